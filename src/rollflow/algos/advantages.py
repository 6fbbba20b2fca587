"""Advantage estimators. Input rewards come as complete groups: ``(G, n)`` = (prompts, samples per prompt)."""

from __future__ import annotations

import torch

from rollflow.algos.registry import ADVANTAGES


@ADVANTAGES.register("grpo")
def grpo(rewards: torch.Tensor, eps: float = 1e-6, scale_by_std: bool = True) -> torch.Tensor:
    """GRPO: reward minus its group's mean, divided by the group's (unbiased) std. (G, n) -> (G, n).

    A group whose rewards are all equal gets advantage 0 everywhere: it carries no signal. With
    ``scale_by_std=False`` only the mean is removed (Dr. GRPO).
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(rewards[:, :1])
    return centred / (std + eps)
