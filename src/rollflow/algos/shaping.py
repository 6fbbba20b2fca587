"""Reward shaping: terms added to the task's reward before advantages are computed.

``overlong_penalty`` is per sequence (B,) and adds to the outcome reward; ``kl_penalty_rewards`` is per token
(B, T) and adds to the token rewards of a token-level estimator (``runtime.batch.outcome_token_rewards``), which masks
them.
"""

from __future__ import annotations

import torch

from rollflow.algos.registry import KL_ESTIMATORS


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int) -> torch.Tensor:
    """DAPO's soft overlong punishment on response lengths L (B,) -> (B,), in [−1, 0].

    0 for L ≤ max_len − buffer; (max_len − buffer − L) / buffer in between, falling linearly to −1 at L = max_len;
    −1 for L > max_len. ``buffer = 0`` keeps only the hard −1 above ``max_len``. A response cut at the generation
    budget (L = max_len) thus gets −1 whenever ``buffer > 0``.
    """
    if not 0 <= buffer <= max_len:
        raise ValueError(f"overlong_penalty: buffer must be in [0, max_len = {max_len}], got {buffer}")
    lengths = lengths.float()
    if buffer == 0:
        return torch.where(lengths > max_len, -1.0, 0.0)
    return ((max_len - buffer - lengths) / buffer).clamp(-1.0, 0.0)


def kl_penalty_rewards(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, coef: float, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token reward −coef · KL estimate of π against π_ref, detached: (B, T), (B, T) -> (B, T), unmasked.

    KL in the reward (InstructGPT, REINFORCE++) rather than in the loss (GRPO's ``kl_coef``); ``estimator`` names
    one of ``KL_ESTIMATORS`` (k1 is the classic choice).
    """
    return -coef * KL_ESTIMATORS.get(estimator)(logprobs, ref_logprobs).detach()
