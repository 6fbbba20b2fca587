"""Simulator workflows: fixed-length fragments of ``gymnasium`` environments that keep running between calls.

``GymFragments`` keeps a pool of environments, one per episode the worker runs at once. Each ``run`` takes a free
environment, plays exactly ``steps`` steps on it from where the previous fragment left it (an episode may end and the
environment be reset inside a fragment), and puts it back; so episodes longer than a fragment continue across
fragments, and every step is trained on exactly once. The task instance is not used: it only stands for "one more
fragment". An environment whose call failed or timed out is dropped from the pool (its state is unknown) and a fresh
one is made for a later fragment.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import torch

from rollflow.api import EpisodeContext, Fragment


@dataclass
class _Slot:
    """One pooled environment, with the observation its next action will see and its current episode's return."""

    env: gym.Env
    observation: torch.Tensor  # (*obs)
    episode_return: float = 0.0


class GymFragments:
    """``api.RolloutWorkflow``: each ``run`` returns one ``Fragment`` of exactly ``steps`` steps. The ``k``-th
    environment made is first reset with seed ``seed + k``, later resets continue its own generator."""

    def __init__(self, make_env: Callable[[], gym.Env], steps: int, seed: int = 0) -> None:
        if steps < 1:
            raise ValueError(f"GymFragments needs steps >= 1 per fragment, got {steps}")
        self.make_env, self.steps, self.seed = make_env, steps, seed
        self._free: list[_Slot] = []  # environments no running episode holds; one event loop uses them, so no lock
        self._made = 0

    async def run(self, task: Any, ctx: EpisodeContext) -> Fragment:
        slot = self._free.pop() if self._free else await self._new(ctx)
        started = time.time()
        observations, actions, rewards, dones, logprobs, versions = [slot.observation], [], [], [], [], []
        terminals: list[bool] = []
        finals: list[torch.Tensor] = []  # each ended episode's last observation, before the reset
        episode_returns: list[float] = []
        for _ in range(self.steps):
            action, logprob, version = await ctx.engine.act(slot.observation)
            observation, reward, terminated, truncated, _ = await ctx.env(slot.env.step, env_action(action))
            slot.episode_return += float(reward)
            done = bool(terminated or truncated)
            terminals.append(bool(terminated))
            if done:
                episode_returns.append(slot.episode_return)
                slot.episode_return = 0.0
                finals.append(torch.as_tensor(observation, dtype=torch.float32))
                observation, _ = await ctx.env(slot.env.reset)
            slot.observation = torch.as_tensor(observation, dtype=torch.float32)
            observations.append(slot.observation)
            actions.append(action)
            rewards.append(float(reward))
            dones.append(done)
            logprobs.append(logprob)
            versions.append(version)
        self._free.append(slot)  # only after a whole fragment: a failed call above leaves the env out of the pool
        return Fragment(
            observations=torch.stack(observations),  # (T + 1, *obs)
            actions=torch.stack(actions),  # (T, *act)
            rewards=torch.tensor(rewards),  # (T,)
            dones=torch.tensor(dones),  # (T,)
            logprobs=torch.tensor(logprobs),  # (T,)
            versions=torch.tensor(versions, dtype=torch.long),  # (T,)
            terminated=torch.tensor(terminals),  # (T,)
            final_observations=torch.stack(finals) if finals else slot.observation.new_empty((0, *slot.observation.shape)),
            started=started, finished=time.time(), episode_returns=episode_returns,
        )

    async def _new(self, ctx: EpisodeContext) -> _Slot:
        seed = self.seed + self._made
        self._made += 1
        env = await ctx.env(self.make_env)  # a simulator may take a while to start
        observation, _ = await ctx.env(env.reset, seed=seed)
        return _Slot(env, torch.as_tensor(observation, dtype=torch.float32))


def env_action(action: torch.Tensor) -> Any:
    """The engine's action as the environment takes it: a Python number for a scalar (``Discrete``), else an array."""
    return action.item() if action.ndim == 0 else action.numpy()
