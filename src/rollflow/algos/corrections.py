"""Off-policy corrections for asynchronous data: per-token weights that account for tokens sampled by an older
policy (the behaviour policy μ, version ``v − lag``) than the one being trained (π, version ``v``).

Every correction has the signature ``(logprobs, old_logprobs, behav_logprobs, mask, **params) -> weights``, all
(B, T); the weights are detached and multiply the per-token policy loss. ``logprobs`` is the current policy's.

Its attribute ``proximal`` says which π_old the loss's ratio π/π_old is taken to:

- ``"behaviour"``: the log-probs recorded by the rollout engine, as they are (plain PPO on stale data);
- ``"recomputed"``: the trainer recomputes π_old with its current weights before the step, so the trust region is
  taken around the policy being trained and the weight carries the behaviour gap π_old/μ (decoupled PPO);
- ``"current"``: π itself, detached: the ratio is 1 in value and its gradient is ∇log π, so there is no trust-region
  clip and the weight alone corrects for μ (AIPO).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rollflow.algos.registry import CORRECTIONS

PROXIMALS = ("behaviour", "recomputed", "current")


def _correction(name: str, *, proximal: str) -> Callable[[Callable], Callable]:
    """Register ``fn`` under ``name`` with the π_old it needs."""
    if proximal not in PROXIMALS:
        raise ValueError(f"correction {name!r}: proximal must be one of {PROXIMALS}, not {proximal!r}")

    def add(fn: Callable) -> Callable:
        fn.proximal = proximal  # type: ignore[attr-defined]
        return CORRECTIONS.register(name)(fn)

    return add


@_correction("none", proximal="behaviour")
def no_correction(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, behav_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """No correction: PPO's ratio is taken to the behaviour log-probs as recorded; every weight is 1."""
    return torch.ones_like(old_logprobs)


@_correction("tis", proximal="recomputed")
def truncated_is(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    behav_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float = 2.0,
) -> torch.Tensor:
    """Truncated importance sampling: weight min(π_old / μ, cap) per token, π_old recomputed by the trainer."""
    return (old_logprobs - behav_logprobs).exp().clamp(max=cap).detach()


@_correction("decoupled", proximal="recomputed")
def decoupled(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    behav_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cap: float = 5.0,
) -> torch.Tensor:
    """Decoupled PPO (AReaL): weight π_old / μ untruncated, but a token whose weight exceeds ``cap`` is dropped (0).

    Unlike ``tis``, a large weight is not shrunk to the cap: such a token was sampled where μ and π_old disagree too
    much for the ratio to be trusted, so it takes no part in the step.
    """
    weight = (old_logprobs - behav_logprobs).exp().detach()
    return torch.where(weight > cap, 0.0, weight)


@_correction("aipo", proximal="current")
def aipo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    behav_logprobs: torch.Tensor,
    mask: torch.Tensor,
    rho: float = 2.0,
) -> torch.Tensor:
    """AIPO (LlamaRL): weight min(π / μ, ρ) to the current policy, with the ratio to π itself (no PPO clip).

    With the loss's ratio exp(log π − sg(log π)) = 1 the gradient is −min(π/μ, ρ)·A·∇log π: one-sided clipped
    importance sampling straight from the behaviour policy, no recomputed π_old.
    """
    return (logprobs - behav_logprobs).exp().clamp(max=rho).detach()


def proximal(name: str) -> str:
    """Which π_old correction ``name`` takes the policy ratio to: ``behaviour``, ``recomputed`` or ``current``."""
    return CORRECTIONS.get(name).proximal


def needs_proximal(name: str) -> bool:
    """Whether the trainer must recompute π_old with its current weights for correction ``name``."""
    return proximal(name) == "recomputed"
