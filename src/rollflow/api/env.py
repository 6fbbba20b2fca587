"""The environment contract of text agents: what a multi-turn agent's world answers to each of its turns.

An environment is async: ``reset(task)`` gives the first observation (the prompt), ``step(action)`` applies one
model turn and may take variable time (it runs the agent's code, calls a tool, plays a game move). A synchronous
environment (``SyncEnv``) is wrapped by ``rollflow.envs.as_async``, which runs its methods in a thread so that the
other episodes' turns go on meanwhile.

``StepResult.info`` carries what the runtime and the trainer read besides the observation:

- ``duration_s``: seconds the action took to execute (set by the environment, or measured by the wrapper); the
  trainer's duration-aware weighting reads it from the trajectory's turns.
- ``status``: the action's outcome class as a ``Status`` value (``ok``; ``agent_error`` when the agent's own action
  failed, e.g. its program crashed or its tool call was malformed; ``timeout`` when it ran too long). An episode ends
  with the status of its last step; an infrastructure fault is not a status an environment returns: it raises, and
  the rollout worker classifies the episode ``infra_error`` (retried, never rewarded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class StepResult:
    """What an environment answers to one model turn."""

    observation: str  # shown to the model next (not shown when ``done``)
    reward: float = 0.0  # this turn's reward; the episode's return sums them (discounted, if the workflow says so)
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)  # "duration_s", "status", and anything to log


@runtime_checkable
class Env(Protocol):
    """A multi-turn text environment (a tool, a code runner, a game): model turns in, observations out."""

    async def reset(self, task: Any) -> str:
        """Start an episode for ``task``; returns the first observation (the prompt)."""
        ...

    async def step(self, action: str) -> StepResult:
        """Apply the model's turn (its text, as decoded)."""
        ...


class SyncEnv(Protocol):
    """The same contract with plain methods; ``rollflow.envs.as_async`` makes it an ``Env``."""

    def reset(self, task: Any) -> str: ...

    def step(self, action: str) -> StepResult: ...
