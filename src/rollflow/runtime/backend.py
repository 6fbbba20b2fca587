"""Backends run workers and calls on them. A call returns a handle at once; ``wait`` blocks until some handles are
done and ``result`` gives a done call's value (or raises its error). The controller is written only against this.

``InlineBackend`` keeps every worker in this process and runs each call when it is submitted, so a run is
deterministic and debuggable; ``RayBackend`` (``runtime.ray_backend``) runs each worker as a Ray actor.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rollflow.runtime.weights import InlineWeightTransport


class WorkerLost(RuntimeError):
    """A worker is gone (its process died, its node left). The calls it held are infrastructure faults: retried."""


class WorkerStartError(RuntimeError):
    """A worker could not be built (its factory raised): the run stops before it starts, naming the worker."""

    @classmethod
    def from_error(cls, name: str, error: BaseException) -> WorkerStartError:
        """One line: the worker (``role/index``), the error's type and message, and where it was raised."""
        return cls(f"worker {name} failed to start: {type(error).__name__}: {error}{_where(error)}")


def in_interpreter(path: str) -> bool:
    """Whether ``path`` lies in the interpreter's own directories (the standard library, installed packages)."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    return any(path == d or path.startswith(os.path.join(d, "")) for d in dirs)


def _where(error: BaseException) -> str:
    # The innermost frame of code a reader can act on (the user's or rollflow's): not the interpreter's own, nor a
    # frozen importlib frame ("<frozen ...>").
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith("<") and not in_interpreter(f.filename)]
    return f" (at {frames[-1].filename}:{frames[-1].lineno}, in {frames[-1].name})" if frames else ""


@dataclass(frozen=True)
class Resources:
    """What one worker of a role asks for."""

    num_cpus: float = 1.0
    torch_threads: int = 1
    concurrency: int = 1  # calls the worker may run at once (threads); >1 only for workers that mostly wait
    pool: str | None = None  # workers naming the same pool share its CPUs (colocated placement)
    restartable: bool = False  # a crashed worker is rebuilt by its factory (stateless roles only)


class Payloads(Protocol):
    """Moves bulk values between workers: ``put`` where they are made, ``get`` where they are used."""

    def put(self, values: list[Any]) -> list[Any]: ...

    def get(self, handles: list[Any]) -> list[Any]: ...


class LocalPayloads:
    """In one process a value is its own handle."""

    def put(self, values: list[Any]) -> list[Any]:
        return list(values)

    def get(self, handles: list[Any]) -> list[Any]:
        return list(handles)


class Backend(Protocol):
    name: str
    payloads: Payloads

    def spawn(self, name: str, factory: Callable[[], Any], resources: Resources) -> Any:
        """Start building worker ``name`` (``role/index``); may return before it is built."""
        ...

    def wait_started(self, workers: list[Any]) -> None:
        """Block until every spawned worker is built; raise ``WorkerStartError`` for the first that could not be."""
        ...

    def make_pool(self, name: str, num_cpus: float, members: int) -> None: ...

    def submit(self, worker: Any, method: str, *args: Any, **kwargs: Any) -> Any: ...

    def wait(self, calls: list[Any], timeout: float | None = None) -> list[Any]: ...

    def result(self, call: Any) -> Any: ...

    def is_worker_lost(self, error: BaseException) -> bool: ...

    def weight_transport(self) -> Any: ...

    def shutdown(self) -> None: ...


class _Done:
    """An inline call: already run; holds its value or its error."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        try:
            self.value = fn()
        except Exception as e:  # handed to whoever asks for the result, as a remote error would be
            self.error = e


class InlineBackend:
    name = "inline"

    def __init__(self) -> None:
        self.payloads = LocalPayloads()

    def spawn(self, name: str, factory: Callable[[], Any], resources: Resources) -> Any:
        try:
            return factory()  # threads: this process's setting applies to every inline worker
        except Exception as e:
            raise WorkerStartError.from_error(name, e) from e

    def wait_started(self, workers: list[Any]) -> None:
        pass  # built by ``spawn`` already

    def make_pool(self, name: str, num_cpus: float, members: int) -> None:
        pass  # one process: every worker already shares everything

    def submit(self, worker: Any, method: str, *args: Any, **kwargs: Any) -> _Done:
        return _Done(lambda: getattr(worker, method)(*args, **kwargs))

    def wait(self, calls: list[Any], timeout: float | None = None) -> list[Any]:
        return calls[:1]  # every inline call is done; hand them back in submission order

    def result(self, call: _Done) -> Any:
        if call.error is not None:
            raise call.error
        return call.value

    def is_worker_lost(self, error: BaseException) -> bool:
        return isinstance(error, WorkerLost)

    def weight_transport(self) -> InlineWeightTransport:
        return InlineWeightTransport()

    def shutdown(self) -> None:
        pass
