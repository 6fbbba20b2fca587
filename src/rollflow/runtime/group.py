"""Worker groups: one driver-side call fans out to N workers and gathers their results.

A worker method declares how its input is split and its output gathered with ``@dispatch(...)``; the group reads
that typed attribute and does dispatch → execute → collect through its backend: the ``inline`` backend runs the
workers in this process one after another, the Ray backend runs the calls on actors at the same time.
``group.submit(i, method, ...)`` starts one call on worker ``i`` without waiting (the controller's streaming loop).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from rollflow.runtime.backend import Backend, InlineBackend, Resources

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
    """``group.method(...)`` calls ``method`` on the workers as the method's ``@dispatch`` mode says.

    ``workers`` are what the backend's ``spawn`` returned (the objects themselves inline, actor handles on Ray);
    ``cls`` is their class, where the dispatch modes are read."""

    def __init__(self, name: str, workers: list[Any], backend: Backend | None = None, cls: type | None = None) -> None:
        if not workers:
            raise ValueError(f"worker group '{name}' needs at least one worker")
        self.name, self.workers = name, workers
        self.backend: Backend = backend or InlineBackend()
        self.cls = cls or type(workers[0])

    @classmethod
    def spawn(cls, backend: Backend, name: str, worker_cls: type, factories: list[Callable[[], Any]], resources: Resources) -> WorkerGroup:
        workers = [backend.spawn(f"{name}/{i}", f, resources, cls_name=worker_cls.__name__) for i, f in enumerate(factories)]
        return cls(name, workers, backend, worker_cls)

    def __len__(self) -> int:
        return len(self.workers)

    def __getattr__(self, method: str) -> Callable[..., Any]:
        fn = getattr(self.cls, method, None)
        spec: DispatchSpec | None = getattr(fn, "__rollflow_dispatch__", None)
        if spec is None:
            raise AttributeError(f"{self.cls.__name__}.{method} is not a @dispatch method of group '{self.name}'")
        return lambda *args, **kwargs: self._call(method, spec.mode, args, kwargs)

    def submit(self, index: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """Start ``method`` on worker ``index``; returns the backend's call handle."""
        return self.backend.submit(self.workers[index], method, *args, **kwargs)

    def _call(self, method: str, mode: Mode, args: tuple, kwargs: dict) -> Any:
        if mode is Mode.FIRST:
            return self.backend.result(self.submit(0, method, *args, **kwargs))
        if mode is Mode.BROADCAST:
            calls = [self.submit(i, method, *args, **kwargs) for i in range(len(self))]
            return [self.backend.result(c) for c in calls]
        first, rest = args[0], args[1:]
        calls = [self.submit(i, method, part, *rest, **kwargs)
                 for i, part in enumerate(chunks(list(first), len(self))) if part]
        return [x for c in calls for x in self.backend.result(c)]
