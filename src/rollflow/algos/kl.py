"""Per-token estimators of KL(π || π_ref) from the log-probs of the sampled tokens (Schulman, "Approximating KL
divergence", 2020). Each maps ``(logprobs (B, T), ref_logprobs (B, T)) -> (B, T)``, differentiable in ``logprobs``;
tokens are sampled from π, so the masked mean over tokens estimates the KL. Masking is the caller's.

Used two ways: as a loss term (``policy_loss_fn(kl_coef=...)``, k3 by default) and as a per-token reward penalty
(``shaping.kl_penalty_rewards``, k1 by default).
"""

from __future__ import annotations

import torch

from rollflow.algos.registry import KL_ESTIMATORS


@KL_ESTIMATORS.register("k1")
def k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log π − log π_ref: unbiased, high variance, negative on some tokens."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2")
def k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = ½(log π − log π_ref)²: biased but low variance, ≥ 0."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@KL_ESTIMATORS.register("k3")
def k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = π_ref/π − log(π_ref/π) − 1: unbiased, low variance, ≥ 0."""
    log_ratio = ref_logprobs - logprobs
    return log_ratio.exp() - log_ratio - 1
