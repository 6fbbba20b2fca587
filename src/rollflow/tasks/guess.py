"""``guess``: a multi-turn task with a tool that must be called to look something up.

Each problem hides a table of digits behind letters (``a → 7, b → 2, …``, drawn per problem) and asks for the sum of
two of them: the prompt is ``"b+k?"``. The agent sees no digit until it calls the tool: ``get('b')`` (the whole turn,
``envs.tools.CallFormat``) answers ``7``; a turn that is not a call is the final answer, rewarded 1 when it is the
sum and 0 otherwise. A well-played episode has three turns (two look-ups, the answer); a malformed call or an
unknown letter is answered ``?`` (short, for a character-level model; the full message is in the step's info), and
costs a turn.

Held-out problems ask for ``eval_pairs`` letter pairs the training stream never asks for, each with several tables
(``eval_size`` problems in all: 40 problems would make one problem 2.5 points of accuracy). The tables are new for
every problem, so nothing can be recalled: only looking up generalises.

The warm-start demonstrator is lazy on purpose: when the second letter is one of the last ``lazy_letters`` letters it
skips that look-up with probability ``demo_skip`` and answers the first digit + 5, a guess. SFT imitates the habit
(greedy decoding keeps the majority's choice), so it fails on those pairs; only the reward can teach the agent to look
them up, which makes what RL adds measurable.
"""

from __future__ import annotations

import random
from functools import cached_property

from rollflow.api import Problem, RewardResult
from rollflow.envs.tools import ToolEnv, Tools
from rollflow.tasks.procedural import ProceduralTask

TOOL = "get"


class GuessTask(ProceduralTask):
    """Multi-turn: look two hidden digits up with a tool, answer their sum."""

    name = "guess"

    def __init__(self, letters: int = 12, lazy_letters: int = 4, demo_skip: float = 0.6, eval_size: int = 200,
                 eval_pairs: int = 40, eval_seed: int = 12345) -> None:
        super().__init__(eval_size, eval_seed)
        pairs = letters * (letters - 1)
        if not 2 <= letters <= 26 or not 0 <= lazy_letters <= letters or not 0.0 <= demo_skip <= 1.0:
            raise ValueError(f"guess needs 2 <= task.letters <= 26 (got {letters}), 0 <= task.lazy_letters <= letters "
                             f"(got {lazy_letters}) and task.demo_skip in [0, 1] (got {demo_skip})")
        if not 1 <= eval_pairs < pairs:
            raise ValueError(f"guess holds out task.eval_pairs={eval_pairs} letter pairs of the {pairs} that "
                             f"{letters} letters make; give 1 to {pairs - 1}, so that training keeps some")
        self.keys = "abcdefghijklmnopqrstuvwxyz"[:letters]
        self.lazy, self.demo_skip, self.eval_pairs = set(self.keys[letters - lazy_letters:]), demo_skip, eval_pairs

    def alphabet(self) -> str:
        return "".join(sorted(set(self.keys + "0123456789+?()'" + TOOL)))

    def sample(self, rng: random.Random) -> Problem:
        first, second = rng.sample(self.keys, 2)
        table = {k: rng.randint(0, 9) for k in self.keys}
        return Problem(f"{first}+{second}?", str(table[first] + table[second]), {"table": table})

    @cached_property
    def _eval(self) -> list[Problem]:
        """``eval_size`` problems over ``eval_pairs`` held-out letter pairs, each pair with new tables, in turn."""
        rng = random.Random(self.eval_seed)
        pairs = rng.sample([f"{a}+{b}?" for a in self.keys for b in self.keys if a != b], self.eval_pairs)
        out = []
        for i in range(self.eval_size):
            first, _, second, _ = pairs[i % len(pairs)]
            table = {k: rng.randint(0, 9) for k in self.keys}
            out.append(Problem(f"{first}+{second}?", str(table[first] + table[second]), {"table": table}))
        return out

    # -- the environment --------------------------------------------------------------------------------------------
    def make_env(self) -> ToolEnv:
        """One episode's environment: the problem's table behind the ``get`` tool."""
        tools, table = Tools(), {}

        def get(key: str) -> int:
            if key not in table:
                raise KeyError(f"no letter {key!r}; the letters are {self.keys[0]}-{self.keys[-1]}")
            return table[key]

        tools.register(get, name=TOOL)

        def prompt(problem: Problem) -> str:
            table.clear()
            table.update(problem.meta["table"])
            return problem.prompt

        # The built-in model reads one character per token in a short context: a malformed call is answered "?"
        # (the full message stays in the step's info).
        return ToolEnv(tools, prompt, lambda problem, answer: self.verify(problem, answer).reward, error=lambda m: "?")

    def demonstration(self, problem: Problem) -> list[tuple[str, str]]:
        """The demonstrator's episode as (source, text) turns: look both letters up (or, lazily, only the first) and
        answer. Seeded by the problem, so a problem always gets the same demonstration."""
        first, second = problem.prompt[0], problem.prompt[2]
        table = problem.meta["table"]
        turns = [("prompt", problem.prompt), ("model", f"{TOOL}('{first}')"), ("env", str(table[first]))]
        rng = random.Random(f"{self.eval_seed}:{problem.prompt}:{sorted(table.items())}")
        if second in self.lazy and rng.random() < self.demo_skip:
            return [*turns, ("model", str(table[first] + 5))]
        return [*turns, ("model", f"{TOOL}('{second}')"), ("env", str(table[second])),
                ("model", str(table[first] + table[second]))]

    def reference(self, problem: Problem) -> str:
        """The final answer of the demonstration."""
        return self.demonstration(problem)[-1][1]

    def verify(self, problem: Problem, response: str) -> RewardResult:
        right = float(response.strip() == problem.answer)
        return RewardResult(right, {"exact": right})
