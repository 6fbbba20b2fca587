"""Engine contracts: what the runtime needs from an inference engine and a training engine.

Log-prob convention used everywhere: ``logprobs[:, t]`` is ``log p(input_ids[:, t] | input_ids[:, :t])``;
position 0 has no prediction and holds 0. Masks select the response tokens that count.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol, TypeVar

import torch

from rollflow.api.sample import Generation, SampleRow, SamplingParams
from rollflow.api.trajectory import Fragment, Trajectory
from rollflow.api.weights import VersionedWeights


@dataclass
class TrainBatch:
    """Right-padded prompt+response tokens of B samples, with per-token training columns."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) 0/1
    response_mask: torch.Tensor  # (B, T) float, the loss mask: 1 on model tokens that enter the loss
    old_logprobs: torch.Tensor  # (B, T) π_old of the policy ratio: the behaviour log-probs, or recomputed by the trainer
    behav_logprobs: torch.Tensor  # (B, T) log-probs recorded by the rollout engine that sampled the tokens (0 where unknown)
    advantages: torch.Tensor  # (B, T)
    versions: torch.Tensor  # (B, T) long, policy version that generated each token (-1 for prompt)
    ref_logprobs: torch.Tensor | None = None  # (B, T) log-probs of the frozen reference policy, when KL is used
    values: torch.Tensor | None = None  # (B, T) critic's V(input_ids[:, :t]) before the step, when a critic is used
    returns: torch.Tensor | None = None  # (B, T) the critic's regression targets
    group_ids: torch.Tensor | None = None  # (B,) long, the group each row belongs to; minibatches keep groups whole

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def from_trajectories(cls, trajectories: Sequence[Trajectory], pad_id: int) -> TrainBatch:
        """Row i is trajectory i's tokens exactly as produced, right-padded; the loss mask, behaviour log-probs
        (also π_old until a trainer recomputes it) and versions are its per-token columns; advantages are 0. Float
        columns take torch's default dtype."""
        B, T = len(trajectories), max(len(t.tokens) for t in trajectories)
        ids = torch.full((B, T), pad_id, dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        mask, logp = torch.zeros((B, T)), torch.zeros((B, T))
        ver = torch.full((B, T), -1, dtype=torch.long)
        for i, t in enumerate(trajectories):
            n = len(t.tokens)
            ids[i, :n] = torch.tensor(t.tokens, dtype=torch.long)
            attn[i, :n] = 1
            mask[i, :n] = torch.tensor(t.loss_mask, dtype=mask.dtype)
            logp[i, :n] = torch.tensor(t.logprobs, dtype=logp.dtype)
            ver[i, :n] = torch.tensor(t.versions, dtype=torch.long)
        return cls(ids, attn, mask, logp, logp.clone(), torch.zeros((B, T)), ver)

    def select(self, index: torch.Tensor) -> TrainBatch:
        return _select(self, index)

    def split(self, n: int, generator: torch.Generator | None = None) -> list[TrainBatch]:
        """Shuffle and cut into ``n`` minibatches of near-equal size; with ``group_ids``, whole groups are shuffled
        and cut (when there are at least ``n`` groups), so each update sees every member of a group: their
        advantages sum to zero, and on the prefix they share their gradients cancel instead of arriving one
        update apart."""
        if self.group_ids is None or len(groups := self.group_ids.unique()) < n:
            return _shuffled_split(self, n, generator)
        shuffled = groups[torch.randperm(len(groups), generator=generator)]
        return [self.select(torch.isin(self.group_ids, part).nonzero().squeeze(-1)) for part in shuffled.tensor_split(n)]


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, float] = field(default_factory=dict)


# (current log-probs (B, T), entropy (B, T), batch) -> loss. Written by algos/, called by the training engine.
LossFn = Callable[[torch.Tensor, torch.Tensor, TrainBatch], LossOutput]


@dataclass
class StepBatch:
    """N environment steps of a non-text agent, as a policy trainer takes them (the counterpart of ``TrainBatch``)."""

    observations: torch.Tensor  # (N, *obs) what each action saw
    actions: torch.Tensor  # (N, *act)
    advantages: torch.Tensor  # (N,)
    behav_logprobs: torch.Tensor  # (N,) recorded by the rollout engine
    versions: torch.Tensor  # (N,) long, policy version that chose each action
    returns: torch.Tensor | None = None  # (N,) value targets, for an actor-critic loss
    old_values: torch.Tensor | None = None  # (N,) the value estimates the advantages were computed with
    ref_logprobs: torch.Tensor | None = None  # (N,) under a frozen reference policy, for a KL term

    def __len__(self) -> int:
        return self.actions.shape[0]

    @classmethod
    def from_fragments(cls, fragments: Sequence[Fragment], advantages: torch.Tensor) -> StepBatch:
        """The fragments' steps in order (fragment 0's T steps first); ``advantages`` (N,) in the same order."""
        return cls(torch.cat([f.observations[:-1] for f in fragments]), torch.cat([f.actions for f in fragments]),
                   advantages, torch.cat([f.logprobs for f in fragments]), torch.cat([f.versions for f in fragments]))

    def select(self, index: torch.Tensor) -> StepBatch:
        return _select(self, index)

    def split(self, n: int, generator: torch.Generator | None = None) -> list[StepBatch]:
        """Shuffle and cut into ``n`` minibatches of near-equal size."""
        return _shuffled_split(self, n, generator)


_Batch = TypeVar("_Batch", TrainBatch, StepBatch)


def _select(batch: _Batch, index: torch.Tensor) -> _Batch:
    """The rows ``index`` of every tensor field of a batch dataclass (fields left None stay None)."""
    return replace(batch, **{f.name: v[index] for f in fields(batch) if (v := getattr(batch, f.name)) is not None})


def _shuffled_split(batch: _Batch, n: int, generator: torch.Generator | None) -> list[_Batch]:
    order = torch.randperm(len(batch), generator=generator)
    return [_select(batch, chunk) for chunk in order.tensor_split(n)]


# (log-probs of the taken actions (N,), entropies (N,), the steps) -> loss. Written by algos/, called by the trainer.
# A loss with the attribute ``needs_values = True`` (actor-critic) is also given the values V(s) (N,) of the steps'
# observations, with gradient, as a fourth argument; the trainer's model must then have a ``value`` method.
StepLossFn = Callable[..., LossOutput]


class PolicyTrainEngine(Protocol):
    """Optimises a non-text policy with a loss it is given; knows nothing of the RL algorithm."""

    @property
    def version(self) -> int:
        """Number of ``train_step`` calls so far (SFT and RL alike), whatever their minibatches and epochs."""
        ...

    def train_step(self, batch: StepBatch, loss_fn: StepLossFn, minibatches: int, epochs: int) -> dict[str, float]: ...

    def export_weights(self) -> VersionedWeights: ...


class TrainStep(Protocol):
    """One RL step on complete groups, built by a recipe from ``algos``: batch building, shaping, advantages, π_old
    recompute, the losses (through ``engine.train_step``, which takes exactly one optimizer version) and the critic.
    Rows' trajectory cells arrive resolved (the ``Trajectory`` or ``Fragment`` itself). Returns the step's metrics."""

    def __call__(self, groups: list[list[SampleRow]], engine: TrainEngine | PolicyTrainEngine,
                 critic: CriticEngine | None) -> dict[str, float]: ...


class InferenceEngine(Protocol):
    """Samples responses. Holds exactly one weight version at a time."""

    @property
    def version(self) -> int: ...

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Generation]: ...

    def load_weights(self, weights: VersionedWeights) -> None:
        """Verify ``weights.checksum`` and swap them in; called only between generate calls."""
        ...


class DecodeSession(Protocol):
    """Continuous batching on one inference engine: rows join and leave the running batch between forward passes.

    A row is one request (its prompt and its own ``SamplingParams``). ``step`` is one decoding step of the whole
    batch: the rows added since the last step are prefilled and join it, then every row gets one token; rows that
    end (EOS or their ``max_new_tokens``) leave and are returned. A session decodes with the weights the engine held
    when its first row was prefilled and must not see a weight load while rows are in flight (``step`` then raises):
    the caller drains it first (steps until ``len`` is 0), so a ``Generation``'s tokens carry one version."""

    def add(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Queue a row to join at the next ``step``; returns its slot, the key of its ``Generation``."""
        ...

    def drop(self, slot: int) -> None:
        """Remove a row (its asker gave up); an unknown or finished slot is ignored."""
        ...

    def step(self) -> list[tuple[int, Generation]]:
        """One decoding step; the (slot, generation) of each row that ended in it."""
        ...

    def __len__(self) -> int:
        """Rows in flight: added and not yet ended or dropped."""
        ...


class SessionEngine(InferenceEngine, Protocol):
    """An ``InferenceEngine`` that can also decode continuously; a runtime then batches requests at each decoding
    step instead of whole ``generate`` calls."""

    def open_session(self) -> DecodeSession:
        """A new, empty session on the current weights."""
        ...


class ScoringEngine(Protocol):
    """Scores given tokens with fixed weights (a frozen reference policy); never trains."""

    @property
    def version(self) -> int: ...

    def load_weights(self, weights: VersionedWeights) -> None:
        """Verify ``weights.checksum`` and swap them in."""
        ...

    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Per-token log-probs (B, T) of ``batch``, without gradients."""
        ...


class CriticEngine(Protocol):
    """Fits a value model: V (B, T) of every prefix, regressed on ``batch.returns`` with a loss it is given."""

    def compute_values(self, batch: TrainBatch) -> torch.Tensor: ...

    def init_from(self, policy: torch.nn.Module) -> None:
        """Restart from the policy's weights (how PPO critics are initialised)."""
        ...

    def train_step(self, batch: TrainBatch, loss_fn: Callable[[torch.Tensor, TrainBatch], LossOutput],
                   minibatches: int, epochs: int) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds of it (weights, optimizer, RNG), for ``load_state_dict``."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainEngine(Protocol):
    """Optimises a model with a loss it is given; knows nothing of the RL algorithm."""

    @property
    def version(self) -> int:
        """Number of ``train_step`` calls so far (SFT and RL alike), whatever their minibatches and epochs."""
        ...

    def train_step(self, batch: TrainBatch, loss_fn: LossFn, minibatches: int, epochs: int, lr_scale: float = 1.0) -> dict[str, float]:
        """``epochs`` passes over ``batch`` in ``minibatches`` updates each, at ``lr_scale`` × the learning rate."""
        ...

    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Per-token log-probs (B, T) of ``batch`` under the current weights, without gradients."""
        ...

    def export_weights(self) -> VersionedWeights: ...

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds of it (weights, optimizer, RNG, version), for ``load_state_dict``."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PolicyEngine(Protocol):
    """Chooses actions of a non-text agent. Holds exactly one weight version at a time."""

    @property
    def version(self) -> int: ...

    def act(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of observations (B, *obs) -> sampled actions (B, *act) and their log-probs (B,)."""
        ...

    def load_weights(self, weights: VersionedWeights) -> None:
        """Verify ``weights.checksum`` and swap them in; called only between act calls."""
        ...
