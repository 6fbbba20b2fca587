"""Learning of the built-in simulator configs over several seeds: held-out success and return before and after.

    python benchmarks/sim_learning.py [--configs configs/sim/cartpole.yaml configs/sim/doorkey.yaml] [--seeds 0 1 2]
                                      [key.sub=value ...]

Each config runs as `rollflow train CONFIG seed=S` would (its backend, Ray by default), once per seed. Held-out
episodes are greedy, on environment seeds from ``sim.eval_seed`` on, which no training environment uses (for
MiniGrid the seed draws the layout: these are layouts the policy never trained on). Reported per run: held-out
success and mean return at the start and the end, the mean return of the last 20 training episodes, the seconds of
training until that mean first reached ``sim.target_return`` (if the config sets one), env steps/s. Prints a table and
writes ``benchmarks/results/sim_learning_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rollflow.config import load_config
from rollflow.recipes import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["configs/sim/cartpole.yaml", "configs/sim/doorkey.yaml"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.configs:
            for seed in args.seeds:
                config = load_config(ROOT / path, [f"seed={seed}", f"run_dir={Path(tmp) / f'{Path(path).stem}_{seed}'}",
                                                   "progress=false", *args.overrides])
                started = time.perf_counter()
                s = train(config).summary
                runs.append({"config": path, "seed": seed, "wall_s": time.perf_counter() - started, **{
                    k: s[k] for k in ("env", "algorithm", "eval_success_initial", "eval_success_final",
                                      "eval_return_initial", "eval_return_final", "train_return_recent",
                                      "seconds_to_target", "env_steps", "train_seconds", "env_steps_per_second",
                                      "infra_retries")}, "eval_episodes": config.sim.eval_episodes,
                    "eval_seed": config.sim.eval_seed})
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    table = Table(title="simulator learning (held-out: greedy episodes on environment seeds never trained on)")
    for col in ("config", "seed", "held-out success", "held-out return", "train return (last 20)", "s to target",
                "env steps/s"):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(Path(r["config"]).stem, str(r["seed"]),
                      f"{r['eval_success_initial']:.2f} → {r['eval_success_final']:.2f}",
                      f"{r['eval_return_initial']:.2f} → {r['eval_return_final']:.2f}", f"{r['train_return_recent']:.2f}",
                      "-" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}",
                      f"{r['env_steps_per_second']:.0f}")
    Console().print(table)
    out = ROOT / "benchmarks" / "results" / f"sim_learning_{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps({"machine": {"cores": os.cpu_count(), "python": platform.python_version()},
                               "args": vars(args), "runs": runs}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
