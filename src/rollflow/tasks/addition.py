"""Multi-digit addition: ``"347+058="`` → ``"504"`` (405 written units digit first).

Operands are zero-padded to ``max_digits`` and the sum is written least-significant digit first, the order in which
a carry propagates; a small transformer learns this form far faster than the usual one (it can emit each digit
from the two digits in the same place and the carry it just produced). The answer is not padded, so the policy
must also decide whether a final carry makes it one digit longer.

Partial credit: the fraction of answer digits right in their place, scaled by ``partial_credit``; an exact answer
scores 1.
"""

from __future__ import annotations

import random

from rollflow.api import Problem, RewardResult
from rollflow.tasks.procedural import ProceduralTask


def digit_credit(response: str, answer: str) -> float:
    """Fraction of ``answer``'s digits matched at the same place (both units first); extra digits count as wrong."""
    if not response.isdigit():
        return 0.0
    right = sum(a == b for a, b in zip(response, answer))
    return right / max(len(answer), len(response))


class AdditionTask(ProceduralTask):
    name = "addition"

    def __init__(
        self,
        min_digits: int = 1,
        max_digits: int = 3,
        partial_credit: float = 0.5,
        eval_size: int = 500,
        eval_seed: int = 12345,
    ) -> None:
        super().__init__(eval_size, eval_seed)
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"task.min_digits={min_digits} must be between 1 and task.max_digits={max_digits}")
        self.min_digits, self.max_digits, self.partial_credit = min_digits, max_digits, partial_credit

    def alphabet(self) -> str:
        return "0123456789+="

    def _number(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    def sample(self, rng: random.Random) -> Problem:
        a, b = self._number(rng), self._number(rng)
        w = self.max_digits
        return Problem(prompt=f"{a:0{w}d}+{b:0{w}d}=", answer=str(a + b)[::-1])

    def reference(self, problem: Problem) -> str:
        return problem.answer

    def verify(self, problem: Problem, response: str) -> RewardResult:
        response = response.strip()
        exact = float(response == problem.answer)
        digits = digit_credit(response, problem.answer)
        reward = 1.0 if exact else self.partial_credit * digits
        return RewardResult(reward, {"exact": exact, "digits": digits, "format": float(response.isdigit())})
