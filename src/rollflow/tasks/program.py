"""``program``: the agent writes a short Python program whose printed output must match the target; the program
runs in the code sandbox and is rewarded with partial credit from its instrumented execution.

A problem names an operation and a list: ``"sort 3 9 4"``. A right program is ``x=[3,9,4];print(sorted(x))``
(one line, ``;`` between statements, so a character-level model needs no newline). The operations: ``sum``, ``max``,
``min``, ``len``, ``sort`` (ascending, as a list), ``rev`` (reversed, as a list), each printed the way ``print``
prints the Python value. The target output is that of the reference program, run in the same interpreter.

Scoring (``tasks.partial_credit``): before it runs, the response is instrumented with two stage markers, by the
rule-based instrumenter (``data`` after the first assignment to ``x``, ``printed`` after the first ``print``) or, with
``task.instrumenter`` a local checkpoint, by that frozen model, kept only when it added nothing but markers. A
program that fails (an exception, a timeout, too much memory or output, a kill) gets ``fail_penalty + stage_credit ×
stages reached`` (−1 + 0.1 per stage by default: the paper's −10 swamped the task score under GRPO's normalisation,
see ``config.schema.ProgramTaskConfig``), and its status is ``agent_error`` (an outcome
of the agent, trained on); one that runs gets the task score: 1 if its output (markers removed, surrounding blank
space stripped) is the target, else 0. A sandbox that could not run the program at all is ``infra_error``: the
sample is scored again, never given a reward. The time the program ran is the reward's duration, the "action
duration" that ``algo.duration_weighting`` reads.

The warm-start demonstrator has bugs on purpose, one per operation in ``buggy_ops``, written with probability
``demo_bug`` (seeded by the problem): ``sort`` → ``print(x.sort())`` (prints None), ``rev`` → ``print(x.reverse())``
(None), ``max`` → ``print(x.max())`` (AttributeError). SFT imitates the majority's habit, so it fails those
operations; only executing the program tells the agent which form works.

Held-out problems are lists never seen in training (disjoint prompts), of every operation.
"""

from __future__ import annotations

import random
from functools import cached_property
from typing import Any

from rollflow.api import Problem, RewardResult, Status
from rollflow.envs.instrument import ModelInstrumenter, RuleInstrumenter
from rollflow.envs.sandbox import Sandbox, SandboxError, SandboxLimits
from rollflow.tasks.partial_credit import PartialCredit, score_run, strip_markers
from rollflow.tasks.procedural import ProceduralTask

# operation -> (the right program's last statement, the demonstrator's buggy one)
OPS: dict[str, tuple[str, str]] = {
    "sum": ("print(sum(x))", "print(sum(x))"),
    "max": ("print(max(x))", "print(x.max())"),
    "min": ("print(min(x))", "print(min(x))"),
    "len": ("print(len(x))", "print(len(x))"),
    "sort": ("print(sorted(x))", "print(x.sort())"),
    "rev": ("print(x[::-1])", "print(x.reverse())"),
}
STAGES = ("data", "printed")
RULES = {"data": (r"^\s*x\s*=",), "printed": (r"\bprint\s*\(",)}


def _value(op: str, xs: list[int]) -> Any:
    return {"sum": sum, "max": max, "min": min, "len": len, "sort": sorted, "rev": lambda v: v[::-1]}[op](xs)


class ProgramTask(ProceduralTask):
    """Write a Python program that prints the answer; run in the sandbox, partial credit by stages."""

    name = "program"

    def __init__(self, min_len: int = 2, max_len: int = 4, buggy_ops: tuple[str, ...] = ("max", "sort", "rev"),
                 demo_bug: float = 0.6, fail_penalty: float = -1.0, stage_credit: float = 0.1,
                 timeout_s: float = 5.0, memory_mb: int = 256, isolation: str = "auto", eval_size: int = 300,
                 eval_seed: int = 12345, instrumenter: str = "rules", instrumenter_max_new_tokens: int = 256) -> None:
        super().__init__(eval_size, eval_seed)
        unknown = set(buggy_ops) - set(OPS)
        if unknown or not 1 <= min_len <= max_len or not 0.0 <= demo_bug <= 1.0:
            raise ValueError(f"program needs task.buggy_ops among {sorted(OPS)} (unknown: {sorted(unknown)}), "
                             f"1 <= task.min_len <= task.max_len (got {min_len}, {max_len}) and task.demo_bug in "
                             f"[0, 1] (got {demo_bug})")
        self.min_len, self.max_len, self.buggy_ops, self.demo_bug = min_len, max_len, tuple(buggy_ops), demo_bug
        self.credit = PartialCredit(STAGES, fail_penalty, stage_credit)
        self.limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, isolation=isolation)
        self.rules = RuleInstrumenter(RULES)
        self.instrumenter_path, self.instrumenter_max_new_tokens = instrumenter, instrumenter_max_new_tokens

    @cached_property
    def sandbox(self) -> Sandbox:
        """Made where it is first used (a reward worker's process), so the isolation tier is probed there."""
        return Sandbox(self.limits)

    @cached_property
    def model_instrumenter(self) -> ModelInstrumenter | None:
        """The frozen LM that inserts the markers (``task.instrumenter`` a checkpoint path), loaded where it is first
        used; None with the rules."""
        if self.instrumenter_path == "rules":
            return None
        return ModelInstrumenter.from_checkpoint(self.instrumenter_path, self.rules, self.instrumenter_max_new_tokens)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for local in ("sandbox", "model_instrumenter"):  # each process probes its own tier, loads its own model
            state.pop(local, None)
        return state

    def instrument(self, response: str) -> tuple[str, dict[str, float]]:
        """The response with its stage markers, and (with a model instrumenter) whether the model's were kept."""
        if self.model_instrumenter is None:
            return self.rules.instrument(response, STAGES), {}
        program, outcome = self.model_instrumenter.attempt(response, STAGES)
        return program, {"instrumented_by_model": float(outcome == "accepted")}

    def alphabet(self) -> str:
        programs = "".join(right + bug for right, bug in OPS.values())
        return "".join(sorted(set(" 0123456789[],;=:-x.()" + "".join(OPS) + programs + "None")))

    def sample(self, rng: random.Random) -> Problem:
        op = rng.choice(sorted(OPS))
        xs = [rng.randint(0, 9) for _ in range(rng.randint(self.min_len, self.max_len))]
        return Problem(f"{op} {' '.join(map(str, xs))}", str(_value(op, xs)), {"op": op, "xs": xs})

    def reference(self, problem: Problem) -> str:
        """The demonstrator's program: right, except on ``buggy_ops`` where it writes its bug with ``demo_bug``."""
        op, xs = problem.meta["op"], problem.meta["xs"]
        right, bug = OPS[op]
        rng = random.Random(f"{self.eval_seed}:{problem.prompt}")
        last = bug if op in self.buggy_ops and rng.random() < self.demo_bug else right
        return f"x=[{','.join(map(str, xs))}];{last}"

    def verify(self, problem: Problem, response: str) -> RewardResult:
        program, instrumented = self.instrument(response)
        try:
            run = self.sandbox.run(program)
        except SandboxError:  # the sandbox, not the program, failed: never a reward
            return RewardResult(0.0, {"sandbox_error": 1.0}, Status.INFRA_ERROR)
        status = Status.OK if run.status == "ok" else Status.AGENT_ERROR
        result = score_run(self.credit, run, lambda stdout: float(strip_markers(stdout).strip() == problem.answer),
                           status)
        return RewardResult(result.reward, {**result.breakdown, **instrumented, "run_s": run.duration_s}, result.status)
