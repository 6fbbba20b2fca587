"""The Ray backend: every worker is a Ray actor, the controller stays in the driver.

Bulk values never pass through the driver, and outlive the worker that made them. What a worker ``put``s during a
call leaves with the call, as its second return value: the caller (the driver) owns a call's returns, so Ray keeps
them when the worker's process dies, where an object the worker ``ray.put`` itself would die with it (Ray 2.60 has
no ``ray.put(_owner=...)``). Inside the call ``put`` hands out placeholders; the driver, taking the call's result,
turns them into handles on that second return without fetching it, and the worker that consumes them fetches it
from the object store. The trainer ``ray.put``s each weight version and posts only its reference on a tiny board
actor, from which rollout workers fetch it at their next safe point.

Workers can be told apart from outside. Each actor is named after its worker (``rollout/0`` → ``rollout-0``) in
its backend's namespace, ``rollflow-<driver pid>-<n>``, given per actor so that it holds whether the backend started
Ray or joined one: two runs on one cluster never collide. Its class is named after the worker's, so its process
shows as ``ray::RolloutWorker``. ``kill`` ends an actor's process as a crash would; Ray rebuilds a restartable
worker from its factory, and until it is back fails every call sent to it (``pid`` waits for it).

On one machine ``RayBackend`` starts a private Ray with the configured CPUs, without a dashboard (so without
``ray list actors``: ``ray.get_actor(name, namespace)`` finds a worker); with ``address='auto'`` (or ``host:port``)
it joins a cluster started by ``ray start`` and leaves it running afterwards.

A worker's factory is pickled to its actor, and what it holds by reference (a user's reward function from a module)
must be importable there. Ray itself passes on only the driver's working directory and script directory, as they
were at ``ray.init``, so every worker also gets the driver's import path (``driver_import_path``) as its
``PYTHONPATH``: what the driver can import, its workers can (on another node, where the same directories exist).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import gc
import inspect
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollflow.api import VersionedWeights
from rollflow.runtime.backend import Resources, WorkerLost, WorkerStartError, in_interpreter

# The values ``RayPayloads.put`` was given during the call this context runs (None: not in a call).
_OUTBOX: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar("rollflow_outbox", default=None)


@dataclass(frozen=True)
class _Pending:
    """A value put during a call: element ``index`` of the call's second return (an ``ObjectHandle`` once the
    driver has the call's result)."""

    index: int


@dataclass(frozen=True)
class _Carrying:
    """A call's result that holds ``_Pending`` handles (the driver looks for them only in such results)."""

    result: Any


class _Host:
    """Hosts one worker object; ``call`` runs a method of it. Threads are set before the worker is built. An async
    method runs on the host's event loop (one thread, started at the first such call), so that every call in flight
    (up to the actor's ``max_concurrency``) shares it: a rollout worker's episodes from many calls batch together.

    ``call`` returns the method's result and the values it put (see the module docstring). ``pid`` runs in a
    concurrency group of its own, so it answers while the worker is busy (a test or a benchmark about to kill it).

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

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        return os.getpid()

    @ray.method(num_returns=2)
    def call(self, method: str, *args: Any, **kwargs: Any) -> tuple[Any, list[Any] | None]:
        if self.error is not None:
            raise WorkerStartError(self.error)
        # OpenMP's thread count is per calling thread; a threaded actor runs calls off the main thread, where it would
        # otherwise fall back to Ray's OMP_NUM_THREADS.
        torch.set_num_threads(self.torch_threads)
        fn = getattr(self.worker, method)
        outbox: list[Any] = []
        if inspect.iscoroutinefunction(fn):
            result = asyncio.run_coroutine_threadsafe(_with_outbox(outbox, fn(*args, **kwargs)), self._loop()).result()
        else:
            token = _OUTBOX.set(outbox)
            try:
                result = fn(*args, **kwargs)
            finally:
                _OUTBOX.reset(token)
                self.torch_threads = torch.get_num_threads()  # a call may change it (the trainer's ``set_threads``)
        return (_Carrying(result), outbox) if outbox else (result, None)

    def _loop(self) -> asyncio.AbstractEventLoop:
        with self.loop_lock:
            if self.loop is None:
                self.loop = asyncio.new_event_loop()
                threading.Thread(target=self.loop.run_forever, name="episodes", daemon=True).start()
            return self.loop


async def _with_outbox(outbox: list[Any], coro: Coroutine[Any, Any, Any]) -> Any:
    # Set inside the task that runs the call: the loop thread's context is not the calling thread's, and every task
    # has its own copy of it, so the calls in flight on one loop keep separate outboxes.
    _OUTBOX.set(outbox)
    return await coro


@functools.cache
def _host_class(cls_name: str) -> Any:
    """The remote ``_Host`` class named ``cls_name``: Ray names an actor's process after its class."""
    host = type(cls_name, (_Host,), {"__module__": __name__, "__qualname__": cls_name})
    return ray.remote(concurrency_groups={"control": 1})(host)


@dataclass(frozen=True)
class ObjectHandle:
    """Element ``index`` of a list stored in Ray's object store."""

    ref: ray.ObjectRef
    index: int


class RayPayloads:
    """``put`` during a worker's call sends the values out with the call's return (they outlive the worker). Anywhere
    else it ``ray.put``s them, owned by that process: on the driver, and on a thread that does not carry the call's
    context (an executor's thread does not; ``asyncio.to_thread`` does)."""

    def put(self, values: list[Any]) -> list[ObjectHandle | _Pending]:
        outbox = _OUTBOX.get()
        if outbox is None:
            ref = ray.put(list(values))
            return [ObjectHandle(ref, i) for i in range(len(values))]
        first = len(outbox)
        outbox.extend(values)
        return [_Pending(first + i) for i in range(len(values))]

    def get(self, handles: list[Any]) -> list[Any]:
        pending = [h for h in handles if isinstance(h, _Pending)]
        if pending:
            raise ValueError(f"payload handle {pending[0]} is read before the call that put it returned it to the "
                             "driver: a handle becomes readable once the driver has the call's result, and only where "
                             "that result holds it in a list, tuple, dict or dataclass")
        refs = list({h.ref: None for h in handles if isinstance(h, ObjectHandle)})
        lists = dict(zip(refs, ray.get(refs)))
        return [lists[h.ref][h.index] if isinstance(h, ObjectHandle) else h for h in handles]


def _fill(value: Any, bulk: ray.ObjectRef) -> Any:
    """``value`` with each ``_Pending`` in it (through lists, tuples, dicts and dataclasses) made a handle on
    ``bulk``; what holds none is returned as it is."""
    if isinstance(value, _Pending):
        return ObjectHandle(bulk, value.index)
    if type(value) in (list, tuple):
        items = [_fill(v, bulk) for v in value]
        return type(value)(items) if any(a is not b for a, b in zip(items, value)) else value
    if type(value) is dict:
        filled = {k: _fill(v, bulk) for k, v in value.items()}
        return filled if any(filled[k] is not v for k, v in value.items()) else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changed = {}
        for f in dataclasses.fields(value):
            if f.init and (new := _fill(old := getattr(value, f.name), bulk)) is not old:
                changed[f.name] = new
        return dataclasses.replace(value, **changed) if changed else value
    return value


@dataclass(frozen=True, eq=False)
class RayCall:
    """A submitted call: ``ref`` its result, ``bulk`` the values it put (kept with the call, so a call dropped
    unread leaves nothing behind)."""

    ref: ray.ObjectRef
    bulk: ray.ObjectRef | None


@ray.remote(num_cpus=0)
class _WeightBoard:
    """Holds the reference of the newest weight version and of the pinned ones (the weights themselves stay in the
    object store)."""

    def __init__(self) -> None:
        self.version, self.box = -1, [None]
        self.pins: dict[str, list[ray.ObjectRef | None]] = {}

    def pin(self, name: str, box: list[ray.ObjectRef] | None) -> None:
        if box is None and self.box[0] is None:
            raise ValueError(f"nothing to pin as {name!r}: no version published yet")
        self.pins[name] = box if box is not None else self.box

    def pinned(self, name: str) -> list[ray.ObjectRef | None]:
        return self.pins.get(name, [None])

    def post(self, version: int, box: list[ray.ObjectRef]) -> None:
        if version <= self.version:
            raise ValueError(f"version {version} published after version {self.version}; versions must increase")
        self.version, self.box = version, box

    def newest(self) -> tuple[int, list[ray.ObjectRef | None]]:
        return self.version, self.box


class RayWeightTransport:
    """``publish`` stores the weights once in the object store; ``latest`` fetches them only when newer.

    The board is a named actor, and the transport travels as that name: a worker's constructor arguments then hold
    no actor handle, which Ray would otherwise have to keep for the worker's restarts."""

    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace
        self.board = _WeightBoard.options(name=_BOARD, namespace=namespace).remote() if namespace else _WeightBoard.remote()

    def __reduce__(self) -> tuple[Any, ...]:
        if self.namespace is None:
            return object.__reduce__(self)
        return _board_transport, (self.namespace,)

    def publish(self, weights: VersionedWeights) -> None:
        ray.get(self.board.post.remote(weights.version, [ray.put(weights)]))  # the box keeps the ref from resolving

    def latest(self, newer_than: int) -> VersionedWeights | None:
        version, box = ray.get(self.board.newest.remote())
        return ray.get(box[0]) if version > newer_than else None

    def newest_version(self) -> int:
        return ray.get(self.board.newest.remote())[0]

    def pin(self, name: str, weights: VersionedWeights | None = None) -> None:
        ray.get(self.board.pin.remote(name, None if weights is None else [ray.put(weights)]))

    def pinned(self, name: str) -> VersionedWeights | None:
        [ref] = ray.get(self.board.pinned.remote(name))
        return None if ref is None else ray.get(ref)


class RayPeer:
    """``Peer`` of a Ray worker, travelling as its actor's name: the handle is looked up in the process that calls
    (and again after the actor was rebuilt, which keeps its name)."""

    def __init__(self, name: str, namespace: str) -> None:
        self.name, self.namespace = name, namespace
        self._handle: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name, "namespace": self.namespace, "_handle": None}

    async def call(self, method: str, *args: Any) -> Any:
        if self._handle is None:
            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        result, _ = self._handle.call.remote(method, *args)
        return await result


_BOARD = "weights"  # the weight board's actor name, in its backend's namespace


def _board_transport(namespace: str) -> RayWeightTransport:
    """A transport on the board already running in ``namespace`` (how a worker receives the driver's)."""
    transport = RayWeightTransport.__new__(RayWeightTransport)
    transport.namespace = namespace
    transport.board = ray.get_actor(_BOARD, namespace=namespace)
    return transport


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


_backends = itertools.count()  # numbers this process's backends, for their namespaces


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
        self.namespace = f"rollflow-{os.getpid()}-{next(_backends)}"
        self.payloads = RayPayloads()
        self._pools: dict[str, Any] = {}
        self._actors: list[Any] = []
        self._names: dict[Any, str] = {}

    def spawn(self, name: str, factory: Callable[[], Any], resources: Resources, *, cls_name: str | None = None) -> Any:
        """An actor named after the worker (``rollout/0`` → ``rollout-0``) in this backend's namespace, whose process
        is named after ``cls_name`` (``ray::RolloutWorker``; ``ray::RollflowWorker`` when not given)."""
        options: dict[str, Any] = {
            "name": name.replace("/", "-"),
            "namespace": self.namespace,
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
        host = _host_class(cls_name or "RollflowWorker")
        actor = host.options(**options).remote(name, factory, resources.torch_threads)
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

    def submit(self, worker: Any, method: str, *args: Any, **kwargs: Any) -> RayCall:
        return RayCall(*worker.call.remote(method, *args, **kwargs))

    def wait(self, calls: list[RayCall], timeout: float | None = None) -> list[RayCall]:
        by_ref = {c.ref: c for c in calls}
        ready, _ = ray.wait(list(by_ref), num_returns=1, timeout=timeout, fetch_local=True)
        return [by_ref[r] for r in ready]

    def result(self, call: RayCall) -> Any:
        value = ray.get(call.ref)
        return _fill(value.result, call.bulk) if isinstance(value, _Carrying) else value

    def kill(self, worker: Any) -> bool:
        """Kill the worker's process as a crash would: its calls in flight fail as lost; a restartable worker is
        rebuilt by its factory and takes the calls submitted from now on."""
        ray.kill(worker, no_restart=False)
        return True

    def pid(self, worker: Any, timeout: float = 60.0) -> int:
        """The worker's process id. It answers while the worker is busy, and waits (up to ``timeout`` seconds) while
        Ray rebuilds a killed worker, during which every call to it fails as lost: Ray sends a restarting actor no
        calls, it fails them at once."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return ray.get(worker.pid.remote())
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def ping(self, worker: Any) -> RayCall:
        return RayCall(worker.pid.remote(), None)

    def is_restarting(self, error: BaseException) -> bool:
        return isinstance(error, ray.exceptions.ActorUnavailableError)

    def is_worker_lost(self, error: BaseException) -> bool:
        lost = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError, WorkerLost)
        return isinstance(error, lost)

    def weight_transport(self) -> RayWeightTransport:
        return RayWeightTransport(self.namespace)

    def peer(self, worker: Any) -> RayPeer:
        return RayPeer(self._names[worker].replace("/", "-"), self.namespace)

    def shutdown(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        for pg, _ in self._pools.values():
            remove_placement_group(pg)
        self._actors, self._pools, self._names = [], {}, {}
        if self.owns_ray:
            ray.shutdown()
