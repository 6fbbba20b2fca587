"""The simulator actor: several Gymnasium environments stepped in lockstep, one batched policy request per step.

``VectorFragments`` is an ``api.BatchWorkflow``: a rollout call of N task instances takes N environments from the
actor's pool (making new ones when the pool runs short), plays exactly ``steps`` steps on each from where its
previous fragment left it, and returns N ``Fragment``s, one per environment. Each step asks the engine once for all
N actions (``EngineClient.act_batch``), so every action of a step comes from one policy version. Episodes end and
restart inside fragments (same-step reset, the last observation kept in ``final_observations``), so one long episode
never holds back sampling. Two calls in flight on one actor interleave: while one waits for its actions, the other
steps its environments (Sample Factory's double-buffered sampling).

Faults are per environment. One whose ``step`` or ``reset`` raises, or (with ``step_timeout``) does not return in
time, is dropped from the pool, to be replaced by a fresh one at a later call, and its partial fragment is dropped
too: its row comes back as ``Status.INFRA_ERROR`` (the controller retries it, then masks it) and is counted in
``dropped``. The other environments of the call go on. A hung ``step`` cannot be interrupted (Python threads cannot
be killed): it is left running in its abandoned thread, and the environments after it in that step are stepped by a
fresh thread. With ``step_timeout`` unset, environments are stepped on the worker's event loop (fastest; a hang then
stalls the worker until ``runtime.call_timeout`` replaces it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from rollflow.api import EpisodeContext, Fragment, InfraError, Status, Trajectory, TrajectoryBuilder
from rollflow.workflows.gym import env_action


@dataclass
class _Slot:
    """One pooled environment, the observation its next action will see and its running episode's return/length."""

    env: gym.Env
    observation: torch.Tensor  # (*obs)
    episode_return: float = 0.0
    episode_length: int = 0


@dataclass
class _Lane:
    """One environment's part of a call: its slot, what it recorded, and why it failed (if it did)."""

    slot: _Slot
    finals: list[torch.Tensor] = field(default_factory=list)  # ended episodes' last observations, in step order
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    error: str | None = None


def as_observation(observation: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(observation), dtype=torch.float32)


class VectorFragments:
    """``api.BatchWorkflow`` of a simulator actor: one ``Fragment`` of ``steps`` steps per task instance of a call.

    The ``k``-th environment this actor makes is first reset with seed ``seed + k`` (later resets continue its own
    generator); ``seed`` should leave room for every environment an actor may make before the next actor's range.
    ``step_timeout``: seconds one lockstep step of a call's environments may take (None: no limit)."""

    def __init__(self, make_env: Callable[[], gym.Env], steps: int, seed: int = 0,
                 step_timeout: float | None = None) -> None:
        if steps < 1:
            raise ValueError(f"VectorFragments needs steps >= 1 per fragment, got {steps}")
        self.make_env, self.steps, self.seed, self.step_timeout = make_env, steps, seed, step_timeout
        self._free: list[_Slot] = []  # one event loop uses the pool, so no lock
        self.made = 0  # environments made (replacements included)
        self.dropped = 0  # environments dropped after a fault
        self._stepper: ThreadPoolExecutor | None = None

    async def run_batch(self, tasks: list[Any], ctx: EpisodeContext) -> list[Fragment | Trajectory]:
        lanes: list[_Lane] = []
        for _ in tasks:
            slot = self._free.pop() if self._free else await self._new()
            lanes.append(_Lane(slot))
        n, T, started = len(lanes), self.steps, time.time()
        obs = torch.empty((T + 1, n, *lanes[0].slot.observation.shape))  # (T + 1, N, *obs)
        obs[0] = torch.stack([lane.slot.observation for lane in lanes])
        rewards, dones, terminated = torch.zeros(T, n), torch.zeros(T, n, dtype=torch.bool), torch.zeros(T, n, dtype=torch.bool)
        logprobs, versions = torch.zeros(T, n), torch.zeros(T, n, dtype=torch.long)
        actions: list[torch.Tensor] = []
        env_seconds = infer_seconds = 0.0
        for t in range(T):
            t0 = time.perf_counter()
            action, logprob, version = await ctx.engine.act_batch(obs[t])  # (N, *act), (N,)
            t1 = time.perf_counter()
            outcomes = await self._step_all(lanes, action)
            env_seconds += time.perf_counter() - t1
            infer_seconds += t1 - t0
            actions.append(action)
            logprobs[t], versions[t] = logprob, version
            for i, (lane, outcome) in enumerate(zip(lanes, outcomes)):
                if lane.error is not None:
                    obs[t + 1, i] = obs[t, i]  # a dead lane's rows are never read; keep them finite
                    continue
                observation, reward, term, trunc = outcome
                slot = lane.slot
                slot.episode_return += reward
                slot.episode_length += 1
                rewards[t, i], dones[t, i], terminated[t, i] = reward, term or trunc, term
                if term or trunc:
                    lane.finals.append(observation)
                    lane.returns.append(slot.episode_return)
                    lane.lengths.append(slot.episode_length)
                    slot.episode_return, slot.episode_length = 0.0, 0
                    try:
                        reset = await self._call(slot.env.reset) if self.step_timeout else slot.env.reset()
                        observation = as_observation(reset[0])
                    except InfraError as e:  # the reset hung
                        self._drop(lane, str(e))
                        continue
                    except Exception as e:  # the environment's fault: this lane is dropped
                        self._drop(lane, f"reset raised {type(e).__name__}: {e}")
                        continue
                slot.observation = observation
                obs[t + 1, i] = observation
        finished = time.time()
        info = {"env_seconds": env_seconds, "infer_seconds": infer_seconds, "envs": n}
        out: list[Fragment | Trajectory] = []
        all_actions = torch.stack(actions)  # (T, N, *act)
        for i, lane in enumerate(lanes):
            if lane.error is not None:
                out.append(TrajectoryBuilder().build(status=Status.INFRA_ERROR, error=lane.error))
                continue
            self._free.append(lane.slot)  # only a whole fragment's environment goes back to the pool
            out.append(Fragment(
                observations=obs[:, i].clone(), actions=all_actions[:, i].clone(), rewards=rewards[:, i].clone(),
                dones=dones[:, i].clone(), logprobs=logprobs[:, i].clone(), versions=versions[:, i].clone(),
                terminated=terminated[:, i].clone(),
                final_observations=torch.stack(lane.finals) if lane.finals else obs.new_empty((0, *obs.shape[2:])),
                started=started, finished=finished, episode_returns=lane.returns,
                info={**info, "episode_returns": lane.returns, "episode_lengths": lane.lengths},
            ))
        return out

    # -- environments -------------------------------------------------------------------------------------------------
    async def _step_all(self, lanes: list[_Lane], actions: torch.Tensor) -> list[Any]:
        """One step of every live lane: (observation, reward, terminated, truncated) each; a lane that failed gets
        its ``error`` set (and None here)."""
        values = [env_action(a) for a in actions]
        if not self.step_timeout:
            return [self._step_one(lane, a) for lane, a in zip(lanes, values)]
        outcomes: list[Any] = [None] * len(lanes)
        todo = [i for i, lane in enumerate(lanes) if lane.error is None]
        while todo:
            progress = {"at": None}
            stop = {"stop": False}

            def run(indices: list[int] = todo, progress: dict = progress, stop: dict = stop) -> None:
                for i in indices:
                    if stop["stop"]:
                        return
                    progress["at"] = i
                    outcomes[i] = self._step_one(lanes[i], values[i])
                progress["at"] = None

            future = asyncio.get_running_loop().run_in_executor(self._executor(), run)
            try:
                await asyncio.wait_for(asyncio.shield(future), self.step_timeout)
                todo = []
            except TimeoutError:
                stop["stop"] = True
                hung = progress["at"]
                self._stepper = None  # its thread is stuck in the hung step: abandoned, a fresh one takes over
                if hung is None:  # it finished as the timeout fired
                    todo = []
                    continue
                self._drop(lanes[hung], f"step did not return within sim.step_timeout={self.step_timeout} s (hung)")
                todo = todo[todo.index(hung) + 1:]
        return outcomes

    def _step_one(self, lane: _Lane, action: Any) -> Any:
        if lane.error is not None:
            return None
        try:
            observation, reward, terminated, truncated, _ = lane.slot.env.step(action)
            return as_observation(observation), float(reward), bool(terminated), bool(truncated)
        except Exception as e:  # the environment's fault: this lane is dropped, the call goes on
            self._drop(lane, f"step raised {type(e).__name__}: {e}")
            return None

    def _drop(self, lane: _Lane, why: str) -> None:
        if lane.error is None:
            lane.error = f"environment dropped: {why}"
            self.dropped += 1
            try:
                lane.slot.env.close()
            except Exception:  # closing a broken environment may fail too; it is gone either way
                pass

    def _executor(self) -> ThreadPoolExecutor:
        if self._stepper is None:
            self._stepper = ThreadPoolExecutor(1, thread_name_prefix="env")
        return self._stepper

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` on the stepping thread under ``step_timeout``; past it: InfraError (the thread is abandoned)."""
        future = asyncio.get_running_loop().run_in_executor(self._executor(), lambda: fn(*args, **kwargs))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.step_timeout)
        except TimeoutError:
            self._stepper = None
            raise InfraError(f"{getattr(fn, '__qualname__', fn)} did not return within sim.step_timeout="
                             f"{self.step_timeout} s") from None

    async def _new(self) -> _Slot:
        seed = self.seed + self.made
        self.made += 1
        try:
            if self.step_timeout:
                env = await self._call(self.make_env)
                observation, _ = await self._call(env.reset, seed=seed)
            else:
                env = self.make_env()
                observation, _ = env.reset(seed=seed)
        except InfraError:
            raise
        except Exception as e:
            raise InfraError(f"making environment {self.made - 1} (seed {seed}) failed: {type(e).__name__}: {e}") from e
        return _Slot(env, as_observation(observation))
