"""Checkpoints and ``--resume`` as a user meets them: the CLI in a working directory, a run stopped by SIGINT or
killed with SIGKILL, then resumed. On the inline backend a resumed run equals the run that was never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rollflow.cli import main
from rollflow.runtime.checkpoint import Checkpoints
from rollflow.runtime.ledger import check
from rollflow.runtime.tracking import read_metrics

TINY = ["sft.steps=10", "rollout.groups_per_step=4", "rollout.group_size=4", "eval.every=2", "task.eval_size=16",
        "runtime.backend=inline", "progress=false", "model.hidden_size=32", "model.layers=1", "model.heads=2",
        "model.intermediate_size=64", "runtime.torch_threads=1"]
# What a step learned and saw (not how long it took): equal between a resumed and an uninterrupted run.
LEARNED = ("reward/", "train/", "eval/", "response/", "status/", "version", "store/")


def learned(run_dir):
    rows = read_metrics(run_dir / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k == "step" or k.startswith(LEARNED)} for r in rows]


def start(args, cwd, **env):
    """``rollflow train ARGS`` in a process of its own, in ``cwd``, with ``env`` added to the environment."""
    return subprocess.Popen([sys.executable, "-m", "rollflow.cli", "train", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **env})


def wait_for_step(proc, metrics, step, timeout=120):
    """Block until ``metrics`` has a line for ``step`` (the run is past it)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and f'"step": {step},' in metrics.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_run_stopped_by_a_signal_and_resumed_equals_the_uninterrupted_run(tmp_path, monkeypatch, sig):
    monkeypatch.chdir(tmp_path)
    args = [*TINY, "train.steps=8", "checkpoint.every=0"]
    proc = start([*args, "run_dir=stopped"], tmp_path)
    wait_for_step(proc, tmp_path / "stopped" / "metrics.jsonl", 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert f"stopped by {sig.name} after step" in err and "rollflow train --resume stopped" in err
    stopped_at = max(r["step"] for r in read_metrics(tmp_path / "stopped" / "metrics.jsonl"))
    assert 3 <= stopped_at < 8 and Checkpoints(tmp_path / "stopped" / "checkpoints").latest().name == f"step_{stopped_at:06d}"

    assert main(["train", "--resume", "stopped"]) == 0
    assert main(["train", *args, "run_dir=straight"]) == 0
    resumed, straight = learned(tmp_path / "stopped"), learned(tmp_path / "straight")
    assert [r["step"] for r in resumed] == [0, *range(1, 9)]  # SFT's last step, then each RL step once
    assert resumed == straight
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["resumed_from_step"] == stopped_at and summary["steps"] == 8
    assert summary["accuracy_final"] == json.loads((tmp_path / "straight" / "summary.json").read_text())["accuracy_final"]
    report = check(tmp_path / "stopped" / "ledger.jsonl")
    assert report.clean and report.resumes == 1 and report.counts["trained"] == 8 * 16


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_from_its_last_checkpoint_without_duplicates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*TINY, "train.steps=8", "checkpoint.every=2"]
    proc = start([*args, "run_dir=killed"], tmp_path)
    wait_for_step(proc, tmp_path / "killed" / "metrics.jsonl", 5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    last = Checkpoints(tmp_path / "killed" / "checkpoints").latest()
    assert last is not None and int(last.name.split("_")[1]) >= 4

    assert main(["train", "--resume", "killed"]) == 0
    assert main(["train", *args, "run_dir=straight"]) == 0
    resumed = learned(tmp_path / "killed")
    assert [r["step"] for r in resumed if r["step"] > 0] == list(range(1, 9))  # the steps after the checkpoint, once
    assert resumed == learned(tmp_path / "straight")
    report = check(tmp_path / "killed" / "ledger.jsonl")
    assert report.clean and report.resumes == 1
    assert report.counts["trained"] == 8 * 16 and not report.unaccounted
    events = EventAccumulator(str(tmp_path / "killed" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward/mean")] == list(range(1, 9))  # steps redone after the checkpoint: once


def test_resume_extends_a_finished_run_and_refuses_to_repeat_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "sft.steps=0", "train.steps=2", "run_dir=run"]) == 0
    assert main(["train", "--resume", "run"]) == 2
    assert "has already done 2 of train.steps=2 steps; resume with a larger train.steps" in capsys.readouterr().err
    assert main(["train", "--resume", "run", "train.steps=3"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    assert check(tmp_path / "run" / "ledger.jsonl").clean


def test_a_new_run_refuses_a_run_directory_unless_told(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["train", *TINY, "sft.steps=0", "train.steps=1", "run_dir=run"]
    assert main(args) == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "run_dir 'run' already holds a run" in err and "--resume run" in err and "--overwrite" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before  # untouched
    assert main([*args, "--overwrite"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]


def test_resume_names_the_config_keys_that_may_not_change(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY, "sft.steps=0", "train.steps=1", "run_dir=run"]) == 0
    assert main(["train", "--resume", "run", "train.steps=2", "train.lr=0.1", "seed=3"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume 'run' with a different config" in err
    assert "seed: 0 in the run, 3 now" in err and "train.lr: 0.0001 in the run, 0.1 now" in err


def test_resume_of_what_is_not_a_run_or_has_no_checkpoint_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", "nowhere"]) == 2
    assert "cannot resume 'nowhere': no config.yaml there" in capsys.readouterr().err
    assert main(["train", "--resume", "x", "config.yaml"]) == 2
    assert "give only key=value overrides" in capsys.readouterr().err
    assert main(["train", *TINY, "sft.steps=0", "train.steps=1", "run_dir=run"]) == 0
    for path in (tmp_path / "run" / "checkpoints").iterdir():
        (path / "meta.json").unlink()  # as if every checkpoint had been cut off mid-write
    assert main(["train", "--resume", "run", "train.steps=2"]) == 2
    assert "it has no complete checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_stopped_during_sft_resumes_there_and_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*TINY, "sft.steps=60", "checkpoint.sft_every=20", "sft.batch_size=16", "train.steps=4", "checkpoint.every=0"]
    proc = start([*args, "run_dir=stopped"], tmp_path)
    deadline = time.time() + 120
    while not (tmp_path / "stopped" / "checkpoints" / "sft_000020").exists():  # 20 SFT steps done
        assert time.time() < deadline and proc.poll() is None, "no SFT checkpoint at step 20"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "during SFT (step " in err and "--resume stopped" in err, err
    assert main(["train", "--resume", "stopped"]) == 0
    assert main(["train", *args, "run_dir=straight"]) == 0
    resumed, straight = learned(tmp_path / "stopped"), learned(tmp_path / "straight")
    sft_loss = [r["sft/loss"] for r in read_metrics(tmp_path / "stopped" / "metrics.jsonl") if "sft/loss" in r]
    assert sft_loss == [r["sft/loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "sft/loss" in r]
    assert [r["step"] for r in resumed] == [-10, 0, 1, 2, 3, 4] and resumed == straight
    assert check(tmp_path / "stopped" / "ledger.jsonl").clean
