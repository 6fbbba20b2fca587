"""The controller's optional stages: dynamic sampling (drop groups without signal, refill the step) and the
reference column (filled side by side with rewards), with the fakes of ``test_controller``."""

import time

import pytest

from rollflow.api import COLUMNS, REFERENCE, RewardCell, RewardResult, Status
from rollflow.recipes.grpo import has_signal
from rollflow.runtime.controller import Controller
from rollflow.runtime.group import WorkerGroup
from rollflow.runtime.roles import Referenced, Scored
from rollflow.runtime.staleness import StalenessBudget
from rollflow.runtime.store import SampleStore, StoreError
from test_controller import B, N, P, FakeReward, FakeRollout, FakeTrainer, Policy, problems


class NoSignalReward(FakeReward):
    """Every row of a group whose first uid is in ``flat`` (or every group, if ``flat`` is None) gets reward 1;
    other rows get 1 for an even digit, as ``FakeReward``."""

    def __init__(self, flat=None, **kw) -> None:
        super().__init__(**kw)
        self.flat = flat

    def score(self, items):
        out = super().score(items)
        for s in out:
            if self.flat is None or s.uid - s.uid % N in self.flat:
                out[out.index(s)] = Scored(s.uid, RewardCell(RewardResult(1.0), 0.0), s.started, s.finished)
        return out


class FakeReference:
    """Reference log-probs: -uid/100 for every response token; records the uids of every call."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def score(self, items) -> Referenced:
        self.calls.append([uid for uid, _, _ in items])
        started = time.time()
        return Referenced([(uid, [-uid / 100] * len(payload.response_ids)) for uid, _, payload in items], started, time.time())


def controller(tokenizer, reward, eta=0, reference=None, keep_group=None, max_dropped=0, policy=None):
    policy = policy or Policy()
    trainer = FakeTrainer(policy)
    store = SampleStore(COLUMNS + ((REFERENCE,) if reference is not None else ()))
    c = Controller(
        store, StalenessBudget(eta, B), WorkerGroup("rollout", [FakeRollout(tokenizer, policy)]),
        WorkerGroup("reward", [reward]), WorkerGroup("trainer", [trainer]), problems(),
        lambda text: [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)],
        group_size=N, groups_per_step=P, generate_batch=B, version=policy.version,
        reference=WorkerGroup("reference", [reference]) if reference is not None else None,
        keep_group=keep_group, max_dropped=max_dropped,
    )
    return c, trainer, store


@pytest.mark.parametrize("eta", [0, 2])
def test_dynamic_sampling_drops_groups_without_signal_and_refills_the_step(tokenizer, eta):
    flat = {0, 2 * N, 5 * N}  # groups 0, 2 and 5 get all-equal rewards
    c, trainer, store = controller(tokenizer, NoSignalReward(flat), eta=eta, keep_group=has_signal, max_dropped=10)
    results = list(c.run(3))
    trained = [g for r in results for g in r.groups]
    assert len(trained) == 3 * P  # every step still gets P groups
    assert all(has_signal([row.reward.result for row in g]) for g in trained)
    assert {g[0].uid for g in trained}.isdisjoint(flat)
    assert c.dropped_groups == 3 and store.counts()["dropped"] == 3 * N
    assert c.budget.admitted == 3 * B + (store.counts()["in_flight"] + store.counts()["ready"])  # dropped rows released
    assert results[-1].metrics["store/dropped"] == 3 * N
    lags = [v - row.generation.version for v, groups in trainer.steps for g in groups for row in g]
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


def test_reference_column_is_filled_for_every_trained_row(tokenizer):
    ref = FakeReference()
    c, trainer, _ = controller(tokenizer, FakeReward(), reference=ref, eta=1)
    results = list(c.run(3))
    rows = [row for r in results for g in r.groups for row in g]
    assert len(rows) == 3 * B
    for row in rows:
        assert row.reference == [-row.uid / 100] * row.generation.num_tokens
    assert all(len(call) % N == 0 for call in ref.calls)  # whole groups per call


def test_reference_result_for_a_row_cleared_by_a_retry_is_not_kept(tokenizer):
    ref = FakeReference()
    flaky = 4
    c, _, _ = controller(tokenizer, FakeReward(flaky={flaky}, times=1), reference=ref)
    [result] = c.run(1)
    [row] = [row for g in result.groups for row in g if row.uid == flaky]
    assert row.status is Status.OK and row.reference == [-flaky / 100] * row.generation.num_tokens
    assert sum(call.count(flaky) for call in ref.calls) == 2  # scored again after its regeneration


def test_reference_group_and_store_column_go_together(tokenizer):
    groups = [WorkerGroup(name, [object()]) for name in ("rollout", "reward", "trainer")]
    with pytest.raises(ValueError, match="reference worker group and the store's 'reference' column"):
        Controller(SampleStore(COLUMNS + (REFERENCE,)), StalenessBudget(0, B), *groups, problems(), list,
                   group_size=N, groups_per_step=P, generate_batch=B)
    with pytest.raises(ValueError, match="reference worker group and the store's 'reference' column"):
        Controller(SampleStore(), StalenessBudget(0, B), *groups, problems(), list, group_size=N, groups_per_step=P,
                   generate_batch=B, reference=WorkerGroup("reference", [FakeReference()]))


def test_store_columns_are_checked():
    with pytest.raises(StoreError, match="must include"):
        SampleStore(("prompt", "generation"))
    with pytest.raises(StoreError, match="must include"):
        SampleStore(COLUMNS + ("values",))


def test_budget_release_frees_room_and_refuses_more_than_admitted():
    budget = StalenessBudget(0, 4)
    assert budget.admit(0, 4) and not budget.admit(0, 1)
    budget.release(2)
    assert budget.capacity(0) == 2 and budget.admit(0, 2)
    with pytest.raises(ValueError, match="release"):
        budget.release(5)
