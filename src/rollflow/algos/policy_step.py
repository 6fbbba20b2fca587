"""The trainer's step for text policies (GRPO and its family, PPO with a critic), as the framework runs it.

One function, top to bottom, in the order of ``reference/grpo.py``: trajectories → batch (their token ids as
produced, the loss mask from the workflow) → reward shaping → KL in the reward → advantages (outcome-level per group,
or token-level with an optional critic; optionally × each sample's action duration over the batch mean) → π_old
recompute for stale tokens → the policy loss through the engine (minibatches, epochs, the step's learning-rate scale)
→ the critic's update → staleness metrics.

Where it departs from ``reference/grpo.py``: rows whose status is ``infra_error`` take part in no group statistic
and no loss (masked); minibatches keep groups whole; the step's learning rate is scaled by its share of samples
with signal (``algo.lr_by_signal``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rollflow.algos.batch import outcome_token_rewards
from rollflow.algos.duration import action_duration, duration_weights
from rollflow.api import CriticEngine, LossFn, LossOutput, SampleRow, Status, TrainBatch, TrainEngine


@dataclass(frozen=True)
class Algorithm:
    """The RL algorithm's parts, chosen by name from the registries (see ``recipes.grpo.build_algorithm``):
    reward shaping → advantage estimation (outcome-level on (G, n) rewards, or token-level on (B, T) rewards with an
    optional critic) → the policy loss, which carries its off-policy correction and KL term."""

    advantage: Callable[..., Any]  # outcome: (G, n) -> (G, n); token-level: (rewards, mask, values) -> (adv, returns)
    loss: LossFn
    token_level: bool = False
    needs_critic: bool = False
    proximal: str = "behaviour"  # π_old of the ratio: "behaviour" (as recorded), "recomputed" (by the trainer), "current"
    shape: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (rewards (B,), lengths (B,)) -> (B,)
    kl_reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (behav, ref) (B, T) -> reward (B, T)
    value_loss: Callable[[torch.Tensor, TrainBatch], LossOutput] | None = None  # (values (B, T), batch) -> loss
    lr_scale: Callable[[torch.Tensor, torch.Tensor], float] | None = None  # (advantages, mask) (B, T) -> step's lr factor
    duration_weighting: bool = False  # each row's advantages × its action duration / batch mean (algos.duration)


@dataclass(frozen=True)
class TextPolicyStep:
    """``api.TrainStep`` for rows with a ``trajectory`` (a ``Trajectory``), a ``reward`` (a ``RewardCell``) and,
    when the run has a reference policy, a ``reference`` column (per-token log-probs)."""

    algo: Algorithm
    pad_id: int
    minibatches: int = 1
    epochs: int = 1
    whole_groups: bool = True

    def __call__(self, groups: list[list[SampleRow]], engine: TrainEngine, critic: CriticEngine | None) -> dict[str, float]:
        algo = self.algo
        if algo.needs_critic and (critic is None or algo.value_loss is None):
            raise ValueError("the advantage estimator needs a critic: build the trainer with a critic engine and a value loss")
        rows = [r for g in groups for r in g]
        trajectories = [r["trajectory"] for r in rows]
        usable = torch.tensor([r.status is not Status.INFRA_ERROR for r in rows])  # (B,)
        rewards = torch.tensor([float(r["reward"].result.reward) for r in rows])  # (B,)
        metrics: dict[str, float] = {}
        if algo.shape is not None:
            shaped = algo.shape(rewards, torch.tensor([float(t.size) for t in trajectories]))
            metrics["reward/shaping"] = (shaped - rewards)[usable].mean().item() if usable.any() else 0.0
            rewards = shaped

        batch = TrainBatch.from_trajectories(trajectories, self.pad_id)
        if rows[0].get("reference") is not None:
            batch.ref_logprobs = torch.zeros_like(batch.old_logprobs)
            for i, r in enumerate(rows):
                batch.ref_logprobs[i, : len(r["reference"])] = torch.tensor(r["reference"])
        batch.response_mask *= usable[:, None]
        mask = batch.response_mask  # (B, T)

        kl = None
        if algo.kl_reward is not None and batch.ref_logprobs is not None:
            kl = algo.kl_reward(batch.behav_logprobs, batch.ref_logprobs) * mask  # (B, T) per-token reward
            metrics["kl/reward_penalty"] = kl.sum(-1)[usable].mean().item() if usable.any() else 0.0
        if algo.token_level:
            token_rewards = outcome_token_rewards(rewards * usable, mask) + (kl if kl is not None else 0.0)
            values = critic.compute_values(batch) * mask if algo.needs_critic else None  # type: ignore[union-attr]
            batch.advantages, batch.returns = algo.advantage(token_rewards, mask, values)
            batch.values = values
        else:
            seq = rewards + (kl.sum(-1) if kl is not None else 0.0)  # a KL penalty folds into the sequence reward
            shape = (len(groups), -1)
            batch.advantages = self._outcome_advantages(seq.view(shape), usable.view(shape)).flatten()[:, None] * mask
        if algo.duration_weighting:  # over usable rows only: a masked row's time says nothing about its action
            weights = torch.ones(len(rows))  # (B,)
            weights[usable] = duration_weights(torch.tensor([action_duration(r) for r in rows])[usable])
            batch.advantages = batch.advantages * weights[:, None]
            metrics["train/duration_weight_max"] = weights.max().item()

        trained_at = engine.version
        lag = trained_at - batch.versions[mask.bool()]  # (tokens,)
        recompute = algo.proximal == "recomputed" and lag.numel() > 0 and bool((lag > 0).any())
        if recompute:
            batch.old_logprobs = torch.where(mask.bool(), engine.compute_logprobs(batch), batch.behav_logprobs)
        if self.whole_groups:
            batch.group_ids = torch.arange(len(groups)).repeat_interleave(torch.tensor([len(g) for g in groups]))  # (B,)
        lr_scale = algo.lr_scale(batch.advantages, mask) if algo.lr_scale is not None else 1.0
        metrics["train/lr_scale"] = lr_scale
        metrics.update(engine.train_step(batch, algo.loss, self.minibatches, self.epochs, lr_scale=lr_scale))
        if critic is not None and algo.value_loss is not None:
            critic_metrics = critic.train_step(batch, algo.value_loss, self.minibatches, self.epochs)
            metrics.update({f"critic/{k}": v for k, v in critic_metrics.items()})
        metrics["correction/recomputed"] = float(recompute)
        metrics.update(staleness_metrics(trained_at, [t.version for t in trajectories], lag))
        return metrics

    def _outcome_advantages(self, rewards: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
        """(G, n) advantages of an outcome estimator; each group's statistics over its usable rows only."""
        if usable.all():
            return self.algo.advantage(rewards)
        advantages = torch.zeros_like(rewards)
        for g in range(rewards.shape[0]):
            if usable[g].any():
                advantages[g, usable[g]] = self.algo.advantage(rewards[g, usable[g]][None])[0]
        return advantages


def staleness_metrics(trained_at: int, sample_versions: list[int], token_lag: torch.Tensor) -> dict[str, float]:
    """Versions behind the trainer: min/mean/max over trained tokens, and the share of samples at each lag."""
    if token_lag.numel() == 0:
        return {"staleness/min": 0.0, "staleness/mean": 0.0, "staleness/max": 0.0}
    out = {"staleness/min": float(token_lag.min()), "staleness/mean": token_lag.float().mean().item(),
           "staleness/max": float(token_lag.max())}
    lags = [trained_at - v for v in sample_versions]
    for k in sorted(set(lags)):
        out[f"staleness/samples_lag{k}"] = lags.count(k) / len(lags)
    return out
