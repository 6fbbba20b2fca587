"""The built-in agent tasks as a user runs them: `rollflow train configs/agents/<task>.yaml` on the Ray backend (the
default), from the repository, with a tiny model and a short run. The episodes are multi-turn with the tool
(`guess`), or programs run in the code sandbox with partial credit (`program`); both evaluate by greedy episodes."""

import json
import string
import subprocess
import sys
from pathlib import Path

import pytest

from rollflow.cli import main
from rollflow.engines.models import TinyModelSpec, char_tokenizer, save_pretrained, tiny_model

ROOT = Path(__file__).resolve().parents[2]
ROLLFLOW = Path(sys.executable).with_name("rollflow")
TINY = [
    "model.hidden_size=16", "model.layers=1", "model.heads=2", "model.intermediate_size=32", "sft.steps=2",
    "sft.batch_size=8", "train.steps=2", "rollout.groups_per_step=2", "rollout.group_size=2", "eval.every=0",
    "progress=false", "runtime.torch_threads=1", "sft.torch_threads=1", "runtime.num_cpus=2", "task.eval_size=6",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both tasks at once, each its own `rollflow train` process with its own private Ray. `program` runs from
    another working directory with a frozen model as its instrumenter, a checkpoint given by a relative path."""
    out = tmp_path_factory.mktemp("agents")
    tokenizer = char_tokenizer(string.printable)
    spec = TinyModelSpec(hidden_size=16, layers=1, heads=2, intermediate_size=32, max_positions=2048)
    save_pretrained(tiny_model(spec, tokenizer, seed=0), tokenizer, out / "instrumenter")
    commands = {
        "guess": ([str(ROLLFLOW), "train", "configs/agents/guess.yaml", *TINY, f"run_dir={out / 'guess'}"], ROOT),
        "program": ([str(ROLLFLOW), "train", str(ROOT / "configs/agents/program.yaml"), *TINY, "run_dir=program",
                     "task.instrumenter=instrumenter", "task.instrumenter_max_new_tokens=8"], out),
    }
    procs = {task: subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for task, (command, cwd) in commands.items()}
    logs = {task: p.communicate(timeout=600)[0] for task, p in procs.items()}
    for task, p in procs.items():
        assert p.returncode == 0, logs[task][-3000:]
    return out


def rollouts(run_dir):
    return [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]


def test_guess_episodes_are_multi_turn_on_ray(runs):
    rows = rollouts(runs / "guess")
    assert len(rows) == 2 * 2 * 2
    assert all(set(r["breakdown"]) == {"return", "turns"} and 1 <= r["breakdown"]["turns"] <= 4 for r in rows)
    assert any(r["breakdown"]["turns"] > 1 for r in rows)  # an untrained model's turns are malformed calls: "?"
    for r in rows:  # the whole episode is logged: model turns, and between them the environment's answers
        assert [source for source, _ in r["turns"]] == ["model", "env"] * int(r["breakdown"]["turns"] - 1) + ["model"]
        assert r["turns"][-1][1] == r["response"]
    summary = json.loads((runs / "guess" / "summary.json").read_text())
    assert summary["backend"] == "ray" and summary["steps"] == 2 and "accuracy_final" in summary


def test_program_runs_in_the_sandbox_with_partial_credit_on_ray(runs):
    rows = rollouts(runs / "program")
    assert len(rows) == 2 * 2 * 2
    for r in rows:  # an untrained model's programs do not run: -1 + 0.1 per stage, agent_error
        assert set(r["breakdown"]) >= {"failed", "stages", "task_score", "run_s"}
        assert r["reward"] == pytest.approx(r["breakdown"]["failed"] + r["breakdown"]["stage_credit"]
                                            + r["breakdown"]["task_score"])
        assert r["status"] == ("agent_error" if r["breakdown"]["failed"] else "ok")
        assert r["breakdown"]["run_s"] > 0.0  # it really ran
        assert r["breakdown"]["instrumented_by_model"] == 0.0  # an untrained instrumenter's markers are never kept
    assert any(r["status"] == "agent_error" for r in rows)
    metrics = [json.loads(line) for line in (runs / "program" / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward/instrumented_by_model"] for m in metrics if "reward/instrumented_by_model" in m] == [0.0, 0.0]


def test_an_agent_workflow_for_a_task_without_an_environment_is_refused(tmp_path, capsys):
    code = main(["train", "rollout.workflow=agent", *TINY, f"run_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "rollout.workflow=agent needs a task with an environment (make_env); task 'addition' has none" in err
    assert not (tmp_path / "run").exists()  # refused before the run directory is touched


def test_a_response_budget_shorter_than_the_demonstrations_is_reported():
    from rollflow.config import load_config
    from rollflow.engines.models import char_tokenizer
    from rollflow.recipes.grpo import demonstrations_cut
    from rollflow.tasks import ProgramTask
    from rollflow.workflows import Tokens

    task = ProgramTask(max_len=4)
    tokens = Tokens(char_tokenizer(task.alphabet()))
    short = load_config(overrides=["task.name=program", "rollout.max_new_tokens=28"])
    assert demonstrations_cut(task, tokens, short) == (
        "warning: rollout.max_new_tokens=28 is shorter than the demonstrations' turns (31 tokens with EOS, in 256 "
        "sampled): responses will be cut; raise it to 31")
    assert demonstrations_cut(task, tokens, load_config(overrides=["task.name=program", "rollout.max_new_tokens=31"])) is None
