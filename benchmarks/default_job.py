"""The default job over several seeds: accuracy after SFT and at the end, the RL gain, wall time, throughput.

    python benchmarks/default_job.py --seeds 0 1 2 [--tag NAME] [key.sub=value ...]

Prints a table and writes benchmarks/results/default_job_<date>[_NAME].json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

from rich.console import Console
from rich.table import Table

import rollflow

KEYS = ("accuracy_after_sft", "accuracy_final", "accuracy_best", "wall_seconds", "sft_seconds", "rl_seconds",
        "samples_per_second", "staleness_chosen", "staleness_reason")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="", help="suffix of the result file's name")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    runs = []
    for seed in args.seeds:
        config = rollflow.load_config(overrides=[*args.overrides, f"seed={seed}", f"run_dir=runs/bench_default/seed{seed}", "progress=false"])
        result = rollflow.train(config, overwrite=True)  # a benchmark reruns into the same folders
        curve = [(h["step"], h["eval/accuracy"]) for h in result.history if "eval/accuracy" in h]
        runs.append({"seed": seed, **{k: result.summary[k] for k in KEYS}, "gain": result.summary["accuracy_final"] - result.summary["accuracy_after_sft"], "eval_curve": curve})

    table = Table(title="default job")
    for col in ("seed", "after SFT", "final", "best", "gain", "wall s", "RL s", "samples/s", "η"):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(str(r["seed"]), f"{r['accuracy_after_sft']:.3f}", f"{r['accuracy_final']:.3f}",
                      f"{r['accuracy_best']:.3f}", f"{r['gain']:+.3f}", f"{r['wall_seconds']:.0f}", f"{r['rl_seconds']:.0f}",
                      f"{r['samples_per_second']:.0f}", str(r["staleness_chosen"]))
    Console().print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"default_job_{datetime.date.today().isoformat()}{'_' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps({"overrides": args.overrides, "machine": platform.platform(), "runs": runs}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
