"""The Ray backend: every worker is a Ray actor, the controller stays in the driver.

Bulk values never pass through the driver: a rollout worker ``ray.put``s its generations and hands the controller
small handles, which the trainer resolves from the object store; the trainer ``ray.put``s each weight version and
posts only its reference on a tiny board actor, from which rollout workers fetch it at their next safe point.

On one machine ``RayBackend`` starts a private Ray with the configured CPUs; with ``address='auto'`` (or
``host:port``) it joins a cluster started by ``ray start`` and leaves it running afterwards.

A worker's factory is pickled to its actor, and what it holds by reference (a user's reward function from a module)
must be importable there. Ray itself passes on only the driver's working directory and script directory, as they
were at ``ray.init``, so every worker also gets the driver's import path (``driver_import_path``) as its
``PYTHONPATH``: what the driver can import, its workers can (on another node, where the same directories exist).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollflow.api import VersionedWeights
from rollflow.runtime.backend import Resources, WorkerLost, WorkerStartError, in_interpreter


@ray.remote
class _Host:
    """Hosts one worker object; ``call`` runs a method of it. Threads are set before the worker is built. An async
    method runs on the host's event loop (one thread, started at the first such call), so that every call in flight
    (up to the actor's ``max_concurrency``) shares it: a rollout worker's episodes from many calls batch together.

    A factory that raises leaves the actor alive with the error in one line, for ``start_error``: Ray's own report
    of a failed constructor is a traceback of its machinery, printed after the fact (and a restartable actor would
    be rebuilt, failing again)."""

    def __init__(self, name: str, factory: Callable[[], Any], torch_threads: int) -> None:
        self.torch_threads = torch_threads
        torch.set_num_threads(torch_threads)
        self.worker: Any = None
        self.error: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_lock = threading.Lock()
        try:
            self.worker = factory()
        except Exception as e:
            self.error = str(WorkerStartError.from_error(name, e))
        gc.freeze()  # the worker's model and libraries live as long as the actor: no need to scan them every full pass

    def start_error(self) -> str | None:
        return self.error

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self.error is not None:
            raise WorkerStartError(self.error)
        # OpenMP's thread count is per calling thread; a threaded actor runs calls off the main thread, where it would
        # otherwise fall back to Ray's OMP_NUM_THREADS.
        torch.set_num_threads(self.torch_threads)
        fn = getattr(self.worker, method)
        if inspect.iscoroutinefunction(fn):
            return asyncio.run_coroutine_threadsafe(fn(*args, **kwargs), self._loop()).result()
        try:
            return fn(*args, **kwargs)
        finally:
            self.torch_threads = torch.get_num_threads()  # a call may change it (the trainer's ``set_threads``)

    def _loop(self) -> asyncio.AbstractEventLoop:
        with self.loop_lock:
            if self.loop is None:
                self.loop = asyncio.new_event_loop()
                threading.Thread(target=self.loop.run_forever, name="episodes", daemon=True).start()
            return self.loop


@dataclass(frozen=True)
class ObjectHandle:
    """Element ``index`` of a list stored in Ray's object store."""

    ref: ray.ObjectRef
    index: int


class RayPayloads:
    def put(self, values: list[Any]) -> list[ObjectHandle]:
        ref = ray.put(list(values))
        return [ObjectHandle(ref, i) for i in range(len(values))]

    def get(self, handles: list[Any]) -> list[Any]:
        refs = list({h.ref: None for h in handles if isinstance(h, ObjectHandle)})
        lists = dict(zip(refs, ray.get(refs)))
        return [lists[h.ref][h.index] if isinstance(h, ObjectHandle) else h for h in handles]


@ray.remote(num_cpus=0)
class _WeightBoard:
    """Holds the reference of the newest weight version (the weights themselves stay in the object store)."""

    def __init__(self) -> None:
        self.version, self.box = -1, [None]

    def post(self, version: int, box: list[ray.ObjectRef]) -> None:
        if version <= self.version:
            raise ValueError(f"version {version} published after version {self.version}; versions must increase")
        self.version, self.box = version, box

    def newest(self) -> tuple[int, list[ray.ObjectRef | None]]:
        return self.version, self.box


class RayWeightTransport:
    """``publish`` stores the weights once in the object store; ``latest`` fetches them only when newer."""

    def __init__(self) -> None:
        self.board = _WeightBoard.remote()

    def publish(self, weights: VersionedWeights) -> None:
        ray.get(self.board.post.remote(weights.version, [ray.put(weights)]))  # the box keeps the ref from resolving

    def latest(self, newer_than: int) -> VersionedWeights | None:
        version, box = ray.get(self.board.newest.remote())
        return ray.get(box[0]) if version > newer_than else None


def driver_import_path() -> str:
    """This process's ``sys.path`` as a ``PYTHONPATH``, less the interpreter's own directories (which every worker
    has already, in their own order)."""
    paths = dict.fromkeys(os.path.abspath(p or os.curdir) for p in sys.path)  # '' is the working directory
    return os.pathsep.join(p for p in paths if os.path.exists(p) and not in_interpreter(p))


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


def _last_line(error: ray.exceptions.RayActorError) -> str:
    # Ray's message ends with the root cause ("ModuleNotFoundError: No module named 'x'") under its own traceback.
    lines = [line for line in str(getattr(error, "error_msg", error)).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


class RayBackend:
    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.owns_ray = not ray.is_initialized()
        self.private = self.owns_ray and address is None
        if self.private:
            # Its workers are children of the raylet started here and inherit its environment: the driver's import
            # path at no cost. Elsewhere each actor gets it in a runtime_env, which costs it a fresh process.
            with _environ("PYTHONPATH", driver_import_path()):
                ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True)
        elif self.owns_ray:
            ray.init(address=address, log_to_driver=True)
        self.payloads = RayPayloads()
        self._pools: dict[str, Any] = {}
        self._actors: list[Any] = []
        self._names: dict[Any, str] = {}

    def spawn(self, name: str, factory: Callable[[], Any], resources: Resources) -> Any:
        options: dict[str, Any] = {
            "num_cpus": resources.num_cpus,
            "max_concurrency": resources.concurrency,
            "max_restarts": -1 if resources.restartable else 0,
        }
        if not self.private:
            options["runtime_env"] = {"env_vars": {"PYTHONPATH": driver_import_path()}}
        if resources.pool is not None:
            pg, share = self._pools[resources.pool]
            options["num_cpus"] = share
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        actor = _Host.options(**options).remote(name, factory, resources.torch_threads)
        self._actors.append(actor)
        self._names[actor] = name
        return actor

    def wait_started(self, workers: list[Any]) -> None:
        """Reports the first failure to arrive, not the first worker's: a slow worker does not delay the news."""
        pending = {worker.start_error.remote(): worker for worker in workers}
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            worker = pending.pop(done)
            try:
                error = ray.get(done)
            except ray.exceptions.RayActorError as e:  # died before its constructor ran, e.g. unpicklable arguments
                raise WorkerStartError(f"worker {self._names[worker]} failed to start: {_last_line(e)}") from None
            if error is not None:
                raise WorkerStartError(error)

    def make_pool(self, name: str, num_cpus: float, members: int) -> None:
        """One bundle of ``num_cpus`` on one node, shared by ``members`` workers that take turns on it."""
        pg = placement_group([{"CPU": num_cpus}], strategy="STRICT_PACK")
        ray.get(pg.ready())
        self._pools[name] = (pg, num_cpus / members)

    def submit(self, worker: Any, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        return worker.call.remote(method, *args, **kwargs)

    def wait(self, calls: list[ray.ObjectRef], timeout: float | None = None) -> list[ray.ObjectRef]:
        ready, _ = ray.wait(calls, num_returns=1, timeout=timeout, fetch_local=True)
        return ready

    def result(self, call: ray.ObjectRef) -> Any:
        return ray.get(call)

    def is_worker_lost(self, error: BaseException) -> bool:
        lost = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError, WorkerLost)
        return isinstance(error, lost)

    def weight_transport(self) -> RayWeightTransport:
        return RayWeightTransport()

    def shutdown(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        for pg, _ in self._pools.values():
            remove_placement_group(pg)
        self._actors, self._pools, self._names = [], {}, {}
        if self.owns_ray:
            ray.shutdown()
