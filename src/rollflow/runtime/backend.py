"""Backends run workers and calls on them. A call returns a handle at once; ``wait`` blocks until some handles are
done and ``result`` gives a done call's value (or raises its error). The controller is written only against this.

A worker method may be ``async`` (a rollout worker's, which runs many episodes at once): every backend runs it on an
event loop of the worker's process, and a plain method as it is.

``InlineBackend`` keeps every worker in this process. A plain call runs when it is submitted; an async call becomes a
task on the backend's one event loop, which runs only inside ``wait``, until the first pending call finishes. Calls
are handed back in submission order among those done, so a run without wall-clock waits is deterministic.
``RayBackend`` (``runtime.ray_backend``) runs each worker as a Ray actor.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rollflow.runtime.weights import InlineWeightTransport


class WorkerLost(RuntimeError):
    """A worker is gone (its process died, its node left). The calls it held are infrastructure faults: retried."""


class WorkerGone(RuntimeError):
    """A worker was lost and did not come back (not restartable, like the trainer, or its rebuild failed): the run
    goes back to its last checkpoint."""


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
    concurrency: int = 1  # calls the worker may run at once; >1 for workers that mostly wait or run many episodes
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

    def spawn(self, name: str, factory: Callable[[], Any], resources: Resources, *, cls_name: str | None = None) -> Any:
        """Start building worker ``name`` (``role/index``), of class ``cls_name`` (which the backend may show, e.g. as
        the worker's process title); may return before it is built."""
        ...

    def wait_started(self, workers: list[Any]) -> None:
        """Block until every spawned worker is built; raise ``WorkerStartError`` for the first that could not be."""
        ...

    def make_pool(self, name: str, num_cpus: float, members: int) -> None: ...

    def submit(self, worker: Any, method: str, *args: Any, **kwargs: Any) -> Any: ...

    def wait(self, calls: list[Any], timeout: float | None = None) -> list[Any]: ...

    def result(self, call: Any) -> Any: ...

    def kill(self, worker: Any) -> bool:
        """Kill ``worker`` as a crash would: its calls in flight fail as lost (``is_worker_lost``) and a restartable
        worker is rebuilt by its factory. False where the backend cannot (a worker in this process)."""
        ...

    def ping(self, worker: Any) -> Any:
        """A call that succeeds once ``worker`` takes calls (a worker being rebuilt fails it as lost)."""
        ...

    def is_restarting(self, error: BaseException) -> bool:
        """Whether ``error`` says the worker is being rebuilt (ask again soon), not gone for good."""
        ...

    def is_worker_lost(self, error: BaseException) -> bool: ...

    def weight_transport(self) -> Any: ...

    def peer(self, worker: Any) -> Peer:
        """A reference to ``worker`` that another worker can hold and call (``await peer.call(method, ...)``)."""
        ...

    def shutdown(self) -> None: ...


class Peer(Protocol):
    """A worker as another worker calls it (an actor asking a policy worker for actions): picklable, awaitable."""

    async def call(self, method: str, *args: Any) -> Any: ...


class InlinePeer:
    """``Peer`` of a worker in this process: its method, called on the caller's event loop (awaited if async)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    async def call(self, method: str, *args: Any) -> Any:
        result = getattr(self.worker, method)(*args)
        return await result if inspect.isawaitable(result) else result


class _Done:
    """A plain inline call: already run; holds its value or its error."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        try:
            self.value = fn()
        except Exception as e:  # handed to whoever asks for the result, as a remote error would be
            self.error = e

    def done(self) -> bool:
        return True


class _Task:
    """An async inline call: a task on the backend's loop."""

    def __init__(self, task: asyncio.Task) -> None:
        self.task = task

    def done(self) -> bool:
        return self.task.done()


class InlineBackend:
    name = "inline"

    def __init__(self) -> None:
        self.payloads = LocalPayloads()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop async calls run on, made at the first one (closed by ``shutdown``, or when the backend is
        garbage collected)."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            weakref.finalize(self, _close, self._loop)
        return self._loop

    def spawn(self, name: str, factory: Callable[[], Any], resources: Resources, *, cls_name: str | None = None) -> Any:
        try:
            return factory()  # threads: this process's setting applies to every inline worker
        except Exception as e:
            raise WorkerStartError.from_error(name, e) from e

    def wait_started(self, workers: list[Any]) -> None:
        pass  # built by ``spawn`` already

    def make_pool(self, name: str, num_cpus: float, members: int) -> None:
        pass  # one process: every worker already shares everything

    def submit(self, worker: Any, method: str, *args: Any, **kwargs: Any) -> _Done | _Task:
        fn = getattr(worker, method)
        if inspect.iscoroutinefunction(fn):
            return _Task(self.loop.create_task(fn(*args, **kwargs)))
        return _Done(lambda: fn(*args, **kwargs))

    def wait(self, calls: list[Any], timeout: float | None = None) -> list[Any]:
        """The first done call (in submission order); runs the loop until one is, or ``timeout`` passes."""
        if not any(c.done() for c in calls):
            tasks = [c.task for c in calls if isinstance(c, _Task)]
            if tasks:
                self.loop.run_until_complete(asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED))
        return [c for c in calls if c.done()][:1]

    def result(self, call: _Done | _Task) -> Any:
        if isinstance(call, _Task):
            if not call.task.done():
                self.loop.run_until_complete(asyncio.wait([call.task]))
            return call.task.result()
        if call.error is not None:
            raise call.error
        return call.value

    def kill(self, worker: Any) -> bool:
        return False  # a call runs in this process: nothing to kill without killing the run

    def ping(self, worker: Any) -> _Done:
        return _Done(lambda: None)

    def is_restarting(self, error: BaseException) -> bool:
        return False

    def is_worker_lost(self, error: BaseException) -> bool:
        return isinstance(error, WorkerLost)

    def weight_transport(self) -> InlineWeightTransport:
        return InlineWeightTransport()

    def peer(self, worker: Any) -> InlinePeer:
        return InlinePeer(worker)

    def shutdown(self) -> None:
        """Cancel the async calls still running (a run stopped by an error) and close the loop."""
        if self._loop is not None:
            _close(self._loop)


def _close(loop: asyncio.AbstractEventLoop) -> None:
    if loop.is_closed():
        return
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.wait(pending))
    loop.close()
