"""A reward that hangs: past ``timeout`` its sample is an infra_error, the hung thread is left behind, and the
worker goes on scoring on fresh threads."""

import threading
import time

import pytest
from test_controller import REWARD, TASK, make_controller, problems, trained_rows

from rollflow.api import RewardCell, RewardResult, Status
from rollflow.runtime.roles import RewardWorker
from rollflow.runtime.threads import DaemonPool

SLEEP, TIMEOUT = 2.0, 0.2


class Hangs:
    """Scores 1.0, but the first call sleeps ``SLEEP`` seconds first (a verifier stuck on one sample)."""

    def __init__(self):
        self.calls = 0
        self.release = threading.Event()  # lets the stuck call end early, so the test leaves no thread behind

    def __call__(self, task, cell):
        self.calls += 1
        if self.calls == 1:
            self.release.wait(SLEEP)
        return RewardResult(1.0, {"exact": 1.0})


@pytest.mark.parametrize("concurrency", [1, 4])
def test_a_hung_reward_is_an_infra_error_after_the_timeout_and_the_next_call_scores(concurrency):
    score = Hangs()
    worker = RewardWorker(score, concurrency, timeout=TIMEOUT)
    try:
        t = time.perf_counter()
        first = worker.score([(7, "task", None)]).values
        waited = time.perf_counter() - t
        assert waited < SLEEP / 2  # given up on at the timeout, not when the sleep ended
        assert [p.uid for p in first] == [7]
        cell = first[0].value
        assert isinstance(cell, RewardCell) and cell.status is Status.INFRA_ERROR
        assert cell.result == RewardResult(0.0, {"timeout_s": TIMEOUT}, Status.INFRA_ERROR)
        assert TIMEOUT <= cell.duration < SLEEP / 2
        assert first[0].started <= first[0].finished

        # Scored again (what the controller does with an infra_error): a fresh thread answers at once, even with
        # concurrency 1, whose only thread is still asleep in the first call.
        t = time.perf_counter()
        second = worker.score([(7, "task", None), (8, "task", None)]).values
        assert time.perf_counter() - t < SLEEP / 2
        assert [p.uid for p in second] == [7, 8]
        assert all(p.value.result == RewardResult(1.0, {"exact": 1.0}) for p in second)
        assert worker.pool.abandoned == 1
    finally:
        score.release.set()


def test_without_a_timeout_a_slow_reward_is_waited_for():
    worker = RewardWorker(lambda task, cell: (time.sleep(0.3), RewardResult(0.5))[1], concurrency=2)
    values = worker.score([(1, "t", None), (2, "t", None)]).values
    assert [p.value.result.reward for p in values] == [0.5, 0.5]
    assert all(p.value.status is Status.OK for p in values)


def test_a_sample_waiting_for_a_thread_is_not_timed_out_while_it_waits():
    """The deadline counts from when a thread takes the sample: with one thread, the second of two 0.15 s rewards
    finishes 0.3 s after the call began, past the 0.2 s timeout, and is still scored."""
    worker = RewardWorker(lambda task, cell: (time.sleep(0.15), RewardResult(1.0))[1], concurrency=1, timeout=TIMEOUT)
    values = worker.score([(1, "t", None), (2, "t", None)]).values
    assert [p.value.status for p in values] == [Status.OK, Status.OK]


def test_a_reward_that_raises_stops_the_call_with_its_error():
    def boom(task, cell):
        raise ValueError("reward fn 'my:score' raised ValueError on sample 3: bad")

    with pytest.raises(ValueError, match="on sample 3: bad"):
        RewardWorker(boom, concurrency=2, timeout=TIMEOUT).score([(1, "t", None)])


def threads(prefix):
    return [t for t in threading.enumerate() if t.name.startswith(prefix + "-")]


def wait_until(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_an_abandoned_thread_exits_when_its_call_returns_and_the_pool_keeps_its_size():
    pool = DaemonPool(1, "abandon")
    gate = threading.Event()
    stuck = pool.submit(gate.wait)
    assert wait_until(lambda: stuck.began is not None)
    assert pool.abandon(stuck)
    assert pool.submit(lambda: 42).future.result(timeout=5) == 42  # served by the replacement
    assert len(threads("abandon")) == 2
    gate.set()
    assert stuck.future.result(timeout=5) is True
    assert wait_until(lambda: len(threads("abandon")) == 1)


def test_threads_start_as_jobs_arrive_and_end_with_the_pool():
    pool = DaemonPool(8, "lifetime")
    assert threads("lifetime") == []
    assert [pool.submit(lambda i=i: i).future.result(timeout=5) for i in range(2)] == [0, 1]
    assert 1 <= len(threads("lifetime")) <= 2
    del pool
    assert wait_until(lambda: threads("lifetime") == [])


def test_a_job_that_finished_cannot_be_abandoned():
    pool = DaemonPool(1, "done")
    job = pool.submit(lambda: 1)
    assert job.future.result(timeout=5) == 1
    assert not pool.abandon(job) and pool.abandoned == 0


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_timeout_must_be_positive(timeout):
    with pytest.raises(ValueError, match=r"reward timeout must be a positive number of seconds or None, got"):
        RewardWorker(lambda t, c: RewardResult(1.0), timeout=timeout)


# -- through the controller: it scores an infra_error again on the same trajectory, then masks it ------------------
class HangsOn:
    """A reward (1 for an even digit, as the controller tests' ``FakeReward``) that hangs on the first ``times``
    calls for the task ``prompt``."""

    def __init__(self, prompt, times):
        self.prompt, self.left = prompt, times
        self.release = threading.Event()

    def __call__(self, task, cell):
        if task.prompt == self.prompt and self.left > 0:
            self.left -= 1
            self.release.wait(SLEEP)
        return RewardResult(float(int(cell.text) % 2 == 0))


@pytest.mark.parametrize("times, max_retries, status", [(1, 2, Status.OK), (100, 1, Status.INFRA_ERROR)])
def test_the_controller_scores_a_timed_out_sample_again_then_masks_it(tokenizer, times, max_retries, status):
    prompt = next(problems()).prompt  # group 0's task
    score = HangsOn(prompt, times)
    try:
        controller, [rollout], _, _ = make_controller(tokenizer, RewardWorker(score, 4, timeout=TIMEOUT),
                                                      max_retries=max_retries)
        t = time.perf_counter()
        [result] = controller.run(1)
        assert time.perf_counter() - t < SLEEP
        rows = trained_rows([result])
        hung = [r for r in rows.values() if r[TASK].prompt == prompt]
        # One sample hung once; or every sample of the group hung on every attempt.
        assert controller.infra_retries == (1 if times == 1 else len(hung) * max_retries)
        assert {r.status for r in hung} == {status}
        assert all(r.status is Status.OK for r in rows.values() if r[TASK].prompt != prompt)
        if status is Status.INFRA_ERROR:
            assert all(r[REWARD].result.breakdown == {"timeout_s": TIMEOUT} for r in hung)
        assert sorted(rollout.generated) == sorted(rows)  # a reward's fault never regenerates the sample
    finally:
        score.release.set()
