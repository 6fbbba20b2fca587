"""The Ray backend's workers seen from outside: named actors and processes, payloads that outlive the worker that put
them, and a killed worker rebuilt by its factory."""

import asyncio
import dataclasses
import os
import signal
import time
from functools import partial
from pathlib import Path

import pytest
import ray
import torch

from rollflow.api import Status, TrajectoryCell
from rollflow.runtime.backend import InlineBackend, Resources
from rollflow.runtime.ray_backend import ObjectHandle, RayBackend, RayPayloads, _fill, _Pending
from rollflow.runtime.stage import Produced, StageOutput

SECONDS = 30  # how long a test waits for a call before it fails (a hung call would otherwise hang the suite)


class Producer:
    """Puts values in the payload store and returns them as a rollout worker does: light cells with handles."""

    def __init__(self, payloads: RayPayloads) -> None:
        self.payloads = payloads

    def produce(self, values: list) -> StageOutput:
        cells = [TrajectoryCell(0, 1, Status.OK, "", "eos", 0.0, 0.0, None, {}, h) for h in self.payloads.put(values)]
        return StageOutput([Produced(uid, cell, 0.0, 0.0) for uid, cell in enumerate(cells)])

    async def produce_async(self, values: list, pause: float = 0.0) -> StageOutput:
        output = self.produce(values)
        await asyncio.sleep(pause)  # other calls' episodes run meanwhile on the worker's loop
        return output

    def own(self, values: list) -> list:
        return [ray.put(values)]  # owned by this worker, as every payload was before they left with the call

    def read_own(self, values: list) -> list:
        return self.payloads.get(self.payloads.put(values))

    def read(self, handles: list) -> list:
        return self.payloads.get(handles)


class Sleeper:
    """Knows the process it was built in."""

    def __init__(self) -> None:
        self.built_in = os.getpid()

    def sleep(self, seconds: float) -> int:
        time.sleep(seconds)
        return self.built_in


@pytest.fixture(scope="module")
def backend():
    backend = RayBackend(num_cpus=2)  # a private Ray: its workers import this module through the driver's path
    yield backend
    backend.shutdown()


@pytest.fixture
def spawn(backend):
    """``spawn(name, factory, ...)`` → a started worker, killed for good after the test. Ray frees a name a moment
    after the kill, so each test names its workers apart from the others'."""
    spawned = []

    def spawn(name, factory, restartable=False, cls_name=None):
        worker = backend.spawn(name, factory, Resources(0, restartable=restartable), cls_name=cls_name)
        backend.wait_started([worker])
        spawned.append(worker)
        return worker

    yield spawn
    for worker in spawned:
        ray.kill(worker)


@pytest.fixture(scope="module")
def reader(backend):
    """A worker that reads payloads others put (as the trainer does), and can run two calls at once."""
    worker = backend.spawn("trainer/0", partial(Producer, backend.payloads), Resources(0, concurrency=2))
    backend.wait_started([worker])
    return worker


def result(backend, call):
    assert backend.wait([call], timeout=SECONDS) == [call], f"the call did not finish within {SECONDS} s"
    return backend.result(call)


def wait_until_lost(ref):
    deadline = time.monotonic() + SECONDS
    while time.monotonic() < deadline:
        try:
            ray.get(ref, timeout=SECONDS)
        except ray.exceptions.OwnerDiedError:
            return
        time.sleep(0.1)
    raise AssertionError(f"an object its owner put was still readable {SECONDS} s after the owner died")


def title(pid):
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def test_actors_are_named_after_their_worker_in_a_namespace_of_their_backend(backend, spawn):
    rollout = spawn("rollout/9", Sleeper, cls_name="RolloutWorker")
    assert ray.get_actor("rollout-9", namespace=backend.namespace)._actor_id == rollout._actor_id
    assert backend.namespace.startswith(f"rollflow-{os.getpid()}-")
    assert title(backend.pid(rollout)) == "ray::RolloutWorker"

    other = RayBackend()  # a second run on the same Ray: it joins, and its workers' names do not collide
    try:
        assert other.namespace != backend.namespace
        twin = other.spawn("rollout/9", Sleeper, Resources(0))
        other.wait_started([twin])
        assert ray.get_actor("rollout-9", namespace=other.namespace)._actor_id == twin._actor_id != rollout._actor_id
        assert title(other.pid(twin)) == "ray::RollflowWorker"  # no class given
    finally:
        other.shutdown()
    assert ray.is_initialized()  # the second backend left the Ray it joined running


@pytest.mark.parametrize("index, method, size", [(1, "produce", 50_000), (2, "produce_async", 10)])
def test_payloads_put_during_a_call_outlive_the_worker(backend, spawn, reader, index, method, size):
    # 50,000 int64 (400 kB) go to the object store; ten numbers are small enough to travel inline.
    values = [torch.arange(size), "text"]
    producer = spawn(f"rollout/{index}", partial(Producer, backend.payloads))
    output = result(backend, backend.submit(producer, method, values))
    handles = [p.value.payload for p in output.values]
    assert all(isinstance(h, ObjectHandle) for h in handles)
    [owned] = result(backend, backend.submit(producer, "own", values))

    os.kill(backend.pid(producer), signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayActorError):  # the producer is gone for good (not restartable)
        result(backend, backend.submit(producer, "produce", []))
    wait_until_lost(owned)  # Ray has freed what the dead worker owned
    tensor, text = result(backend, backend.submit(reader, "read", handles))
    assert torch.equal(tensor, values[0]) and text == "text"
    tensor, text = backend.payloads.get(handles)  # and from the driver
    assert torch.equal(tensor, values[0]) and text == "text"


def test_a_payload_cannot_be_read_in_the_call_that_put_it(backend, reader):
    with pytest.raises(ValueError, match=r"payload handle _Pending\(index=0\) is read before the call that put it "
                       r"returned it to the driver"):
        result(backend, backend.submit(reader, "read_own", ["a"]))


def test_calls_in_flight_together_keep_their_payloads_apart(backend, reader):
    # Both run on the worker's one event loop: the second puts while the first, which put before it, still runs.
    first = backend.submit(reader, "produce_async", ["first"], 1.0)
    second = backend.submit(reader, "produce_async", ["second"])
    outputs = [result(backend, call) for call in (second, first)]
    assert [backend.payloads.get([p.value.payload for p in out.values]) for out in outputs] == [["second"], ["first"]]


def test_the_driver_fills_handles_in_lists_tuples_dicts_and_dataclasses():
    @dataclasses.dataclass(frozen=True)
    class Pair:
        left: object
        right: object

    untouched = Pair([1, 2], {"a": (3,)})
    value = [untouched, (_Pending(0), {"k": _Pending(2)}), Pair("x", [_Pending(1)])]
    filled = _fill(value, "bulk")
    assert filled == [untouched, (ObjectHandle("bulk", 0), {"k": ObjectHandle("bulk", 2)}),
                      Pair("x", [ObjectHandle("bulk", 1)])]
    assert filled[0] is untouched  # what holds no handle is not copied
    assert value[2].right == [_Pending(1)]  # nor changed in place


def test_a_killed_restartable_worker_loses_its_calls_and_is_rebuilt(backend, spawn):
    worker = spawn("reward/0", Sleeper, restartable=True, cls_name="RewardWorker")
    built_in = result(backend, backend.submit(worker, "sleep", 0))
    for kill in (backend.kill, lambda w: os.kill(backend.pid(w), signal.SIGKILL)):  # Ray's kill, then a crash
        call = backend.submit(worker, "sleep", 60)
        assert backend.pid(worker) == built_in  # answers while the worker is busy
        assert kill(worker) is not False
        with pytest.raises(Exception) as info:
            result(backend, call)
        assert backend.is_worker_lost(info.value), repr(info.value)
        rebuilt = backend.pid(worker)  # waits while Ray rebuilds it (calls sent meanwhile would fail as lost too)
        assert rebuilt != built_in
        built_in = result(backend, backend.submit(worker, "sleep", 0))  # the same handle, a new worker
        assert built_in == rebuilt


def test_inline_backend_cannot_kill_a_worker():
    assert InlineBackend().kill(Sleeper()) is False
