"""PPO with a vectorised Gymnasium environment in plain PyTorch: the single-file reference for rollflow's simulator
recipe, and the baseline its throughput is measured against.

PPO (Schulman et al. 2017, "Proximal Policy Optimization Algorithms") collects T steps from each of N environments
with the current policy π_old, estimates advantages with GAE (Schulman et al. 2016), and then takes several epochs
of minibatch steps on the clipped surrogate, a value loss and an entropy bonus:

    δ_t   = r_t + γ · V(s_{t+1}) · (1 − terminal_t) − V(s_t)
    Â_t   = δ_t + γλ · Â_{t+1} · (1 − end_t)
    ρ_t   = π_θ(a_t | s_t) / π_old(a_t | s_t)
    L     = −E[min(ρ_t Â_t, clip(ρ_t, 1 − ε, 1 + ε) Â_t)] + c_v · ½ E[(V_θ(s_t) − (Â_t + V_old(s_t)))²] − c_e · E[H]

Read top to bottom: collect → advantages → update. No rollflow imports, on purpose: this file is what
``tests/algos/test_reference_ppo.py`` holds ``rollflow.algos.ppo`` to.

Details the paper leaves open, chosen as common practice (and as rollflow does):
  * Termination and truncation are told apart (Gymnasium's 5-tuple). A terminated step has no future (V = 0 after
    it); a truncated one (a time limit) is bootstrapped from V of its final observation, which the vectorised
    environment reports in ``info["final_obs"]`` before resetting. Both stop the advantage recursion.
  * Advantages are normalised per minibatch (mean 0, std 1).
  * The value loss is clipped around the old value estimate by the same kind of ε (``value_clip``), as in the
    OpenAI baselines implementation; ``None`` turns that off.
  * Gradients are clipped to a global norm; Adam with a learning rate annealed linearly to 0 over the run's steps.

What it leaves out: observation and reward normalisation, recurrent policies, KL early stopping.

Run it (CartPole-v1, prints the mean return of finished episodes every few updates):

    python reference/ppo.py [--steps 200000] [--seconds 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import nn


@dataclass
class PPOConfig:
    envs: int = 8  # N environments stepped together
    steps: int = 128  # T steps per environment per update
    epochs: int = 4
    minibatches: int = 4
    gamma: float = 0.99
    lam: float = 0.95
    clip: float = 0.2
    value_clip: float | None = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    lr: float = 2.5e-3
    max_grad_norm: float = 0.5


class Agent(nn.Module):
    """An MLP actor and critic (separate trunks) for a discrete action space."""

    def __init__(self, obs_size: int, actions: int, hidden: int = 64) -> None:
        super().__init__()
        self.critic = nn.Sequential(nn.Linear(obs_size, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                    nn.Linear(hidden, 1))
        self.actor = nn.Sequential(nn.Linear(obs_size, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                   nn.Linear(hidden, actions))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    def evaluate(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log π(a|s), entropy of π(·|s), V(s)) for given actions."""
        dist = torch.distributions.Categorical(logits=self.actor(obs))
        return dist.log_prob(actions), dist.entropy(), self.value(obs)


# -- advantages --------------------------------------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
        ended: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, N) tensors, time first. ``next_values[t]``: V of the observation after step t (the final observation of a
    truncated episode, the next step's observation otherwise). Returns (advantages, returns)."""
    T = rewards.shape[0]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in range(T - 1, -1, -1):
        not_terminal = 1.0 - terminated[t].to(rewards.dtype)
        not_end = 1.0 - ended[t].to(rewards.dtype)
        delta = rewards[t] + gamma * next_values[t] * not_terminal - values[t]
        last = delta + gamma * lam * not_end * last
        advantages[t] = last
    return advantages, advantages + values


# -- the update --------------------------------------------------------------------------------------------------
def minibatch_loss(agent: Agent, obs: torch.Tensor, actions: torch.Tensor, old_logprobs: torch.Tensor,
                   old_values: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
                   cfg: PPOConfig) -> torch.Tensor:
    """The PPO loss of one minibatch of steps (flat)."""
    logprobs, entropy, values = agent.evaluate(obs, actions)
    adv = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.min(ratio * adv, torch.clamp(ratio, 1 - cfg.clip, 1 + cfg.clip) * adv)
    policy_loss = -surrogate.mean()
    value_loss = (values - returns) ** 2
    if cfg.value_clip is not None:
        clipped = old_values + torch.clamp(values - old_values, -cfg.value_clip, cfg.value_clip)
        value_loss = torch.max(value_loss, (clipped - returns) ** 2)
    value_loss = 0.5 * value_loss.mean()
    return policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy.mean()


def update(agent: Agent, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], cfg: PPOConfig,
           generator: torch.Generator) -> None:
    """``cfg.epochs`` passes over the flattened batch in ``cfg.minibatches`` shuffled minibatches."""
    n = batch["actions"].numel()
    size = n // cfg.minibatches
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            idx = order[start:start + size]
            loss = minibatch_loss(agent, *(batch[k].reshape(n, *batch[k].shape[2:])[idx] for k in (
                "obs", "actions", "logprobs", "values", "advantages", "returns")), cfg)
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
            optimizer.step()


# -- collect and train -------------------------------------------------------------------------------------------
def train(env_id: str = "CartPole-v1", total_steps: int = 200_000, seed: int = 0, cfg: PPOConfig | None = None,
          seconds: float | None = None, log_every: int = 5, make_env: Callable[[], gym.Env] | None = None,
          updates: int | None = None) -> list[tuple[float, int, float]]:
    """Train for ``total_steps`` environment steps (the learning rate anneals over them), or until ``seconds`` of
    wall time have passed, or ``updates`` updates are done; returns (seconds, env steps, mean return of the last 20
    finished episodes) after every update. ``make_env`` replaces ``gym.make(env_id)``."""
    cfg = cfg or PPOConfig()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # same-step autoreset: an ended episode's environment is reset within the step, its last observation in info
    envs = gym.vector.SyncVectorEnv([make_env or (lambda: gym.make(env_id)) for _ in range(cfg.envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    agent = Agent(envs.single_observation_space.shape[0], envs.single_action_space.n)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=1e-5)
    obs = torch.as_tensor(envs.reset(seed=seed)[0], dtype=torch.float32)
    finished: list[float] = []
    running = np.zeros(cfg.envs)
    history, steps, started, update_no = [], 0, time.perf_counter(), 0
    while (steps < total_steps and (seconds is None or time.perf_counter() - started < seconds)
           and (updates is None or update_no < updates)):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * (1.0 - steps / total_steps)
        cols: dict[str, list[torch.Tensor]] = {k: [] for k in (
            "obs", "actions", "logprobs", "values", "rewards", "next_values", "terminated", "ended")}
        for _ in range(cfg.steps):
            with torch.no_grad():
                logits, value = agent.actor(obs), agent.value(obs)
                dist = torch.distributions.Categorical(logits=logits)
                action = dist.sample()
            next_obs, reward, terminated, truncated, info = envs.step(action.numpy())
            next_obs = torch.as_tensor(next_obs, dtype=torch.float32)
            after = next_obs.clone()  # the observation after this step, before any reset
            ended = np.logical_or(terminated, truncated)
            if "final_obs" in info:  # the ended episodes' last observations
                for i in np.flatnonzero(ended):
                    after[i] = torch.as_tensor(info["final_obs"][i], dtype=torch.float32)
            with torch.no_grad():
                next_value = agent.value(after)
            for k, v in (("obs", obs), ("actions", action), ("logprobs", dist.log_prob(action)), ("values", value),
                         ("rewards", torch.as_tensor(reward, dtype=torch.float32)), ("next_values", next_value),
                         ("terminated", torch.as_tensor(terminated)), ("ended", torch.as_tensor(ended))):
                cols[k].append(v)
            running += reward
            for i in np.flatnonzero(ended):
                finished.append(float(running[i]))
                running[i] = 0.0
            obs = next_obs
            steps += cfg.envs
        batch = {k: torch.stack(v) for k, v in cols.items()}
        batch["advantages"], batch["returns"] = gae(batch["rewards"], batch["values"], batch["next_values"],
                                                    batch["terminated"], batch["ended"], cfg.gamma, cfg.lam)
        update(agent, optimizer, batch, cfg, generator)
        update_no += 1
        mean = float(np.mean(finished[-20:])) if finished else 0.0
        history.append((time.perf_counter() - started, steps, mean))
        if log_every and update_no % log_every == 0:
            print(f"{history[-1][0]:6.1f} s  {steps:8d} steps  mean return {mean:6.1f}")
    envs.close()
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="PPO on a vectorised Gymnasium environment (the reference)")
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--steps", type=int, default=200_000, help="environment steps")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this much wall time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args.env, args.steps, args.seed, seconds=args.seconds)
