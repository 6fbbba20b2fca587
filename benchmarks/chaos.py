"""Chaos: the default job on Ray while workers are killed with SIGKILL every few seconds, and once the whole run,
next to a clean run of the same config.

    python benchmarks/chaos.py [--every 8] [--seed 0] [--whole-at 0.6] [--tag NAME] [key.sub=value ...]

Workers are found as an operator would find them, by process title (``ray::RolloutWorker``, ``ray::RewardWorker``,
``ray::TrainerWorker``). Rollout and reward workers are killed at any time; the trainer once the run has a
checkpoint (the first is written before SFT), at most ``runtime.max_restarts`` − 1 times per attempt. When the RL steps
reach ``--whole-at`` of the total, the driver itself is killed and the run continues with ``--resume``.

Prints a table and writes benchmarks/results/chaos_<date>[_NAME].json: faults injected by kind, restarts, samples
lost and samples trained twice (from ``rollflow ledger check``; both must be 0), steps completed, wall time, and the
final held-out accuracy of the chaos run and the clean run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rollflow.config import load_config
from rollflow.runtime.checkpoint import Checkpoints
from rollflow.runtime.ledger import check
from rollflow.runtime.tracking import read_metrics

TITLES = {"rollout": "RolloutWorker", "reward": "RewardWorker", "trainer": "TrainerWorker"}


def rollflow_train(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "a") as f:
        return subprocess.Popen([sys.executable, "-m", "rollflow.cli", "train", *args], stdout=f, stderr=subprocess.STDOUT)


def pids(title: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"ray::{title}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def rl_steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return max((r["step"] for r in read_metrics(path)), default=-1) if path.exists() else -1


def clean_run(overrides: list[str], run_dir: Path) -> tuple[dict, float]:
    started = time.perf_counter()
    proc = rollflow_train([*overrides, f"run_dir={run_dir}", "--overwrite"], run_dir.with_suffix(".log"))
    if proc.wait() != 0:
        sys.exit(f"the clean run failed: see {run_dir.with_suffix('.log')}")
    return json.loads((run_dir / "summary.json").read_text()), time.perf_counter() - started


def chaos_run(overrides: list[str], run_dir: Path, every: float, whole_at: float, steps: int, max_restarts: int,
              rng: random.Random) -> tuple[Counter, float]:
    """Run with faults injected until the run finishes; returns the faults injected and the wall time."""
    log, injected = run_dir.with_suffix(".log"), Counter()
    started = time.perf_counter()
    proc = rollflow_train([*overrides, f"run_dir={run_dir}", "--overwrite"], log)
    whole_done, trainer_kills, next_kill = False, 0, time.time() + every
    while True:
        code = proc.poll()
        if code is not None:
            if code != 0:
                sys.exit(f"the chaos run failed (exit {code}): see {log}")
            break
        time.sleep(0.2)
        done = rl_steps_done(run_dir)
        if not whole_done and done >= whole_at * steps:
            proc.send_signal(signal.SIGKILL)  # the whole run, as `kill -9` of the driver
            proc.wait()
            injected["whole_run"] += 1
            whole_done, trainer_kills = True, 0
            proc = rollflow_train(["--resume", str(run_dir)], log)
            next_kill = time.time() + every
            continue
        if time.time() < next_kill:
            continue
        next_kill = time.time() + every * rng.uniform(0.5, 1.5)
        roles = ["rollout", "reward"]
        if Checkpoints(run_dir / "checkpoints").latest() is not None and trainer_kills < max_restarts - 1:
            roles.append("trainer")
        role = rng.choice(roles)
        found = pids(TITLES[role])
        if len(found) != 1:
            continue  # starting up, or being rebuilt
        try:
            os.kill(found[0], signal.SIGKILL)
        except ProcessLookupError:
            continue
        injected[role] += 1
        trainer_kills += role == "trainer"
    return injected, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=float, default=8.0, help="mean seconds between two worker kills")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed and the chaos schedule's")
    parser.add_argument("--whole-at", type=float, default=0.6, help="kill the whole run at this share of the RL steps")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--root", type=Path, default=Path("runs/bench_chaos"))
    parser.add_argument("--tag", default="", help="suffix of the result file's name")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    overrides = [*args.overrides, f"seed={args.seed}", "progress=false", "runtime.backend=ray"]
    config = load_config(None, overrides)
    args.root.mkdir(parents=True, exist_ok=True)
    clean, clean_wall = clean_run(overrides, args.root / "clean")
    injected, chaos_wall = chaos_run(overrides, args.root / "chaos", args.every, args.whole_at, config.train.steps,
                                     config.runtime.max_restarts, random.Random(args.seed))

    chaos_dir = args.root / "chaos"
    summary = json.loads((chaos_dir / "summary.json").read_text())
    report = check(chaos_dir / "ledger.jsonl")
    notes = (chaos_dir / "notes.log").read_text()
    steps = sorted(r["step"] for r in read_metrics(chaos_dir / "metrics.jsonl") if r["step"] > 0)
    result = {
        "overrides": args.overrides, "seed": args.seed, "every_s": args.every, "machine": platform.platform(),
        "faults_injected": dict(injected),
        "faults_seen": {"worker_lost": notes.count(" lost ("), "worker_back": notes.count(" is back"),
                        "trainer_restarts": notes.count("restarting from"), "resumed": notes.count("resumed from")},
        "restarts": notes.count("restarting from") + injected["whole_run"],
        "samples_lost": len(report.unaccounted),
        "samples_trained_twice": len(report.trained_twice),
        "trained_unadmitted": len(report.trained_unknown),
        "ledger": report.summary(),
        "steps_completed": len(steps), "steps_each_once": steps == list(range(1, config.train.steps + 1)),
        "steps": config.train.steps,
        "wall_seconds": {"clean": clean_wall, "chaos": chaos_wall},
        "accuracy_final": {"clean": clean["accuracy_final"], "chaos": summary["accuracy_final"]},
        "accuracy_after_sft": {"clean": clean["accuracy_after_sft"], "chaos": summary["accuracy_after_sft"]},
    }

    table = Table(title=f"chaos (seed {args.seed}, a worker killed every ~{args.every:g} s, the whole run once)")
    table.add_column("")
    table.add_column("clean", justify="right")
    table.add_column("chaos", justify="right")
    table.add_row("faults injected", "0", ", ".join(f"{k} {v}" for k, v in sorted(injected.items())))
    table.add_row("restarts (trainer + whole run)", "0", str(result["restarts"]))
    table.add_row("samples lost", "0", str(result["samples_lost"]))
    table.add_row("samples trained twice", "0", str(result["samples_trained_twice"]))
    table.add_row("steps completed", str(config.train.steps), f"{len(steps)} (each once: {result['steps_each_once']})")
    table.add_row("wall seconds", f"{clean_wall:.0f}", f"{chaos_wall:.0f}")
    table.add_row("final accuracy", f"{clean['accuracy_final']:.3f}", f"{summary['accuracy_final']:.3f}")
    Console().print(table)
    print(report.summary())

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"chaos_{datetime.date.today().isoformat()}{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
