"""The Ray backend: every worker is a Ray actor, the controller stays in the driver.

Bulk values never pass through the driver: a rollout worker ``ray.put``s its generations and hands the controller
small handles, which the trainer resolves from the object store; the trainer ``ray.put``s each weight version and
posts only its reference on a tiny board actor, from which rollout workers fetch it at their next safe point.

On one machine ``RayBackend`` starts a private Ray with the configured CPUs; with ``address='auto'`` (or
``host:port``) it joins a cluster started by ``ray start`` and leaves it running afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rollflow.api import VersionedWeights
from rollflow.runtime.backend import Resources, WorkerLost


@ray.remote
class _Host:
    """Hosts one worker object; ``call`` runs a method of it. Threads are set before the worker is built."""

    def __init__(self, factory: Callable[[], Any], torch_threads: int) -> None:
        self.torch_threads = torch_threads
        torch.set_num_threads(torch_threads)
        self.worker = factory()

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        # OpenMP's thread count is per calling thread; a threaded actor runs calls off the main thread, where it would
        # otherwise fall back to Ray's OMP_NUM_THREADS.
        torch.set_num_threads(self.torch_threads)
        try:
            return getattr(self.worker, method)(*args, **kwargs)
        finally:
            self.torch_threads = torch.get_num_threads()  # a call may change it (the trainer's ``set_threads``)


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


class RayBackend:
    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            if address is None:
                ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=True)
            else:
                ray.init(address=address, log_to_driver=True)
        self.payloads = RayPayloads()
        self._pools: dict[str, Any] = {}
        self._actors: list[Any] = []

    def spawn(self, name: str, factory: Callable[[], Any], resources: Resources) -> Any:
        options: dict[str, Any] = {
            "num_cpus": resources.num_cpus,
            "max_concurrency": resources.concurrency,
            "max_restarts": -1 if resources.restartable else 0,
        }
        if resources.pool is not None:
            pg, share = self._pools[resources.pool]
            options["num_cpus"] = share
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        actor = _Host.options(**options).remote(factory, resources.torch_threads)
        self._actors.append(actor)
        return actor

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
        self._actors, self._pools = [], {}
        if self.owns_ray:
            ray.shutdown()
