import itertools
import time

import pytest
import torch

from rollflow.algos import ADVANTAGES, policy_loss_fn
from rollflow.api import GENERATION, REWARD, Generation, Problem, RewardCell, RewardResult, SamplingParams, Status
from rollflow.engines.torch_train import TorchTrainEngine
from rollflow.runtime.controller import Controller
from rollflow.runtime.group import Mode, WorkerGroup, dispatch
from rollflow.runtime.roles import Generated, TrainerWorker
from rollflow.runtime.staleness import StalenessBudget
from rollflow.runtime.store import SampleStore
from rollflow.runtime.weights import InlineWeightTransport

P, N = 2, 3  # prompts per step, samples per prompt


class FakeRollout:
    """Answers every prompt with the uid's last digit (as text and ids) then EOS; records what it generated."""

    def __init__(self, tokenizer, version: int = 0) -> None:
        self.tokenizer, self.version = tokenizer, version
        self.generated: list[int] = []

    @dispatch(Mode.SPLIT)
    def generate(self, items: list[tuple[int, list[int]]], params: SamplingParams | None = None) -> list[Generated]:
        out, now = [], time.time()
        for uid, _ in items:
            self.generated.append(uid)
            ids = [*self.tokenizer.encode(str(uid % 10), add_special_tokens=False), self.tokenizer.eos_token_id]
            generation = Generation(ids, str(uid % 10), [-0.5] * len(ids), [self.version] * len(ids), "eos")
            out.append(Generated(uid, generation, now, now))
        return out


class FakeReward:
    """Reward 1 when the response's digit is even; ``infra_error`` for ``flaky`` uids (``times`` times each)."""

    def __init__(self, flaky: set[int] = frozenset(), times: int = 1) -> None:
        self.failures_left = {uid: times for uid in flaky}

    @dispatch(Mode.SPLIT)
    def score(self, items: list[tuple[int, Problem, str]]) -> list[tuple[int, RewardCell]]:
        out = []
        for uid, _, response in items:
            if self.failures_left.get(uid, 0) > 0:
                self.failures_left[uid] -= 1
                out.append((uid, RewardCell(RewardResult(0.0, status=Status.INFRA_ERROR), 0.0)))
            else:
                out.append((uid, RewardCell(RewardResult(float(int(response) % 2 == 0)), 0.0)))
        return out


def problems():
    for i in itertools.count():
        yield Problem(f"{i % 10}+{i % 7}=", str(i % 10 + i % 7))


def make_controller(tokenizer, reward: FakeReward, eta: int = 0, max_retries: int = 2, rollout_workers: int = 1):
    rollouts = [FakeRollout(tokenizer) for _ in range(rollout_workers)]
    controller = Controller(
        SampleStore(),
        StalenessBudget(eta, P * N),
        WorkerGroup("rollout", rollouts),
        WorkerGroup("reward", [reward]),
        problems(),
        lambda text: [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)],
        group_size=N,
        max_retries=max_retries,
    )
    return controller, rollouts


def test_admit_respects_the_staleness_budget(tokenizer):
    controller, _ = make_controller(tokenizer, FakeReward(), eta=0)
    assert controller.admit(version=0) == P * N
    assert controller.admit(version=0) == 0  # η = 0: nothing more until the trainer steps
    assert controller.store.counts() == {"in_flight": P * N, "ready": 0, "consumed": 0}
    assert controller.admit(version=1) == P * N

    controller, _ = make_controller(tokenizer, FakeReward(), eta=2)
    assert controller.admit(version=0) == 3 * P * N


def test_produce_fills_the_store_and_retries_an_infra_error_once(tokenizer):
    flaky = 4
    controller, [rollout] = make_controller(tokenizer, FakeReward(flaky={flaky}, times=1))
    controller.admit(version=0)
    times = controller.produce()

    assert set(times) == {"generate", "reward"}
    assert controller.infra_retries == 1
    assert sorted(rollout.generated) == [0, 1, 2, 3, 4, 4, 5]  # only the faulty row is generated again
    assert controller.store.counts() == {"in_flight": 0, "ready": P * N, "consumed": 0}
    assert controller.store.pending(GENERATION) == [] and controller.store.pending(REWARD) == []

    groups = controller.next_batch(P, timeout=0)
    assert [[r.uid for r in g] for g in groups] == [[0, 1, 2], [3, 4, 5]]
    assert [g[0].group_id for g in groups] == [0, 1]
    assert [g[0].prompt.problem.prompt for g in groups] == ["0+0=", "1+1="]
    rows = {r.uid: r for g in groups for r in g}
    assert rows[flaky].status is Status.OK
    assert rows[flaky].reward.result.reward == 1.0  # "4" is even
    assert [rows[u].reward.result.reward for u in (0, 1, 2, 3, 5)] == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert controller.store.counts()["consumed"] == P * N


def test_rollout_split_across_workers(tokenizer):
    controller, rollouts = make_controller(tokenizer, FakeReward(), rollout_workers=2)
    controller.admit(version=0)
    controller.produce()
    assert [r.generated for r in rollouts] == [[0, 1, 2], [3, 4, 5]]
    assert len(controller.next_batch(P, timeout=0)) == P


def test_row_failing_every_time_ends_as_infra_error(tokenizer):
    flaky = 1
    controller, _ = make_controller(tokenizer, FakeReward(flaky={flaky}, times=100), max_retries=2)
    controller.admit(version=0)
    controller.produce()
    assert controller.infra_retries == 2
    rows = {r.uid: r for g in controller.next_batch(P, timeout=0) for r in g}
    assert rows[flaky].status is Status.INFRA_ERROR
    assert all(r.status is Status.OK for u, r in rows.items() if u != flaky)


def test_exhausted_row_is_not_generated_again(tokenizer):
    flaky = 1
    controller, [rollout] = make_controller(tokenizer, FakeReward(flaky={flaky}, times=100), max_retries=2)
    controller.admit(version=0)
    controller.produce()
    assert rollout.generated.count(flaky) == 3  # the first attempt and 2 retries


class Spy:
    """Wraps a training engine and keeps every batch handed to ``train_step``."""

    def __init__(self, engine: TorchTrainEngine) -> None:
        self.engine, self.batches = engine, []

    @property
    def version(self) -> int:
        return self.engine.version

    def train_step(self, batch, loss_fn, minibatches, epochs):
        self.batches.append(batch)
        return self.engine.train_step(batch, loss_fn, minibatches, epochs)

    def export_weights(self):
        return self.engine.export_weights()


def make_trainer(tokenizer, model):
    engine = Spy(TorchTrainEngine(model, lr=1e-3))
    transport = InlineWeightTransport()
    trainer = TrainerWorker(
        engine,
        transport,
        tokenizer.pad_token_id,
        advantage_fn=ADVANTAGES.get("grpo"),
        loss_fn=policy_loss_fn("ppo_clip", "token-mean"),
        minibatches=1,
        epochs=1,
    )
    return trainer, engine, transport


def test_trainer_masks_infra_error_rows(tokenizer, make_model):
    flaky = 1
    controller, _ = make_controller(tokenizer, FakeReward(flaky={flaky}, times=100), max_retries=1)
    controller.admit(version=0)
    controller.produce()
    groups = controller.next_batch(P, timeout=0)
    trainer, engine, transport = make_trainer(tokenizer, make_model())

    metrics = trainer.train(groups)

    [batch] = engine.batches
    uids = [r.uid for g in groups for r in g]
    i = uids.index(flaky)
    assert batch.response_mask[i].sum() == 0  # masked: no loss from the infra_error row
    assert batch.advantages[i].abs().sum() == 0
    assert all(batch.response_mask[j].sum() == 2 for j in range(len(uids)) if j != i)  # digit + EOS
    assert torch.isfinite(torch.tensor(list(metrics.values()))).all()
    assert metrics["staleness/max"] == 0.0
    assert engine.version == 1
    assert transport.latest().version == 1  # the new version was published


def test_infra_error_row_takes_no_part_in_group_statistics(tokenizer, make_model):
    flaky = 2
    controller, _ = make_controller(tokenizer, FakeReward(flaky={flaky}, times=100), max_retries=0)
    controller.admit(version=0)
    controller.produce()
    groups = controller.next_batch(P, timeout=0)
    # group 0 usable rewards: uid 0 → 1.0, uid 1 → 0.0; group 1: uids 3, 4, 5 → 0.0, 1.0, 0.0
    trainer, engine, _ = make_trainer(tokenizer, make_model())
    trainer.train(groups)
    [batch] = engine.batches
    per_row = batch.advantages.max(dim=1).values + batch.advantages.min(dim=1).values  # the row's constant, once
    # group 0's usable rows alone, (1, 0): mean 0.5, unbiased std √0.5 → ±0.7071.
    # (Filling the infra row with the batch's usable mean 2/5 = 0.4 gives (1, 0, 0.4) → +1.0596 / -0.9272 instead.)
    assert per_row[:2].tolist() == pytest.approx([0.5 / 0.5**0.5, -0.5 / 0.5**0.5], abs=1e-4)
