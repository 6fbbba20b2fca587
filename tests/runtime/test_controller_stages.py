"""The stage table beyond rollout → reward: dynamic sampling (drop groups without signal, refill the step), a
reference column filled side by side with rewards, a workflow's ``Reject``, and the table's own checks; with the
fakes of ``test_controller``."""

import time

import pytest
from test_controller import (
    COLUMNS,
    REWARD,
    TASK,
    TRAJECTORY,
    B,
    FakeReward,
    FakeRollout,
    FakeTrainer,
    N,
    P,
    Policy,
    problems,
)

from rollflow.api import Column, Reject, RewardCell, RewardResult, Status
from rollflow.recipes.grpo import has_signal
from rollflow.runtime.backend import InlineBackend, WorkerLost
from rollflow.runtime.controller import Controller
from rollflow.runtime.group import WorkerGroup
from rollflow.runtime.stage import Produced, Stage, StageOutput
from rollflow.runtime.staleness import StalenessBudget
from rollflow.runtime.store import SampleStore

REFERENCE = "reference"


class NoSignalReward(FakeReward):
    """Every row of a group whose first uid is in ``flat`` (or every group, if ``flat`` is None) gets reward 1;
    other rows get 1 for an even digit, as ``FakeReward``."""

    def __init__(self, flat=None, **kw) -> None:
        super().__init__(**kw)
        self.flat = flat

    def score(self, items):
        out = super().score(items)
        for p in out.values:
            if self.flat is None or p.uid - p.uid % N in self.flat:
                p.value = RewardCell(RewardResult(1.0), 0.0)
        return out


class FakeReference:
    """Reference log-probs: -uid/100 for every token of the trajectory; records the uids of every call."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def score(self, items) -> StageOutput:
        self.calls.append([uid for uid, _ in items])
        now = time.time()
        return StageOutput([Produced(uid, [-uid / 100] * len(cell.payload.tokens), now, now) for uid, cell in items])


class RejectingRollout(FakeRollout):
    """``FakeRollout`` whose workflow rejects the task instances of the groups in ``reject`` (first attempt only)."""

    def __init__(self, tokenizer, policy, reject) -> None:
        super().__init__(tokenizer, policy)
        self.reject = set(reject)

    def rollout(self, items):
        out = super().rollout(items)
        for p in out.values:
            if p.uid // N in self.reject:
                p.value = Reject("not useful")
        self.reject -= {p.uid // N for p in out.values}
        return out


def controller(tokenizer, reward, eta=0, reference=None, keep_group=None, max_dropped=0, policy=None, rollout=None):
    policy = policy or Policy()
    backend = InlineBackend()
    trainer = FakeTrainer(policy)
    columns, stages = list(COLUMNS), [
        Stage(TRAJECTORY, WorkerGroup("rollout", [rollout or FakeRollout(tokenizer, policy)], backend), "rollout",
              lambda uid, cells: (uid, cells[TASK]), groups_per_call=P),
        Stage(REWARD, WorkerGroup("reward", [reward], backend), "score", lambda uid, cells: (uid, cells[TASK], cells[TRAJECTORY])),
    ]
    if reference is not None:
        columns.append(Column(REFERENCE, (TRAJECTORY,)))
        stages.append(Stage(REFERENCE, WorkerGroup("reference", [reference], backend), "score",
                            lambda uid, cells: (uid, cells[TRAJECTORY])))
    store = SampleStore(columns)
    c = Controller(store, StalenessBudget(eta, B), stages, WorkerGroup("trainer", [trainer], backend), problems(),
                   group_size=N, groups_per_step=P, version=policy.version, keep_group=keep_group, max_dropped=max_dropped)
    return c, trainer, store


@pytest.mark.parametrize("eta", [0, 2])
def test_dynamic_sampling_drops_groups_without_signal_and_refills_the_step(tokenizer, eta):
    flat = {0, 2 * N, 5 * N}  # groups 0, 2 and 5 get all-equal rewards
    c, trainer, store = controller(tokenizer, NoSignalReward(flat), eta=eta, keep_group=has_signal, max_dropped=10)
    results = list(c.run(3))
    trained = [g for r in results for g in r.groups]
    assert len(trained) == 3 * P  # every step still gets P groups
    assert all(has_signal(g) for g in trained)
    assert {g[0].uid for g in trained}.isdisjoint(flat)
    assert c.dropped_groups == 3 and store.counts()["dropped"] == 3 * N
    assert c.budget.admitted == 3 * B + (store.counts()["in_flight"] + store.counts()["ready"])  # dropped rows released
    assert results[-1].metrics["store/dropped"] == 3 * N
    lags = [v - row[TRAJECTORY].version for v, groups in trainer.steps for g in groups for row in g]
    assert max(lags) <= eta


def test_dynamic_sampling_keeps_groups_past_the_per_step_limit(tokenizer):
    # Every group is flat (a solved task): dropping them all would never fill a step.
    c, trainer, _ = controller(tokenizer, NoSignalReward(None), keep_group=has_signal, max_dropped=2)
    results = list(c.run(3))
    assert len(results) == 3 and all(len(r.groups) == P for r in results)
    assert c.dropped_groups == 3 * 2  # two per step, then the rest are kept


def test_without_a_filter_nothing_is_dropped(tokenizer):
    c, _, store = controller(tokenizer, NoSignalReward(None))
    list(c.run(2))
    assert c.dropped_groups == 0 and store.counts()["dropped"] == 0


def test_a_rejected_group_is_dropped_and_replaced(tokenizer):
    policy = Policy()
    rollout = RejectingRollout(tokenizer, policy, reject={1})
    c, trainer, store = controller(tokenizer, FakeReward(), rollout=rollout, policy=policy)
    results = list(c.run(2))
    trained = [g[0].group_id for r in results for g in r.groups]
    assert trained == [0, 2, 3, 4]  # group 1 never trained; group 4 took its place in the budget
    assert c.rejected_groups == 1 and store.counts()["dropped"] == N
    assert c.budget.admitted == 2 * B


def test_a_workflow_that_rejects_everything_stops_the_run_with_a_message(tokenizer):
    policy = Policy()
    rollout = RejectingRollout(tokenizer, policy, reject=range(10**6))
    c, trainer, _ = controller(tokenizer, FakeReward(), rollout=rollout, policy=policy)
    with pytest.raises(RuntimeError, match=r"rejected 201 groups since the last train step .*check its Reject conditions"):
        list(c.run(1))
    assert trainer.steps == []


def test_reference_column_is_filled_for_every_trained_row(tokenizer):
    ref = FakeReference()
    c, trainer, _ = controller(tokenizer, FakeReward(), reference=ref, eta=1)
    results = list(c.run(3))
    rows = [row for r in results for g in r.groups for row in g]
    assert len(rows) == 3 * B
    for row in rows:
        assert row[REFERENCE] == [-row.uid / 100] * len(row[TRAJECTORY].payload.tokens)
    assert all(len(call) % N == 0 for call in ref.calls)  # whole groups per call


def test_a_reward_retry_keeps_the_trajectory_and_its_reference(tokenizer):
    ref = FakeReference()
    flaky = 4
    c, _, _ = controller(tokenizer, FakeReward(flaky={flaky}, times=1), reference=ref)
    [result] = c.run(1)
    [row] = [row for g in result.groups for row in g if row.uid == flaky]
    assert row.status is Status.OK and row[REFERENCE] == [-flaky / 100] * len(row[TRAJECTORY].payload.tokens)
    assert sum(call.count(flaky) for call in ref.calls) == 1  # the trajectory did not change: nothing to redo


class LostOnce(FakeReference):
    """A reference worker whose first call is lost (its actor died)."""

    def score(self, items):
        if not self.calls:
            self.calls.append([uid for uid, _ in items])
            raise WorkerLost("reference/0: actor died")
        return super().score(items)


def test_a_lost_reference_call_is_redone_on_the_same_trajectories(tokenizer):
    policy = Policy()
    rollout = FakeRollout(tokenizer, policy)
    c, _, store = controller(tokenizer, FakeReward(), reference=LostOnce(), rollout=rollout, policy=policy)
    [result] = c.run(1)
    assert sorted(rollout.generated) == list(range(B))  # no trajectory generated twice
    assert c.infra_retries == N and all(row[REFERENCE] == [-row.uid / 100] * len(row[TRAJECTORY].payload.tokens)
                                        for g in result.groups for row in g)


def test_every_column_needs_exactly_one_stage_on_one_backend(tokenizer):
    backend = InlineBackend()
    rollout = Stage(TRAJECTORY, WorkerGroup("rollout", [object()], backend), "rollout", lambda u, c: u)
    reward = Stage(REWARD, WorkerGroup("reward", [object()], backend), "score", lambda u, c: u)
    trainer = WorkerGroup("trainer", [object()], backend)
    with pytest.raises(ValueError, match=r"every column but the admission column needs exactly one stage: columns "
                                         r"\['trajectory', 'reward'\], stages \['trajectory'\]"):
        Controller(SampleStore(COLUMNS), StalenessBudget(0, B), [rollout], trainer, problems(), N, P)
    elsewhere = Stage(REWARD, WorkerGroup("reward", [object()], InlineBackend()), "score", lambda u, c: u)
    with pytest.raises(ValueError, match="same backend"):
        Controller(SampleStore(COLUMNS), StalenessBudget(0, B), [rollout, elsewhere], trainer, problems(), N, P)
    with pytest.raises(ValueError, match="budget counts 5 samples per step but a step takes 2 groups of 3"):
        Controller(SampleStore(COLUMNS), StalenessBudget(0, 5), [rollout, reward], trainer, problems(), N, P)


def test_budget_release_frees_room_and_refuses_more_than_admitted():
    budget = StalenessBudget(0, 4)
    assert budget.admit(0, 4) and not budget.admit(0, 1)
    budget.release(2)
    assert budget.admit(0, 2) and not budget.admit(0, 1)
    with pytest.raises(ValueError, match="release"):
        budget.release(5)
