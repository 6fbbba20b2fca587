"""Off-policy corrections for asynchronous data: per-token weights that account for tokens sampled by an older
policy (the behaviour policy, version ``v − lag``) than the one being trained (version ``v``).

Each correction maps ``(old_logprobs, behav_logprobs)`` — both (B, T) — to detached per-token weights (B, T) that
multiply the per-token policy loss. ``old_logprobs`` is π_old of the PPO ratio: when a correction sets
``needs_proximal``, the trainer recomputes it with its current weights before the step, so the ratio's trust region
is taken around the current policy and the weight carries the behaviour gap. Issue 4 adds the decoupled PPO objective
and AIPO-style clipped weights next to these.
"""

from __future__ import annotations

import torch

from rollflow.algos.registry import CORRECTIONS


@CORRECTIONS.register("none")
def no_correction(old_logprobs: torch.Tensor, behav_logprobs: torch.Tensor) -> torch.Tensor:
    """No correction: PPO's ratio is taken to the behaviour log-probs as recorded; every weight is 1."""
    return torch.ones_like(old_logprobs)


no_correction.needs_proximal = False  # type: ignore[attr-defined]


@CORRECTIONS.register("tis")
def truncated_is(old_logprobs: torch.Tensor, behav_logprobs: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """Truncated importance sampling: weight min(π_old / π_behav, cap) per token, π_old recomputed by the trainer."""
    return (old_logprobs - behav_logprobs).exp().clamp(max=cap).detach()


truncated_is.needs_proximal = True  # type: ignore[attr-defined]


def needs_proximal(name: str) -> bool:
    """Whether the trainer must recompute π_old with its current weights for correction ``name``."""
    return bool(getattr(CORRECTIONS.get(name), "needs_proximal", False))
