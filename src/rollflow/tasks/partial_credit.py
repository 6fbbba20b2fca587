"""Partial credit from instrumented execution: a program that fails late earns more than one that fails early.

A program's stages (loaded data, built model, trained, wrote answer) are declared as marker lines it prints to stdout,
``@@stage <name>``, one per line; ``envs/instrument.py`` inserts the statements that print them before the program
runs. The reward follows "RL for ML-engineering agents": a program that did not run to completion (an error, a
timeout, too much memory, killed, too much output) gets ``fail_penalty + stage_credit × stages reached``; one that ran
gets its task score.

Where it departs from the paper: a program that ran but has no task score (the task found no answer to grade) gets
``0 + stage_credit × stages reached``, the failure branch without the penalty: it is still told how far it got, and
stays above every failed program whenever ``stage_credit × len(stages) < |fail_penalty|``.

Not covered: markers are not a security boundary. A program can print every marker itself; what that buys it is at
most ``stage_credit × len(stages)`` on a failed run (a run that completes is scored by its task alone). A marker counts
only on a line of its own: output printed without a newline just before it hides it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rollflow.api import RewardResult, Status

MARKER = "@@stage"
# A marker line: the prefix, one space, a stage name without whitespace; surrounding whitespace (a "\r") is allowed.
MARKER_LINE = re.compile(rf"^\s*{re.escape(MARKER)} (\S+)\s*$")

# The sandbox's statuses (``SandboxResult.status``): "ok" ran to completion, every other one is a failed run.
RAN_OK = "ok"
FAILED_RUNS = frozenset({"error", "timeout", "memory", "killed", "output_limit"})


def check_stage(name: str) -> str:
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"stage name {name!r} must be a non-empty string without whitespace (it ends a marker line "
                         f"'{MARKER} <name>')")
    return name


def marker(name: str) -> str:
    """The Python statement that prints stage ``name``'s marker line, flushed so that a later crash cannot lose it."""
    return f"print({f'{MARKER} {check_stage(name)}'!r}, flush=True)"


def stages_reached(stdout: str, stages: Sequence[str]) -> list[str]:
    """The declared ``stages`` whose marker line appears in ``stdout``, in declared order, each once; markers of
    undeclared stages are ignored."""
    seen = {m.group(1) for line in stdout.splitlines() if (m := MARKER_LINE.match(line))}
    return list(dict.fromkeys(s for s in stages if s in seen))


def strip_markers(stdout: str) -> str:
    """``stdout`` without its marker lines (of any stage), every other line kept byte for byte: what the task
    compares."""
    return "".join(line for line in stdout.splitlines(keepends=True) if not MARKER_LINE.match(line))


@dataclass(frozen=True)
class PartialCredit:
    """How a run of an instrumented program is scored. ``reward = failed + stage_credit + task_score`` in the
    breakdown, which also holds ``stages``, the number of declared stages reached."""

    stages: tuple[str, ...]
    """The declared stages, in the order a correct program reaches them (the order does not change the credit)."""
    fail_penalty: float = -10.0
    """Added when the program did not run to completion."""
    stage_credit: float = 0.1
    """Earned per declared stage reached, when there is no task score (a failed run, or a run with nothing to grade)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        for name in self.stages:
            check_stage(name)
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"PartialCredit.stages={self.stages!r} names a stage twice; each stage counts once")
        if not (math.isfinite(self.fail_penalty) and math.isfinite(self.stage_credit) and self.stage_credit >= 0):
            raise ValueError(f"PartialCredit needs a finite fail_penalty and a finite stage_credit >= 0, got "
                             f"fail_penalty={self.fail_penalty}, stage_credit={self.stage_credit}")

    def score(self, ran_ok: bool, stdout: str, task_score: float | None, status: Status = Status.OK) -> RewardResult:
        """The reward of one run. ``task_score`` is the task's grade of a program that ran (``None``: nothing to
        grade); a failed run is never graded, so it must be ``None`` there. ``status`` is passed through: whether a
        failed program is the agent's fault is the caller's call."""
        if not ran_ok and task_score is not None:
            raise ValueError(f"a failed run is not graded, but task_score={task_score} was given; pass None")
        n = len(stages_reached(stdout, self.stages))
        failed = 0.0 if ran_ok else self.fail_penalty
        credit = self.stage_credit * n if task_score is None else 0.0
        task = 0.0 if task_score is None else float(task_score)
        breakdown = {"failed": failed, "stages": float(n), "stage_credit": credit, "task_score": task}
        return RewardResult(failed + credit + task, breakdown, status)


def score_run(credit: PartialCredit, run: Any, task_score: Callable[[str], float | None],
              status: Status = Status.OK) -> RewardResult:
    """The reward of a sandbox run (anything with ``.status``, a sandbox status string, and ``.stdout``).
    ``task_score`` grades the program's stdout without its marker lines (``None``: nothing to grade) and is called only
    when it ran to completion; an exception from it propagates (a broken grader is not the program's fault)."""
    if run.status != RAN_OK and run.status not in FAILED_RUNS:
        raise ValueError(f"sandbox status {run.status!r} is none of {sorted({RAN_OK, *FAILED_RUNS})}; "
                         "cannot tell whether the program ran")
    ran_ok = run.status == RAN_OK
    graded = task_score(strip_markers(run.stdout)) if ran_ok else None
    return credit.score(ran_ok, run.stdout, graded, status)
