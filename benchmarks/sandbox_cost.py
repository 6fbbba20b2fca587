"""What one sandbox run of a tiny program costs, per isolation tier that works here.

Runs ``--runs`` programs like the ``program`` task's (``x=[1,2];print(sum(x))``) one after another in each tier, after
one warm-up run (the tier's probe and the first run's caches are not counted), and prints per run: the wall time, the
CPU time of the processes the sandbox started (user + system of ``RUSAGE_CHILDREN``: unshare or bwrap, the launcher,
the program, all reaped by the time ``run`` returns), and this process's own CPU time (setting up, watching, cleaning
up). Writes ``benchmarks/results/sandbox_cost_<date>[_<tag>].json``.

    python benchmarks/sandbox_cost.py [--runs 30] [--tag before]

On a loaded machine the wall time moves with the load; the CPU times much less.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

from rollflow.envs.sandbox import TIERS, Sandbox, SandboxLimits, why_unavailable

PROGRAM = "x=[1,2];print(sum(x))"


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measure(tier: str, runs: int) -> dict[str, float | int | str]:
    box = Sandbox(SandboxLimits(isolation=tier, timeout_s=10))
    warm = box.run(PROGRAM)
    if (warm.status, warm.stdout) != ("ok", "3\n"):
        raise RuntimeError(f"the warm-up run in {tier!r} ended {warm.status!r}: {warm.stderr[-500:]}")
    walls = []
    children, own = _cpu(resource.RUSAGE_CHILDREN), _cpu(resource.RUSAGE_SELF)
    for i in range(runs):
        start = time.perf_counter()
        result = box.run(PROGRAM)
        walls.append(time.perf_counter() - start)
        if (result.status, result.stdout) != ("ok", "3\n"):
            raise RuntimeError(f"run {i} in {tier!r} ended {result.status!r}: {result.stderr[-500:]}")
    children, own = _cpu(resource.RUSAGE_CHILDREN) - children, _cpu(resource.RUSAGE_SELF) - own
    return {"tier": tier, "runs": runs, "wall_ms_mean": 1000 * statistics.mean(walls),
            "wall_ms_median": 1000 * statistics.median(walls), "wall_ms_max": 1000 * max(walls),
            "children_cpu_ms": 1000 * children / runs, "parent_cpu_ms": 1000 * own / runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="runs per tier (default 30)")
    parser.add_argument("--tag", default="", help="added to the result file's name (e.g. before, after)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")

    rows, skipped = [], {}
    for tier in TIERS:
        reason = why_unavailable(tier)
        if reason is not None:
            skipped[tier] = reason
            continue
        rows.append(measure(tier, args.runs))

    print(f"{'tier':<12}{'wall ms/run':>12}{'(median)':>10}{'CPU ms/run':>12}{'parent CPU':>12}")
    for r in rows:
        print(f"{r['tier']:<12}{r['wall_ms_mean']:>12.1f}{r['wall_ms_median']:>10.1f}{r['children_cpu_ms']:>12.1f}"
              f"{r['parent_cpu_ms']:>12.1f}")
    for tier, reason in skipped.items():
        print(f"{tier:<12}skipped: {reason}")

    args.out.mkdir(parents=True, exist_ok=True)
    name = f"sandbox_cost_{datetime.date.today().isoformat()}{'_' + args.tag if args.tag else ''}.json"
    (args.out / name).write_text(json.dumps({
        "program": PROGRAM, "runs": args.runs, "machine": platform.platform(), "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(), "tiers": rows, "skipped": skipped}, indent=2) + "\n")
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
