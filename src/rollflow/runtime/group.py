"""Worker groups: one driver-side call fans out to N workers and gathers their results.

A worker method declares how its input is split and its output gathered with ``@dispatch(...)``; the group reads
that typed attribute and does dispatch → execute → collect. The ``inline`` backend runs workers in this process,
one after another; a Ray backend runs the same methods on actors.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Mode(enum.Enum):
    SPLIT = "split"  # first argument (a list) is cut into near-equal contiguous chunks; result lists are concatenated
    BROADCAST = "broadcast"  # every worker gets the same arguments; the list of their results is returned
    FIRST = "first"  # only worker 0 is called (the trainer); its result is returned


@dataclass(frozen=True)
class DispatchSpec:
    mode: Mode


def dispatch(mode: Mode) -> Callable[[F], F]:
    def mark(fn: F) -> F:
        fn.__rollflow_dispatch__ = DispatchSpec(mode)  # type: ignore[attr-defined]
        return fn

    return mark


def chunks(items: list[Any], n: int) -> list[list[Any]]:
    """Cut ``items`` into ``n`` contiguous chunks whose sizes differ by at most one."""
    q, r = divmod(len(items), n)
    bounds = [i * q + min(i, r) for i in range(n + 1)]
    return [items[bounds[i] : bounds[i + 1]] for i in range(n)]


class WorkerGroup:
    """``group.method(...)`` calls ``method`` on the workers as the method's ``@dispatch`` mode says."""

    def __init__(self, name: str, workers: list[Any]) -> None:
        if not workers:
            raise ValueError(f"worker group '{name}' needs at least one worker")
        self.name, self.workers = name, workers

    def __len__(self) -> int:
        return len(self.workers)

    def __getattr__(self, method: str) -> Callable[..., Any]:
        fn = getattr(type(self.workers[0]), method, None)
        spec: DispatchSpec | None = getattr(fn, "__rollflow_dispatch__", None)
        if spec is None:
            raise AttributeError(f"{type(self.workers[0]).__name__}.{method} is not a @dispatch method of group '{self.name}'")
        return lambda *args, **kwargs: self._call(method, spec.mode, args, kwargs)

    def _call(self, method: str, mode: Mode, args: tuple, kwargs: dict) -> Any:
        if mode is Mode.FIRST:
            return getattr(self.workers[0], method)(*args, **kwargs)
        if mode is Mode.BROADCAST:
            return [getattr(w, method)(*args, **kwargs) for w in self.workers]
        first, rest = args[0], args[1:]
        out: list[Any] = []
        for worker, part in zip(self.workers, chunks(list(first), len(self.workers))):
            if part:
                out.extend(getattr(worker, method)(part, *rest, **kwargs))
        return out
