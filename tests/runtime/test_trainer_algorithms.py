"""The real ``TrainerWorker`` with each kind of algorithm part, driven by the controller with fake producers:
a critic (token-level GAE), KL to a reference in the reward and in the loss, reward shaping, and which π_old the
ratio uses for each correction."""

import copy
import functools

import pytest
import torch
from test_controller import B, N, P, FakeReward, FakeRollout, Policy, problems
from test_controller_stages import FakeReference

from rollflow.algos import ADVANTAGES, policy_loss_fn, proximal, signal_share, value_loss_fn
from rollflow.api import COLUMNS, REFERENCE, RewardCell, RewardResult
from rollflow.engines.critic import TorchCriticEngine, ValueModel
from rollflow.engines.torch_train import TorchTrainEngine
from rollflow.runtime.controller import Controller
from rollflow.runtime.group import WorkerGroup
from rollflow.runtime.roles import Algorithm, TrainerWorker
from rollflow.runtime.staleness import StalenessBudget
from rollflow.runtime.store import SampleStore
from rollflow.runtime.weights import InlineWeightTransport


class Recording(TorchTrainEngine):
    """Keeps every batch it trains on (after the trainer filled advantages, values, π_old)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.batches, self.recomputed, self.lr_scales = [], 0, []

    def train_step(self, batch, loss_fn, minibatches=1, epochs=1, lr_scale=1.0):
        self.batches.append(copy.copy(batch))
        self.lr_scales.append(lr_scale)
        return super().train_step(batch, loss_fn, minibatches, epochs, lr_scale)

    def compute_logprobs(self, batch):
        self.recomputed += 1
        return super().compute_logprobs(batch)


class SomeGroupsAgree(FakeReward):
    """Every third group scores 1 throughout (no signal); the others score their digits' parity (mixed)."""

    def score(self, items):
        scored = super().score(items)
        for s in scored:
            if (s.uid // N) % 3 == 0:
                s.cell = RewardCell(RewardResult(1.0), 0.0)
        return scored


def run(tokenizer, model, algorithm, steps=2, eta=0, critic=None, reference=False, reward=None, engine_cls=None):
    policy = Policy()
    engine = (engine_cls or Recording)(model, lr=1e-3)
    trainer = TrainerWorker(engine, InlineWeightTransport(), tokenizer.pad_token_id, algorithm, 1, 1, critic=critic)

    class Versioned(FakeRollout):  # samples at the trainer's real version, so lags are real
        def rollout(self, items, params=None):
            policy.version = engine.version
            return super().rollout(items, params)

    store = SampleStore(COLUMNS + ((REFERENCE,) if reference else ()))
    controller = Controller(
        store, StalenessBudget(eta, B), WorkerGroup("rollout", [Versioned(tokenizer, policy)]), WorkerGroup("reward", [reward or FakeReward()]),
        WorkerGroup("trainer", [trainer]), problems(),
        lambda text: [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)],
        group_size=N, groups_per_step=P, generate_batch=B,
        reference=WorkerGroup("reference", [FakeReference()]) if reference else None,
    )
    return list(controller.run(steps)), engine


def grpo_loss(**kw):
    return policy_loss_fn("ppo_clip", "token-mean", **kw)


def test_critic_path_end_to_end(tokenizer, make_model):
    model = make_model()
    critic = TorchCriticEngine(ValueModel(copy.deepcopy(model)), lr=1e-2)
    critic.init_from(model)
    gae = ADVANTAGES.get("gae")
    algorithm = Algorithm(functools.partial(gae, gamma=1.0, lam=0.95), grpo_loss(), token_level=True, needs_critic=True,
                          value_loss=value_loss_fn(clip=None))
    head_before = critic.model.head.bias.item()
    results, engine = run(tokenizer, model, algorithm, steps=3, critic=critic)
    batch = engine.batches[-1]
    mask = batch.response_mask
    assert batch.values is not None and batch.returns is not None
    # returns = GAE advantages + values: with γ = 1 and one terminal reward they lie near the reward
    rewards = torch.tensor([row.reward.result.reward for g in results[-1].groups for row in g])
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)
    assert torch.allclose(batch.returns[torch.arange(len(last)), last], rewards, atol=1e-5)  # δ at the last token
    assert (batch.advantages * (1 - mask)).abs().sum() == 0
    metrics = results[-1].train.metrics
    assert {"critic/loss", "critic/grad_norm", "critic/value_mean"} <= set(metrics)
    assert critic.model.head.bias.item() != head_before  # the critic was trained
    # the critic learns: its values move toward the returns it was fitted on
    values_now = critic.compute_values(batch) * mask
    err = lambda v: ((v - batch.returns) ** 2 * mask).sum() / mask.sum()  # noqa: E731
    assert err(values_now) < err(batch.values)


def test_critic_init_copies_the_policy_decoder(make_model):
    policy, other = make_model(0), make_model(1)
    critic = TorchCriticEngine(ValueModel(other), lr=1e-3)
    critic.init_from(policy)
    for (name, a), b in zip(critic.model.decoder.state_dict().items(), policy.base_model.state_dict().values()):
        assert torch.equal(a, b), name
    assert critic.model.head.weight.abs().sum() == 0


def test_an_estimator_that_needs_a_critic_refuses_to_run_without_one(tokenizer, make_model):
    algorithm = Algorithm(ADVANTAGES.get("gae"), grpo_loss(), token_level=True, needs_critic=True)
    with pytest.raises(ValueError, match="needs a critic"):
        TrainerWorker(TorchTrainEngine(make_model(), lr=1e-3), InlineWeightTransport(), 0, algorithm, 1, 1)


def test_reinforce_pp_is_token_level_without_a_critic(tokenizer, make_model):
    est = functools.partial(ADVANTAGES.get("reinforce_pp"), gamma=1.0)
    results, engine = run(tokenizer, make_model(), Algorithm(est, grpo_loss(), token_level=True))
    batch = engine.batches[-1]
    assert batch.values is None
    masked = batch.advantages[batch.response_mask.bool()]
    assert abs(masked.mean().item()) < 1e-5  # whitened over the batch's response tokens


def test_kl_in_the_reward_lowers_each_sequence_reward_by_its_penalty(tokenizer, make_model):
    coef = 0.5
    kl_reward = lambda behav, ref: -coef * (behav - ref)  # noqa: E731  (k1, as kl_penalty_rewards does)
    plain, e_plain = run(tokenizer, make_model(), Algorithm(ADVANTAGES.get("rloo"), grpo_loss()), steps=1, reference=True)
    kl, e_kl = run(tokenizer, make_model(), Algorithm(ADVANTAGES.get("rloo"), grpo_loss(), kl_reward=kl_reward),
                   steps=1, reference=True)
    rows = [r for g in kl[0].groups for r in g]
    # fake behaviour log-probs are -0.5 per token and the fake reference's -uid/100: penalty per token
    # -0.5·(-0.5 + uid/100), summed over the row's tokens
    penalty = torch.tensor([-coef * (-0.5 + r.uid / 100) * r.generation.num_tokens for r in rows])
    assert kl[0].train.metrics["kl/reward_penalty"] == pytest.approx(penalty.mean().item(), abs=1e-5)
    a_plain = e_plain.batches[0].advantages.max(1).values + e_plain.batches[0].advantages.min(1).values
    a_kl = e_kl.batches[0].advantages.max(1).values + e_kl.batches[0].advantages.min(1).values
    # RLOO is linear in the rewards: the difference is RLOO of the penalties alone
    expected = ADVANTAGES.get("rloo")(penalty.view(P, N)).flatten()
    assert torch.allclose(a_kl - a_plain, expected, atol=1e-5)


def test_kl_in_the_loss_reports_the_reference_kl(tokenizer, make_model):
    results, engine = run(tokenizer, make_model(), Algorithm(ADVANTAGES.get("grpo"), grpo_loss(kl_coef=0.1)), reference=True)
    assert engine.batches[0].ref_logprobs is not None
    assert results[-1].train.metrics["kl_ref"] > 0


def test_reward_shaping_changes_the_rewards_the_advantages_see(tokenizer, make_model):
    shape = lambda rewards, lengths: rewards - 10.0 * (lengths > 1)  # noqa: E731  every fake response has 2 tokens
    results, _ = run(tokenizer, make_model(), Algorithm(ADVANTAGES.get("grpo"), grpo_loss(), shape=shape), steps=1)
    assert results[0].train.metrics["reward/shaping"] == pytest.approx(-10.0)


@pytest.mark.parametrize("correction", ["none", "tis", "decoupled", "aipo"])
def test_only_corrections_with_a_recomputed_proximal_recompute_it_on_stale_batches(tokenizer, make_model, correction):
    algorithm = Algorithm(ADVANTAGES.get("grpo"), grpo_loss(correction=correction), proximal=proximal(correction))
    results, engine = run(tokenizer, make_model(), algorithm, steps=4, eta=2)
    assert max(r.train.metrics["staleness/max"] for r in results) > 0
    recomputes = sum(r.train.metrics["correction/recomputed"] for r in results)
    assert (recomputes > 0) == (correction in ("tis", "decoupled"))
    assert engine.recomputed == recomputes


def test_trainer_marks_groups_and_scales_the_step_by_its_signal(tokenizer, make_model):
    algorithm = Algorithm(ADVANTAGES.get("grpo"), grpo_loss(), lr_scale=signal_share)
    results, engine = run(tokenizer, make_model(), algorithm, steps=4, reward=SomeGroupsAgree())
    for result, batch, scale in zip(results, engine.batches, engine.lr_scales):
        rows = [row for g in result.groups for row in g]
        assert batch.group_ids.tolist() == [i for i in range(P) for _ in range(N)]
        # a group's rewards all equal <=> its advantages are all 0
        mixed = [len({row.reward.result.reward for row in g}) > 1 for g in result.groups]
        assert scale == pytest.approx(sum(mixed) * N / len(rows))
        assert result.train.metrics["train/lr_scale"] == scale
    assert len(set(engine.lr_scales)) > 1, "the fake policy should give steps with different signal"


class SignalOnlyFirst(FakeReward):
    """The first step's groups score their digits' parity (mixed); every later sample scores 1 (no signal)."""

    def score(self, items):
        scored = super().score(items)
        for s in scored:
            if s.uid >= B:
                s.cell = RewardCell(RewardResult(1.0), 0.0)
        return scored


@pytest.mark.parametrize("scaled", [True, False])
def test_steps_without_signal_move_no_weight_only_when_scaled(tokenizer, make_model, scaled):
    # AdamW's momentum from the first step keeps moving the weights on later steps whose gradient is exactly 0;
    # scaling the step by its signal share (0 there) stops that.
    algorithm = Algorithm(ADVANTAGES.get("grpo"), grpo_loss(), lr_scale=signal_share if scaled else None)
    model = make_model()
    snapshots = []

    class Snapshot(Recording):
        def train_step(self, batch, loss_fn, minibatches=1, epochs=1, lr_scale=1.0):
            out = super().train_step(batch, loss_fn, minibatches, epochs, lr_scale)
            snapshots.append(torch.cat([p.detach().flatten().clone() for p in self.model.parameters()]))
            return out

    results, _ = run(tokenizer, model, algorithm, steps=3, reward=SignalOnlyFirst(), engine_cls=Snapshot)
    assert all(len({row.reward.result.reward for row in g}) == 1 for r in results[1:] for g in r.groups)
    moved = (snapshots[2] - snapshots[0]).abs().max().item()
    assert (moved == 0.0) if scaled else (moved > 1e-5)
