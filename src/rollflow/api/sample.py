"""The sample schema: what a task instance, a verdict and a store row are.

The store's columns are not fixed here: a recipe declares them (``Column``: its name, the columns a stage reads
before it can fill it, whether its values carry policy versions). GRPO's are ``task`` (filled at admission) →
``trajectory`` (rollout) → ``reward`` and ``reference`` (side by side); a simulator recipe has just ``task`` →
``fragment``. A row handed to a consumer is a ``SampleRow``: its cells by column name, and its timestamps.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Status(str, enum.Enum):
    """Outcome class of a sample. ``ok``, ``agent_error`` and ``timeout`` are trained on (an agent's fault is an
    outcome with its own reward); ``infra_error`` never is: the sample is retried, then masked and counted."""

    OK = "ok"
    AGENT_ERROR = "agent_error"
    TIMEOUT = "timeout"
    INFRA_ERROR = "infra_error"


@dataclass(frozen=True)
class Problem:
    """One task instance of a text task: the prompt shown to the policy and what the verifier needs to score it."""

    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RewardResult:
    """A verifier's verdict: the scalar reward, its named parts, and the outcome class."""

    reward: float
    breakdown: dict[str, float] = field(default_factory=dict)
    status: Status = Status.OK


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 16
    greedy: bool = False


@dataclass
class Generation:
    """One sampled response of an inference engine. ``logprobs[i]`` and ``versions[i]`` belong to ``response_ids[i]``."""

    response_ids: list[int]
    response_text: str
    logprobs: list[float]
    versions: list[int]
    finish_reason: str  # "eos" | "length"


@dataclass(frozen=True)
class Column:
    """One column of the sample store, declared by the recipe.

    ``reads``: the columns a row must have before this one can be produced (empty for the admission column, which is
    the first one declared). ``versioned``: its values carry ``.version``, the lowest policy version of the tokens
    they hold; the store's staleness deadline reads it."""

    name: str
    reads: tuple[str, ...] = ()
    versioned: bool = False


@dataclass
class RewardCell:
    """A reward column's value: the verdict and how long computing it took."""

    result: RewardResult
    duration: float

    @property
    def status(self) -> Status:
        return self.result.status


@dataclass
class SampleRow:
    """A complete row as handed to a consumer: its cells by column name. Timestamps are ``time.time()`` seconds
    (``admitted``, ``started`` and ``finished`` of its production, ``consumed``)."""

    uid: int
    group_id: int
    cells: dict[str, Any]
    timestamps: dict[str, float]

    def __getitem__(self, column: str) -> Any:
        return self.cells[column]

    def get(self, column: str, default: Any = None) -> Any:
        return self.cells.get(column, default)

    @property
    def status(self) -> Status:
        """The first non-``ok`` status among the cells that have one (in column order), else ``ok``."""
        for cell in self.cells.values():
            status = getattr(cell, "status", Status.OK)
            if status is not Status.OK:
                return status
        return Status.OK

    @property
    def duration(self) -> float:
        """Seconds from the start of its production to its last column."""
        return self.timestamps["finished"] - self.timestamps["started"]
