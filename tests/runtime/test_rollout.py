"""The rollout worker: concurrent episodes, dynamic batching of their engine requests, weight pick-up between
batches, and the classification of timeouts and faults."""

import asyncio
import time

import pytest
import torch

from rollflow.api import InfraError, Reject, SamplingParams, Status, VersionedWeights
from rollflow.runtime.backend import InlineBackend
from rollflow.runtime.rollout import Limits, RolloutWorker
from rollflow.runtime.weights import InlineWeightTransport
from rollflow.testing import FakeEngine

PARAMS = SamplingParams(max_new_tokens=4)


class Echo:
    """One model turn on the task's ids; the response is the fake engine's."""

    async def run(self, task, ctx):
        ctx.trajectory.prompt(task)
        ctx.trajectory.model(await ctx.engine.generate(ctx.trajectory.tokens, PARAMS))
        return ctx.trajectory.build()


class TwoTurns:
    """A model turn, an environment call that takes ``seconds[task[0]]`` (or raises), another model turn."""

    def __init__(self, seconds=None, fail=False) -> None:
        self.seconds, self.fail = seconds or {}, fail

    async def step(self, task):
        if self.fail:
            raise ConnectionError("sandbox unreachable")
        await asyncio.sleep(self.seconds.get(task[0], 0.0))
        return [9]

    async def run(self, task, ctx):
        ctx.trajectory.prompt(task)
        ctx.trajectory.model(await ctx.engine.generate(ctx.trajectory.tokens, PARAMS))
        ctx.trajectory.env(await ctx.env(self.step, task))
        ctx.trajectory.model(await ctx.engine.generate(ctx.trajectory.tokens, PARAMS))
        return ctx.trajectory.build()


def rollout(worker, *calls):
    """Submit every call (a list of (uid, task)) at once on one inline backend; their outputs in order."""
    backend = InlineBackend()
    try:
        handles = [backend.submit(worker, "rollout", items) for items in calls]
        return [backend.result(h) for h in handles]
    finally:
        backend.shutdown()


def test_episodes_of_concurrent_calls_share_one_engine_batch():
    engine = FakeEngine(eos=0)
    worker = RolloutWorker(engine, InlineWeightTransport(), Echo(), max_batch=16)
    a, b = rollout(worker, [(0, [1, 5]), (1, [1, 6])], [(2, [1, 7])])
    assert engine.batches == [[[1, 5], [1, 6], [1, 7]]]  # three episodes, two calls, one engine batch
    [t0, t1] = [p.value.payload for p in a.values]
    assert t0.tokens == [1, 5, 6, 0] and t0.loss_mask == [0, 0, 1, 1]  # ids as produced: prompt, then 5 + 1, EOS
    assert t0.logprobs == [0.0, 0.0, -0.5, -0.5] and t0.versions == [-1, -1, 0, 0]
    assert [p.uid for p in a.values + b.values] == [0, 1, 2]
    assert [s.name for s in a.spans] == ["generate"] and a.spans[0].meta == {"samples": 3, "version": 0}
    assert b.spans == []  # each engine batch is reported once, by the call that returns first


def test_max_batch_cuts_the_waiting_requests():
    engine = FakeEngine()
    worker = RolloutWorker(engine, InlineWeightTransport(), Echo(), max_batch=2)
    rollout(worker, [(i, [1, i]) for i in range(5)])
    assert [len(b) for b in engine.batches] == [2, 2, 1]


def test_new_weights_are_picked_up_between_batches_and_recorded_per_token():
    engine, transport = FakeEngine(), InlineWeightTransport()
    worker = RolloutWorker(engine, transport, TwoTurns(seconds={1: 0.05}))
    backend = InlineBackend()
    try:
        slow = backend.submit(worker, "rollout", [(0, [1, 1])])
        backend.wait([slow], timeout=0.01)  # the first turn is generated; the episode waits on its environment
        transport.publish(VersionedWeights.pack(1, {"w": torch.zeros(1)}))
        out = backend.result(slow)
    finally:
        backend.shutdown()
    [t] = [p.value.payload for p in out.values]
    model = [v for v, m in zip(t.versions, t.loss_mask) if m]
    assert model == [0, 0, 1, 1]  # first turn at version 0, second at version 1: one version per batch
    assert t.version == 0 and engine.loaded == [1]
    assert [s.name for s in out.spans] == ["generate", "load weights", "generate"]
    assert out.spans[1].meta["version"] == 1


def test_env_call_past_its_timeout_ends_the_episode_as_a_timeout_with_what_it_produced():
    worker = RolloutWorker(FakeEngine(), InlineWeightTransport(), TwoTurns(seconds={1: 5.0, 2: 0.0}), limits=Limits(env=0.05))
    started = time.perf_counter()
    [out] = rollout(worker, [(0, [1, 1]), (1, [2, 2])])
    assert time.perf_counter() - started < 2.0
    slow, fast = (p.value for p in out.values)
    assert slow.status is Status.TIMEOUT and slow.size == 2  # the first model turn is kept, to be scored and trained
    assert "env_timeout=0.05" in slow.info["error"]
    assert fast.status is Status.OK and fast.size == 4


def test_episode_past_its_timeout_is_a_timeout():
    worker = RolloutWorker(FakeEngine(), InlineWeightTransport(), TwoTurns(seconds={1: 5.0}), limits=Limits(episode=0.05))
    [out] = rollout(worker, [(0, [1, 1])])
    [cell] = [p.value for p in out.values]
    assert cell.status is Status.TIMEOUT and "episode_timeout=0.05" in cell.info["error"]


class Stuck(FakeEngine):
    def generate(self, prompt_ids, params):
        time.sleep(0.3)
        return super().generate(prompt_ids, params)


def test_engine_that_does_not_answer_is_an_infra_error():
    worker = RolloutWorker(Stuck(), InlineWeightTransport(), Echo(), limits=Limits(engine=0.05))
    [out] = rollout(worker, [(0, [1, 1])])
    [cell] = [p.value for p in out.values]
    assert cell.status is Status.INFRA_ERROR and "did not answer within 0.05 s" in cell.info["error"]


def test_environment_that_raises_is_an_infra_error_naming_the_call():
    worker = RolloutWorker(FakeEngine(), InlineWeightTransport(), TwoTurns(fail=True))
    [out] = rollout(worker, [(0, [1, 1])])
    [cell] = [p.value for p in out.values]
    assert cell.status is Status.INFRA_ERROR
    assert cell.info["error"] == "environment call TwoTurns.step raised ConnectionError: sandbox unreachable"


class Rejects:
    async def run(self, task, ctx):
        return Reject("too easy")


class Buggy:
    async def run(self, task, ctx):
        if task == [1, 3]:
            raise KeyError("answer")
        raise InfraError("never reached for task 3")


def test_reject_passes_through_and_a_workflow_bug_stops_the_call_naming_the_sample():
    [out] = rollout(RolloutWorker(FakeEngine(), InlineWeightTransport(), Rejects()), [(4, [1])])
    assert out.values[0].value == Reject("too easy")
    with pytest.raises(RuntimeError, match=r"rollout workflow Buggy failed on sample 7: KeyError: 'answer'"):
        rollout(RolloutWorker(FakeEngine(), InlineWeightTransport(), Buggy()), [(7, [1, 3])])


def test_eval_generate_runs_on_the_engine_thread_with_the_newest_weights():
    engine, transport = FakeEngine(), InlineWeightTransport()
    worker = RolloutWorker(engine, transport, Echo())
    transport.publish(VersionedWeights.pack(3, {"w": torch.zeros(1)}))
    [(uid, generation)] = worker.generate([(5, [1, 2])], PARAMS)
    assert uid == 5 and generation.response_ids == [3, 0] and generation.versions == [3, 3]
    [out] = rollout(worker, [(6, [1, 4])])
    # the evaluation's batch is not stage work (its weight load is still reported: the engine did load them)
    assert [s.name for s in out.spans] == ["load weights", "generate"] and out.spans[1].meta["samples"] == 1


def test_requests_arriving_a_little_apart_share_a_batch_when_gathering():
    async def arrive(worker, items, delay):
        await asyncio.sleep(delay)
        return await worker.rollout(items)

    async def two_calls(gather):
        engine = FakeEngine()
        worker = RolloutWorker(engine, InlineWeightTransport(), Echo(), gather=gather)
        await asyncio.gather(arrive(worker, [(0, [1, 1])], 0.0), arrive(worker, [(1, [1, 2])], 0.005))
        return [len(b) for b in engine.batches]

    assert asyncio.run(two_calls(0.0)) == [1, 1]  # the second request came 5 ms late: a batch of its own
    assert asyncio.run(two_calls(0.02)) == [2]  # gathering for up to 20 ms of quiet: one batch
