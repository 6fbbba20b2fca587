"""The critic of PPO-style training: a value model and the engine that fits it.

``ValueModel`` puts a scalar head on a causal LM's decoder (built from a copy of the policy, as verl and OpenRLHF
initialise their critics); ``values[:, t]`` is V(input_ids[:, :t]), the value of the state in which token t is
chosen, read from the hidden state at t − 1 (column 0 is 0, like the log-prob convention in ``api.engines``).
Not covered: a value head sharing the policy's trunk (one backward for both; saves memory, couples the losses).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel

from rollflow.api import LossOutput, TrainBatch
from rollflow.engines.torch_train import minibatch_updates


class ValueModel(torch.nn.Module):
    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.decoder = lm.base_model  # the transformer without its LM head
        self.head = torch.nn.Linear(lm.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)  # start at V = bias = 0: no prior on returns
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, H)
        v = self.head(hidden[:, :-1]).squeeze(-1)  # (B, T-1): value of the state after each prefix
        return torch.cat([v.new_zeros(v.shape[0], 1), v], 1)  # (B, T)


class TorchCriticEngine:
    """Fits a ``ValueModel`` with a value loss it is given (AdamW, clipped gradients, minibatches × epochs)."""

    def __init__(self, model: ValueModel, lr: float, grad_clip: float = 1.0, seed: int = 0) -> None:
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self.grad_clip = grad_clip
        self.generator = torch.Generator().manual_seed(seed)

    def init_from(self, lm: PreTrainedModel) -> None:
        """Restart from ``lm``'s decoder weights (the policy RL starts from), a zero head and a fresh optimizer."""
        self.model.decoder.load_state_dict(lm.base_model.state_dict())
        torch.nn.init.zeros_(self.model.head.weight)
        torch.nn.init.zeros_(self.model.head.bias)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.optimizer.defaults["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])

    @torch.no_grad()
    def compute_values(self, batch: TrainBatch) -> torch.Tensor:
        """V (B, T) of every prefix of ``batch`` under the current critic."""
        return self.model(batch.input_ids, batch.attention_mask)

    def train_step(self, batch: TrainBatch, loss_fn: Callable[[torch.Tensor, TrainBatch], LossOutput],
                   minibatches: int = 1, epochs: int = 1) -> dict[str, float]:
        """Regress values on ``batch.returns``; ``loss_fn(values (B, T), minibatch)`` clips against ``batch.values``."""
        return minibatch_updates(self.model, self.optimizer, self.grad_clip, batch,
                                 lambda mb: loss_fn(self.model(mb.input_ids, mb.attention_mask), mb),
                                 minibatches, epochs, self.generator)
