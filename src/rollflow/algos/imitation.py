"""Behaviour cloning for simulator policies: the negative log-likelihood of demonstrated actions.

A warm start before RL (a scripted planner's actions, a human's): ``bc_loss`` on ``StepBatch``es of (observation,
demonstrated action) through the policy trainer, as SFT is for language models. The batch's other fields are unused.
"""

from __future__ import annotations

import torch

from rollflow.api import LossOutput, StepBatch


def bc_loss(logprobs: torch.Tensor, entropy: torch.Tensor, batch: StepBatch) -> LossOutput:
    """−mean log π(a*|s) over the demonstrated actions a*; reports the policy's entropy alongside."""
    nll = -logprobs.mean()
    return LossOutput(nll, {"bc/nll": nll.item(), "bc/entropy": entropy.mean().item()})


def demonstration_batch(observations: torch.Tensor, actions: torch.Tensor) -> StepBatch:
    """A ``StepBatch`` of demonstrations: observations (N, *obs), actions (N,)."""
    n = len(actions)
    return StepBatch(observations, actions, torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=torch.long))
