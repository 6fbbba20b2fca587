"""Digit sorting: ``"sort:3172="`` → ``"1237"``.

Partial credit: the fraction of positions holding the right digit (aligned from the left), scaled by
``partial_credit``; an exact answer scores 1. A response of the wrong length is charged for every position it
misses or adds.
"""

from __future__ import annotations

import random

from rollflow.api import Problem, RewardResult
from rollflow.tasks.procedural import ProceduralTask

DIGITS = "0123456789"
PREFIX = "sort:"


def position_credit(response: str, answer: str) -> float:
    """Fraction of ``answer``'s positions that ``response`` matches; extra characters count as wrong."""
    right = sum(a == b for a, b in zip(response, answer))
    return right / max(len(answer), len(response), 1)


class SortingTask(ProceduralTask):
    name = "sorting"

    def __init__(
        self, min_len: int = 3, max_len: int = 6, partial_credit: float = 0.5, eval_size: int = 500, eval_seed: int = 12345
    ) -> None:
        super().__init__(eval_size, eval_seed)
        if not 1 <= min_len <= max_len:
            raise ValueError(f"task.min_len={min_len} must be between 1 and task.max_len={max_len}")
        if not 0.0 <= partial_credit <= 1.0:
            raise ValueError(f"task.partial_credit={partial_credit} must be in [0, 1]")
        if eval_size < 1:
            raise ValueError(f"task.eval_size={eval_size} must be at least 1")
        self.min_len, self.max_len, self.partial_credit = min_len, max_len, partial_credit

    def alphabet(self) -> str:
        return DIGITS + PREFIX + "="

    def sample(self, rng: random.Random) -> Problem:
        digits = "".join(rng.choice(DIGITS) for _ in range(rng.randint(self.min_len, self.max_len)))
        return Problem(prompt=f"{PREFIX}{digits}=", answer="".join(sorted(digits)))

    def reference(self, problem: Problem) -> str:
        return problem.answer

    def verify(self, problem: Problem, response: str) -> RewardResult:
        response = response.strip()
        exact = float(response == problem.answer)
        positions = position_credit(response, problem.answer)
        reward = 1.0 if exact else self.partial_credit * positions
        # The answer is the input's digits in order, so this asks "is the response a permutation of the input?".
        permutation = float("".join(sorted(response)) == problem.answer)
        return RewardResult(reward, {"exact": exact, "positions": positions, "format": permutation})
