"""REINFORCE for simulator agents: returns-to-go within fragments, a normalised-return baseline, the policy-gradient
loss, and ``PolicyGradientStep``, the trainer's step on rows holding ``Fragment``s.

Where it departs from textbook REINFORCE: a fragment is T steps cut out of a stream of episodes, so an episode
still running at the fragment's end contributes the rewards it earned inside the fragment only (there is no critic to
bootstrap from ``observations[T]``); with ``gamma`` < 1 the missing tail weighs little on all but the last steps.
The baseline is the batch mean of the returns (scaled by their std by default), not a learned value. Behaviour
log-probs are not used: with η > 0 the gradient is that of slightly stale actions, uncorrected (the version lag is
reported so a run can see how stale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollflow.algos.policy_step import staleness_metrics
from rollflow.api import CriticEngine, Fragment, LossOutput, PolicyTrainEngine, SampleRow, Status, StepBatch


def returns_to_go(rewards: torch.Tensor, dones: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = r_t + γ·(1 − done_t)·G_{t+1}, with G_T = 0: discounted returns that restart after every step ending an
    episode. ``rewards`` and ``dones`` (..., T); returns (..., T)."""
    returns = torch.zeros_like(rewards, dtype=torch.float)  # (..., T)
    keep = gamma * (~dones.bool()).float()  # (..., T) 0 where an episode ended with step t
    future = torch.zeros_like(returns[..., 0])  # (...,)
    for t in range(rewards.shape[-1] - 1, -1, -1):
        future = rewards[..., t] + keep[..., t] * future
        returns[..., t] = future
    return returns


def normalised(x: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """``x`` (N,) minus its mean, divided by its std when ``scale_by_std``: REINFORCE's batch baseline."""
    centred = x - x.mean()
    if not scale_by_std or x.numel() < 2:
        return centred
    return centred / (x.std() + eps)


def reinforce_loss(logprobs: torch.Tensor, advantages: torch.Tensor, entropy: torch.Tensor | None = None,
                   entropy_coef: float = 0.0) -> torch.Tensor:
    """−mean(A_t · log π(a_t|s_t)) − entropy_coef · mean(H_t): descending it raises the log-prob of actions with
    positive advantage. ``logprobs``, ``advantages``, ``entropy`` (N,); returns a scalar."""
    loss = -(advantages.detach() * logprobs).mean()
    if entropy is not None and entropy_coef:
        loss = loss - entropy_coef * entropy.mean()
    return loss


@dataclass(frozen=True)
class PolicyGradientStep:
    """``api.TrainStep`` for rows whose ``column`` holds a ``Fragment``: returns-to-go per fragment → advantages
    (returns normalised over the whole batch) → the REINFORCE loss through ``engine.train_step``.

    A row left without a fragment by an infrastructure fault or a timeout (its status says so) is masked: it takes
    no part in the baseline or the loss. The engine must take ``StepBatch``es (``engines.policy.TorchPolicyTrainer``
    does); there is no critic, so ``critic`` is not used.
    """

    gamma: float = 0.99
    scale_by_std: bool = True  # divide the centred returns by their std (False: returns minus their mean)
    entropy_coef: float = 0.0
    minibatches: int = 1
    epochs: int = 1
    column: str = "fragment"

    def __call__(self, groups: list[list[SampleRow]], engine: PolicyTrainEngine,
                 critic: CriticEngine | None) -> dict[str, float]:
        rows, kept = kept_fragments(groups, self.column, type(self).__name__)
        returns = torch.cat([returns_to_go(f.rewards, f.dones, self.gamma) for f in kept])  # (N,)
        batch = StepBatch.from_fragments(kept, normalised(returns, self.scale_by_std))

        def loss(logp: torch.Tensor, entropy: torch.Tensor, mb: StepBatch) -> LossOutput:
            return LossOutput(reinforce_loss(logp, mb.advantages, entropy, self.entropy_coef),
                              {"entropy": entropy.mean().item()})

        trained_at = engine.version
        lag = trained_at - batch.versions  # (N,) versions behind the trainer
        metrics = engine.train_step(batch, loss, self.minibatches, self.epochs)
        metrics.update(episode_metrics(rows, kept))
        metrics["fragment/return_to_go_mean"] = returns.mean().item()
        metrics.update(staleness_metrics(trained_at, [f.version for f in kept], lag))
        return metrics


def fragment_of(row: SampleRow, column: str, step: str) -> Fragment | None:
    """The row's fragment; None for a row an infrastructure fault or a timeout left without one (its status says so)."""
    value = row[column]
    if isinstance(value, Fragment):
        return value
    if row.status is not Status.OK:
        return None
    raise TypeError(f"row {row.uid}: column '{column}' holds a {type(value).__name__}, not a Fragment; "
                    f"{step} trains simulator agents (give it a workflow such as workflows.GymFragments)")


def kept_fragments(groups: list[list[SampleRow]], column: str, step: str) -> tuple[list[SampleRow], list[Fragment]]:
    """(every row, the fragments of those that have one); an error if none has."""
    rows = [r for g in groups for r in g]
    kept = [f for f in (fragment_of(r, column, step) for r in rows) if f is not None]
    if not kept:
        raise RuntimeError(f"no row of this step holds a fragment (statuses: {[r.status.value for r in rows]}): "
                           "every episode failed or timed out; check the environment and the rollout limits")
    return rows, kept


def episode_metrics(rows: list[SampleRow], kept: list[Fragment]) -> dict[str, float]:
    """Episodes that ended in the step's fragments (count, mean return) and the fragments masked."""
    returns = [x for f in kept for x in f.episode_returns]
    metrics = {"episode/count": float(len(returns)), "fragment/masked": float(len(rows) - len(kept))}
    if returns:  # no episode may end within a step's fragments; then there is no mean to report
        metrics["episode/return_mean"] = sum(returns) / len(returns)
    return metrics
