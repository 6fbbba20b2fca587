"""REINFORCE on fragments: returns-to-go by hand, the loss's gradient direction, and one step of the trainer's step
function on hand-built fragments through the real policy trainer."""

import pytest
import torch

from rollflow.algos.pg import PolicyGradientStep, normalised, reinforce_loss, returns_to_go
from rollflow.api import Fragment, SampleRow, Status, StepBatch, Trajectory
from rollflow.engines.policy import CategoricalMLP, TorchPolicyEngine, TorchPolicyTrainer, action_logprobs


def test_returns_to_go_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0])
    no_done = torch.zeros(4, dtype=torch.bool)
    # γ = 0.5: G3 = 4, G2 = 3 + 2 = 5, G1 = 2 + 2.5 = 4.5, G0 = 1 + 2.25 = 3.25
    assert returns_to_go(rewards, no_done, 0.5).tolist() == [3.25, 4.5, 5.0, 4.0]


def test_returns_restart_after_a_done_inside_the_fragment():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0])
    dones = torch.tensor([False, True, False, False])  # an episode ends with step 1; steps 2-3 are the next one's
    # G3 = 4, G2 = 3 + 0.5·4 = 5, G1 = 2 (its episode ended: nothing after it counts), G0 = 1 + 0.5·2 = 2
    assert returns_to_go(rewards, dones, 0.5).tolist() == [2.0, 2.0, 5.0, 4.0]
    last = torch.tensor([False, False, False, True])
    assert returns_to_go(rewards, last, 1.0).tolist() == [10.0, 9.0, 7.0, 4.0]


def test_returns_to_go_of_a_batch_of_fragments_is_each_fragments_own():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 0.0]])  # (2, 4)
    dones = torch.tensor([[False, True, False, False], [False, False, True, False]])
    out = returns_to_go(rewards, dones, 0.5)
    assert out.shape == (2, 4)
    assert out[0].tolist() == [2.0, 2.0, 5.0, 4.0]
    assert out[1].tolist() == [0.25, 0.5, 1.0, 0.0]


def test_normalised_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0])
    assert normalised(x, scale_by_std=False).tolist() == [-1.0, 0.0, 1.0]
    assert normalised(x).tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-5)  # std of [1, 2, 3] is 1


def test_loss_descends_towards_actions_with_positive_advantage():
    logp = torch.tensor([-0.5, -0.5, -1.0], requires_grad=True)
    advantages = torch.tensor([1.0, -1.0, 0.0])
    loss = reinforce_loss(logp, advantages)
    assert loss.item() == pytest.approx(-(1.0 * -0.5 + -1.0 * -0.5) / 3)
    loss.backward()
    # Gradient descent moves logp against the gradient: up for A > 0, down for A < 0, untouched for A = 0.
    assert logp.grad.tolist() == pytest.approx([-1 / 3, 1 / 3, 0.0])


def test_entropy_bonus_lowers_the_loss_by_its_weight():
    logp, advantages, entropy = torch.tensor([-0.7]), torch.tensor([0.0]), torch.tensor([0.6])
    assert reinforce_loss(logp, advantages, entropy, entropy_coef=0.5).item() == pytest.approx(-0.3)


def fragment(observations, actions, rewards, dones, version=0):
    T = len(actions)
    return Fragment(torch.tensor(observations, dtype=torch.float), torch.tensor(actions), torch.tensor(rewards),
                    torch.tensor(dones), torch.zeros(T), torch.full((T,), version),
                    episode_returns=[sum(rewards)] if dones[-1] else [])


def rows(*cells):
    return [[SampleRow(uid, uid, {"task": uid, "fragment": c}, {})] for uid, c in enumerate(cells)]


def test_one_step_makes_the_rewarded_action_likelier_and_takes_one_version():
    # Two one-step episodes from the same observation: action 1 pays 1, action 0 pays 0.
    obs = [[1.0, 0.0], [1.0, 0.0]]
    good = fragment([[1.0, 0.0], [0.0, 1.0]], [1], [1.0], [True], version=0)
    bad = fragment([[1.0, 0.0], [0.0, 1.0]], [0], [0.0], [True], version=0)
    trainer = TorchPolicyTrainer(CategoricalMLP(2, 2, seed=0), lr=0.05)
    before = action_logprobs(trainer.model, torch.tensor(obs), torch.tensor([1, 0]))[0].detach()
    metrics = PolicyGradientStep(gamma=1.0)(rows(good, bad), trainer, None)
    after = action_logprobs(trainer.model, torch.tensor(obs), torch.tensor([1, 0]))[0].detach()
    assert after[0] > before[0] and after[1] < before[1]
    assert trainer.version == 1
    assert metrics["episode/return_mean"] == 0.5 and metrics["episode/count"] == 2.0
    assert metrics["staleness/max"] == 0.0 and metrics["fragment/masked"] == 0.0

    engine = TorchPolicyEngine(CategoricalMLP(2, 2, seed=1))  # other weights until it loads the trainer's
    engine.load_weights(trainer.export_weights())
    assert engine.version == 1
    actions, logp = engine.act(torch.tensor(obs * 4))  # (8,), (8,)
    assert torch.allclose(logp, action_logprobs(trainer.model, torch.tensor(obs * 4), actions)[0].detach())


def test_version_lag_is_trainer_version_minus_each_actions_version():
    trainer = TorchPolicyTrainer(CategoricalMLP(2, 2, seed=0), lr=0.01)
    for _ in range(3):  # the trainer is at version 3
        PolicyGradientStep()(rows(fragment([[1.0, 0.0], [0.0, 1.0]], [1], [1.0], [True], version=3)), trainer, None)
    old = fragment([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], [1, 0], [0.0, 1.0], [False, True], version=1)
    mixed = fragment([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], [1, 0], [0.0, 1.0], [False, True], version=2)
    mixed.versions = torch.tensor([2, 3])
    metrics = PolicyGradientStep()(rows(old, mixed), trainer, None)
    assert (metrics["staleness/max"], metrics["staleness/min"]) == (2.0, 0.0)  # 3 - 1, 3 - 3
    assert metrics["staleness/mean"] == pytest.approx((2 + 2 + 1 + 0) / 4)
    assert metrics["staleness/samples_lag2"] == metrics["staleness/samples_lag1"] == 0.5  # by each fragment's oldest


def test_rows_without_a_fragment_are_masked_only_when_their_status_says_why():
    trainer = TorchPolicyTrainer(CategoricalMLP(2, 2, seed=0), lr=0.01)
    failed = Trajectory([], [], [], [], [], "", status=Status.INFRA_ERROR)
    ok = fragment([[1.0, 0.0], [0.0, 1.0]], [1], [1.0], [True])
    metrics = PolicyGradientStep()(rows(ok, failed), trainer, None)
    assert metrics["fragment/masked"] == 1.0 and metrics["episode/count"] == 1.0
    with pytest.raises(RuntimeError, match="no row of this step holds a fragment"):
        PolicyGradientStep()(rows(failed), trainer, None)
    with pytest.raises(TypeError, match="row 0: column 'fragment' holds a Trajectory"):
        PolicyGradientStep()(rows(Trajectory([], [], [], [], [], "")), trainer, None)


def test_step_batch_split_keeps_every_step_once_and_its_columns_aligned():
    batch = StepBatch(torch.arange(10.0)[:, None], torch.arange(10), torch.arange(10.0), torch.zeros(10),
                      torch.zeros(10, dtype=torch.long))
    parts = batch.split(3, torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [4, 3, 3]
    assert sorted(torch.cat([p.actions for p in parts]).tolist()) == list(range(10))
    assert all(torch.equal(p.observations[:, 0], p.advantages) for p in parts)
