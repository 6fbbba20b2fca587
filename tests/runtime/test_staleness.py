import random
from collections import deque

import pytest

from rollflow.runtime.staleness import StageTimes, StalenessBudget, StalenessTuner, choose_staleness


class FakeVersionClock:
    """The trainer's version, advanced by hand: one bump per consumed batch."""

    def __init__(self) -> None:
        self.version = 0

    def bump(self) -> None:
        self.version += 1


def room(budget: StalenessBudget, version: int) -> int:
    """How many single samples the budget admits at ``version`` (admitting them)."""
    n = 0
    while budget.admit(version, 1):
        n += 1
    return n


def test_capacity_formula():
    budget = StalenessBudget(eta=1, batch_size=4)
    assert budget.admit(0, 3)
    assert room(budget, 0) == 5  # (0 + 1 + 1) · 4 − 3
    assert room(budget, 2) == 8  # (2 + 1 + 1) · 4 − 8


def test_eta_zero_admits_exactly_one_batch_per_version():
    clock, budget = FakeVersionClock(), StalenessBudget(eta=0, batch_size=4)
    for v in range(3):
        assert clock.version == v
        assert budget.admit(clock.version, 4)
        assert not budget.admit(clock.version, 1)
        clock.bump()
    assert budget.admitted == 12


def test_eta_two_admits_three_batches_at_version_zero():
    budget = StalenessBudget(eta=2, batch_size=4)
    assert [budget.admit(0, 4) for _ in range(4)] == [True, True, True, False]
    assert room(budget, 1) == 4


def test_admit_refuses_beyond_capacity_without_reserving():
    budget = StalenessBudget(eta=0, batch_size=4)
    assert budget.admit(0, 3)
    assert not budget.admit(0, 2)  # 2 > capacity 1: refused whole, nothing reserved
    assert budget.admitted == 3
    assert budget.admit(0, 1)


def test_an_older_version_sees_no_room():
    budget = StalenessBudget(eta=1, batch_size=2)
    assert budget.admit(5, 14)  # (5 + 2) · 2 = 14
    assert not budget.admit(0, 1)


def test_lowering_eta_admits_nothing_until_the_trainer_catches_up():
    budget = StalenessBudget(eta=2, batch_size=2)
    assert room(budget, 0) == 6
    budget.set_eta(0)
    assert room(budget, 1) == 0  # (1 + 0 + 1) · 2 = 4 < 6 admitted
    assert room(budget, 2) == 0
    assert room(budget, 3) == 2
    budget.set_eta(1)
    assert room(budget, 3) == 2  # raising η admits the next batch at once
    with pytest.raises(ValueError, match="need eta >= 0"):
        budget.set_eta(-1)


@pytest.mark.parametrize("eta, batch_size", [(-1, 4), (0, 0)])
def test_rejects_bad_parameters(eta, batch_size):
    with pytest.raises(ValueError, match="need eta >= 0 and batch_size >= 1"):
        StalenessBudget(eta, batch_size)


@pytest.mark.parametrize("eta", [0, 1, 2, 3])
def test_greedy_admission_keeps_every_sample_within_eta(eta):
    B, clock, budget = 4, FakeVersionClock(), StalenessBudget(eta, 4)
    queue: deque[int] = deque()  # admission version of each admitted, unconsumed sample (FIFO)
    lags = []
    for _ in range(20):
        while budget.admit(clock.version, 1):  # admit as much as allowed
            queue.append(clock.version)
        assert len(queue) == (eta + 1) * B  # the budget keeps exactly η + 1 batches in flight
        for _ in range(B):
            lags.append(clock.version - queue.popleft())
        clock.bump()
    assert all(lag <= eta for lag in lags)
    assert max(lags) == eta  # the bound is reached: the budget does not throttle more than it must


@pytest.mark.parametrize("eta", [0, 1, 2, 3])
def test_irregular_admission_keeps_every_sample_within_eta(eta):
    # Admission in random-sized chunks, training only when a full batch is there: the bound must still hold.
    B, clock, budget, rng = 3, FakeVersionClock(), StalenessBudget(eta, 3), random.Random(eta)
    queue: deque[int] = deque()
    consumed = 0
    for _ in range(200):
        n = rng.randint(1, 2 * B)
        if budget.admit(clock.version, n):
            queue.extend([clock.version] * n)
        if len(queue) >= B and rng.random() < 0.5:
            for _ in range(B):
                assert clock.version - queue.popleft() <= eta
            consumed += B
            clock.bump()
    assert consumed >= 20 * B  # the simulation made real progress


# -- runtime.staleness=auto ------------------------------------------------------------------------------------------
def times(produce, score, train, step, n=3):
    return [StageTimes(produce, score, train, step)] * n


def test_auto_keeps_synchronous_when_cpu_bound_stages_would_only_share_the_cores():
    choice = choose_staleness(times(0.35, 0.02, 0.4, 0.92), split=2.0)
    assert (choice.eta, choice.synchronous) == (0, 0.92)
    assert choice.predicted == pytest.approx(0.95)  # max(0.7, 0.8, 0.36) + other 0.15
    assert choice.reason == ("synchronous step 0.920 s = produce 0.350 + score 0.020 + train 0.400 + other 0.150; "
                             "overlap predicted 0.950 s at η=1 (cores split 2.0×)")


def test_auto_overlaps_slow_rewards_and_picks_the_eta_that_hides_them():
    # scoring 1.5 s per step: η=1 predicts max(0.6, 0.6, 2.1/2) + 0.1 = 1.15 s, η=2 predicts 0.8 s; sync is 2.2 s.
    choice = choose_staleness(times(0.3, 1.5, 0.3, 2.2), split=2.0)
    assert choice.eta == 2 and choice.predicted == pytest.approx(0.8)
    assert choice.reason.endswith("overlapped at η=2 predicted 0.800 s")
    assert choose_staleness(times(0.3, 1.5, 0.3, 2.2), split=2.0, max_eta=1).eta == 1


def test_auto_prefers_the_smallest_eta_within_five_percent_of_the_best():
    # split 1 (rollout and trainer on their own devices): η=1 predicts max(0.3, 0.3, 0.35/2) = 0.3, as good as η=2.
    assert choose_staleness(times(0.3, 0.05, 0.3, 0.65), split=1.0).eta == 1


def test_auto_averages_the_measured_steps():
    samples = [StageTimes(0.3, 0.0, 0.3, 0.7), StageTimes(0.3, 3.0, 0.3, 3.7)]  # mean scoring 1.5 s: slow rewards
    assert choose_staleness(samples, split=2.0).eta == 2


def feed(tuner, samples):
    return [tuner.observe(t) for t in samples]


def test_tuner_switches_at_once_on_a_clear_gain():
    tuner = StalenessTuner(steps=3, split=2.0)
    assert feed(tuner, times(0.3, 1.5, 0.3, 2.2)) == [None, None, 2]
    assert tuner.settled and tuner.eta == 2 and tuner.reason.endswith("predicted 0.800 s")
    assert tuner.observe(StageTimes(0.3, 1.5, 0.3, 0.8)) is None  # settled: nothing changes any more


def test_tuner_stays_synchronous_on_a_clear_loss():
    tuner = StalenessTuner(steps=2, split=2.0)
    assert feed(tuner, times(0.2, 0.0, 0.8, 1.0, n=2)) == [None, None]  # predicts 1.6 s > 1.5 × 1.0 s
    assert tuner.settled and tuner.eta == 0


@pytest.mark.parametrize("trial_step, kept", [(0.70, True), (0.76, False), (0.85, False)])
def test_tuner_tries_eta_one_when_the_model_cannot_tell_and_keeps_it_only_if_clearly_faster(trial_step, kept):
    tuner = StalenessTuner(steps=3, split=2.0)
    # sync 0.8 s; predicted max(0.4, 0.8, 0.2) + other 0.2 = 1.0 s: between 0.9 × and 1.5 × 0.8 s, undecided
    assert feed(tuner, times(0.2, 0.0, 0.4, 0.8)) == [None, None, 1]
    assert not tuner.settled and tuner.eta == 1
    fill = StageTimes(0.2, 0.0, 0.8, 1.5)  # the first overlapped step fills the pipeline: not measured
    assert feed(tuner, [fill, *times(0.2, 0.0, 0.8, trial_step)]) == [None, None, None, None if kept else 0]
    assert tuner.settled and tuner.eta == (1 if kept else 0)
    assert tuner.reason.endswith(f"tried η=1: {trial_step:.3f} s a step against 0.800 s synchronous (kept only "
                                 f"under 0.720 s), " + ("kept" if kept else "back to η=0"))  # 5 % faster: not enough
