"""The real ``TrainerWorker`` running ``algos.policy_step.TextPolicyStep`` with each kind of algorithm part, driven
by the controller with fake producers: a critic (token-level GAE), KL to a reference in the reward and in the loss,
reward shaping, and which π_old the ratio uses for each correction."""

import copy
import functools

import pytest
import torch
from test_controller import COLUMNS, REWARD, TASK, TRAJECTORY, B, FakeReward, FakeRollout, N, P, Policy, problems
from test_controller_stages import REFERENCE, FakeReference

from rollflow.algos import ADVANTAGES, policy_loss_fn, proximal, signal_share, value_loss_fn
from rollflow.algos.kl import k3
from rollflow.algos.policy_step import Algorithm, TextPolicyStep
from rollflow.api import Column, RewardCell, RewardResult
from rollflow.engines.critic import TorchCriticEngine, ValueModel
from rollflow.engines.torch_train import TorchTrainEngine
from rollflow.runtime.backend import InlineBackend
from rollflow.runtime.controller import Controller
from rollflow.runtime.group import WorkerGroup
from rollflow.runtime.roles import TrainerWorker
from rollflow.runtime.stage import Stage
from rollflow.runtime.staleness import StalenessBudget
from rollflow.runtime.store import SampleStore
from rollflow.runtime.weights import InlineWeightTransport


class Recording(TorchTrainEngine):
    """Keeps every batch it trains on (after the step filled advantages, values, π_old) and the log-probs of the
    weights it was trained from."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.batches, self.recomputed, self.lr_scales, self.before = [], 0, [], []

    def train_step(self, batch, loss_fn, minibatches=1, epochs=1, lr_scale=1.0):
        self.batches.append(copy.copy(batch))
        self.lr_scales.append(lr_scale)
        self.before.append(super().compute_logprobs(batch))
        return super().train_step(batch, loss_fn, minibatches, epochs, lr_scale)

    def compute_logprobs(self, batch):
        self.recomputed += 1
        return super().compute_logprobs(batch)


class SomeGroupsAgree(FakeReward):
    """Every third group scores 1 throughout (no signal); the others score their digits' parity (mixed)."""

    def score(self, items):
        out = super().score(items)
        for p in out.values:
            if (p.uid // N) % 3 == 0:
                p.value = RewardCell(RewardResult(1.0), 0.0)
        return out


def run(tokenizer, model, algorithm, steps=2, eta=0, critic=None, reference=False, reward=None, engine_cls=None):
    policy, backend = Policy(), InlineBackend()
    engine = (engine_cls or Recording)(model, lr=1e-3)
    trainer = TrainerWorker(engine, InlineWeightTransport(), TextPolicyStep(algorithm, tokenizer.pad_token_id), critic=critic)

    class Versioned(FakeRollout):  # samples at the trainer's real version, so lags are real
        def rollout(self, items):
            policy.version = engine.version
            return super().rollout(items)

    columns, stages = list(COLUMNS), [
        Stage(TRAJECTORY, WorkerGroup("rollout", [Versioned(tokenizer, policy)], backend), "rollout",
              lambda uid, cells: (uid, cells[TASK]), groups_per_call=P),
        Stage(REWARD, WorkerGroup("reward", [reward or FakeReward()], backend), "score",
              lambda uid, cells: (uid, cells[TASK], cells[TRAJECTORY])),
    ]
    if reference:
        columns.append(Column(REFERENCE, (TRAJECTORY,)))
        stages.append(Stage(REFERENCE, WorkerGroup("reference", [FakeReference()], backend), "score",
                            lambda uid, cells: (uid, cells[TRAJECTORY])))
    controller = Controller(SampleStore(columns), StalenessBudget(eta, B), stages, WorkerGroup("trainer", [trainer], backend),
                            problems(), group_size=N, groups_per_step=P)
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
    rewards = torch.tensor([row[REWARD].result.reward for g in results[-1].groups for row in g])
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
        run(tokenizer, make_model(), algorithm, steps=1)


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
    penalty = torch.tensor([-coef * (-0.5 + r.uid / 100) * r[TRAJECTORY].size for r in rows])
    assert kl[0].train.metrics["kl/reward_penalty"] == pytest.approx(penalty.mean().item(), abs=1e-5)
    a_plain = e_plain.batches[0].advantages.max(1).values + e_plain.batches[0].advantages.min(1).values
    a_kl = e_kl.batches[0].advantages.max(1).values + e_kl.batches[0].advantages.min(1).values
    # RLOO is linear in the rewards: the difference is RLOO of the penalties alone
    expected = ADVANTAGES.get("rloo")(penalty.view(P, N)).flatten()
    assert torch.allclose(a_kl - a_plain, expected, atol=1e-5)


def test_kl_in_the_loss_reports_the_reference_kl(tokenizer, make_model):
    results, engine = run(tokenizer, make_model(), Algorithm(ADVANTAGES.get("grpo"), grpo_loss(kl_coef=0.1)), reference=True)
    for result, batch, before in zip(results, engine.batches, engine.before):
        rows = [r for g in result.groups for r in g]
        # the fake reference gives -uid/100 on every token; the batch holds it on the model's tokens
        for i, row in enumerate(rows):
            n = len(row[TRAJECTORY].payload.tokens)  # inline: the payload is the trajectory
            assert batch.ref_logprobs[i, :n].tolist() == pytest.approx([-row.uid / 100] * n)
        # one update per step: the metric is k3 between the weights trained from and the reference, over the mask
        mask = batch.response_mask
        expected = (k3(before, batch.ref_logprobs) * mask).sum() / mask.sum()
        assert result.train.metrics["kl_ref"] == pytest.approx(expected.item(), rel=1e-5)


def test_reward_shaping_reaches_the_advantages(tokenizer, make_model):
    flip = lambda rewards, lengths: 1.0 - rewards  # noqa: E731  a shaping that reverses every group's ranking
    plain, e_plain = run(tokenizer, make_model(), Algorithm(ADVANTAGES.get("grpo"), grpo_loss()), steps=1)
    shaped, e_shaped = run(tokenizer, make_model(), Algorithm(ADVANTAGES.get("grpo"), grpo_loss(), shape=flip), steps=1)
    rewards = torch.tensor([r[REWARD].result.reward for g in shaped[0].groups for r in g])
    assert shaped[0].train.metrics["reward/shaping"] == pytest.approx((1.0 - 2 * rewards).mean().item())
    # GRPO of 1 - r is minus GRPO of r: the estimator saw the shaped rewards, not the verifier's
    assert torch.allclose(e_shaped.batches[0].advantages, -e_plain.batches[0].advantages, atol=1e-6)
    assert e_plain.batches[0].advantages.abs().sum() > 0


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
        mixed = [len({row[REWARD].result.reward for row in g}) > 1 for g in result.groups]
        assert scale == pytest.approx(sum(mixed) * N / len(rows))
        assert result.train.metrics["train/lr_scale"] == scale
    assert len(set(engine.lr_scales)) > 1, "the fake policy should give steps with different signal"


class SignalOnlyFirst(FakeReward):
    """The first step's groups score their digits' parity (mixed); every later sample scores 1 (no signal)."""

    def score(self, items):
        out = super().score(items)
        for p in out.values:
            if p.uid >= B:
                p.value = RewardCell(RewardResult(1.0), 0.0)
        return out


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
    assert all(len({row[REWARD].result.reward for row in g}) == 1 for r in results[1:] for g in r.groups)
    moved = (snapshots[2] - snapshots[0]).abs().max().item()
    assert (moved == 0.0) if scaled else (moved > 1e-5)
