"""Asynchronous vs synchronous training on the same CPUs: throughput, pipeline efficiency and final accuracy.

    python benchmarks/async_vs_sync.py [--quick] [--etas 0 1 2 auto] [key.sub=value ...]

Every run starts from one SFT checkpoint (made first, once) and trains the same number of samples with the same
task, model and seed, on Ray, for each staleness bound η (and ``auto``, the default, which starts synchronous and
settles η after measuring its first steps), in these scenarios:

  (a) the built-in task as is;
  (b) the same task with rewards that take a log-normal time per sample (median 0.2 s, σ 0.75, at most 2 s),
      as running generated code would;
  (c) the same with actions that take seconds (median 1 s, at most 4 s), as an agent's training script does
      (e.g. with ``task.name=program`` and its settings as overrides: on top of running each program in the sandbox);
  (d) longer still (median 3 s, at most 10 s), as an ML-engineering agent's training runs.

In (c) and (d) the wait is not CPU (the scripts run elsewhere), so a reward worker waits on 256 samples at once
(``runtime.reward.concurrency``; the default 64 made the waits queue, and the queue, not the pipeline, the bound).

Threads follow the runtime's defaults: at η = 0 rollout and trainer take turns and each uses every core; at η > 0
they run at once, each on its share of the cores. Reported per scenario and η:
samples/s, trainer busy fraction, pipeline efficiency (the bound max(producers' busy time, trainer's busy time)
over the time achieved), final held-out accuracy, and speedup = samples/s ÷ the η = 0 run's samples/s.
Prints a table and writes benchmarks/results/async_vs_sync_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import ray
from rich.console import Console
from rich.table import Table

import rollflow

CORES = os.cpu_count() or 2
SCENARIOS = {
    "a": [],
    "b": ["reward_latency.median=0.2", "reward_latency.sigma=0.75", "reward_latency.max=2.0", "runtime.reward.groups_per_call=1"],
    # actions that run for seconds, as an agent's training script does (with task.name=program: on top of the sandbox)
    "c": ["reward_latency.median=1.0", "reward_latency.sigma=0.75", "reward_latency.max=4.0", "runtime.reward.groups_per_call=1",
          "runtime.reward.concurrency=256"],
    # an ML-engineering agent's training runs
    "d": ["reward_latency.median=3.0", "reward_latency.sigma=0.75", "reward_latency.max=10.0", "runtime.reward.groups_per_call=1",
          "runtime.reward.concurrency=256"],
}
KEYS = ("samples_per_second", "trainer_busy_fraction", "pipeline_efficiency", "accuracy_final",
        "pipeline_seconds", "producer_busy_seconds", "trainer_busy_seconds", "staleness_chosen", "staleness_reason")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs: the whole benchmark in under 3 minutes")
    parser.add_argument("--etas", nargs="+", default=["0", "1", "2", "auto"], help="bounds to run: integers or 'auto'")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--steps", type=int, help="RL steps per run (default: 8 quick, 40 full)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tag", default="", help="suffix of the result file's name")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    steps = args.steps or (8 if args.quick else 40)
    root = Path("runs/bench_async")
    common = [*args.overrides, "progress=false", "eval.every=0", "runtime.backend=ray"]
    if args.quick:
        common += ["task.eval_size=100"]

    started = time.perf_counter()
    ray.init(num_cpus=CORES, include_dashboard=False)  # one Ray for every run: each run joins it
    sft = rollflow.train(rollflow.load_config(overrides=[
        *common, "train.steps=0", f"run_dir={root}/sft", *(["sft.steps=100"] if args.quick else []),
    ]), overwrite=True)
    print(f"SFT checkpoint: accuracy {sft.summary['accuracy_after_sft']:.3f} ({sft.summary['wall_seconds']:.0f} s)")

    runs = []
    for scenario in args.scenarios:
        for eta in args.etas:
            config = rollflow.load_config(overrides=[
                *common, *SCENARIOS[scenario], f"runtime.staleness={eta}",
                f"model.path={root}/sft/model", "sft.steps=0", f"train.steps={steps}", f"run_dir={root}/{scenario}_eta{eta}",
            ])
            s = rollflow.train(config, overwrite=True).summary
            runs.append({"scenario": scenario, "eta": eta, **{k: s[k] for k in KEYS}})
            print(f"  ({scenario}) η={eta}: {s['samples_per_second']:.0f} samples/s, accuracy {s['accuracy_final']:.3f}"
                  + (f" (auto chose η={s['staleness_chosen']}: {s['staleness_reason']})" if eta == "auto" else ""))
    ray.shutdown()
    for r in runs:
        sync = next(x for x in runs if x["scenario"] == r["scenario"] and x["eta"] == "0")
        r["speedup"] = r["samples_per_second"] / sync["samples_per_second"]

    table = Table(title=f"async vs sync: {steps} steps × {sft_samples(common)} samples, {CORES} CPUs")
    for col in ("scenario", "η", "trained at", "samples/s", "speedup", "trainer busy", "pipeline eff.", "final acc."):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(r["scenario"], str(r["eta"]), str(r["staleness_chosen"]), f"{r['samples_per_second']:.0f}", f"{r['speedup']:.2f}",
                      f"{r['trainer_busy_fraction']:.2f}", f"{r['pipeline_efficiency']:.2f}", f"{r['accuracy_final']:.3f}")
    Console().print(table)

    args.out.mkdir(parents=True, exist_ok=True)
    name = (f"async_vs_sync{'_quick' if args.quick else ''}_{datetime.date.today().isoformat()}"
            f"{'_' + args.tag if args.tag else ''}.json")
    (args.out / name).write_text(json.dumps({
        "steps": steps, "overrides": args.overrides, "cpus": CORES,
        "accuracy_after_sft": sft.summary["accuracy_after_sft"], "machine": platform.platform(),
        "seconds": time.perf_counter() - started, "runs": runs,
    }, indent=2))
    print(f"wrote {args.out / name} in {time.perf_counter() - started:.0f} s")


def sft_samples(overrides: list[str]) -> int:
    return rollflow.load_config(overrides=overrides).samples_per_step


if __name__ == "__main__":
    main()
