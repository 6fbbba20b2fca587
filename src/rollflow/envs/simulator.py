"""Gymnasium environments as the simulator recipe builds them: by registered id or entry point, with the options a
config names (frame stacking, a fixed compute cost per step), and the image part of MiniGrid's observations.

``make_env("CartPole-v1")`` and ``make_env("my_pkg.envs:Maze", size=9)`` both return a ``gymnasium.Env``; an id of a
package that registers its environments on import (``MiniGrid-…``) imports it first. ``env_spec`` checks a config's
choice once, in the driver, and describes the spaces, so a bad id fails before any worker starts.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

# Registered-id prefixes whose package registers them on import.
_REGISTERING_PACKAGES = {"MiniGrid-": "minigrid", "BabyAI-": "minigrid"}


class EnvSpecError(ValueError):
    """The configured environment cannot be made; the message names it and says what to do."""


class ImageObservation(gym.ObservationWrapper):
    """The ``"image"`` entry of a dict observation (MiniGrid's agent view: (7, 7, 3) object, colour, state ids)."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.observation_space = env.observation_space["image"]

    def observation(self, observation: dict[str, Any]) -> Any:
        return observation["image"]


class CostlyStep(gym.Wrapper):
    """Spends ``seconds`` of CPU on every step before the real one: a stand-in for a simulator whose steps cost
    compute (physics, rendering), for measuring how actor workers scale. It computes, it does not sleep."""

    def __init__(self, env: gym.Env, seconds: float) -> None:
        super().__init__(env)
        self.seconds = seconds

    def step(self, action: Any) -> Any:
        end, x = time.perf_counter() + self.seconds, 0.0
        while time.perf_counter() < end:
            x = (x + 1.0) * 0.5  # busy work that holds the CPU as a simulator's would
        return self.env.step(action)


def load_entry_point(target: str, key: str = "sim.env") -> Any:
    """``module:Name`` or ``path/file.py:Name`` → the object; errors name the config ``key`` it came from."""
    where, _, name = target.rpartition(":")
    if where.endswith(".py"):
        path = Path(where).resolve()
        if not path.is_file():
            raise EnvSpecError(f"{key}={target!r}: no file {str(path)!r}")
        module_name = f"rollflow_user_env_{abs(hash(str(path)))}"
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[module_name] = module
            spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise EnvSpecError(f"{key}={target!r}: cannot import {where!r} ({e}); give 'module:Name' on the Python "
                               f"path or 'path/file.py:Name'") from e
    if not hasattr(module, name):
        raise EnvSpecError(f"{key}={target!r}: {where!r} has no {name!r}")
    return getattr(module, name)


def make_env(env: str, kwargs: dict[str, Any] | None = None, frame_stack: int = 1, step_cost: float = 0.0) -> gym.Env:
    """A new environment: ``env`` is a registered id or an entry point (``module:Class``, ``path/file.py:Class``,
    a class or function returning a ``gymnasium.Env``), made with ``kwargs``. A dict observation with an ``"image"``
    entry is reduced to it; ``frame_stack`` > 1 stacks that many observations (oldest first); ``step_cost`` > 0
    adds that many seconds of computation to every step."""
    kwargs = kwargs or {}
    if ":" in env:
        made = load_entry_point(env)(**kwargs)
        if not isinstance(made, gym.Env):
            raise EnvSpecError(f"sim.env={env!r} made a {type(made).__name__}, not a gymnasium.Env")
    else:
        package = next((p for prefix, p in _REGISTERING_PACKAGES.items() if env.startswith(prefix)), None)
        if package is not None:
            importlib.import_module(package)
        try:
            made = gym.make(env, **kwargs)
        except gym.error.Error as e:
            raise EnvSpecError(f"sim.env={env!r}: {e}; give a registered Gymnasium id (e.g. CartPole-v1) or an "
                               f"entry point 'module:Class'") from e
    space = made.observation_space
    if isinstance(space, gym.spaces.Dict) and "image" in space.spaces:
        made = ImageObservation(made)
    if step_cost > 0:
        made = CostlyStep(made, step_cost)
    if frame_stack > 1:
        made = gym.wrappers.FrameStackObservation(made, frame_stack)
    return made


@dataclass(frozen=True)
class EnvSpec:
    """What a policy needs to know of an environment."""

    observation_shape: tuple[int, ...]
    actions: int
    image: bool  # observations are (…, H, W, C) grids: a CNN policy fits them


def env_spec(env: str, kwargs: dict[str, Any] | None = None, frame_stack: int = 1) -> EnvSpec:
    """Make the environment once to read its spaces; a clear error if it cannot be made or is not supported."""
    try:
        made = make_env(env, kwargs, frame_stack)
    except EnvSpecError:
        raise
    except Exception as e:
        raise EnvSpecError(f"sim.env={env!r} could not be made: {type(e).__name__}: {e}") from e
    try:
        obs_space, act_space = made.observation_space, made.action_space
        if not isinstance(act_space, gym.spaces.Discrete):
            raise EnvSpecError(f"sim.env={env!r} has a {type(act_space).__name__} action space; the simulator "
                               "recipe's policies are categorical: it needs Discrete actions")
        if not isinstance(obs_space, gym.spaces.Box):
            raise EnvSpecError(f"sim.env={env!r} has a {type(obs_space).__name__} observation space; it needs a Box "
                               "(a vector or an image), or a dict with an 'image' entry")
        shape = tuple(int(d) for d in obs_space.shape)
        image = len(shape) >= 3 and np.issubdtype(obs_space.dtype, np.integer)
        return EnvSpec(shape, int(act_space.n), image)
    finally:
        made.close()
