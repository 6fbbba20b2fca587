"""Fault injection on the default backend (Ray, started by each run on this machine), as an operator would do it:
workers found by their process titles (``ray::RolloutWorker`` ...) and killed with SIGKILL mid-run, a worker that
hangs, the whole run killed and resumed. After each, the run has done every step once and its ledger is clean."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_resume import start, wait_for_step

from rollflow.runtime.ledger import check
from rollflow.runtime.tracking import read_metrics

pytestmark = pytest.mark.slow

SMALL = ["sft.steps=10", "rollout.groups_per_step=4", "rollout.group_size=4", "eval.every=5", "progress=false",
         "model.hidden_size=32", "model.layers=1", "model.heads=2", "model.intermediate_size=64",
         "runtime.num_cpus=2"]
SLOW_REWARDS = ["reward_latency.median=0.02", "reward_latency.max=0.1"]  # steps long enough to aim a kill at

# Hangs the first time it scores in a reward worker's process (never in the driver, which checks the reward and
# scores evaluations), then scores normally: a flag file says it already hung.
HANGS_ONCE = """
import os, time

def score(problem, response):
    flag = os.environ["HANG_FLAG"]
    if "RewardWorker" in open("/proc/self/cmdline").read() and not os.path.exists(flag):
        open(flag, "w").close()
        time.sleep(3600)
    return float(response.strip() == problem.answer.strip())
"""


def descends_from(pid, root):
    """Whether process ``pid`` is ``root`` or one of its descendants (read from /proc; False once it is gone)."""
    while pid > 1:
        if pid == root:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the parent's pid
        except (OSError, ValueError, IndexError):
            return False
    return False


def kill_role(proc, title):
    """SIGKILL the worker of the run ``proc`` whose process title is ``ray::<title>`` (one of each role per run; its
    Ray is the run's own, so its workers descend from it: another Ray on the machine is left alone)."""
    found = subprocess.run(["pgrep", "-f", f"ray::{title}"], capture_output=True, text=True).stdout.split()
    pids = [int(p) for p in found if descends_from(int(p), proc.pid)]
    assert len(pids) == 1, f"expected one process titled ray::{title} under the run, found {pids} (all: {found})"
    os.kill(pids[0], signal.SIGKILL)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return " ".join((out + err).split())  # notes go to stdout, the restart to stderr; rich may wrap lines


def assert_whole(run_dir, steps, samples_per_step=16):
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] > 0] == list(range(1, steps + 1))
    report = check(run_dir / "ledger.jsonl")
    assert report.clean, report.summary()
    assert report.counts["trained"] == steps * samples_per_step and not report.unaccounted and not report.trained_twice
    return report


def test_killed_rollout_reward_and_trainer_workers_are_replaced_and_nothing_is_lost(tmp_path):
    run_dir = tmp_path / "run"
    proc = start([*SMALL, *SLOW_REWARDS, "task.eval_size=16", "train.steps=24", "checkpoint.every=3",
                  f"run_dir={run_dir}"], tmp_path)
    wait_for_step(proc, run_dir / "metrics.jsonl", 3, timeout=240)
    kill_role(proc, "RolloutWorker")
    wait_for_step(proc, run_dir / "metrics.jsonl", 9, timeout=240)
    kill_role(proc, "RewardWorker")
    wait_for_step(proc, run_dir / "metrics.jsonl", 14, timeout=240)
    kill_role(proc, "TrainerWorker")
    err = finish(proc)

    assert "fault: rollout/0 lost" in err and "fault: rollout/0 is back" in err
    assert "fault: reward/0 lost" in err and "fault: reward/0 is back" in err
    assert re.search(r"(the trainer|trainer/0) was lost[^:]*: restarting from step_\d+ \(restart 1 of 3\)", err), err[-2000:]
    report = assert_whole(run_dir, 24)
    assert report.counts["readmitted"] > 0  # the rows in flight on the lost workers, produced again
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["restarts"] == 1 and summary["resumed_from_step"] >= 12
    assert summary["faults"]["worker_lost"] >= 2  # counted across the restart (the checkpoint keeps the counts)


def test_a_hung_reward_worker_is_killed_and_its_samples_scored_again(tmp_path):
    (tmp_path / "hangs.py").write_text(HANGS_ONCE)
    (tmp_path / "data.jsonl").write_text("".join(f'{{"prompt": "{i}+{i}=", "answer": "{2 * i}"}}\n' for i in range(40)))
    run_dir = tmp_path / "run"
    proc = start([*SMALL, "task.name=file", "task.path=data.jsonl", "task.reward_fn=hangs.py:score",
                  "runtime.reward.timeout=null", "runtime.call_timeout=4", "train.steps=4", f"run_dir={run_dir}"],
                 tmp_path, HANG_FLAG=str(tmp_path / "hung"))
    err = finish(proc)
    assert (tmp_path / "hung").exists()  # it did hang
    assert "reward/0: a call ran past runtime.call_timeout=4 s; killed" in err and "fault: reward/0 is back" in err
    report = assert_whole(run_dir, 4)
    assert report.counts["hung"] > 0
    assert json.loads((run_dir / "summary.json").read_text())["faults"]["hung_killed"] == 1


def test_a_run_killed_whole_resumes_on_ray_to_its_step_count_with_a_clean_ledger(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMALL, *SLOW_REWARDS, "task.eval_size=16", "train.steps=12", "checkpoint.every=2", f"run_dir={run_dir}"]
    proc = start(args, tmp_path)
    wait_for_step(proc, run_dir / "metrics.jsonl", 5, timeout=240)
    proc.kill()  # SIGKILL of the driver, as `kill -9` would
    proc.communicate(timeout=60)
    resumed = start(["--resume", str(run_dir)], tmp_path)
    finish(resumed)
    report = assert_whole(run_dir, 12)
    assert report.resumes == 1
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_step"] >= 4


def test_a_trainer_killed_during_sft_continues_from_its_sft_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = [*SMALL, "sft.steps=60", "sft.batch_size=256", "checkpoint.sft_every=20", "task.eval_size=16",
            "train.steps=3", f"run_dir={run_dir}"]
    proc = start(args, tmp_path)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "sft_000020").exists():
        assert time.time() < deadline and proc.poll() is None, "no SFT checkpoint at step 20"
        time.sleep(0.05)
    kill_role(proc, "TrainerWorker")
    err = finish(proc)
    # Lost in an SFT step, or (if the kill lands while it writes a checkpoint) in a driver call to it.
    assert re.search(r"(trainer was lost during SFT step \d+|trainer/0 was lost)[^:]*: restarting from sft_\d+ "
                     r"\(restart 1 of 3\)", err), err[-2000:]
    assert "resumed from" in err and "(SFT step " in err
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == [-10, 0, 1, 2, 3]  # SFT's log lines and each RL step, once
    assert_whole(run_dir, 3)
