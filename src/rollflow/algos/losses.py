"""Policy losses (per-token), the ways to aggregate them into one scalar, and the loss functions the training
engine calls.

Shapes: ``logprobs``, ``old_logprobs``, ``advantages``, ``mask`` are all (B, T); ``mask`` is 1 on response tokens.
A policy loss has the signature ``(logprobs, old_logprobs, advantages, mask, **params) -> TokenLoss``; an
aggregation ``(per_token, mask, norm=None) -> scalar``. Aggregations skip rows with no response token (infra
errors), and a minibatch made only of such rows aggregates to 0, never nan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rollflow.algos.corrections import proximal
from rollflow.algos.kl import k3
from rollflow.algos.registry import AGGREGATIONS, CORRECTIONS, KL_ESTIMATORS, POLICY_LOSSES
from rollflow.api import LossFn, LossOutput, TrainBatch


@dataclass(frozen=True)
class TokenLoss:
    per_token: torch.Tensor  # (B, T), meaningful where mask == 1
    metrics: dict[str, torch.Tensor]  # (B, T) per-token diagnostics, averaged over the mask by the caller


def _clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float, clip_high: float) -> TokenLoss:
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * advantages
    return TokenLoss(-torch.minimum(unclipped, clipped), {"clip_frac": (clipped < unclipped).float(), "ratio": ratio})


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> TokenLoss:
    """PPO clipped surrogate: -min(r·A, clip(r, 1-ε_low, 1+ε_high)·A) with r = π/π_old per token.

    ``clip_high > clip_low`` is DAPO's clip-higher: low-probability tokens may grow further before the clip stops
    them, which keeps entropy from collapsing. ``mask`` is unused: every token is its own sample.
    """
    return _clipped_surrogate((logprobs - old_logprobs).exp(), advantages, clip_low, clip_high)


@POLICY_LOSSES.register("gspo")
def gspo(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> TokenLoss:
    """GSPO: PPO's clipped surrogate on the sequence ratio s_i = exp(token mean of log π/π_old), GSPO-token form.

    Per token the ratio is s_{i,t} = sg(s_i)·π/sg(π): s_i in value, so the whole sequence is clipped or not
    together, and each token's gradient is s_i·∇log π. With ``seq-mean-token-mean`` this is the paper's
    sequence-level GSPO. Sequence ratios stay close to 1, so the paper's clip ranges are tiny (3e-4, 4e-4); PPO's
    0.2 rarely clips anything here. A row with no response token gets s = 1.
    """
    log_s = ((logprobs - old_logprobs) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
    ratio = log_s.detach().exp() * (logprobs - logprobs.detach()).exp()  # (B, T)
    return _clipped_surrogate(ratio, advantages, clip_low, clip_high)


@POLICY_LOSSES.register("reinforce")
def reinforce(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> TokenLoss:
    """Plain policy gradient: loss −A per token in value, gradient −A·∇log π; no ratio, no clip.

    Written −A·exp(log π − sg(log π)) so its value reads like the ratio losses'. ``clip_low`` and ``clip_high`` are
    accepted and ignored, so the config can pass them to every loss alike; the ``ratio`` metric is π/π_old.
    """
    per_token = -advantages * (logprobs - logprobs.detach()).exp()
    return TokenLoss(per_token, {"ratio": (logprobs - old_logprobs).detach().exp()})


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


@AGGREGATIONS.register("token-mean")
def token_mean(per_token: torch.Tensor, mask: torch.Tensor, norm: float | None = None) -> torch.Tensor:
    """Mean over every response token of the minibatch: long responses weigh more (DAPO's choice)."""
    return _masked_mean(per_token, mask)


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(per_token: torch.Tensor, mask: torch.Tensor, norm: float | None = None) -> torch.Tensor:
    """Mean over sequences of each sequence's token mean: every sample weighs the same (original GRPO)."""
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return per_seq[mask.sum(-1) > 0].mean() if (mask.sum(-1) > 0).any() else per_token.sum() * 0


@AGGREGATIONS.register("seq-mean-token-sum")
def seq_mean_token_sum(per_token: torch.Tensor, mask: torch.Tensor, norm: float | None = None) -> torch.Tensor:
    """Mean over sequences of each sequence's token sum: the REINFORCE estimator's natural scale."""
    has_tokens = mask.sum(-1) > 0  # fully masked rows (infra errors) are not samples
    return (per_token * mask).sum(-1)[has_tokens].mean() if has_tokens.any() else per_token.sum() * 0


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(per_token: torch.Tensor, mask: torch.Tensor, norm: float | None = None) -> torch.Tensor:
    """Mean over sequences of each sequence's token sum divided by a constant ``norm`` (Dr. GRPO): no length bias.

    Σ masked losses / (sequences with tokens × norm). Dr. GRPO's constant is the generation budget (max new
    tokens); pass it as ``norm``. Without it the padded width T = mask.shape[-1] is used, which is constant only
    when every minibatch is padded to the same width.
    """
    sequences = (mask.sum(-1) > 0).sum().clamp(min=1)
    return (per_token * mask).sum() / (sequences * (mask.shape[-1] if norm is None else norm))


def policy_loss_fn(
    loss: str,
    aggregation: str,
    entropy_coef: float = 0.0,
    correction: str = "none",
    correction_params: dict[str, float] | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    norm: float | None = None,
    **loss_params: float,
) -> LossFn:
    """Build the ``LossFn`` the training engine calls, from registered parts chosen by name.

    loss = aggregate(policy loss · correction weight) − entropy_coef · aggregate(entropy)
           + kl_coef · aggregate(KL estimate to the reference policy),
    all aggregated alike (``norm`` goes to the aggregation). The off-policy ``correction`` weighs each token's loss
    and chooses π_old of the ratio (see ``algos.corrections``); ``none`` leaves the loss untouched. ``loss_params``
    go to the policy loss (``clip_low``, ``clip_high``).
    """
    token_loss, aggregate = POLICY_LOSSES.get(loss), AGGREGATIONS.get(aggregation)
    correct, kl = CORRECTIONS.get(correction), KL_ESTIMATORS.get(kl_estimator)
    ratio_to_current = proximal(correction) == "current"
    correction_params = correction_params or {}

    def fn(logprobs: torch.Tensor, entropy: torch.Tensor, batch: TrainBatch) -> LossOutput:
        mask = batch.response_mask
        old = logprobs.detach() if ratio_to_current else batch.old_logprobs
        out = token_loss(logprobs, old, batch.advantages, mask, **loss_params)
        # (B, T), detached
        weight = correct(logprobs.detach(), batch.old_logprobs, batch.behav_logprobs, mask, **correction_params)
        total = aggregate(out.per_token * weight, mask, norm=norm) - entropy_coef * aggregate(entropy, mask, norm=norm)
        if kl_coef > 0:
            if batch.ref_logprobs is None:
                raise ValueError(
                    "algo.kl_coef > 0 in the loss needs reference log-probs: the batch has no ref_logprobs; "
                    "compute them with the reference model before the step, or set algo.kl_coef = 0"
                )
            total = total + kl_coef * aggregate(kl(logprobs, batch.ref_logprobs), mask, norm=norm)
        # Drift from the batch's π_old (behaviour or recomputed), even when the ratio is taken to π itself.
        log_ratio = (logprobs - batch.old_logprobs).detach()
        metrics = {
            "is_weight": _masked_mean(weight, mask).item(),
            "is_dropped": _masked_mean((weight == 0).float(), mask).item(),
            "entropy": _masked_mean(entropy.detach(), mask).item(),
            # k3 estimator of KL(π_old || π): unbiased, always >= 0
            "kl_old": _masked_mean(log_ratio.exp() - 1 - log_ratio, mask).item(),
            **{k: _masked_mean(v.detach(), mask).item() for k, v in out.metrics.items()},
        }
        if batch.ref_logprobs is not None:
            metrics["kl_ref"] = _masked_mean(k3(logprobs.detach(), batch.ref_logprobs), mask).item()
        return LossOutput(total, metrics)

    return fn


def _value_errors(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared errors (B, T) of the values, and of the values clipped to within ``clip`` of the old ones."""
    unclipped = (values - returns) ** 2
    if clip is None:
        return unclipped, unclipped
    return unclipped, (old_values + (values - old_values).clamp(-clip, clip) - returns) ** 2


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None = 0.2
) -> torch.Tensor:
    """Clipped value loss per token: ½·max((V − R)², (V_old + clip(V − V_old, ±clip) − R)²). (B, T), 0 off the mask.

    The clipped term keeps the critic within ``clip`` of its values before the step, as PPO's ratio clip does for
    the policy; ``clip=None`` leaves plain ½(V − R)².
    """
    return 0.5 * torch.maximum(*_value_errors(values, old_values, returns, clip)) * mask


# (critic's values (B, T), batch) -> loss. Like LossFn, for the critic: batch.values are its values before the step.
ValueLossFn = Callable[[torch.Tensor, TrainBatch], LossOutput]


def value_loss_fn(aggregation: str = "token-mean", clip: float | None = 0.2) -> ValueLossFn:
    """Build the critic's loss: ``value_loss`` against ``batch.returns``, clipped around ``batch.values``."""
    aggregate = AGGREGATIONS.get(aggregation)

    def fn(values: torch.Tensor, batch: TrainBatch) -> LossOutput:
        if batch.values is None or batch.returns is None:
            missing = " and ".join(n for n in ("values", "returns") if getattr(batch, n) is None)
            raise ValueError(f"the value loss needs batch.{missing}: compute them with a critic and a token-level "
                             "estimator that needs one (e.g. 'gae') before the step")
        mask = batch.response_mask
        loss = aggregate(value_loss(values, batch.values, batch.returns, mask, clip), mask)
        unclipped, clipped = _value_errors(values.detach(), batch.values, batch.returns, clip)
        binds = torch.zeros_like(mask, dtype=torch.bool)  # (B, T)
        if clip is not None:  # the clip moved the value (|V − V_old| > clip) and its error is the larger one
            binds = ((values.detach() - batch.values).abs() > clip) & (clipped > unclipped)
        metrics = {
            "value_clip_frac": _masked_mean(binds.float(), mask).item(),
            "value_mean": _masked_mean(values.detach(), mask).item(),
            "return_mean": _masked_mean(batch.returns, mask).item(),
        }
        return LossOutput(loss, metrics)

    return fn


def sft_loss(logprobs: torch.Tensor, entropy: torch.Tensor, batch: TrainBatch) -> LossOutput:
    """Negative log-likelihood of the reference response tokens, token-mean."""
    return LossOutput(-_masked_mean(logprobs, batch.response_mask), {"entropy": _masked_mean(entropy.detach(), batch.response_mask).item()})
