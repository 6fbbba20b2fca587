"""Worker groups: one driver-side call fans out to N workers and gathers their results.

A worker method declares how its input is split and its output gathered with ``@dispatch(...)``; the group reads
that typed attribute and does dispatch → execute → collect through its backend: the ``inline`` backend runs the
workers in this process one after another, the Ray backend runs the calls on actors at the same time.
``group.submit(i, method, ...)`` starts one call on worker ``i`` without waiting (the controller's streaming loop).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from rollflow.runtime.backend import Backend, InlineBackend, Resources, WorkerGone

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

    def call(self, index: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``method`` on worker ``index`` and return its result, waiting for the worker if it is being rebuilt."""
        return self._finish(index, self.submit(index, method, *args, **kwargs), method, args, kwargs)

    def _call(self, method: str, mode: Mode, args: tuple, kwargs: dict) -> Any:
        if mode is Mode.FIRST:
            return self._finish(0, self.submit(0, method, *args, **kwargs), method, args, kwargs)
        if mode is Mode.BROADCAST:
            calls = [self.submit(i, method, *args, **kwargs) for i in range(len(self))]
            return [self._finish(i, c, method, args, kwargs) for i, c in enumerate(calls)]
        first, rest = args[0], args[1:]
        parts = [(i, part) for i, part in enumerate(chunks(list(first), len(self))) if part]
        calls = [self.submit(i, method, part, *rest, **kwargs) for i, part in parts]
        return [x for (i, part), c in zip(parts, calls) for x in self._finish(i, c, method, (part, *rest), kwargs)]

    def _finish(self, i: int, call: Any, method: str, args: tuple, kwargs: dict, attempts: int = 3) -> Any:
        """The result of ``call`` on worker ``i``. If the worker was lost, wait until the backend has rebuilt it and
        call again (driver calls are safe to repeat: publish, evaluate, save, set_threads, ...), up to ``attempts``
        calls; a worker that does not come back raises ``WorkerGone``."""
        for attempt in range(attempts):
            try:
                return self.backend.result(call)
            except Exception as e:
                if not self.backend.is_worker_lost(e):
                    raise
                if attempt == attempts - 1:
                    raise WorkerGone(f"{self.name}/{i} was lost {attempts} times during {method}") from e
                self._wait_back(i, e)
                call = self.submit(i, method, *args, **kwargs)
        raise AssertionError("unreachable")

    def _wait_back(self, i: int, error: BaseException, timeout: float = 120.0) -> None:
        """Block until worker ``i``, lost with ``error``, answers a ping; ``WorkerGone`` if it is gone for good or
        not rebuilt within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.backend.result(self.backend.ping(self.workers[i]))
                return
            except Exception as e:
                if not self.backend.is_worker_lost(e):
                    raise
                if not self.backend.is_restarting(e):
                    raise WorkerGone(f"{self.name}/{i} was lost ({type(error).__name__}) and is not coming back") from e
                error = e
            time.sleep(0.2)
        raise WorkerGone(f"{self.name}/{i} was not rebuilt within {timeout:g} s") from error
