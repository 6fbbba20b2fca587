import random
from collections import deque

import pytest

from rollflow.runtime.staleness import StalenessBudget


class FakeVersionClock:
    """The trainer's version, advanced by hand: one bump per consumed batch."""

    def __init__(self) -> None:
        self.version = 0

    def bump(self) -> None:
        self.version += 1


def test_capacity_formula():
    budget = StalenessBudget(eta=1, batch_size=4)
    assert budget.capacity(0) == 8  # (0 + 1 + 1) · 4 − 0
    assert budget.admit(0, 3)
    assert budget.capacity(0) == 5  # 8 − 3
    assert budget.capacity(2) == 13  # (2 + 1 + 1) · 4 − 3


def test_eta_zero_admits_exactly_one_batch_per_version():
    clock, budget = FakeVersionClock(), StalenessBudget(eta=0, batch_size=4)
    for v in range(3):
        assert clock.version == v
        assert budget.capacity(clock.version) == 4
        assert budget.admit(clock.version, 4)
        assert budget.capacity(clock.version) == 0
        assert not budget.admit(clock.version, 1)
        clock.bump()
    assert budget.admitted == 12


def test_eta_two_admits_three_batches_at_version_zero():
    budget = StalenessBudget(eta=2, batch_size=4)
    assert budget.capacity(0) == 12
    assert [budget.admit(0, 4) for _ in range(4)] == [True, True, True, False]
    assert budget.capacity(1) == 4


def test_admit_refuses_beyond_capacity_without_reserving():
    budget = StalenessBudget(eta=0, batch_size=4)
    assert budget.admit(0, 3)
    assert not budget.admit(0, 2)  # 2 > capacity 1: refused whole, nothing reserved
    assert budget.admitted == 3
    assert budget.capacity(0) == 1
    assert budget.admit(0, 1)


def test_capacity_never_negative():
    budget = StalenessBudget(eta=1, batch_size=2)
    assert budget.admit(5, 14)  # (5 + 2) · 2 = 14
    assert budget.capacity(0) == 0  # an older version sees no room, not a negative one


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
