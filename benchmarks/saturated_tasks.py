"""Tasks that SFT solves, so RL has nothing to add: does the default recipe leave them as good as it found them?

Each task is a user's own task as the README describes it: a JSONL train file, a JSONL held-out file and a reward
file next to them, run through the CLI from that folder (``task.reward_fn=reward.py:score``).

- ``cipher``: a fixed letter substitution; partial credit (1 exact, else half the share of positions right).
- ``reverse``: reverse a word; binary exact match.
- ``increment``: add 1 to every digit (9 → 0); credit for the longest right prefix (1 exact, else 0.8 × share).

    python benchmarks/saturated_tasks.py make DIR            # write the three task folders under DIR
    python benchmarks/saturated_tasks.py run DIR --seeds 0 1 2 [key.sub=value ...]

``run`` trains each task per seed (SFT, then RL at the defaults plus the overrides), prints held-out accuracy after
SFT, at the end and the best, and the sampled training reward of the first and last fifth of the RL steps; writes
``benchmarks/results/saturated_tasks_<label>_<date>.json``. To compare RL settings from one SFT checkpoint per task,
make one with ``train.steps=0 run_dir=sft`` (it lands in ``TASK/sft/model``) and pass ``model.path=sft/model
sft.steps=0`` (paths are relative to each task's folder, where the CLI runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

LETTERS = "abcdefghij"
CIPHER = dict(zip(LETTERS, "fjaichbgde"))  # a fixed permutation

REWARDS = {
    "cipher": '''
def score(problem, response):
    """1 for the exact answer, else half the share of positions right."""
    answer, response = problem.answer, response.strip()
    if response == answer:
        return 1.0
    right = sum(a == b for a, b in zip(answer, response))
    return 0.5 * right / max(len(answer), len(response))
''',
    "reverse": '''
def score(problem, response):
    """Exact match only."""
    return float(response.strip() == problem.answer)
''',
    "increment": '''
def score(problem, response):
    """1 for the exact answer, else 0.8 times the share of the answer matched by the response's longest right prefix."""
    answer, response = problem.answer, response.strip()
    if response == answer:
        return 1.0
    prefix = 0
    for a, b in zip(answer, response):
        if a != b:
            break
        prefix += 1
    return 0.8 * prefix / len(answer)
''',
}


def _word(rng: random.Random, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 6)))


def examples(task: str, rng: random.Random) -> tuple[str, str]:
    if task == "cipher":
        w = _word(rng, LETTERS)
        return f"{w}=", "".join(CIPHER[c] for c in w)
    if task == "reverse":
        w = _word(rng, LETTERS)
        return f"{w}=", w[::-1]
    w = _word(rng, "0123456789")
    return f"{w}+", "".join(str((int(c) + 1) % 10) for c in w)


def make(root: Path, n_train: int = 4000, n_eval: int = 300) -> list[Path]:
    dirs = []
    for i, task in enumerate(REWARDS):
        rng, seen = random.Random(100 + i), set()
        rows = []
        while len(rows) < n_train + n_eval:
            prompt, answer = examples(task, rng)
            if prompt not in seen:  # held-out prompts never appear in training
                seen.add(prompt)
                rows.append({"prompt": prompt, "answer": answer})
        d = root / task
        d.mkdir(parents=True, exist_ok=True)
        (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:n_train]))
        (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[n_train:]))
        (d / "reward.py").write_text(REWARDS[task].lstrip())
        dirs.append(d)
    return dirs


def run_one(task_dir: Path, seed: int, overrides: list[str], label: str) -> dict:
    run_dir = task_dir / "runs" / (label or "default") / f"seed{seed}"
    cmd = [str(Path(sys.executable).parent / "rollflow"), "train", "task.name=file", "task.path=train.jsonl",
           "task.eval_path=test.jsonl", "task.reward_fn=reward.py:score", f"seed={seed}", f"run_dir={run_dir}",
           "progress=false", "eval.every=10", "--overwrite", *overrides]
    subprocess.run(cmd, cwd=task_dir, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [s for s in steps if s["step"] > 0 and "reward/mean" in s]
    k = max(1, len(rl) // 5)
    return {
        "task": task_dir.name, "seed": seed,
        "after_sft": summary["accuracy_after_sft"], "final": summary["accuracy_final"],
        "best": summary.get("accuracy_best", max([summary["accuracy_final"]] + [s["eval/accuracy"] for s in rl if "eval/accuracy" in s])),
        "reward_first": sum(s["reward/mean"] for s in rl[:k]) / k, "reward_last": sum(s["reward/mean"] for s in rl[-k:]) / k,
        "eval_curve": [(s["step"], s["eval/accuracy"]) for s in rl if "eval/accuracy" in s],
        "wall_seconds": summary["wall_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["make", "run"])
    parser.add_argument("root", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--tasks", nargs="+", default=list(REWARDS))
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    if args.command == "make":
        for d in make(args.root.resolve()):
            print(d)
        return

    from rich.console import Console
    from rich.table import Table

    runs = [run_one(args.root.resolve() / t, s, args.overrides, args.label) for t in args.tasks for s in args.seeds]
    table = Table(title=f"saturated tasks {' '.join(args.overrides)}")
    for col in ("task", "seed", "after SFT", "final", "best", "reward first 20%", "reward last 20%", "wall s"):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(r["task"], str(r["seed"]), f"{r['after_sft']:.3f}", f"{r['final']:.3f}", f"{r['best']:.3f}",
                      f"{r['reward_first']:.3f}", f"{r['reward_last']:.3f}", f"{r['wall_seconds']:.0f}")
    Console().print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"saturated_tasks{'_' + args.label if args.label else ''}_{datetime.date.today().isoformat()}.json"
    (args.out / name).write_text(json.dumps({"overrides": args.overrides, "machine": platform.platform(), "runs": runs}, indent=2))
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
