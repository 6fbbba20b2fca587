"""Every algorithm from one SFT checkpoint, and a staleness × off-policy-correction study.

    python benchmarks/algos.py [--quick] [--algos grpo ppo ...] [--etas 0 1 2 4 8] [--corrections none tis ...]
                               [--steps N] [--no-study] [--no-algos] [key.sub=value ...]

1. One SFT checkpoint is made first (the default task and model).
2. Each algorithm preset in ``configs/algos/`` trains from it for the same number of RL steps, on Ray, with the
   default asynchronous runtime (η = 1, truncated IS); reported: held-out accuracy after SFT and at the end, the
   gain, RL wall time.
3. The staleness study trains GRPO from the same checkpoint for every η × correction: η = the staleness bound (the
   rollout worker runs ahead until admission stops it, so the realised lag reaches η), correction ∈ none, tis,
   decoupled, aipo. Reported: final accuracy, and the mean and max lag actually trained on.

Prints tables and writes benchmarks/results/algos[_quick]_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import ray
from rich.console import Console
from rich.table import Table

import rollflow

PRESETS = Path(__file__).parent.parent / "configs" / "algos"
ALGOS = ["grpo", "dr_grpo", "rloo", "reinforce_pp", "ppo", "dapo", "gspo", "grpo_kl"]
CORRECTIONS = ["none", "tis", "decoupled", "aipo"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, small eval, few cells")
    parser.add_argument("--algos", nargs="+", default=ALGOS, choices=ALGOS)
    parser.add_argument("--etas", type=int, nargs="+")
    parser.add_argument("--corrections", nargs="+", default=CORRECTIONS, choices=CORRECTIONS)
    parser.add_argument("--steps", type=int, help="RL steps per run (default: 6 quick, 60 full)")
    parser.add_argument("--no-algos", action="store_true", help="skip the per-algorithm table")
    parser.add_argument("--no-study", action="store_true", help="skip the staleness study")
    parser.add_argument("--sft", type=Path, help="reuse this SFT run directory (made by an earlier run) instead of training one")
    parser.add_argument("--tag", default="", help="added to the JSON file's name")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    steps = args.steps or (6 if args.quick else 60)
    etas = args.etas or ([0, 8] if args.quick else [0, 1, 2, 4, 8])
    root = Path("runs/bench_algos")
    common = [*args.overrides, "progress=false", "eval.every=0", "runtime.backend=ray"]
    if args.quick:
        common += ["task.eval_size=100", "sft.steps=100"]

    started = time.perf_counter()
    ray.init(include_dashboard=False)  # one Ray for every run: each run joins it
    sft_dir = args.sft or root / "sft"
    if args.sft:
        acc_sft = json.loads((sft_dir / "summary.json").read_text())["accuracy_after_sft"]
    else:
        sft = rollflow.train(rollflow.load_config(overrides=[*common, "train.steps=0", f"run_dir={sft_dir}"]), overwrite=True)
        acc_sft = sft.summary["accuracy_after_sft"]
    print(f"SFT checkpoint {sft_dir}: accuracy {acc_sft:.3f}")
    from_sft = [f"model.path={sft_dir}/model", "sft.steps=0", f"train.steps={steps}"]

    def run(name: str, preset: str, extra: list[str]) -> dict:
        config = rollflow.load_config(PRESETS / f"{preset}.yaml", [*common, *from_sft, *extra, f"run_dir={root}/{name}"])
        result = rollflow.train(config, overwrite=True)  # a benchmark reruns into the same folders
        s, lags = result.summary, [h.get("staleness/mean", 0.0) for h in result.history]
        row = {
            "accuracy_final": s["accuracy_final"], "gain": s["accuracy_final"] - acc_sft, "rl_seconds": s["rl_seconds"],
            "staleness_mean": sum(lags) / max(1, len(lags)),
            "staleness_max": max((h.get("staleness/max", 0.0) for h in result.history), default=0.0),
            "dropped_groups": s["dropped_groups"],
        }
        print(f"  {name}: accuracy {row['accuracy_final']:.3f} (gain {row['gain']:+.3f}), {row['rl_seconds']:.0f} s, "
              f"lag mean {row['staleness_mean']:.2f} max {row['staleness_max']:.0f}")
        return row

    algos = {} if args.no_algos else {a: run(a, a, []) for a in args.algos}
    study = [] if args.no_study else [
        {"eta": eta, "correction": c, **run(f"eta{eta}_{c}", "grpo", [f"runtime.staleness={eta}", f"algo.correction={c}"])}
        for eta in etas for c in args.corrections
    ]
    ray.shutdown()

    console = Console()
    if algos:
        table = Table(title=f"algorithms: {steps} RL steps from SFT (accuracy {acc_sft:.3f})")
        for col in ("algorithm", "final acc.", "gain", "RL s"):
            table.add_column(col, justify="right")
        for a, r in algos.items():
            table.add_row(a, f"{r['accuracy_final']:.3f}", f"{r['gain']:+.3f}", f"{r['rl_seconds']:.0f}")
        console.print(table)
    if study:
        table = Table(title=f"staleness study: GRPO, final accuracy after {steps} steps (mean / max lag trained on)")
        table.add_column("η", justify="right")
        for c in args.corrections:
            table.add_column(c, justify="right")
        for eta in etas:
            cells = [next(r for r in study if r["eta"] == eta and r["correction"] == c) for c in args.corrections]
            table.add_row(str(eta), *(f"{r['accuracy_final']:.3f} ({r['staleness_mean']:.1f}/{r['staleness_max']:.0f})" for r in cells))
        console.print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    name = f"algos{'_quick' if args.quick else ''}{'_' + args.tag if args.tag else ''}_{datetime.date.today().isoformat()}.json"
    (args.out / name).write_text(json.dumps({
        "steps": steps, "overrides": args.overrides, "sft": str(sft_dir), "accuracy_after_sft": acc_sft, "machine": platform.platform(),
        "seconds": time.perf_counter() - started, "algorithms": algos, "staleness_study": study,
    }, indent=2))
    print(f"wrote {args.out / name} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
