"""Faults a run meets and what it keeps: non-finite losses are skipped and, in a row, stop the run with a
checkpoint; a reward that raises mid-run stops it with the finished steps checkpointed; both resume."""

import pytest

from rollflow import load_config, train
from rollflow.cli import main
from rollflow.recipes.grpo import NonFiniteLoss
from rollflow.runtime.backend import WorkerGone
from rollflow.runtime.checkpoint import Checkpoints, read_meta
from rollflow.runtime.ledger import check
from rollflow.runtime.roles import TrainerWorker
from rollflow.runtime.tracking import read_metrics

SMALL = ["sft.steps=0", "rollout.groups_per_step=4", "rollout.group_size=4", "eval.every=0", "runtime.backend=inline", "progress=false", "model.hidden_size=32", "model.layers=1", "model.heads=2",
         "model.intermediate_size=64", "runtime.torch_threads=1"]

HUGE = """
def score(problem, response):  # finite, but a loss summed over them is not
    return 3e38 if len(response) % 2 else -3e38
"""

FAILS_LATER = """
import os
calls = 0

def score(problem, response):
    global calls
    calls += 1
    if calls > int(os.environ["FAIL_AFTER"]):
        raise ValueError("the grader's database is gone")
    return float(response.strip() == problem.answer.strip())
"""


def test_non_finite_losses_are_skipped_then_stop_the_run_with_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "huge.py").write_text(HUGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from huge import score

    # The built-in task's verifier replaced by the user's: through the Python API (the CLI takes it for file tasks).
    config = load_config(overrides=[*SMALL, "task.eval_size=16", "train.steps=10", "algo.scale_by_std=false",
                                    "run_dir=run", "train.max_nonfinite_steps=2"])
    with pytest.raises(NonFiniteLoss, match=r"2 steps in a row \(the last: step 2\) had no finite"):
        train(config, reward_fn=score)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["train/nonfinite_updates"] for r in rows] == [2.0, 2.0]  # every update of both steps skipped
    meta = read_meta(Checkpoints(tmp_path / "run" / "checkpoints").latest())
    assert meta["step"] == 2 and meta["why"] == "non-finite loss"


def test_a_reward_that_raises_mid_run_stops_it_with_the_finished_steps_checkpointed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grader.py").write_text(FAILS_LATER)
    rows = "".join(f'{{"prompt": "{i}+{i}=", "answer": "{2 * i}"}}\n' for i in range(40))
    (tmp_path / "data.jsonl").write_text(rows)
    task = ["task.name=file", "task.path=data.jsonl", "task.reward_fn=grader.py:score", "checkpoint.every=0"]
    monkeypatch.setenv("FAIL_AFTER", str(1 + 4 + 3 * 16))  # the startup check, the 4 held-out problems, 3 steps
    assert main(["train", *SMALL, *task, "train.steps=6", "run_dir=run"]) == 2
    err = capsys.readouterr().err
    assert "reward fn 'grader.py:score' raised ValueError" in err and "the grader's database is gone" in err
    assert "checkpoint of step 3 written to run/checkpoints/step_000003" in err and "--resume run" in err
    monkeypatch.setenv("FAIL_AFTER", "1000000")  # the grader is back
    assert main(["train", "--resume", "run"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == list(range(1, 7))
    assert check(tmp_path / "run" / "ledger.jsonl").clean


def crash_once(monkeypatch, cls, method, when):
    """Make ``cls.method`` raise ``WorkerGone`` (a worker that died for good) the first time ``when(calls)`` holds."""
    original, calls = getattr(cls, method), []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if when(len(calls)) and not hasattr(flaky, "done"):
            flaky.done = True
            raise WorkerGone("trainer/0 died (injected)")
        return original(self, *args, **kwargs)

    flaky.__rollflow_dispatch__ = getattr(original, "__rollflow_dispatch__", None)
    monkeypatch.setattr(cls, method, flaky)


def test_a_trainer_lost_mid_run_goes_back_to_its_checkpoint_and_ends_as_if_it_had_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*SMALL, "task.eval_size=16", "sft.steps=10", "train.steps=6", "checkpoint.every=2"]
    straight = train(load_config(overrides=[*args, "run_dir=straight"]))
    crash_once(monkeypatch, TrainerWorker, "train", lambda n: n == 5)  # in step 5: back to the checkpoint of step 4
    crashed = train(load_config(overrides=[*args, "run_dir=crashed"]))
    assert crashed.summary["restarts"] == 1 and crashed.summary["resumed_from_step"] == 4
    assert "trainer/0 died (injected): restarting from step_000004 (restart 1 of 3)" in (tmp_path / "crashed" / "notes.log").read_text()
    learned = [{k: v for k, v in h.items() if k.startswith(("reward/", "train/", "eval/", "version"))} for h in straight.history]
    assert [{k: v for k, v in h.items() if k.startswith(("reward/", "train/", "eval/", "version"))} for h in crashed.history] == learned
    assert check(tmp_path / "crashed" / "ledger.jsonl").clean


def test_a_trainer_lost_before_the_first_checkpoint_starts_the_run_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    crash_once(monkeypatch, TrainerWorker, "publish", lambda n: n == 1)  # the first publish, before the initial eval
    result = train(load_config(overrides=[*SMALL, "task.eval_size=16", "train.steps=2", "run_dir=run"]))
    assert result.summary["restarts"] == 1 and result.summary["resumed_from_step"] is None
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert "restarting from the start (restart 1 of 3)" in (tmp_path / "run" / "notes.log").read_text()


def test_a_trainer_that_keeps_dying_stops_the_run_after_max_restarts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original, calls = TrainerWorker.train, []

    def dies_from_step_3(self, groups):
        calls.append(1)
        if len(calls) >= 3:
            raise WorkerGone("trainer/0 died (injected)")
        return original(self, groups)

    dies_from_step_3.__rollflow_dispatch__ = original.__rollflow_dispatch__
    monkeypatch.setattr(TrainerWorker, "train", dies_from_step_3)
    with pytest.raises(RuntimeError, match=r"trainer/0 died \(injected\); not restarting: runtime.max_restarts=2 "
                                           r"restarts used"):
        train(load_config(overrides=[*SMALL, "task.eval_size=16", "train.steps=4", "checkpoint.every=1",
                                     "runtime.max_restarts=2", "run_dir=run"]))
    notes = (tmp_path / "run" / "notes.log").read_text()
    assert notes.count("restarting from step_000002") == 2  # both restarts went back to the last good step
    assert check(tmp_path / "run" / "ledger.jsonl").trained_twice == []
