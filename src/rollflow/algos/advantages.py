"""Advantage estimators, of two kinds told apart by attributes every registered estimator carries:

- ``token_level = False`` (outcome estimators): ``(rewards (G, n), **params) -> advantages (G, n)``, one scalar
  reward per sample, in complete groups of ``n`` samples of one prompt. The trainer broadcasts each sample's
  advantage over its response tokens.
- ``token_level = True``: ``(token_rewards (B, T), mask (B, T), values (B, T) | None, **params)
  -> (advantages (B, T), returns (B, T))``. ``token_rewards`` holds each sequence's reward on its last response token
  (``runtime.batch.outcome_token_rewards`` puts it there) plus any per-token terms such as a KL penalty; both outputs are 0 where mask == 0.

``needs_critic`` says whether the estimator reads ``values`` (then the run must train a critic).

Token-level scans assume the response is contiguous, as in a right-padded prompt-then-response row: GAE stops
bootstrapping at the first masked position after a response token; REINFORCE++ returns skip masked positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rollflow.algos.registry import ADVANTAGES


def _estimator(name: str, *, token_level: bool, needs_critic: bool = False) -> Callable[[Callable], Callable]:
    """Register ``fn`` under ``name`` with the attributes the trainer dispatches on."""

    def add(fn: Callable) -> Callable:
        fn.token_level, fn.needs_critic = token_level, needs_critic  # type: ignore[attr-defined]
        return ADVANTAGES.register(name)(fn)

    return add


# --- outcome (sequence-level) estimators: (G, n) -> (G, n) ---------------------------------------------------------


@_estimator("grpo", token_level=False)
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


@_estimator("rloo", token_level=False)
def rloo(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO: reward minus the mean of the other samples of its group (leave-one-out baseline). (G, n) -> (G, n).

    A_i = r_i − mean_{j≠i} r_j = n/(n−1) · (r_i − mean_j r_j), so the baseline never sees the sample it judges. A
    group of one has no other sample and gets 0.
    """
    n = rewards.shape[1]
    if n < 2:
        return torch.zeros_like(rewards)
    return (rewards - rewards.mean(dim=1, keepdim=True)) * (n / (n - 1))


# --- token-level estimators: (B, T) -> ((B, T), (B, T)) -------------------------------------------------------------


def reverse_scan(x: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """out_t = x_t + decay_t · out_{t+1}, out_T = 0, along the last dim. (B, T), (B, T) -> (B, T)."""
    out = torch.empty_like(x)
    running = torch.zeros_like(x[:, 0])  # (B,)
    for t in reversed(range(x.shape[1])):
        running = x[:, t] + decay[:, t] * running
        out[:, t] = running
    return out


def _whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Subtract the masked mean of ``x`` over the whole batch and divide by the masked (unbiased) std.

    Fewer than two masked tokens, or a std of (numerically) 0, leaves only the mean removed. 0 where mask == 0.
    """
    n = mask.sum()
    centred = (x - (x * mask).sum() / n.clamp(min=1)) * mask
    std = ((centred**2).sum() / (n - 1).clamp(min=1)).sqrt()  # 0 when n < 2: centred is 0 then
    return torch.where(std > eps, centred / (std + eps), centred)


@_estimator("reinforce_pp", token_level=True)
def reinforce_pp(
    token_rewards: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None = None, gamma: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: discounted reward-to-go per token, whitened over every response token of the batch.

    returns_t = Σ_{s≥t} γ^{s−t} r_s over response tokens (γ counts response tokens only; masked positions neither
    decay nor add). advantages = returns minus their masked batch mean, divided by their masked std; returns come
    back unwhitened. ``values`` is ignored: the batch-wide normalisation is the baseline.
    """
    m = mask.to(token_rewards.dtype)
    decay = torch.where(mask > 0, gamma, 1.0).to(token_rewards.dtype)  # carry the sum through masked positions
    returns = reverse_scan(token_rewards * m, decay) * m
    return _whiten(returns, m), returns


@_estimator("gae", token_level=True, needs_critic=True)
def gae(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(γ, λ) on a critic's values: A_t = δ_t + γλ·A_{t+1}, δ_t = r_t + γ·V_{t+1} − V_t, over response tokens.

    ``values[:, t]`` is V of the state before token t. After the last response token (or at T−1) there is no next
    value and no next advantage. returns = A + V (the critic's targets, computed before whitening); advantages are
    whitened over the batch's response tokens when ``whiten``.
    """
    if values is None:
        raise ValueError(
            "gae needs a critic: set algo.critic (and train it on the returns), or choose an estimator with "
            "needs_critic = False such as 'reinforce_pp' or 'grpo'"
        )
    m = mask.to(token_rewards.dtype)
    v = torch.where(mask > 0, values, 0.0)  # padding may hold anything; it must not leak into δ
    next_m = F.pad(m[:, 1:], (0, 1))  # (B, T): mask_{t+1}, 0 at T−1
    delta = token_rewards * m + gamma * F.pad(v[:, 1:], (0, 1)) * next_m - v
    adv = reverse_scan(delta, gamma * lam * next_m) * m
    returns = adv + v
    return (_whiten(adv, m) if whiten else adv), returns


# --- step size -------------------------------------------------------------------------------------------------------


def signal_share(advantages: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the samples in the loss whose advantage is non-zero somewhere: (B, T), (B, T) -> float in [0, 1].

    Used to scale a step's learning rate (``algo.lr_by_signal``). Adam divides each gradient by its running size, so
    a step whose only signal is one odd sample among hundreds (a group whose rewards all agree has advantage 0
    everywhere) moves the weights as far as a step in which every group disagrees: on a task the policy already
    solves, RL then takes full-size steps in the direction of a handful of samples and drifts. Scaling by this share
    gives the step the size plain SGD would give it under a token-mean loss, while keeping Adam's per-weight scaling.
    """
    rows = mask.sum(-1) > 0  # (B,) samples that enter the loss
    if not rows.any():
        return 0.0
    informative = ((advantages != 0) & (mask > 0)).any(-1)  # (B,)
    return (informative & rows).sum().item() / rows.sum().item()
