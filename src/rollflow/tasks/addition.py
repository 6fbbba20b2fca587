"""Multi-digit addition: ``"347+058="`` → ``"504"`` (405 written units digit first).

Operands are zero-padded to ``max_digits`` and the sum is written least-significant digit first, the order in which
a carry propagates; a small transformer learns this form far faster than the usual one (it can emit each digit
from the two digits in the same place and the carry it just produced). The answer is not padded, so the policy
must also decide whether a final carry makes it one digit longer.

Partial credit: the fraction of answer digits right in their place, scaled by ``partial_credit``; an exact answer
scores 1.

The warm-start demonstrator is imperfect on purpose, as real demonstrations are: ``reference`` forgets each carry with
probability ``demo_carry_drop`` (seeded by the prompt, so a problem always gets the same demonstration). SFT on it
learns the digit-by-digit algorithm but stays split about carries; only the verifier, which always checks the true
sum, can settle them, so what RL adds over SFT is measurable. With ``demo_carry_drop=0`` the references are exact
(measured here: 800 SFT steps then reach about 0.95 alone, and GRPO at this scale only sharpens what the policy
already samples — it does not learn carrying from scratch).
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
        demo_carry_drop: float = 0.5,
        eval_size: int = 500,
        eval_seed: int = 12345,
    ) -> None:
        super().__init__(eval_size, eval_seed)
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"task.min_digits={min_digits} must be between 1 and task.max_digits={max_digits}")
        if not 0.0 <= demo_carry_drop <= 1.0:
            raise ValueError(f"task.demo_carry_drop={demo_carry_drop} must be a probability in [0, 1]")
        self.min_digits, self.max_digits, self.partial_credit = min_digits, max_digits, partial_credit
        self.demo_carry_drop = demo_carry_drop

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
        """The demonstrator's answer: column addition, units first, forgetting each carry with ``demo_carry_drop``."""
        if self.demo_carry_drop == 0.0:
            return problem.answer
        rng = random.Random(f"{self.eval_seed}:{problem.prompt}")
        a, b = problem.prompt[:-1].split("+")
        digits, carry = [], 0
        for x, y in zip(reversed(a), reversed(b)):
            s = int(x) + int(y) + carry
            digits.append(s % 10)
            carry = 1 if s >= 10 and rng.random() >= self.demo_carry_drop else 0
        digits.append(carry)
        while len(digits) > 1 and digits[-1] == 0:  # no leading zeros (trailing, units first)
            digits.pop()
        return "".join(map(str, digits))

    def verify(self, problem: Problem, response: str) -> RewardResult:
        response = response.strip()
        exact = float(response == problem.answer)
        digits = digit_credit(response, problem.answer)
        reward = 1.0 if exact else self.partial_credit * digits
        return RewardResult(reward, {"exact": exact, "digits": digits, "format": float(response.isdigit())})
