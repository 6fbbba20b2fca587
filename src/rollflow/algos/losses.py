"""Policy losses (per-token) and the ways to aggregate them into one scalar.

Shapes: ``logprobs``, ``old_logprobs``, ``advantages``, ``mask`` are all (B, T); ``mask`` is 1 on response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollflow.algos.registry import AGGREGATIONS, CORRECTIONS, POLICY_LOSSES
from rollflow.api import LossFn, LossOutput, TrainBatch


@dataclass(frozen=True)
class TokenLoss:
    per_token: torch.Tensor  # (B, T), meaningful where mask == 1
    metrics: dict[str, torch.Tensor]  # (B, T) per-token diagnostics, averaged over the mask by the caller


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2
) -> TokenLoss:
    """PPO clipped surrogate: -min(r·A, clip(r, 1-ε_low, 1+ε_high)·A) with r = π/π_old per token."""
    ratio = (logprobs - old_logprobs).exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    return TokenLoss(-torch.minimum(unclipped, clipped), {"clip_frac": (clipped < unclipped).float(), "ratio": ratio})


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


@AGGREGATIONS.register("token-mean")
def token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over every response token of the minibatch: long responses weigh more (DAPO's choice)."""
    return _masked_mean(per_token, mask)


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's token mean: every sample weighs the same (original GRPO)."""
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq[mask.sum(-1) > 0].mean() if (mask.sum(-1) > 0).any() else per_token.sum() * 0


@AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over sequences of each sequence's token sum: the REINFORCE estimator's natural scale."""
    has_tokens = mask.sum(-1) > 0  # fully masked rows (infra errors) are not samples
    return (per_token * mask).sum(-1)[has_tokens].mean() if has_tokens.any() else per_token.sum() * 0


def policy_loss_fn(
    loss: str,
    aggregation: str,
    entropy_coef: float = 0.0,
    correction: str = "none",
    correction_params: dict[str, float] | None = None,
    **loss_params: float,
) -> LossFn:
    """Build the ``LossFn`` the training engine calls, from registered parts chosen by name. The off-policy
    ``correction`` weighs each token's loss (see ``algos.corrections``); ``none`` leaves the loss untouched."""
    token_loss, aggregate = POLICY_LOSSES.get(loss), AGGREGATIONS.get(aggregation)
    correct = CORRECTIONS.get(correction)
    correction_params = correction_params or {}

    def fn(logprobs: torch.Tensor, entropy: torch.Tensor, batch: TrainBatch) -> LossOutput:
        mask = batch.response_mask
        out = token_loss(logprobs, batch.old_logprobs, batch.advantages, **loss_params)
        weight = correct(batch.old_logprobs, batch.behav_logprobs, **correction_params)  # (B, T), detached
        total = aggregate(out.per_token * weight, mask) - entropy_coef * aggregate(entropy, mask)
        log_ratio = (logprobs - batch.old_logprobs).detach()
        metrics = {
            "is_weight": _masked_mean(weight, mask).item(),
            "entropy": _masked_mean(entropy.detach(), mask).item(),
            # k3 estimator of KL(π_old || π): unbiased, always >= 0
            "kl_old": _masked_mean(log_ratio.exp() - 1 - log_ratio, mask).item(),
            **{k: _masked_mean(v.detach(), mask).item() for k, v in out.metrics.items()},
        }
        return LossOutput(total, metrics)

    return fn


def sft_loss(logprobs: torch.Tensor, entropy: torch.Tensor, batch: TrainBatch) -> LossOutput:
    """Negative log-likelihood of the reference response tokens, token-mean."""
    return LossOutput(-_masked_mean(logprobs, batch.response_mask), {"entropy": _masked_mean(entropy.detach(), batch.response_mask).item()})
