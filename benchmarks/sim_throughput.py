"""Simulator throughput: rollflow's actor workers against a plain single-process vectorised PPO loop.

    python benchmarks/sim_throughput.py [--quick] [--seeds 0 1 2] [--actors 1 2 4] [--cost 0.001]

The baseline is ``reference/ppo.py`` (the single-file PPO the recipe's numerics are tested against): one process,
a ``gymnasium.vector.SyncVectorEnv`` of 8 environments, collect 128 steps → GAE → 4 epochs × 4 minibatches, the
way CleanRL writes it. rollflow runs ``configs/sim/cartpole.yaml`` (the same PPO, network, batch and learning rate)
on the inline backend and on Ray with 1, 2 and 4 actor workers; the 8 environments of a train step are split over
the actors (8/k environments each, k calls per step), so every run learns the same problem at the same batch size.
On the costly environment Ray also runs with one policy worker serving every actor (``ray+policy``:
``sim.inference=policy_workers``).

Two environments:

  cartpole   CartPole-v1, steps of microseconds: per-step overhead dominates. Each run trains to the target return
             (the mean of the last 20 finished episodes ≥ 475) or its step budget; reported: env steps/s over the
             training, seconds to the target, per seed.
  costly     CartPole with ``--cost`` seconds of computation added to every step (``sim.step_cost``: a busy loop, as
             a simulator's physics would be): the environments dominate. A fixed number of train steps; env steps/s.

Speedups are each run's env steps/s over the baseline's, same environment, same seed, measured in this one
invocation (machines differ: compare ratios). Prints a table and writes
``benchmarks/results/sim_throughput_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # reference/ is not a package on the path

from reference.ppo import PPOConfig  # noqa: E402
from reference.ppo import train as reference_train  # noqa: E402
from rollflow.config import load_config  # noqa: E402
from rollflow.envs.simulator import make_env  # noqa: E402
from rollflow.recipes import train  # noqa: E402

CONFIG = ROOT / "configs" / "sim" / "cartpole.yaml"
TARGET = 475.0
ENVS, STEPS = 8, 128  # the baseline's vector; rollflow's train step has the same envs × steps


def baseline(seed: int, cost: float, updates: int, target: bool) -> dict[str, float | None]:
    """The reference loop: env steps/s over its updates, and (``target``) seconds to the target return."""
    torch.set_num_threads(1)
    cfg = PPOConfig(envs=ENVS, steps=STEPS)
    history = reference_train("CartPole-v1", total_steps=updates * ENVS * STEPS, seed=seed, cfg=cfg, log_every=0,
                              make_env=partial(make_env, "CartPole-v1", None, 1, cost))
    seconds, steps, _ = history[-1]
    reached = next((s for s, _, mean in history if mean >= TARGET), None) if target else None
    return {"env_steps_per_s": steps / seconds, "seconds_to_target": reached, "seconds": seconds,
            "final_return": history[-1][2]}


def rollflow_run(seed: int, cost: float, updates: int, backend: str, actors: int, workdir: Path) -> dict[str, float | None]:
    inference = "policy_workers" if backend == "ray+policy" else "actor"
    overrides = [f"seed={seed}", f"run_dir={workdir / f'{backend}_{actors}_{seed}_{cost}'}", "progress=false",
                 f"train.steps={updates}", "eval.every=0", "sim.eval_episodes=1", "checkpoint.every=0",
                 "runtime.trace=false", f"runtime.backend={backend.split('+')[0]}", f"sim.inference={inference}",
                 f"runtime.rollout.workers={actors}",
                 f"sim.envs_per_actor={ENVS // actors}", f"sim.calls_per_step={actors}", f"sim.step_cost={cost}",
                 "runtime.torch_threads=1"]
    summary = train(load_config(CONFIG, overrides)).summary
    return {"env_steps_per_s": summary["env_steps_per_second"], "seconds_to_target": summary["seconds_to_target"],
            "seconds": summary["train_seconds"], "final_return": summary["train_return_recent"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--cost", type=float, default=0.001, help="seconds added to every step of the costly env")
    parser.add_argument("--cartpole-updates", type=int, default=150)
    parser.add_argument("--costly-updates", type=int, default=12)
    parser.add_argument("--only", choices=["cartpole", "costly"], default=None)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.cartpole_updates, args.costly_updates = args.seeds[:1], 60, 6
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    envs = {"cartpole": (0.0, args.cartpole_updates, True), "costly": (args.cost, args.costly_updates, False)}
    if args.only:
        envs = {args.only: envs[args.only]}
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for env, (cost, updates, target) in envs.items():
            seeds = args.seeds if env == "cartpole" else args.seeds[:1]
            for seed in seeds:
                runners = ("inline", "ray") if env == "cartpole" else ("inline", "ray", "ray+policy")
                kinds = [("baseline", 1)] + [(b, k) for b in runners for k in args.actors
                                             if not (env == "costly" and b == "inline" and k > 1)]
                for backend, actors in kinds:
                    started = time.perf_counter()
                    out = (baseline(seed, cost, updates, target) if backend == "baseline"
                           else rollflow_run(seed, cost, updates, backend, actors, Path(tmp)))
                    runs.append({"env": env, "seed": seed, "backend": backend, "actors": actors, **out,
                                 "wall_s": time.perf_counter() - started})
                    print(json.dumps(runs[-1]), flush=True)
    table = Table(title=f"simulator throughput ({os.cpu_count()} cores; speedup = env steps/s ÷ baseline's, same "
                        "env and seed)")
    for col in ("env", "runner", "actors", "env steps/s", "speedup", "s to 475", "final return"):
        table.add_column(col, justify="right")
    summary = []
    for env in envs:
        for backend, actors in dict.fromkeys((r["backend"], r["actors"]) for r in runs if r["env"] == env):
            mine = [r for r in runs if r["env"] == env and r["backend"] == backend and r["actors"] == actors]
            ratios = [r["env_steps_per_s"] / next(b["env_steps_per_s"] for b in runs if b["env"] == env
                                                   and b["backend"] == "baseline" and b["seed"] == r["seed"])
                      for r in mine]
            to_target = [r["seconds_to_target"] for r in mine]
            row = {"env": env, "backend": backend, "actors": actors, "seeds": [r["seed"] for r in mine],
                   "env_steps_per_s": statistics.mean(r["env_steps_per_s"] for r in mine),
                   "speedup_mean": statistics.mean(ratios), "speedups": ratios, "seconds_to_target": to_target,
                   "final_returns": [r["final_return"] for r in mine]}
            summary.append(row)
            table.add_row(env, backend, str(actors), f"{row['env_steps_per_s']:.0f}", f"{row['speedup_mean']:.2f}×",
                          " / ".join("-" if t is None else f"{t:.1f}" for t in to_target) if env == "cartpole" else "",
                          " / ".join(f"{x:.0f}" if x is not None else "-" for x in row["final_returns"]))
    Console().print(table)
    out = ROOT / "benchmarks" / "results" / f"sim_throughput_{datetime.date.today().isoformat()}{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps({"machine": {"cores": os.cpu_count(), "python": platform.python_version()},
                               "args": vars(args), "summary": summary, "runs": runs}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
