"""Corridor: the smallest simulator task with something to learn, for testing the non-text path end to end.

Cells ``0 … n-1``; the agent starts on a random cell left of the goal (drawn from the env's seeded generator),
moves left (action 0) or right (action 1; a move into a wall stays put) and sees its cell as a one-hot vector.
Every step costs ``step_cost``; reaching cell ``n-1`` pays +1 and ends the episode (terminated); after
``max_steps`` steps it is cut off (truncated). Walking straight right from cell ``p`` returns
``1 − (n−1−p)·step_cost``, the best possible, so a policy's mean return says how far it is from optimal.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

LEFT, RIGHT = 0, 1


class Corridor(gym.Env[np.ndarray, int]):
    metadata = {"render_modes": []}

    def __init__(self, n: int = 6, max_steps: int = 20, step_cost: float = 0.05) -> None:
        if n < 2 or max_steps < 1:
            raise ValueError(f"Corridor needs n >= 2 cells and max_steps >= 1, got n={n}, max_steps={max_steps}")
        self.n, self.max_steps, self.step_cost = n, max_steps, step_cost
        self.observation_space = spaces.Box(0.0, 1.0, (n,), np.float32)
        self.action_space = spaces.Discrete(2)
        self.position = 0
        self.steps = 0

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.position = int(self.np_random.integers(0, self.n - 1))  # any cell but the goal
        self.steps = 0
        return self._observation(), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not self.action_space.contains(action):
            raise ValueError(f"Corridor action must be {LEFT} (left) or {RIGHT} (right), got {action!r}")
        self.position = min(max(self.position + (1 if action == RIGHT else -1), 0), self.n - 1)
        self.steps += 1
        terminated = self.position == self.n - 1
        truncated = not terminated and self.steps >= self.max_steps
        reward = (1.0 if terminated else 0.0) - self.step_cost
        return self._observation(), reward, terminated, truncated, {}

    def _observation(self) -> np.ndarray:
        one_hot = np.zeros(self.n, dtype=np.float32)  # (n,)
        one_hot[self.position] = 1.0
        return one_hot
