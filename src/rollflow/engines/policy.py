"""Engines for small non-text policies: a categorical MLP, the rollout engine that samples from it, and the trainer
that optimises it with a loss it is given.

The pair mirrors the text engines (``hf_inference`` and ``torch_train``): the rollout engine holds one weight version
at a time and changes it only through verified ``VersionedWeights``; the trainer knows nothing of RL, it turns a
loss function into ``minibatches × epochs`` clipped AdamW updates and counts one version per ``train_step``.
Not covered: continuous actions (a Gaussian head would be another module with the same two engines).
"""

from __future__ import annotations

import copy
from typing import Any

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


class RunningNorm(torch.nn.Module):
    """Running mean and variance of a stream of ``shape``-d values (Chan et al.'s parallel update), in buffers, so
    they travel with the weights: ``forward`` standardises and clips to ±``clip``; ``update`` folds a batch in."""

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.clip, self.eps = clip, eps
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(0.0, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean.to(x.dtype)) / torch.sqrt(self.var.to(x.dtype) + self.eps)
        return z.clamp(-self.clip, self.clip)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Fold ``x`` (N, *shape) into the statistics."""
        x = x.to(torch.float64).reshape(-1, *self.mean.shape)
        n = x.shape[0]
        if n == 0:
            return
        mean, var = x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.var.copy_((self.var * self.count + var * n + delta**2 * self.count * n / total) / total)
        self.count.copy_(total)


class ActorCriticMLP(torch.nn.Module):
    """A categorical policy (``forward``: observations → logits, as ``CategoricalMLP``) and a value function
    (``value``: observations → V (B,)) on separate MLP trunks of ``hidden`` units per layer, as PPO uses them.
    Observations are flattened (a frame stack (B, k, obs) becomes (B, k·obs); ``obs_dim`` is the flat size);
    ``normalize`` standardises them by running statistics the trainer updates (``observe``); ``normalize_rewards``
    keeps the statistics of discounted returns that ``TorchPolicyTrainer.scaled_rewards`` divides rewards by."""

    def __init__(self, obs_dim: int, actions: int, hidden: tuple[int, ...] = (64, 64), seed: int = 0,
                 normalize: bool = False, normalize_rewards: bool = False) -> None:
        super().__init__()
        self.actor = CategoricalMLP(obs_dim, actions, hidden, seed)
        self.critic = CategoricalMLP(obs_dim, 1, hidden, seed + 1)  # one output: the value
        self.obs_norm = RunningNorm((obs_dim,)) if normalize else None
        self.return_norm = RunningNorm(()) if normalize_rewards else None  # read by the trainer only

    def _inputs(self, observations: torch.Tensor) -> torch.Tensor:
        x = observations.float().flatten(1)  # (B, obs_dim)
        return x if self.obs_norm is None else self.obs_norm(x)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.actor(self._inputs(observations))  # (B, actions)

    def value(self, observations: torch.Tensor) -> torch.Tensor:
        return self.critic(self._inputs(observations)).squeeze(-1)  # (B,)

    def observe(self, observations: torch.Tensor) -> None:
        """Fold a trained batch's observations (B, *obs) into the normaliser (nothing without one)."""
        if self.obs_norm is not None:
            self.obs_norm.update(observations.float().flatten(1))


class ActorCriticCNN(torch.nn.Module):
    """A small convolutional actor-critic for grid images (B, H, W, C), or frame stacks of them (B, k, H, W, C),
    whose frames are stacked as channels: conv 2×2 layers of ``channels`` (ReLU), a shared ``hidden``-unit layer, and
    a policy and a value head. ``scale`` divides the raw values (255 for pixels; MiniGrid's ids are below 11);
    ``normalize_rewards`` as for ``ActorCriticMLP``."""

    def __init__(self, obs_shape: tuple[int, ...], actions: int, channels: tuple[int, ...] = (16, 32),
                 hidden: int = 64, seed: int = 0, scale: float = 10.0, normalize_rewards: bool = False) -> None:
        super().__init__()
        self.return_norm = RunningNorm(()) if normalize_rewards else None
        *frames, height, width, depth = obs_shape
        in_channels = depth * (frames[0] if frames else 1)
        self.scale = scale
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            layers: list[torch.nn.Module] = []
            for c_in, c_out in zip((in_channels, *channels), channels):
                layers += [torch.nn.Conv2d(c_in, c_out, 2), torch.nn.ReLU()]
            self.conv = torch.nn.Sequential(*layers, torch.nn.Flatten())
            with torch.no_grad():
                flat = self.conv(torch.zeros(1, in_channels, height, width)).shape[1]
            self.trunk = torch.nn.Sequential(torch.nn.Linear(flat, hidden), torch.nn.ReLU())
            self.policy_head = torch.nn.Linear(hidden, actions)
            self.value_head = torch.nn.Linear(hidden, 1)

    def _features(self, observations: torch.Tensor) -> torch.Tensor:
        x = observations.float() / self.scale
        if x.ndim == 5:  # (B, k, H, W, C) → (B, H, W, k·C)
            x = x.permute(0, 2, 3, 1, 4).flatten(3)
        return self.trunk(self.conv(x.permute(0, 3, 1, 2)))  # (B, hidden)

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.policy_head(self._features(observations))  # (B, actions)

    def value(self, observations: torch.Tensor) -> torch.Tensor:
        return self.value_head(self._features(observations)).squeeze(-1)  # (B,)


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
    calls: one per RL step, whatever the minibatches and epochs. With ``anneal_steps`` > 0 the learning rate falls
    linearly from ``lr`` to 0 over that many steps (by version, so a restored trainer continues the schedule)."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), grad_clip: float = 1.0, seed: int = 0,
                 anneal_steps: int = 0) -> None:
        super().__init__(model, lr, weight_decay, betas, grad_clip, seed)
        self.anneal_steps = anneal_steps
        self.origin = 0  # the version the current phase started at (``set_lr``): annealing counts from it
        self.reference: torch.nn.Module | None = None  # a frozen copy of the policy (``freeze_reference``)

    @property
    def phase_steps(self) -> int:
        """Steps since the current phase began (the last ``set_lr``): a warm start's steps do not count for RL."""
        return self.version - self.origin

    def set_lr(self, lr: float) -> None:
        """The learning rate from now on; annealing starts again from here (a new phase, e.g. RL after BC)."""
        super().set_lr(lr)
        self.origin = self.version

    def freeze_reference(self) -> None:
        """Keep a frozen copy of the policy as it is now (e.g. after behaviour cloning), for a KL term to it."""
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)

    @torch.no_grad()
    def reference_logprobs(self, batch: StepBatch) -> torch.Tensor:
        """Log-probs (N,) of the batch's actions under the frozen reference (``freeze_reference`` first)."""
        if self.reference is None:
            raise RuntimeError("no reference policy: call freeze_reference (after the warm start) before a KL term")
        return action_logprobs(self.reference, batch.observations, batch.actions)[0]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "origin": self.origin,
                "reference": None if self.reference is None else self.reference.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.origin = state.get("origin", 0)
        if state.get("reference") is not None:
            self.freeze_reference()
            self.reference.load_state_dict(state["reference"])

    def train_step(self, batch: StepBatch, loss_fn: StepLossFn, minibatches: int = 1, epochs: int = 1,
                   lr_scale: float = 1.0) -> dict[str, float]:
        """``epochs`` passes over ``batch``, each cut into ``minibatches`` updates at ``lr_scale`` × the learning
        rate (× the annealing factor); then version += 1."""
        if self.anneal_steps:
            lr_scale *= max(0.0, 1.0 - self.phase_steps / self.anneal_steps)

        needs_values = getattr(loss_fn, "needs_values", False)
        if needs_values and not callable(getattr(self.model, "value", None)):
            raise TypeError(f"this loss needs values, but the policy ({type(self.model).__name__}) has no value head; "
                            "use an actor-critic model such as engines.policy.ActorCriticMLP")

        def loss(mb: StepBatch) -> LossOutput:
            logp, entropy = action_logprobs(self.model, mb.observations, mb.actions)
            if needs_values:
                return loss_fn(logp, entropy, mb, self.model.value(mb.observations))
            return loss_fn(logp, entropy, mb)

        metrics = self._updates(batch, loss, minibatches, epochs, lr_scale)
        observe = getattr(self.model, "observe", None)
        if callable(observe):  # a normaliser learns from the batch after it: the whole step saw one set of statistics
            observe(batch.observations)
        return metrics

    @torch.no_grad()
    def scaled_rewards(self, rewards: torch.Tensor, discounted_returns: torch.Tensor) -> torch.Tensor:
        """``rewards`` (N,) divided by the running std of the discounted returns (N,) they sum to (the returns'
        statistics, kept in the model's ``return_norm`` so checkpoints hold them, are updated with these first)."""
        norm = getattr(self.model, "return_norm", None)
        if norm is None:
            raise TypeError(f"reward normalisation needs a policy that keeps return statistics; build "
                            f"{type(self.model).__name__} with normalize_rewards=True")
        norm.update(discounted_returns)
        return rewards / torch.sqrt(norm.var.float() + norm.eps)

    @torch.no_grad()
    def compute_values(self, observations: torch.Tensor) -> torch.Tensor:
        """V (N,) of ``observations`` (N, *obs) under the current weights of an actor-critic model."""
        return self.model.value(observations)

    @torch.no_grad()
    def compute_logprobs(self, batch: StepBatch) -> torch.Tensor:
        """Log-probs (N,) of the batch's actions under the current weights (π_old for off-policy corrections)."""
        return action_logprobs(self.model, batch.observations, batch.actions)[0]
