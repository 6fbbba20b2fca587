"""Engines for small non-text policies: a categorical MLP, the rollout engine that samples from it, and the trainer
that optimises it with a loss it is given.

The pair mirrors the text engines (``hf_inference`` and ``torch_train``): the rollout engine holds one weight version
at a time and changes it only through verified ``VersionedWeights``; the trainer knows nothing of RL, it turns a
loss function into ``minibatches × epochs`` clipped AdamW updates and counts one version per ``train_step``.
Not covered: continuous actions (a Gaussian head would be another module with the same two engines).
"""

from __future__ import annotations

import torch

from rollflow.api import LossOutput, StepBatch, StepLossFn
from rollflow.engines.models import VersionedEngine
from rollflow.engines.torch_train import AdamWTrainer


class CategoricalMLP(torch.nn.Module):
    """Observations (B, obs_dim) → logits (B, actions) of a categorical policy; ``hidden`` units per layer."""

    def __init__(self, obs_dim: int, actions: int, hidden: tuple[int, ...] = (32,), seed: int = 0) -> None:
        super().__init__()
        sizes = [obs_dim, *hidden]
        layers: list[torch.nn.Module] = []
        with torch.random.fork_rng():  # the same seed gives the same weights, without touching the global generator
            torch.manual_seed(seed)
            for a, b in zip(sizes, sizes[1:]):
                layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
            layers.append(torch.nn.Linear(sizes[-1], actions))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.net(observations.float())  # (B, actions)


class ActorCriticMLP(torch.nn.Module):
    """A categorical policy (``forward``: observations → logits, as ``CategoricalMLP``) and a value function
    (``value``: observations → V (B,)) on separate MLP trunks of ``hidden`` units per layer, as PPO uses them."""

    def __init__(self, obs_dim: int, actions: int, hidden: tuple[int, ...] = (64, 64), seed: int = 0) -> None:
        super().__init__()
        self.actor = CategoricalMLP(obs_dim, actions, hidden, seed)
        self.critic = CategoricalMLP(obs_dim, 1, hidden, seed + 1)  # one output: the value

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.actor(observations)  # (B, actions)

    def value(self, observations: torch.Tensor) -> torch.Tensor:
        return self.critic(observations).squeeze(-1)  # (B,)


def action_logprobs(model: torch.nn.Module, observations: torch.Tensor,
                    actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (B,) of ``actions`` (B,) given ``observations`` (B, *obs) under ``model``, and the entropies (B,)."""
    logp = model(observations).log_softmax(-1)  # (B, A)
    taken = logp.gather(-1, actions.long()[:, None]).squeeze(-1)  # (B,)
    entropy = -(logp.exp() * logp).sum(-1)  # (B,)
    return taken, entropy


class TorchPolicyEngine(VersionedEngine):
    """``api.PolicyEngine`` over a categorical policy: samples one action per observation with its own seeded
    generator, so a worker's stream of actions depends only on its seed and what it was asked."""

    def __init__(self, model: torch.nn.Module, seed: int = 0) -> None:
        self.model = model.eval().requires_grad_(False)
        self.generator = torch.Generator().manual_seed(seed)
        self._version = 0  # built from the trainer's starting weights, which are version 0

    @torch.no_grad()
    def act(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp = self.model(observations).log_softmax(-1)  # (B, A)
        actions = torch.multinomial(logp.exp(), 1, generator=self.generator).squeeze(-1)  # (B,)
        return actions, logp.gather(-1, actions[:, None]).squeeze(-1)  # (B,), (B,)


class TorchPolicyTrainer(AdamWTrainer):
    """Trains a categorical policy with a loss it is given: AdamW, gradient clipping, minibatches and epochs per step
    (``torch_train.AdamWTrainer``, shared with the text trainer). ``version`` is the number of ``train_step``
    calls: one per RL step, whatever the minibatches and epochs."""

    def train_step(self, batch: StepBatch, loss_fn: StepLossFn, minibatches: int = 1, epochs: int = 1,
                   lr_scale: float = 1.0) -> dict[str, float]:
        """``epochs`` passes over ``batch``, each cut into ``minibatches`` updates at ``lr_scale`` × the learning
        rate; then version += 1."""

        needs_values = getattr(loss_fn, "needs_values", False)
        if needs_values and not callable(getattr(self.model, "value", None)):
            raise TypeError(f"this loss needs values, but the policy ({type(self.model).__name__}) has no value head; "
                            "use an actor-critic model such as engines.policy.ActorCriticMLP")

        def loss(mb: StepBatch) -> LossOutput:
            logp, entropy = action_logprobs(self.model, mb.observations, mb.actions)
            if needs_values:
                return loss_fn(logp, entropy, mb, self.model.value(mb.observations))
            return loss_fn(logp, entropy, mb)

        return self._updates(batch, loss, minibatches, epochs, lr_scale)

    @torch.no_grad()
    def compute_values(self, observations: torch.Tensor) -> torch.Tensor:
        """V (N,) of ``observations`` (N, *obs) under the current weights of an actor-critic model."""
        return self.model.value(observations)

    @torch.no_grad()
    def compute_logprobs(self, batch: StepBatch) -> torch.Tensor:
        """Log-probs (N,) of the batch's actions under the current weights (π_old for off-policy corrections)."""
        return action_logprobs(self.model, batch.observations, batch.actions)[0]
