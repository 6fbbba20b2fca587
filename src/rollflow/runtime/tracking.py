"""What a training run writes into its run directory, and the live view of it.

Layout of ``run_dir``:

- ``metrics.jsonl``  one ``{"step": ..., **metrics}`` line per step, flushed as written so a crash loses nothing
- ``rollouts.jsonl`` sample rows the caller chose to keep, one per line
- ``tensorboard/``   every numeric metric as a scalar, tagged by its name (``reward/mean``, ``time/trajectory``)
- ``summary.json``, ``curves.png``  written by :meth:`Tracker.finish` only

A resumed run (``Resume``) cuts ``metrics.jsonl`` and ``rollouts.jsonl`` back to their length at the checkpoint and
has TensorBoard purge the later steps, so the steps redone after it appear once.

Non-finite floats are written as ``NaN``/``Infinity``: Python's ``json`` reads them back, strict parsers do not.
Hiding a diverged loss as ``null`` would be worse.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # not pyplot: no global backend or figure registry to touch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter

Metrics = dict[str, float | int | None]
Eval = tuple[int, float, str]  # (step, accuracy, label)


@dataclass
class Resume:
    """Where a resumed run picks its files up: the checkpoint's step, the files' lengths then, the labelled
    evaluations so far, and how far the progress bar had come."""

    step: int
    metrics_bytes: int
    rollouts_bytes: int
    evals: list[Eval] = field(default_factory=list)
    completed: int = 0


class Tracker:
    """Owns the files of one run; use as a context manager so files close even when training raises."""

    def __init__(self, run_dir: Path, total_steps: int, show_progress: bool = True, resume: Resume | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.evals: list[Eval] = list(resume.evals) if resume else []
        if resume is not None:
            _cut(self.run_dir / "metrics.jsonl", resume.metrics_bytes)
            _cut(self.run_dir / "rollouts.jsonl", resume.rollouts_bytes)
        self._metrics = open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self._rollouts = open(self.run_dir / "rollouts.jsonl", "a", encoding="utf-8")
        if resume is not None:
            _after_existing_events(self.run_dir / "tensorboard")
        self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                 purge_step=resume.step + 1 if resume is not None else None)
        self._console = Console()
        self._live: dict[str, float] = {}  # latest values shown in the progress description
        # Off a TTY rich draws only the final state on stop, so CI logs get one line, not one per refresh.
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=self._console, transient=False, disable=not show_progress,
        )
        self._task = self._progress.add_task("training", total=total_steps, completed=resume.completed if resume else 0)
        self._progress.start()
        self._closed = False

    def log_step(self, step: int, metrics: Metrics, advance: int = 1) -> None:
        """Record one step's metrics; ``advance`` is how many units the progress bar moves (steps since the last call)."""
        if "step" in metrics:
            raise ValueError(f"metric name 'step' at step {step} clashes with the step column; rename it")
        for k, v in metrics.items():
            if v is not None and not isinstance(v, (int, float)):
                raise TypeError(f"metric {k!r} at step {step} is a {type(v).__name__}; log a float "
                                f"(call .item() on a tensor) or None")
        self._metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        self._metrics.flush()
        for k, v in metrics.items():
            if v is not None:
                self._tb.add_scalar(k, v, step)
        for k in ("reward/mean", "eval/accuracy", "throughput/samples_per_s"):
            if metrics.get(k) is not None:
                self._live[k] = float(metrics[k])
        self._progress.update(self._task, advance=advance, description=self._describe())

    def sizes(self) -> tuple[int, int]:
        """Bytes in metrics.jsonl and rollouts.jsonl so far (flushed): where a checkpoint taken now resumes them."""
        self._metrics.flush()
        self._rollouts.flush()
        return self._metrics.tell(), self._rollouts.tell()

    def log_rollouts(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._rollouts.write(json.dumps(row) + "\n")
        self._rollouts.flush()

    def log_eval(self, step: int, accuracy: float, label: str) -> None:
        """Record a labelled held-out evaluation (e.g. "initial", "after SFT") for the plot and the bar.
        Not written to metrics.jsonl: put ``eval/accuracy`` in :meth:`log_step` for that, not both."""
        self.evals.append((step, float(accuracy), label))
        self._tb.add_scalar("eval/accuracy", accuracy, step)
        self._live["eval/accuracy"] = float(accuracy)
        self._progress.update(self._task, description=self._describe())

    def note(self, line: str) -> None:
        """A one-line message about the run (a decision it took), printed above the bar and kept in notes.log."""
        self._console.print(line)
        with open(self.run_dir / "notes.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def finish(self, summary: dict[str, Any]) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        self.close()
        plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png", self.evals)
        table = Table(title=f"run summary ({self.run_dir})")
        table.add_column("key")
        table.add_column("value", justify="right")
        for k, v in summary.items():
            table.add_row(str(k), f"{v:.4g}" if isinstance(v, float) else str(v))
        self._console.print(table)

    def close(self) -> None:
        """Close files, TensorBoard and the bar; safe to call twice. Writes no summary or plot."""
        if self._closed:
            return
        self._closed = True
        self._progress.stop()
        self._tb.close()
        self._metrics.close()
        self._rollouts.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _describe(self) -> str:
        parts = []
        if "reward/mean" in self._live:
            parts.append(f"reward {self._live['reward/mean']:.3f}")
        if "eval/accuracy" in self._live:
            parts.append(f"eval acc {self._live['eval/accuracy']:.3f}")
        if "throughput/samples_per_s" in self._live:
            parts.append(f"{self._live['throughput/samples_per_s']:.1f} samples/s")
        return " | ".join(parts) or "training"


def _after_existing_events(log_dir: Path) -> None:
    """Wait, if need be, until a new event file's name sorts after every existing one. TensorBoard reads a directory's
    files in name order, ``events.out.tfevents.<unix second>.<host>.<pid>...``, and applies a resumed writer's purge
    only to what it read before it: a run resumed within the second its last file was opened, by a process of a lower
    pid, had its purge read first and the steps redone after the checkpoint shown twice."""
    seconds = [int(parts[3]) for f in log_dir.glob("events.out.tfevents.*")
               if len(parts := f.name.split(".")) > 3 and parts[3].isdigit()]
    if seconds and (wait := max(seconds) + 1 - time.time()) > 0:
        time.sleep(wait)


def _cut(path: Path, size: int) -> None:
    """Truncate ``path`` to ``size`` bytes (it may be shorter, or missing, if the run died before flushing)."""
    if path.exists() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl. A final line without its newline is a write cut off by a crash and is dropped;
    a bad line anywhere else means the file is corrupt and raises."""
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines):  # last piece after the final "\n": an unfinished write
                break
            raise ValueError(f"{path}:{i} is not valid JSON ({e}); fix or delete that line") from e
    return rows


def plot_curves(metrics_path: Path, out_path: Path, evals: list[Eval] | None = None) -> None:
    """Two panels: training reward (mean ± std band) and held-out accuracy, both against step."""
    rows = read_metrics(metrics_path)
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_r, ax_a = fig.subplots(1, 2)

    pts = [(r["step"], r["reward/mean"], r.get("reward/std")) for r in rows if r.get("reward/mean") is not None]
    if pts:
        steps, mean = [p[0] for p in pts], [p[1] for p in pts]
        ax_r.plot(steps, mean, marker="o" if len(pts) == 1 else None, label="reward/mean")
        if all(p[2] is not None for p in pts):
            lo = [m - s for m, s in zip(mean, (p[2] for p in pts))]
            hi = [m + s for m, s in zip(mean, (p[2] for p in pts))]
            ax_r.fill_between(steps, lo, hi, alpha=0.25, label="± reward/std")
        ax_r.legend(loc="lower right")
    else:
        ax_r.text(0.5, 0.5, "no reward/mean logged", ha="center", va="center", transform=ax_r.transAxes)
    ax_r.set(title="training reward", xlabel="step", ylabel="reward")

    acc = [(r["step"], r["eval/accuracy"]) for r in rows if r.get("eval/accuracy") is not None]
    if acc:
        ax_a.plot([a[0] for a in acc], [a[1] for a in acc], marker="o", label="eval/accuracy")
    for step, a, label in evals or []:
        ax_a.scatter([step], [a], marker="D", zorder=3, label=label)  # diamonds: apart from the eval line
        ax_a.annotate(f"{label}: {a:.3f}", (step, a), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if acc or evals:
        ax_a.legend(loc="lower right")
    else:
        ax_a.text(0.5, 0.5, "no evaluations logged", ha="center", va="center", transform=ax_a.transAxes)
    ax_a.set(title="held-out accuracy", xlabel="step", ylabel="accuracy")

    fig.savefig(out_path, format="png", dpi=100)


__all__ = ["Resume", "Tracker", "plot_curves", "read_metrics"]
