"""The sample schema: what every row of the sample store carries.

A row is created when the controller admits a prompt and is filled column by column as stages finish:
``prompt`` (admission) → ``generation`` (rollout) → ``reward`` (reward worker) → consumed by the trainer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class Status(str, enum.Enum):
    """Outcome class of a sample. Only ``ok`` and ``agent_error``/``timeout`` are trained on;
    ``infra_error`` is never turned into a reward: the sample is retried or masked."""

    OK = "ok"
    AGENT_ERROR = "agent_error"
    TIMEOUT = "timeout"
    INFRA_ERROR = "infra_error"


@dataclass(frozen=True)
class Problem:
    """One task instance: the prompt shown to the policy and what the verifier needs to score it."""

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
    """One sampled response. ``logprobs[i]`` and ``versions[i]`` belong to ``response_ids[i]``."""

    response_ids: list[int]
    response_text: str
    logprobs: list[float]
    versions: list[int]
    finish_reason: str  # "eos" | "length"


# Column names of the sample store. Every run fills the first three; ``reference`` (the frozen reference policy's
# per-token log-probs) only when the algorithm uses a KL term. ``NEEDS`` says what a stage reads before it can start.
PROMPT = "prompt"
GENERATION = "generation"
REWARD = "reward"
REFERENCE = "reference"
COLUMNS = (PROMPT, GENERATION, REWARD)
NEEDS = {GENERATION: (PROMPT,), REWARD: (GENERATION,), REFERENCE: (GENERATION,)}


@dataclass
class PromptCell:
    """The ``prompt`` column: filled at admission."""

    group_id: int
    problem: Problem
    prompt_ids: list[int]


@dataclass
class GenerationCell:
    """The ``generation`` column. The controller and the logs read the light fields; ``payload`` is the ``Generation``
    itself (inline backend) or a handle to it in the backend's object store (Ray), resolved only by the worker that
    trains on it, so token ids and log-probs never pass through the driver."""

    response_text: str
    num_tokens: int
    version: int  # the policy version that generated every token (an engine batch never mixes versions)
    finish_reason: str
    payload: Any

    @classmethod
    def of(cls, generation: Generation, payload: Any = None) -> GenerationCell:
        version = min(generation.versions) if generation.versions else -1
        return cls(generation.response_text, len(generation.response_ids), version, generation.finish_reason,
                   generation if payload is None else payload)


@dataclass
class RewardCell:
    """The ``reward`` column: filled by a reward worker."""

    result: RewardResult
    duration: float


@dataclass
class SampleRow:
    """A complete row as handed to a consumer. Timestamps are ``time.time()`` seconds."""

    uid: int
    prompt: PromptCell
    generation: GenerationCell
    reward: RewardCell
    timestamps: dict[str, float]
    reference: list[float] | None = None  # per response token, when the run has a reference column

    @property
    def group_id(self) -> int:
        return self.prompt.group_id

    @property
    def status(self) -> Status:
        return self.reward.result.status

    @property
    def duration(self) -> float:
        """Seconds from start of generation to the reward being known."""
        return self.timestamps["finished"] - self.timestamps["started"]
