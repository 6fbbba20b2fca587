"""Synchronous environments on the event loop: ``as_async`` runs their methods in a thread.

A rollout worker runs many episodes on one event loop, so an environment method that blocks (runs a program, sleeps,
calls a service) must not run on it. ``as_async(env)`` returns an ``api.Env`` whose ``reset`` and ``step`` run the
plain methods with ``asyncio.to_thread``, and which records each step's wall time as ``info["duration_s"]`` when the
environment did not set it. An environment that is already async is returned as it is.

A thread cannot be killed: when the episode's ``env_timeout`` cancels a step, the episode ends at once but the thread
finishes its call in the background. Environments whose actions can run forever should bound them themselves (the
code sandbox kills its process group at its own timeout).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from dataclasses import replace
from typing import Any

from rollflow.api import Env, StepResult, SyncEnv


class _Threaded:
    """``api.Env`` over a ``SyncEnv``."""

    def __init__(self, env: SyncEnv) -> None:
        self.env = env

    async def reset(self, task: Any) -> str:
        return await asyncio.to_thread(self.env.reset, task)

    async def step(self, action: str) -> StepResult:
        started = time.perf_counter()
        result = await asyncio.to_thread(self.env.step, action)
        if not isinstance(result, StepResult):
            raise TypeError(f"{type(self.env).__name__}.step must return a StepResult, got {type(result).__name__}")
        if "duration_s" in result.info:
            return result
        return replace(result, info={**result.info, "duration_s": time.perf_counter() - started})


def as_async(env: Env | SyncEnv) -> Env:
    """``env`` as an ``api.Env``: itself if both its methods are coroutine functions, else wrapped in threads."""
    if inspect.iscoroutinefunction(env.reset) and inspect.iscoroutinefunction(env.step):
        return env  # type: ignore[return-value]
    if inspect.iscoroutinefunction(env.reset) or inspect.iscoroutinefunction(env.step):
        raise TypeError(f"{type(env).__name__}: reset and step must both be async or both plain, not one of each")
    return _Threaded(env)  # type: ignore[arg-type]
