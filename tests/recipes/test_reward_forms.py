"""Every documented form of reward function, on the Ray backend (the default), run as a user runs it: `module:function`
and `file.py:function` with the `rollflow` command from the directory that holds the file, and a callable passed to
`rollflow.train` from a module this process imports through a path entry of its own. Each reward returns a value no
other reward gives, found again in every rollout. A reward that cannot run stops the run before the model is built;
a worker whose factory raises stops it with its own error."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rollflow
from rollflow.cli import main
from rollflow.recipes import grpo

TINY = [
    "model.hidden_size=16", "model.layers=1", "model.heads=2", "model.intermediate_size=32",
    "sft.steps=0", "train.steps=2", "rollout.groups_per_step=2", "rollout.group_size=2", "eval.every=0",
    "progress=false", "runtime.torch_threads=1", "sft.torch_threads=1", "runtime.num_cpus=2",
]
FILE_TASK = ["task.name=file", "task.path=train.jsonl", "task.eval_path=eval.jsonl"]  # relative: to the cwd
SAMPLES = 2 * 2 * 2  # steps × prompts × samples per prompt
ROLLFLOW = Path(sys.executable).with_name("rollflow")  # the entry point: its directory, not the cwd, leads sys.path


def write_rows(path, numbers):
    path.write_text("".join(json.dumps({"prompt": f"{i}>", "answer": str(i % 3)}) + "\n" for i in numbers))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A user's project directory: data files and reward modules, nothing installed."""
    d = tmp_path_factory.mktemp("project")
    write_rows(d / "train.jsonl", range(40))
    write_rows(d / "eval.jsonl", range(40, 44))
    (d / "my_reward.py").write_text("def score(problem, response):\n    return 0.375\n")
    (d / "my_reward_typo.py").write_text("def score(problem, response):\n    return 1.0\n")
    (d / "import_fails.py").write_text("import no_such_pkg_xyz\n")
    (d / "raises.py").write_text("def score(problem, response):\n    return {}['meta']\n")
    (d / "text.py").write_text("def score(problem, response):\n    return 'yes'\n")
    return d


def rewards(run_dir):
    return [json.loads(line)["reward"] for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cli_runs(workdir):
    """Both spec forms at once, each its own `rollflow train` process with its own private Ray."""
    assert ROLLFLOW.is_file(), f"{ROLLFLOW} is missing; install the package (pip install -e .)"
    env = {**os.environ, "HF_DATASETS_CACHE": str(workdir / "hf_cache")}
    env.pop("PYTHONPATH", None)  # the working directory must be found without it
    procs = {}
    for spec in ("my_reward:score", "my_reward.py:score"):
        name = spec.replace(":", "_")
        with open(workdir / f"{name}.log", "w") as log:  # a file, not a pipe: a full pipe would stall the run
            procs[spec] = subprocess.Popen([str(ROLLFLOW), "train", *TINY, *FILE_TASK, f"task.reward_fn={spec}",
                                            f"run_dir=out_{name}"], cwd=workdir, env=env, stdout=log, stderr=log)
    return {spec: (p.wait(timeout=300), (workdir / f"{spec.replace(':', '_')}.log").read_text()) for spec, p in procs.items()}


@pytest.mark.parametrize("spec", ["my_reward:score", "my_reward.py:score"])
def test_cli_on_ray_scores_with_the_reward_from_the_working_directory(cli_runs, workdir, spec):
    code, output = cli_runs[spec]
    assert code == 0, output[-3000:]
    assert rewards(workdir / f"out_{spec.replace(':', '_')}") == [0.375] * SAMPLES


def test_api_on_ray_takes_a_callable_the_driver_imports_through_its_own_path(tmp_path, monkeypatch):
    side = tmp_path / "side"
    side.mkdir()
    (side / "side_reward_for_ray.py").write_text(
        "import rollflow\n\n"
        "def score(problem, response):\n"
        "    return rollflow.RewardResult(0.625, {'side': 1.0})\n"
    )
    monkeypatch.syspath_prepend(str(side))  # as a script next to the module would have it: not in the worker's path
    from side_reward_for_ray import score

    result = rollflow.train(rollflow.load_config(overrides=[*TINY, f"run_dir={tmp_path / 'run'}"]), reward_fn=score)
    assert result.summary["backend"] == "ray"
    assert rewards(tmp_path / "run") == [0.625] * SAMPLES
    assert all(step["reward/side"] == 1.0 for step in result.history)


# --- an unusable reward stops the run before the model is built --------------------------------------------------

BROKEN = {
    "missing.py:score": r"reward fn 'missing\.py:score': file '.*missing\.py' does not exist",
    "my_reward_typo:scroe": r"reward fn 'my_reward_typo:scroe': module 'my_reward_typo' has no attribute 'scroe'; "
                            r"did you mean 'score'\?",
    "import_fails.py:score": r"reward fn 'import_fails\.py:score': executing '.*import_fails\.py' raised "
                             r"ModuleNotFoundError: No module named 'no_such_pkg_xyz'",
    "raises.py:score": r"reward fn 'raises\.py:score' raised KeyError on sample 0: 'meta' \(checked before training",
    "text.py:score": r"reward fn 'text\.py:score' returned str on sample 0; expected a float",
}


@pytest.mark.parametrize("spec", BROKEN)
def test_unusable_reward_fails_before_the_model_is_built(spec, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading a module spec puts the cwd on it
    monkeypatch.setattr(grpo, "build_model", lambda *a: pytest.fail("the model was built before the reward was checked"))
    run_dir = workdir / f"failed_{spec.replace(':', '_')}"
    assert main(["train", *TINY, *FILE_TASK, "sft.steps=100000", f"task.reward_fn={spec}", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.match(f"rollflow: {BROKEN[spec]}", err.splitlines()[-1]), err  # after `datasets`' progress bars
    assert not (run_dir / "model").exists()


def test_worker_that_cannot_start_stops_the_cli_with_its_own_error(tmp_path, monkeypatch, capsys):
    def no_trainer(*args):
        raise RuntimeError("out of GPU memory")

    monkeypatch.setattr(grpo, "_trainer_worker", no_trainer)
    assert main(["train", *TINY, "runtime.backend=inline", f"run_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.fullmatch(r"rollflow: worker trainer/0 failed to start: RuntimeError: out of GPU memory "
                        r"\(at .*test_reward_forms\.py:\d+, in no_trainer\)", err.splitlines()[-1]), err
