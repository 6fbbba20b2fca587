"""The simulator recipe's policies: running normalisers, the flattening MLP, the small CNN, reward scaling and the
learning-rate schedule of ``TorchPolicyTrainer``."""

import pytest
import torch

from rollflow.api import LossOutput, StepBatch
from rollflow.engines.policy import ActorCriticCNN, ActorCriticMLP, RunningNorm, TorchPolicyEngine, TorchPolicyTrainer


def test_running_norm_matches_the_statistics_of_everything_it_saw():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 3, generator=g) * 4 + 2 for n in (5, 17, 1, 40)]
    norm = RunningNorm((3,))
    for b in batches:
        norm.update(b)
    seen = torch.cat(batches).double()
    torch.testing.assert_close(norm.mean, seen.mean(0))
    torch.testing.assert_close(norm.var, seen.var(0, unbiased=False))
    assert norm.count.item() == 63
    z = norm(seen.float())
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    assert norm(torch.full((1, 3), 1e6)).max().item() == norm.clip


def test_the_mlp_flattens_frame_stacks_and_normalises_with_statistics_that_travel_with_the_weights():
    model = ActorCriticMLP(2 * 4, 3, (16,), normalize=True)
    obs = torch.randn(6, 2, 4) * 100  # a stack of 2 frames of 4
    assert model(obs).shape == (6, 3) and model.value(obs).shape == (6,)
    model.observe(obs)
    copy = ActorCriticMLP(2 * 4, 3, (16,), normalize=True)
    copy.load_state_dict(model.state_dict())  # what a rollout engine receives as a new version
    torch.testing.assert_close(copy(obs), model(obs))
    torch.testing.assert_close(copy.obs_norm.mean, obs.flatten(1).double().mean(0))


def test_the_cnn_reads_grid_images_and_stacks_of_them():
    grid = torch.randint(0, 10, (4, 7, 7, 3))
    model = ActorCriticCNN((7, 7, 3), 7, (8, 16), 32)
    assert model(grid).shape == (4, 7) and model.value(grid).shape == (4,)
    stacked = ActorCriticCNN((2, 7, 7, 3), 7, (8, 16), 32)
    frames = torch.randint(0, 10, (4, 2, 7, 7, 3))
    assert stacked(frames).shape == (4, 7)
    # each frame is its own channels: changing only the older frame changes the output
    changed = frames.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 10
    assert not torch.allclose(stacked(frames), stacked(changed))
    actions, logprobs = TorchPolicyEngine(model).act(grid)
    assert actions.shape == (4,) and bool((logprobs <= 0).all())


def _batch(n=32):
    return StepBatch(torch.randn(n, 4), torch.randint(0, 2, (n,)), torch.randn(n), torch.zeros(n),
                     torch.zeros(n, dtype=torch.long))


def _pg_loss(logp, entropy, mb):
    return LossOutput(-(mb.advantages * logp).mean(), {})


def test_the_learning_rate_anneals_linearly_by_version():
    trainer = TorchPolicyTrainer(ActorCriticMLP(4, 2, (8,)), lr=0.1, anneal_steps=4)
    seen = []

    def loss(logp, entropy, mb):  # reads the learning rate the update is about to use
        seen.append(trainer.optimizer.param_groups[0]["lr"])
        return _pg_loss(logp, entropy, mb)

    for step in range(5):
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.train_step(_batch(), loss)
        moved = any(not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters()))
        assert moved == (step < 4)  # the fifth step runs at lr 0
    assert seen == pytest.approx([0.1, 0.075, 0.05, 0.025, 0.0])


def test_rewards_are_scaled_by_the_running_std_of_their_returns():
    trainer = TorchPolicyTrainer(ActorCriticMLP(4, 2, (8,), normalize_rewards=True), lr=0.1)
    returns = torch.tensor([10.0, 20.0, 30.0, 40.0])
    scaled = trainer.scaled_rewards(torch.ones(4), returns)
    torch.testing.assert_close(scaled, torch.ones(4) / returns.double().var(unbiased=False).sqrt().float(), rtol=1e-4, atol=0)
    with pytest.raises(TypeError, match="normalize_rewards=True"):
        TorchPolicyTrainer(ActorCriticMLP(4, 2, (8,)), lr=0.1).scaled_rewards(torch.ones(2), torch.ones(2))
