"""Batches for the training engine: prompt/response pairs (SFT, tests) as a ``TrainBatch``, and outcome rewards as
per-token rewards. Trajectories become batches through ``TrainBatch.from_trajectories`` (their ids as produced)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rollflow.api import TrainBatch, Trajectory


def collate(
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    pad_id: int,
    old_logprobs: Sequence[list[float]] | None = None,
    advantages: Sequence[float] | None = None,
    versions: Sequence[list[int]] | None = None,
    ref_logprobs: Sequence[list[float]] | None = None,
) -> TrainBatch:
    """Row i is ``prompts[i] + responses[i]``, the response tokens in the loss mask; response columns hold the
    per-token values, the rest zeros (versions -1).

    ``advantages`` are per sequence and broadcast over that sequence's response tokens. ``old_logprobs`` are the
    recorded behaviour log-probs; they fill both ``old_logprobs`` and ``behav_logprobs`` until a trainer recomputes
    the former. ``ref_logprobs`` (per response token, from a reference policy) fill ``batch.ref_logprobs``.
    """
    trajectories = [
        Trajectory(
            p + r, [0] * len(p) + [1] * len(r),
            [0.0] * len(p) + (list(old_logprobs[i]) if old_logprobs is not None else [0.0] * len(r)),
            [-1] * len(p) + (list(versions[i]) if versions is not None else [-1] * len(r)),
            [], "",
        )
        for i, (p, r) in enumerate(zip(prompts, responses))
    ]
    batch = TrainBatch.from_trajectories(trajectories, pad_id)
    if advantages is not None:
        batch.advantages = torch.tensor(advantages, dtype=torch.float)[:, None] * batch.response_mask
    if ref_logprobs is not None:
        batch.ref_logprobs = torch.zeros_like(batch.old_logprobs)
        for i, (p, ref) in enumerate(zip(prompts, ref_logprobs)):
            batch.ref_logprobs[i, len(p) : len(p) + len(ref)] = torch.tensor(ref)
    return batch


def outcome_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's reward (B,) placed on its last token of ``mask`` (B, T); rows without one get none."""
    out = torch.zeros_like(mask, dtype=rewards.dtype)  # (B, T)
    has = mask.sum(-1) > 0
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # (B,) index of the last 1 in each row
    out[has, last[has]] = rewards[has]
    return out
