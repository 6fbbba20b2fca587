"""Shared machinery of procedurally generated tasks: a seeded stream and a disjoint held-out set."""

from __future__ import annotations

import random
from collections.abc import Iterator
from functools import cached_property

from rollflow.api import Problem


class ProceduralTask:
    """Subclasses implement ``sample(rng)``, ``reference``, ``verify`` and ``alphabet``.

    The held-out set is drawn from its own seed; the training stream skips every prompt in it, so
    evaluation measures generalisation to unseen problems, not recall.
    """

    name = "procedural"

    def __init__(self, eval_size: int, eval_seed: int) -> None:
        self.eval_size = eval_size
        self.eval_seed = eval_seed

    def sample(self, rng: random.Random) -> Problem:
        raise NotImplementedError

    @cached_property
    def _eval(self) -> list[Problem]:
        rng, seen, out = random.Random(self.eval_seed), set(), []
        for _ in range(100 * self.eval_size):
            p = self.sample(rng)
            if p.prompt not in seen:
                seen.add(p.prompt)
                out.append(p)
                if len(out) == self.eval_size:
                    return out
        raise ValueError(
            f"task '{self.name}' has fewer than eval_size={self.eval_size} distinct problems; "
            "lower task.eval_size or widen the task"
        )

    @cached_property
    def _eval_prompts(self) -> frozenset[str]:
        return frozenset(p.prompt for p in self._eval)

    def eval_problems(self) -> list[Problem]:
        return list(self._eval)

    def train_problems(self, seed: int) -> Iterator[Problem]:
        rng = random.Random(seed)
        while True:
            p = self.sample(rng)
            if p.prompt not in self._eval_prompts:
                yield p
