"""A single-process PyTorch training engine: AdamW, gradient clipping, minibatches and epochs per step.

It is given the loss function; it knows nothing of RL. FSDP or DeepSpeed engines would implement the same
``TrainEngine`` contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel

from rollflow.api import LossFn, LossOutput, StepBatch, TrainBatch, VersionedWeights
from rollflow.engines.models import VersionedEngine


def token_logprobs(model: PreTrainedModel, batch: TrainBatch, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs and entropies of ``batch.input_ids`` under ``model``; column 0 is 0 (see api.engines)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # softmax in at least float32; float64 models stay float64 (the reference test)
    logp = (logits / temperature).log_softmax(-1)  # (B, T-1, V)
    taken = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    entropy = -(logp.exp() * logp).sum(-1)  # (B, T-1)
    zero = taken.new_zeros(taken.shape[0], 1)
    return torch.cat([zero, taken], 1), torch.cat([zero, entropy], 1)


def minibatch_updates(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_clip: float,
    batch: TrainBatch | StepBatch,
    loss: Callable[[TrainBatch], LossOutput] | Callable[[StepBatch], LossOutput],
    minibatches: int,
    epochs: int,
    generator: torch.Generator,
    lr_scale: float = 1.0,
) -> dict[str, float]:
    """``epochs`` shuffled passes over ``batch``, each cut into ``minibatches`` clipped optimizer updates of
    ``loss(minibatch)`` at ``lr_scale`` × each group's learning rate; returns every metric (and loss, grad_norm)
    averaged over the updates.

    An update whose loss or gradient norm is NaN or infinite is skipped: its gradients are dropped before the
    optimizer sees them, so the weights and AdamW's moments and step count stay as they were. ``nonfinite_updates``
    counts the skipped ones; every other metric averages the applied ones only, and is NaN when every update was
    skipped."""
    if minibatches > len(batch):
        raise ValueError(f"cannot cut {len(batch)} samples into {minibatches} minibatches; lower minibatches_per_step")
    totals: dict[str, float] = {"loss": 0.0, "grad_norm": 0.0}
    updates = skipped = 0
    base = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] *= lr_scale
    try:
        for _ in range(epochs):
            for mb in batch.split(minibatches, generator):
                out = loss(mb)
                optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
                loss_value = out.loss.item()
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    totals.update({k: totals.get(k, 0.0) for k in out.metrics})  # the same keys whatever is skipped
                    continue
                optimizer.step()
                for k, v in {"loss": loss_value, "grad_norm": grad_norm, **out.metrics}.items():
                    totals[k] = totals.get(k, 0.0) + v
                updates += 1
    finally:
        for group, lr in zip(optimizer.param_groups, base):
            group["lr"] = lr
    return {**{k: v / updates if updates else math.nan for k, v in totals.items()}, "nonfinite_updates": float(skipped)}


class AdamWTrainer:
    """What every trainer here shares: AdamW on ``model``, gradient clipping, seeded minibatch shuffling, and the
    version (``train_step`` calls so far) of the weights it exports."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), grad_clip: float = 1.0, seed: int = 0) -> None:
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
        self.grad_clip = grad_clip
        self.generator = torch.Generator().manual_seed(seed)  # minibatch shuffling
        self._version = 0

    @property
    def version(self) -> int:
        return self._version

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _updates(self, batch: TrainBatch | StepBatch, loss: Callable[[Any], LossOutput], minibatches: int, epochs: int,
                 lr_scale: float) -> dict[str, float]:
        """``minibatch_updates`` on this trainer's model and optimizer; then version += 1."""
        metrics = minibatch_updates(self.model, self.optimizer, self.grad_clip, batch, loss, minibatches, epochs,
                                    self.generator, lr_scale)
        self._version += 1
        return metrics

    def export_weights(self) -> VersionedWeights:
        return VersionedWeights.pack(self._version, self.model.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint needs to continue training exactly: weights, optimizer, shuffling RNG, version."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "version": self._version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self._version = state["version"]


class TorchTrainEngine(AdamWTrainer):
    def __init__(
        self,
        model: PreTrainedModel,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        grad_clip: float = 1.0,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(model, lr, weight_decay, betas, grad_clip, seed)
        self.temperature = temperature

    def train_step(self, batch: TrainBatch, loss_fn: LossFn, minibatches: int = 1, epochs: int = 1, lr_scale: float = 1.0) -> dict[str, float]:
        """``epochs`` passes over ``batch``, each cut into ``minibatches`` optimizer updates at ``lr_scale`` × the
        learning rate; then version += 1."""

        def loss(mb: TrainBatch) -> LossOutput:
            logp, entropy = token_logprobs(self.model, mb, self.temperature)
            return loss_fn(logp, entropy, mb)

        return self._updates(batch, loss, minibatches, epochs, lr_scale)

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        """Per-token log-probs (B, T) under the current weights: π_old for off-policy corrections."""
        return token_logprobs(self.model, batch, self.temperature)[0]


class TorchScorer(VersionedEngine):
    """A frozen policy that only scores tokens: the reference model of a KL term (``api.ScoringEngine``)."""

    def __init__(self, model: PreTrainedModel, temperature: float = 1.0) -> None:
        self.model = model.eval().requires_grad_(False)
        self.temperature = temperature
        self._version = -1  # no published weights loaded yet

    @torch.no_grad()
    def compute_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        return token_logprobs(self.model, batch, self.temperature)[0]
