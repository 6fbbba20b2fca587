"""The controller's stage table: which worker group fills which store column, from what.

A stage is a row of data, not a branch of code: the controller runs every stage the same way (find the rows that
have what it reads and lack its column, send them in whole groups to the least loaded worker, write what comes
back). A recipe declares its stages; GRPO's are rollout → (reward ∥ reference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rollflow.runtime.group import WorkerGroup


@dataclass
class Span:
    """Something a worker did, for the trace and the stage's busy time (``time.time()`` seconds)."""

    name: str
    start: float
    end: float
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Produced:
    """One row's value of a stage's column, with when its production started and finished."""

    uid: int
    value: Any
    started: float
    finished: float


@dataclass
class StageOutput:
    """What a stage worker's call returns: a value per row, and what the worker did meanwhile (``spans``; None
    means the call's own span, from the earliest start to the latest finish of its values; a rollout worker reports
    its engine batches and weight loads instead, each once, with whichever call returns next)."""

    values: list[Produced]
    spans: list[Span] | None = None


@dataclass(frozen=True)
class Stage:
    """One row of the stage table.

    ``method(items)`` is called on a worker of ``group`` with one item per row, ``item(uid, cells)`` built from the
    row's cells (every column it has: at least those ``column`` reads), and returns a ``StageOutput``. A call holds
    ``groups_per_call`` whole groups (with ``whole_groups=False``, that many rows: each episode is reported as soon
    as it finishes); each worker has at most ``calls_per_worker`` calls in flight (more for workers that run many
    episodes, or many slow rewards, at once)."""

    column: str
    group: WorkerGroup
    method: str
    item: Callable[[int, dict[str, Any]], Any]
    groups_per_call: int = 1
    calls_per_worker: int = 1
    whole_groups: bool = True
