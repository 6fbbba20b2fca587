"""PPO for simulator agents: advantages over fixed-length fragments, and the actor-critic loss.

A batch is B fragments of T steps each (``api.Fragment``), laid out (B, T). An episode may end inside a fragment and
a new one start; the fragment's last step usually ends nothing, and is bootstrapped from the value of the observation
after it. Two ways an episode ends are kept apart, as Gymnasium does:

- **terminated**: the environment reached a terminal state; nothing follows, the value after it is 0;
- **truncated**: the episode was cut (a time limit); the state after it still had a future, worth V(s').

``next_values[b, t]`` is V of the observation after step t: for a truncated step the episode's final observation
(before the reset), otherwise the next step's observation. The recursion never crosses an episode's end.

``vtrace`` gives IMPALA's off-policy targets for actions of an older policy. ``tests/algos/test_reference_ppo.py`` holds
the PPO functions to ``reference/ppo.py`` (a plain single-file PPO) in
float64: the same advantages, returns, loss and gradients. ``PPOStep`` is the trainer's step on rows holding
fragments, with an actor-critic policy (``engines.policy.ActorCriticMLP``); ``APPOStep`` the same with V-trace's
targets, for stale fragments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollflow.algos.advantages import reverse_scan
from rollflow.algos.kl import k3
from rollflow.algos.pg import episode_metrics, kept_fragments, returns_to_go
from rollflow.algos.policy_step import staleness_metrics
from rollflow.api import CriticEngine, Fragment, LossOutput, PolicyTrainEngine, SampleRow, StepBatch


def fragment_gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
                 ended: torch.Tensor, gamma: float = 0.99, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over (B, T) fragments; returns (advantages, returns),
    returns = advantages + values (the value targets).

        δ_t = r_t + γ · (1 − terminated_t) · next_values_t − values_t
        A_t = δ_t + γλ · (1 − ended_t) · A_{t+1}             (A_T = 0: the fragment's end is bootstrapped by δ)

    ``terminated`` and ``ended`` (terminated or truncated) are bool (B, T)."""
    if not rewards.shape == values.shape == next_values.shape == terminated.shape == ended.shape:
        raise ValueError(f"fragment_gae needs equal (B, T) shapes, got rewards {tuple(rewards.shape)}, values "
                         f"{tuple(values.shape)}, next_values {tuple(next_values.shape)}, terminated "
                         f"{tuple(terminated.shape)}, ended {tuple(ended.shape)}")
    if bool((terminated & ~ended).any()):
        raise ValueError("fragment_gae: a step is terminated but not ended; ended must include every terminated step")
    deltas = rewards + gamma * (~terminated).to(values.dtype) * next_values - values
    advantages = reverse_scan(deltas, gamma * lam * (~ended).to(values.dtype))
    return advantages, advantages + values


def vtrace(behav_logprobs: torch.Tensor, logprobs: torch.Tensor, rewards: torch.Tensor, values: torch.Tensor,
           next_values: torch.Tensor, terminated: torch.Tensor, ended: torch.Tensor, gamma: float = 0.99,
           rho_bar: float = 1.0, c_bar: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """V-trace targets and policy-gradient advantages (Espeholt et al. 2018, IMPALA §4.1) over (B, T) fragments whose
    actions came from a behaviour policy μ (``behav_logprobs``) older than π (``logprobs``); returns (vs, advantages).

        ρ_t = min(ρ̄, π/μ),  c_t = min(c̄, π/μ),  δ_t = ρ_t · (r_t + γ · (1 − terminated_t) · next_values_t − V_t)
        vs_t − V_t = δ_t + γ · (1 − ended_t) · c_t · (vs_{t+1} − V_{t+1})          (0 after the fragment's end)
        A_t = ρ_t · (r_t + γ · (1 − terminated_t) · v'_{t+1} − V_t),   v'_{t+1} = vs_{t+1} inside an episode and
              next_values_t where it ended or the fragment ends

    With π = μ and ρ̄ = c̄ = 1, vs is the λ = 1 GAE return (tested). Ends as in ``fragment_gae``."""
    if not (behav_logprobs.shape == logprobs.shape == rewards.shape == values.shape == next_values.shape
            == terminated.shape == ended.shape):
        raise ValueError("vtrace needs equal (B, T) shapes of every input")
    ratio = (logprobs - behav_logprobs).detach().exp()
    rho, c = ratio.clamp(max=rho_bar), ratio.clamp(max=c_bar)
    live = (~terminated).to(values.dtype)
    deltas = rho * (rewards + gamma * live * next_values - values)
    vs = values + reverse_scan(deltas, gamma * (~ended).to(values.dtype) * c)  # vs − V, scanned back
    following = next_values.clone()  # v'_{t+1}: vs_{t+1} where the episode goes on inside the fragment
    inside = ~ended[:, :-1]
    following[:, :-1] = torch.where(inside, vs[:, 1:], next_values[:, :-1])
    advantages = rho * (rewards + gamma * live * following - values)
    return vs.detach(), advantages.detach()


def ppo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             old_values: torch.Tensor, returns: torch.Tensor, entropy: torch.Tensor, clip: float = 0.2,
             value_clip: float | None = 0.2, value_coef: float = 0.5, entropy_coef: float = 0.0,
             normalize_advantages: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """The PPO actor-critic loss of one minibatch (any shape, every element one step); returns (loss, metrics).

        ρ      = exp(logprobs − old_logprobs)
        Â      = (A − mean A) / (std A + 1e-8)           with normalize_advantages (over the minibatch)
        L_pg   = −mean(min(ρ·Â, clip(ρ, 1 − ε, 1 + ε)·Â))
        L_v    = ½ · mean(max((V − R)², (V_old + clip(V − V_old, −ε_v, ε_v) − R)²))   (no clip: ½ · mean((V − R)²))
        loss   = L_pg + value_coef · L_v − entropy_coef · mean(entropy)
    """
    advantages = advantages.detach()
    if normalize_advantages and advantages.numel() > 1:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    log_ratio = logprobs - old_logprobs.detach()
    ratio = log_ratio.exp()
    policy_loss = -torch.min(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages).mean()
    returns, old_values = returns.detach(), old_values.detach()
    value_error = (values - returns) ** 2
    if value_clip is not None:
        clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
        value_error = torch.max(value_error, (clipped - returns) ** 2)
    value_loss = 0.5 * value_error.mean()
    entropy_mean = entropy.mean()
    loss = policy_loss + value_coef * value_loss - entropy_coef * entropy_mean
    with torch.no_grad():
        metrics = {
            "train/policy_loss": float(policy_loss), "train/value_loss": float(value_loss),
            "train/entropy": float(entropy_mean), "train/clip_frac": float(((ratio - 1.0).abs() > clip).float().mean()),
            "train/approx_kl": float(((ratio - 1.0) - log_ratio).mean()),  # k3 estimator of KL(old ‖ new)
        }
    return loss, metrics


@dataclass(frozen=True)
class PPOStep:
    """``api.TrainStep`` for rows whose ``column`` holds a ``Fragment``, with an actor-critic policy engine
    (``engines.policy.TorchPolicyTrainer`` over ``ActorCriticMLP``): values of every observation and of the one after
    each step (``Fragment.next_observations``: a truncated episode bootstraps from its final observation) under the
    current weights → ``fragment_gae`` per fragment → ``epochs`` passes of ``minibatches`` updates on ``ppo_loss``.

    π_old is the behaviour policy (the log-probs the rollout engine recorded): with η > 0 the ratio also carries the
    version lag, and the clip bounds how far a stale action can move the policy. A row left without a fragment by an
    infrastructure fault or a timeout is masked."""

    gamma: float = 0.99
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float | None = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    normalize_advantages: bool = True
    normalize_rewards: bool = False  # divide rewards by the running std of discounted returns (``scaled_rewards``)
    kl_coef: float = 0.0  # weight of KL(π ‖ π_ref) to the engine's frozen reference (its warm start), k3 estimator
    kl_decay_steps: int = 0  # the KL weight falls linearly to 0 over this many RL steps (0: constant)
    minibatches: int = 4
    epochs: int = 4
    column: str = "fragment"

    def __call__(self, groups: list[list[SampleRow]], engine: PolicyTrainEngine,
                 critic: CriticEngine | None) -> dict[str, float]:
        rows, kept = kept_fragments(groups, self.column, type(self).__name__)
        values, next_values = fragment_values(engine, kept)
        rewards = step_rewards(engine, kept, self.gamma, self.normalize_rewards)
        sizes = [f.size for f in kept]
        if len(set(sizes)) == 1:  # the usual case: one (B, T) scan for the whole batch
            shape = (len(kept), sizes[0])
            a, r = fragment_gae(rewards.to(values.dtype).view(shape), values.view(shape), next_values.view(shape),
                                torch.stack([f.terminated for f in kept]).bool(),
                                torch.stack([f.dones for f in kept]).bool(), self.gamma, self.lam)
            advantages, returns = a.flatten(), r.flatten()
        else:  # lengths differ: a row each
            parts = [fragment_gae(rw[None].to(v.dtype), v[None], nv[None], f.terminated[None].bool(),
                                  f.dones[None].bool(), self.gamma, self.lam)
                     for f, rw, v, nv in zip(kept, rewards.split(sizes), values.split(sizes), next_values.split(sizes))]
            advantages, returns = torch.cat([a[0] for a, _ in parts]), torch.cat([r[0] for _, r in parts])
        batch = StepBatch.from_fragments(kept, advantages)
        batch.returns, batch.old_values = returns, values
        return actor_critic_update(self, engine, rows, kept, batch)


def step_rewards(engine: PolicyTrainEngine, fragments: list[Fragment], gamma: float, normalize: bool) -> torch.Tensor:
    """The fragments' rewards (N,) in order; with ``normalize``, divided by the running std of discounted returns
    (``engine.scaled_rewards``; the returns are those to go within each fragment)."""
    rewards = torch.cat([f.rewards for f in fragments]).float()
    if not normalize:
        return rewards
    returns = torch.cat([returns_to_go(f.rewards, f.dones, gamma) for f in fragments])
    return engine.scaled_rewards(rewards, returns)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class APPOStep:
    """Asynchronous PPO (IMPALA's V-trace under PPO's clip): like ``PPOStep``, but the value targets and advantages
    are V-trace's (``vtrace``), which correct for actions chosen by an older policy version than the one trained
    (π: the current weights before the step; μ: the recorded behaviour log-probs), so a larger staleness bound η
    costs less. The ratio in the clipped surrogate is π_θ / μ, as in ``PPOStep``."""

    gamma: float = 0.99
    clip: float = 0.2
    rho_bar: float = 1.0
    c_bar: float = 1.0
    value_clip: float | None = None
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    normalize_advantages: bool = True
    normalize_rewards: bool = False  # as in ``PPOStep``
    kl_coef: float = 0.0  # as in ``PPOStep``
    kl_decay_steps: int = 0
    minibatches: int = 2
    epochs: int = 1
    column: str = "fragment"

    def __call__(self, groups: list[list[SampleRow]], engine: PolicyTrainEngine,
                 critic: CriticEngine | None) -> dict[str, float]:
        rows, kept = kept_fragments(groups, self.column, type(self).__name__)
        values, next_values = fragment_values(engine, kept)
        batch = StepBatch.from_fragments(kept, torch.zeros_like(values))
        target = engine.compute_logprobs(batch)  # type: ignore[attr-defined]
        rewards = step_rewards(engine, kept, self.gamma, self.normalize_rewards)
        sizes = [f.size for f in kept]
        targets, advantages = [], []
        for f, mu, pi, rw, v, nv in zip(kept, batch.behav_logprobs.split(sizes), target.split(sizes),
                                        rewards.split(sizes), values.split(sizes), next_values.split(sizes)):
            vs, adv = vtrace(mu[None], pi[None], rw[None].to(v.dtype), v[None], nv[None],
                             f.terminated[None].bool(), f.dones[None].bool(), self.gamma, self.rho_bar, self.c_bar)
            targets.append(vs[0])
            advantages.append(adv[0])
        batch.advantages, batch.returns, batch.old_values = torch.cat(advantages), torch.cat(targets), values
        metrics = actor_critic_update(self, engine, rows, kept, batch)
        metrics["vtrace/rho_clipped"] = float(((target - batch.behav_logprobs).exp() > self.rho_bar).float().mean())
        return metrics


def fragment_values(engine: PolicyTrainEngine, fragments: list[Fragment]) -> tuple[torch.Tensor, torch.Tensor]:
    """V (N,) of every step's observation and of the observation after it (``Fragment.next_observations``), under
    the engine's current weights, the fragments' steps in order."""
    values = engine.compute_values(torch.cat([f.observations[:-1] for f in fragments]))  # type: ignore[attr-defined]
    after = engine.compute_values(torch.cat([f.next_observations() for f in fragments]))  # type: ignore[attr-defined]
    return values, after


def actor_critic_update(step: PPOStep | APPOStep, engine: PolicyTrainEngine, rows: list[SampleRow],
                        kept: list[Fragment], batch: StepBatch) -> dict[str, float]:
    """``step.epochs`` passes of ``step.minibatches`` updates on ``ppo_loss`` over ``batch`` (advantages, returns and
    old values filled in); returns the step's metrics."""

    coef = kl_weight(step, engine)
    if coef > 0:
        batch.ref_logprobs = engine.reference_logprobs(batch)  # type: ignore[attr-defined]

    def loss(logp: torch.Tensor, entropy: torch.Tensor, mb: StepBatch, v: torch.Tensor) -> LossOutput:
        total, metrics = ppo_loss(logp, mb.behav_logprobs, mb.advantages, v, mb.old_values, mb.returns, entropy,
                                  step.clip, step.value_clip, step.value_coef, step.entropy_coef,
                                  step.normalize_advantages)
        if coef > 0:
            kl = k3(logp, mb.ref_logprobs).mean()
            total = total + coef * kl
            metrics["kl/ref"] = kl.item()
        return LossOutput(total, metrics)

    loss.needs_values = True  # type: ignore[attr-defined]
    trained_at = engine.version
    lag = trained_at - batch.versions  # (N,) versions behind the trainer
    metrics = engine.train_step(batch, loss, step.minibatches, step.epochs)
    metrics.update(episode_metrics(rows, kept))
    if step.kl_coef > 0:
        metrics["kl/coef"] = coef
    metrics["value/mean"] = batch.old_values.mean().item()
    metrics["value/explained_variance"] = explained_variance(batch.old_values, batch.returns)
    metrics.update(staleness_metrics(trained_at, [f.version for f in kept], lag))
    return metrics


def kl_weight(step: PPOStep | APPOStep, engine: PolicyTrainEngine) -> float:
    """The KL weight of this step: ``kl_coef``, decayed linearly to 0 over ``kl_decay_steps`` RL steps (counted from
    the start of RL: ``engine.phase_steps``)."""
    if step.kl_coef <= 0:
        return 0.0
    if not step.kl_decay_steps:
        return step.kl_coef
    done = getattr(engine, "phase_steps", engine.version)
    return step.kl_coef * max(0.0, 1.0 - done / step.kl_decay_steps)


def explained_variance(predicted: torch.Tensor, targets: torch.Tensor) -> float:
    """1 − Var(targets − predicted) / Var(targets): 1 for a perfect critic, 0 for one that predicts the mean, NaN
    when the targets do not vary."""
    var = targets.var()
    return float(1.0 - (targets - predicted).var() / var) if var > 0 else float("nan")
