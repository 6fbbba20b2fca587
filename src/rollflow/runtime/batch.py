"""Turning token sequences into the right-padded ``TrainBatch`` a training engine consumes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rollflow.api import TrainBatch


def collate(
    prompts: Sequence[list[int]],
    responses: Sequence[list[int]],
    pad_id: int,
    old_logprobs: Sequence[list[float]] | None = None,
    advantages: Sequence[float] | None = None,
    versions: Sequence[list[int]] | None = None,
    ref_logprobs: Sequence[list[float]] | None = None,
) -> TrainBatch:
    """Row i is ``prompts[i] + responses[i]``; response columns hold the per-token values, the rest zeros.

    ``advantages`` are per sequence and broadcast over that sequence's response tokens. ``old_logprobs`` are the
    recorded behaviour log-probs; they fill both ``old_logprobs`` and ``behav_logprobs`` until a trainer recomputes
    the former. ``ref_logprobs`` (per response token, from a reference policy) fill ``batch.ref_logprobs``.
    """
    B = len(prompts)
    T = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    resp = torch.zeros((B, T))
    old = torch.zeros((B, T))
    adv = torch.zeros((B, T))
    ver = torch.full((B, T), -1, dtype=torch.long)
    ref = torch.zeros((B, T)) if ref_logprobs is not None else None
    for i, (p, r) in enumerate(zip(prompts, responses)):
        P, R = len(p), len(r)
        ids[i, : P + R] = torch.tensor(p + r)
        attn[i, : P + R] = 1
        resp[i, P : P + R] = 1
        if old_logprobs is not None:
            old[i, P : P + R] = torch.tensor(old_logprobs[i])
        if advantages is not None:
            adv[i, P : P + R] = advantages[i]
        if versions is not None:
            ver[i, P : P + R] = torch.tensor(versions[i])
        if ref is not None:
            ref[i, P : P + R] = torch.tensor(ref_logprobs[i])  # type: ignore[index]
    return TrainBatch(ids, attn, resp, old, old.clone(), adv, ver, ref_logprobs=ref)


def outcome_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's reward (B,) placed on its last response token of ``mask`` (B, T); rows without one get none."""
    out = torch.zeros_like(mask, dtype=rewards.dtype)  # (B, T)
    has = mask.sum(-1) > 0
    last = mask.shape[1] - 1 - mask.flip(-1).argmax(-1)  # (B,) index of the last 1 in each row
    out[has, last[has]] = rewards[has]
    return out
