"""Continuous batching on the rollout worker: requests join the running batch at the next decoding step, weights are
picked up only once the session has drained, engine faults and abandoned requests touch only their own rows."""

import asyncio
import threading
import time

import pytest
import torch

from rollflow.api import Generation, SamplingParams, Status, VersionedWeights
from rollflow.engines.hf_inference import HFInferenceEngine
from rollflow.runtime.rollout import Limits, RolloutWorker
from rollflow.runtime.weights import InlineWeightTransport


class StepEngine:
    """A ``SessionEngine`` whose rows answer ``prompt[-1] + 1, + 2, …`` one token per step, for ``max_new_tokens``
    steps; a step takes ``step_s`` seconds. ``steps`` records every step: (version, slots decoded in it);
    ``fail_at``: the step numbers that raise; ``on_step[k]()`` runs during step k; ``loaded``: (version, steps done)."""

    def __init__(self, step_s=0.004, fail_at=()):
        self.step_s, self.fail_at = step_s, set(fail_at)
        self.on_step = {}
        self.steps: list[tuple[int, list[int]]] = []
        self.loaded: list[tuple[int, int]] = []
        self.dropped: list[int] = []
        self.prompts: dict[int, list[int]] = {}
        self._version = 0
        self._slots = iter(range(1 << 30))

    @property
    def version(self):
        return self._version

    def load_weights(self, weights):
        self.loaded.append((weights.version, len(self.steps)))
        self._version = weights.version

    def generate(self, prompt_ids, params):
        return [Generation([p[-1] + 1], "", [-0.5], [self._version], "length") for p in prompt_ids]

    def open_session(self):
        return StepSession(self)


class StepSession:
    def __init__(self, engine):
        self.engine, self.version = engine, engine.version
        self.rows: dict[int, tuple[list[int], SamplingParams, list[int]]] = {}

    def __len__(self):
        return len(self.rows)

    def add(self, prompt_ids, params):
        slot = next(self.engine._slots)
        self.engine.prompts[slot] = prompt_ids
        self.rows[slot] = (prompt_ids, params, [])
        return slot

    def drop(self, slot):
        if self.rows.pop(slot, None) is not None:
            self.engine.dropped.append(slot)

    def step(self):
        assert self.engine.version == self.version or not self.rows, "weights loaded under rows in flight"
        self.version = self.engine.version
        time.sleep(self.engine.step_s)
        self.engine.on_step.get(len(self.engine.steps), lambda: None)()
        if len(self.engine.steps) in self.engine.fail_at:
            self.engine.steps.append((self.version, []))
            raise RuntimeError("CUDA error: an illegal memory access")
        self.engine.steps.append((self.version, sorted(self.rows)))
        finished = []
        for slot, (prompt, params, tokens) in list(self.rows.items()):
            tokens.append(prompt[-1] + len(tokens) + 1)
            if len(tokens) == params.max_new_tokens:
                del self.rows[slot]
                n = len(tokens)
                finished.append((slot, Generation(tokens, "", [-0.5] * n, [self.version] * n, "length")))
        return finished


async def until(condition, limit=5.0):
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.001)


class AfterDelay:
    """Waits until ``task["after"]()`` holds (an environment step that ends when the test says), then one model turn
    of ``task["n"]`` tokens on ``task["prompt"]``."""

    async def run(self, task, ctx):
        await until(task.get("after", lambda: True))
        ctx.trajectory.prompt(task["prompt"])
        ctx.trajectory.model(await ctx.engine.generate(ctx.trajectory.tokens, SamplingParams(max_new_tokens=task["n"])))
        return ctx.trajectory.build()


def run(worker, tasks, during=None):
    """Every task as one episode of one rollout call, with ``during()`` (a coroutine) beside it; waits until the
    worker's batcher has nothing left (drops included). Returns the output and each episode's trajectory cell."""
    async def main():
        side = asyncio.ensure_future(during()) if during else None
        out = await worker.rollout(list(enumerate(tasks)))
        if side is not None:
            await side
        await asyncio.wait_for(worker.decoder().settle(), 5)
        assert worker.decoder().idle
        return out

    out = asyncio.run(main())
    return out, [p.value for p in out.values]


def slots_of(engine, prompt):
    return [s for s, p in engine.prompts.items() if p == prompt]


def test_a_request_arriving_mid_decode_joins_the_running_batch():
    engine = StepEngine()
    worker = RolloutWorker(engine, InlineWeightTransport(), AfterDelay())
    tasks = [{"prompt": [1, 10], "n": 60}, {"prompt": [1, 50], "n": 4, "after": lambda: len(engine.steps) >= 5}]
    out, cells = run(worker, tasks)
    [a], [b] = slots_of(engine, [1, 10]), slots_of(engine, [1, 50])
    with_a = [rows for _, rows in engine.steps if a in rows]
    with_b = [rows for _, rows in engine.steps if b in rows]
    assert len(with_a) == 60 and len(with_b) == 4
    assert a in with_b[0] and a in with_b[-1]  # b joined and left while a was decoding
    assert engine.steps.index((0, with_b[0])) >= 5
    assert [c.payload.tokens for c in cells] == [[1, 10, *range(11, 71)], [1, 50, 51, 52, 53, 54]]
    assert all(c.status is Status.OK for c in cells)
    # one busy period: both requests, every step, one version
    assert [(s.name, s.meta) for s in out.spans] == [("generate", {"samples": 2, "steps": 60, "version": 0})]


def test_at_most_max_batch_rows_decode_at_once_and_the_rest_join_as_rows_leave():
    engine = StepEngine(step_s=0.0)
    worker = RolloutWorker(engine, InlineWeightTransport(), AfterDelay(), max_batch=2)
    _, cells = run(worker, [{"prompt": [1, 10 * i], "n": 2 + i} for i in range(5)])
    assert max(len(rows) for _, rows in engine.steps) == 2
    assert [c.status for c in cells] == [Status.OK] * 5
    assert len(engine.steps) < sum(2 + i for i in range(5))  # rows overlapped


def test_new_weights_wait_for_the_rows_in_flight_and_no_generation_mixes_versions():
    engine, transport = StepEngine(), InlineWeightTransport()
    worker = RolloutWorker(engine, transport, AfterDelay())
    worker.decoder().poll = 0.0  # look for new weights at every step that has a request waiting

    published = asyncio.Event()

    async def publish():
        await until(lambda: len(engine.steps) >= 3)  # the first request is decoding
        transport.publish(VersionedWeights.pack(1, {"w": torch.zeros(1)}))
        published.set()

    tasks = [{"prompt": [1, 10], "n": 25}, {"prompt": [1, 50], "n": 4, "after": published.is_set}]
    out, [first, second] = run(worker, tasks, publish)
    [a], [b] = slots_of(engine, [1, 10]), slots_of(engine, [1, 50])
    assert [v for v, _ in engine.loaded] == [1]
    assert {v for v, rows in engine.steps if a in rows} == {0}
    assert {v for v, rows in engine.steps if b in rows} == {1}
    assert not any(a in rows and b in rows for _, rows in engine.steps)  # b waited for a's session to drain
    t0, t1 = (p.value.payload for p in out.values)
    assert set(t0.versions[2:]) == {0} and set(t1.versions[2:]) == {1}
    assert [s.name for s in out.spans] == ["generate", "load weights", "generate"]
    assert [s.meta["version"] for s in out.spans] == [0, 1, 1]


def test_an_evaluation_lets_the_rows_in_flight_end_then_loads_the_newest_weights():
    engine, transport = StepEngine(), InlineWeightTransport()
    worker = RolloutWorker(engine, transport, AfterDelay())
    evaluation = []

    def publish_and_evaluate():
        # During step 2 (on the engine thread): new weights, and an evaluation queued behind the running steps, which
        # end at step 3, when the second request arrives, with the first row still decoding.
        transport.publish(VersionedWeights.pack(1, {"w": torch.zeros(1)}))
        evaluation.append(worker.executor.submit(worker._generate, [[1, 2]], SamplingParams(max_new_tokens=1), False))

    engine.on_step[2] = publish_and_evaluate
    tasks = [{"prompt": [1, 10], "n": 25}, {"prompt": [1, 20], "n": 5, "after": lambda: len(engine.steps) >= 3}]
    out, cells = run(worker, tasks)
    assert [c.status for c in cells] == [Status.OK, Status.OK]
    [g] = evaluation[0].result()
    assert g.versions == [1]  # the evaluation saw the newest weights,
    assert engine.loaded == [(1, 25)]  # loaded once the first row had decoded its 25 steps on the old ones,
    assert [set(c.payload.versions[2:]) for c in cells] == [{0}, {1}]  # and the waiting request was decoded on them
    assert [s.name for s in out.spans] == ["generate", "load weights", "generate"]


def test_an_engine_error_is_an_infra_error_for_the_episodes_in_flight_only():
    engine = StepEngine(fail_at={3})
    worker = RolloutWorker(engine, InlineWeightTransport(), AfterDelay())
    failed = lambda: len(engine.steps) > 3  # noqa: E731
    tasks = [{"prompt": [1, 10], "n": 8}, {"prompt": [1, 20], "n": 8}, {"prompt": [1, 30], "n": 3, "after": failed}]
    out, cells = run(worker, tasks)
    assert [c.status for c in cells] == [Status.INFRA_ERROR, Status.INFRA_ERROR, Status.OK]
    assert cells[0].info["error"] == ("the inference engine failed while decoding: "
                                      "RuntimeError: CUDA error: an illegal memory access")
    assert out.values[2].value.payload.tokens == [1, 30, 31, 32, 33]  # a new session after the failure


def test_a_request_whose_asker_gave_up_is_dropped_from_the_session():
    engine = StepEngine()
    worker = RolloutWorker(engine, InlineWeightTransport(), AfterDelay(), limits=Limits(engine=0.5))
    _, [slow, fast] = run(worker, [{"prompt": [1, 10], "n": 10**6}, {"prompt": [1, 20], "n": 3}])
    assert slow.status is Status.INFRA_ERROR and "did not answer within 0.5 s" in slow.info["error"]
    assert fast.status is Status.OK
    [a] = slots_of(engine, [1, 10])
    assert engine.dropped == [a]
    assert sum(a in rows for _, rows in engine.steps) < 10**4  # decoded until the timeout, not to its end


class TwoTurns:
    """A model turn, an environment step of ``task[0] / 100`` seconds that answers ``[3, 4]``, another model turn."""

    params = SamplingParams(greedy=True, max_new_tokens=6)

    async def run(self, task, ctx):
        ctx.trajectory.prompt(task)
        ctx.trajectory.model(await ctx.engine.generate(ctx.trajectory.tokens, self.params))
        await asyncio.sleep(task[0] / 100)
        ctx.trajectory.env([3, 4])
        ctx.trajectory.model(await ctx.engine.generate(ctx.trajectory.tokens, self.params))
        return ctx.trajectory.build()


def test_continuous_batching_equals_one_at_a_time_generation_token_for_token(model, tokenizer):
    engine = HFInferenceEngine(model, tokenizer)
    sizes, lock = [], threading.Lock()
    open_session = engine.open_session

    def spied():  # records how many rows each decoding step had
        session = open_session()
        step = session.step

        def counted():
            with lock:
                sizes.append(len(session))
            return step()

        session.step = counted
        return session

    engine.open_session = spied
    tasks = [[1, 3 * i % 10 + 3, *[5 + i % 4] * (i % 5)] for i in range(8)]  # different lengths and env delays
    worker = RolloutWorker(engine, InlineWeightTransport(), TwoTurns())
    out, cells = run(worker, tasks)

    for task, cell in zip(tasks, cells):  # the same episode, one generate call at a time
        first = engine.generate([task], TwoTurns.params)[0]
        second = engine.generate([[*task, *first.response_ids, 3, 4]], TwoTurns.params)[0]
        t = cell.payload
        assert t.tokens == [*task, *first.response_ids, 3, 4, *second.response_ids]
        model_logprobs = [lp for lp, m in zip(t.logprobs, t.loss_mask) if m]
        assert model_logprobs == pytest.approx(first.logprobs + second.logprobs, abs=1e-4)
    assert max(sizes) == len(tasks)  # the first turns decoded together
    assert any(1 < n < len(tasks) for n in sizes)  # second turns joined and left at different steps
