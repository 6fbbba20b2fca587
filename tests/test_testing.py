"""The fakes shipped for users' tests: they must behave as documented, or users' tests would prove nothing."""

import asyncio

import pytest
import torch

from rollflow.api import SamplingParams, VersionedWeights
from rollflow.testing import FakeEngine, FakeTextEnv, ScriptedBackend


class Worker:
    def __init__(self) -> None:
        self.ran: list[str] = []

    def work(self, tag: str) -> str:
        self.ran.append(tag)
        return tag

    async def awork(self, tag: str) -> str:
        await asyncio.sleep(0)
        self.ran.append(tag)
        return tag

    def fail(self) -> None:
        raise ValueError("boom")


def durations(worker, method, args):
    return {"slow": 5.0, "mid": 2.0, "fast": 1.0}[args[0]]


@pytest.mark.parametrize("method", ["work", "awork"])
def test_scripted_backend_finishes_calls_by_virtual_time_not_submission(method):
    backend, worker = ScriptedBackend(durations), Worker()
    calls = [backend.submit(worker, method, tag) for tag in ("slow", "mid", "fast")]
    assert worker.ran == ["slow", "mid", "fast"]  # every call ran when submitted
    order = []
    pending = list(calls)
    while pending:
        [done] = backend.wait(pending)
        pending.remove(done)
        order.append(backend.result(done))
    assert order == ["fast", "mid", "slow"]
    assert backend.finished == [(method, 1.0), (method, 2.0), (method, 5.0)]
    backend.shutdown()


def test_scripted_backend_clock_moves_forward_from_the_submission_time():
    backend, worker = ScriptedBackend(durations), Worker()
    first = backend.submit(worker, "work", "mid")
    assert backend.wait([first]) == [first] and backend.now == 2.0
    later = backend.submit(worker, "work", "fast")  # submitted at t = 2, finishes at t = 3
    assert backend.wait([later]) == [later] and backend.now == 3.0


def test_scripted_backend_hands_errors_to_the_result():
    backend = ScriptedBackend()
    call = backend.submit(Worker(), "fail")
    assert backend.wait([call]) == [call]
    with pytest.raises(ValueError, match="boom"):
        backend.result(call)


def test_fake_engine_answers_from_its_script_at_its_version():
    engine = FakeEngine(lambda ids: [len(ids), 7, 0], eos=0)
    engine.load_weights(VersionedWeights.pack(4, {"w": torch.zeros(1)}))
    [a, b] = engine.generate([[1], [1, 2]], SamplingParams(max_new_tokens=2))
    assert engine.batches == [[[1], [1, 2]]] and engine.loaded == [4]
    assert a.response_ids == [1, 7] and a.finish_reason == "length"  # cut at max_new_tokens before the EOS
    assert a.versions == [4, 4] and a.logprobs == [-0.5, -0.5] and a.response_text == "1 7"
    [c] = engine.generate([[5]], SamplingParams(max_new_tokens=3))
    assert c.response_ids == [1, 7, 0] and c.finish_reason == "eos" and c.response_text == "1 7"


def test_fake_text_env_takes_its_scripted_time_and_ends_after_its_turns():
    env = FakeTextEnv(turns=2, durations=lambda task, turn: 0.05 * turn, observe=lambda task, turn, action: f"{task}:{turn}",
                      reward=lambda task, action: float(action == "ok"))
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(env.reset("t")) == "t"
        first = loop.run_until_complete(env.step("no"))
        started = loop.time()
        second = loop.run_until_complete(env.step("ok"))
        took = loop.time() - started
    finally:
        loop.close()
    assert (first.observation, first.reward, first.done) == ("t:1", 0.0, False)
    assert (second.reward, second.done) == (1.0, True)
    assert took >= 0.045
    assert env.actions == [("t", 0, "no"), ("t", 1, "ok")]
