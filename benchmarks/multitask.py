"""Multi-task RL in cross-view worlds: success before RL (the behaviour-cloned planner) and after, in training worlds
and in unseen ones, per interaction, for both goal encodings; and env steps/s with 1, 2 and 4 actor workers.

    python benchmarks/multitask.py [--seeds 0 1 2] [--goals crossview id] [--episodes 300] [--actors 1 2 4]
                                   [--skip-learning] [--skip-throughput] [key.sub=value ...]
    python benchmarks/multitask.py --bc-reference [--bc-episodes 3000] [--bc-steps 1500]   # imitation alone

Learning: each (goal, seed) runs ``rollflow train configs/sim/crossview.yaml seed=S sim.env_kwargs.goal=G`` from the
command line, as a user would (Ray, its defaults; ``key=value`` overrides are passed on). The run saves the cloned
policy (``model/policy_bc.pt``) and the final one (``model/policy.pt``); each is then evaluated here on
``--episodes`` held-out tasks of each split (environment seeds from ``sim.eval_seed`` on: no training environment
drew them), sampled from the policy (``sampled``, what RL optimises) and greedy (the most likely action; a
memoryless policy can loop in a partially observed world). RL seconds (evaluations excluded) and BC seconds come
from the run's summary.

Throughput: the same config without behaviour cloning, ``--throughput-steps`` RL steps with each number of actor
workers (two environments' batches each per train step, as configured): env steps per second of training.

Reference (``--bc-reference``): behaviour cloning alone on many more demonstrations, evaluated the same way: how
far imitation gets without RL.

Prints tables and writes ``benchmarks/results/multitask_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from rich.console import Console
from rich.table import Table

from rollflow.config import Config
from rollflow.envs.simulator import env_spec
from rollflow.envs.worlds import INTERACTIONS
from rollflow.recipes.sim import build_policy, evaluate
from rollflow.runtime.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sim" / "crossview.yaml"
SPLITS = ("train", "unseen")
MODES = ("sampled", "greedy")


def rollflow(args: list[str], cwd: Path) -> None:
    cmd = [sys.executable, "-m", "rollflow.cli", "train", str(CONFIG), "progress=false", *args]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def success_table(path: Path, episodes: int, untrained: bool = False) -> dict[str, dict[str, dict[str, float]]]:
    """{split: {mode: {"all": success, <interaction>: success}}} of the saved policy at ``path`` (``untrained``: of
    the policy its run started from, before any training)."""
    saved = torch.load(path, weights_only=False)
    config = Config.model_validate(saved["config"])
    sim = config.sim
    spec = env_spec(sim.env, sim.env_kwargs, sim.frame_stack)
    weights = SimpleNamespace(tensors=build_policy(sim, spec, config.seed).state_dict() if untrained
                              else saved["state_dict"])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for split in SPLITS:
        for mode in MODES:
            sim.eval_episodes, sim.eval_greedy = episodes, mode == "greedy"
            m = evaluate(config, spec, weights, {**sim.env_kwargs, "split": split, "curriculum": False})
            out.setdefault(split, {})[mode] = {"all": m["eval/success"],
                                               **{i: m.get(f"eval/success/{i}") for i in INTERACTIONS}}
    return out


def learning(args: argparse.Namespace, tmp: Path) -> list[dict]:
    runs = []
    for goal in args.goals:
        for seed in args.seeds:
            run_dir = tmp / f"{goal}_{seed}"
            started = time.perf_counter()
            rollflow([f"seed={seed}", f"sim.env_kwargs.goal={goal}", f"run_dir={run_dir}", *args.overrides], tmp)
            wall = time.perf_counter() - started
            summary = json.loads((run_dir / "summary.json").read_text())
            run = {"goal": goal, "seed": seed, "wall_s": wall, "bc_seconds": summary["bc_seconds"],
                   "rl_seconds": summary["train_seconds"], "env_steps": summary["env_steps"],
                   "env_steps_per_second": summary["env_steps_per_second"],
                   "before_rl": success_table(run_dir / "model" / "policy_bc.pt", args.episodes),
                   "after_rl": success_table(run_dir / "model" / "policy.pt", args.episodes),
                   "curve": [{k: v for k, v in r.items() if k in ("step", "eval/success", "eval/train/success")}
                             for r in read_metrics(run_dir / "metrics.jsonl") if "eval/success" in r]}
            runs.append(run)
            print(json.dumps({k: run[k] for k in ("goal", "seed", "wall_s", "rl_seconds")}), file=sys.stderr,
                  flush=True)
    return runs


def bc_reference(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """Behaviour cloning alone on many more demonstrations (``--bc-episodes``, ``--bc-steps``): what imitation reaches
    without RL. The run stops after one RL step; only its cloned policy is evaluated."""
    runs = []
    for goal in args.goals:
        for seed in args.seeds:
            run_dir = tmp / f"bc_{goal}_{seed}"
            rollflow([f"seed={seed}", f"sim.env_kwargs.goal={goal}", f"run_dir={run_dir}", "train.steps=1",
                      f"sim.bc_episodes={args.bc_episodes}", f"sim.bc_steps={args.bc_steps}", "eval.every=0",
                      "sim.eval_episodes=8", "sim.eval_sets={}", *args.overrides], tmp)
            summary = json.loads((run_dir / "summary.json").read_text())
            runs.append({"goal": goal, "seed": seed, "bc_episodes": args.bc_episodes, "bc_steps": args.bc_steps,
                         "bc_seconds": summary["bc_seconds"],
                         "bc_only": success_table(run_dir / "model" / "policy_bc.pt", args.episodes),
                         "untrained": success_table(run_dir / "model" / "policy_bc.pt", args.episodes, untrained=True)})
            print(json.dumps({k: runs[-1][k] for k in ("goal", "seed", "bc_seconds")}), file=sys.stderr, flush=True)
    return runs


def throughput(args: argparse.Namespace, tmp: Path) -> list[dict]:
    rows = []
    for n in args.actors:
        run_dir = tmp / f"throughput_{n}"
        rollflow([f"run_dir={run_dir}", f"runtime.rollout.workers={n}", "sim.bc_steps=0", "sim.kl_coef=0",
                  f"train.steps={args.throughput_steps}", "eval.every=0", "sim.eval_episodes=8", "sim.eval_sets={}",
                  "checkpoint.every=0", *args.overrides], tmp)
        s = json.loads((run_dir / "summary.json").read_text())
        rows.append({"actors": n, "env_steps": s["env_steps"], "train_seconds": s["train_seconds"],
                     "env_steps_per_second": s["env_steps_per_second"]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def report(runs: list[dict], rows: list[dict], console: Console) -> dict:
    summary: dict = {}
    for mode in MODES:
        table = Table(title=f"success, {mode} actions: before RL (BC) → after RL, per seed; mean over seeds")
        for col in ("goal", "split", "seeds", "mean BC → RL", "× BC", "+ points", *INTERACTIONS):
            table.add_column(col, justify="right")
        for goal in dict.fromkeys(r["goal"] for r in runs):
            mine = [r for r in runs if r["goal"] == goal]
            for split in SPLITS:
                bc = [r["before_rl"][split][mode]["all"] for r in mine]
                rl = [r["after_rl"][split][mode]["all"] for r in mine]
                per = {i: (mean([r["before_rl"][split][mode][i] or 0 for r in mine]),
                           mean([r["after_rl"][split][mode][i] or 0 for r in mine])) for i in INTERACTIONS}
                summary[f"{goal}/{split}/{mode}"] = {"bc": bc, "rl": rl, "bc_mean": mean(bc), "rl_mean": mean(rl),
                                                      "per_interaction": per}
                ratio = mean(rl) / mean(bc) if mean(bc) else float("inf")
                table.add_row(goal, split, "  ".join(f"{b:.2f}→{a:.2f}" for b, a in zip(bc, rl)),
                              f"{mean(bc):.3f} → {mean(rl):.3f}", f"{ratio:.2f}", f"{100 * (mean(rl) - mean(bc)):+.1f}",
                              *(f"{b:.2f}→{a:.2f}" for b, a in per.values()))
        console.print(table)
    if runs:
        console.print("RL seconds per run: " + ", ".join(f"{r['goal']}/{r['seed']} {r['rl_seconds']:.0f}" for r in runs))
    if rows:
        table = Table(title="env steps/s of training with N actor workers (Ray)")
        for col in ("actors", "env steps", "seconds", "env steps/s", "× 1 actor"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(str(r["actors"]), str(r["env_steps"]), f"{r['train_seconds']:.1f}",
                          f"{r['env_steps_per_second']:.0f}",
                          f"{r['env_steps_per_second'] / rows[0]['env_steps_per_second']:.2f}")
        console.print(table)
    return summary


def report_bc(runs: list[dict], console: Console) -> None:
    table = Table(title="behaviour cloning alone (no RL), and the untrained policy: success per seed")
    for col in ("goal", "policy", "split", *MODES):
        table.add_column(col, justify="right")
    for goal in dict.fromkeys(r["goal"] for r in runs):
        mine = [r for r in runs if r["goal"] == goal]
        for which, label in (("untrained", "untrained"), ("bc_only", f"BC, {mine[0]['bc_episodes']} episodes")):
            for split in SPLITS:
                table.add_row(goal, label, split,
                              *("  ".join(f"{r[which][split][mode]['all']:.2f}" for r in mine) for mode in MODES))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--goals", nargs="+", default=["crossview", "id"], choices=["crossview", "id"])
    parser.add_argument("--episodes", type=int, default=300)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--throughput-steps", type=int, default=20)
    parser.add_argument("--skip-learning", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--bc-reference", action="store_true",
                        help="instead: behaviour cloning alone on --bc-episodes demonstrations, --bc-steps updates")
    parser.add_argument("--bc-episodes", type=int, default=3000)
    parser.add_argument("--bc-steps", type=int, default=1500)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/multitask_<date>.json)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(2)
    console = Console(width=180)
    with tempfile.TemporaryDirectory() as tmp:
        if args.bc_reference:
            runs, rows, summary = bc_reference(args, Path(tmp)), [], {}
            report_bc(runs, console)
        else:
            runs = [] if args.skip_learning else learning(args, Path(tmp))
            rows = [] if args.skip_throughput else throughput(args, Path(tmp))
            summary = report(runs, rows, console)
    out = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "results" / f"multitask_{datetime.date.today().isoformat()}.json")
    out.write_text(json.dumps({"machine": {"cores": os.cpu_count(), "python": platform.python_version()},
                               "args": vars(args), "summary": summary, "runs": runs, "throughput": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
