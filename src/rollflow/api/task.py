"""Task and reward-function contracts: a verifiable task, and an agent task (one with an environment)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

from rollflow.api.env import Env, SyncEnv
from rollflow.api.sample import Problem, RewardResult

# A user reward function: (problem, response text) -> reward or a full verdict.
RewardFn = Callable[[Problem, str], "float | RewardResult"]


@runtime_checkable
class Task(Protocol):
    """A verifiable task: a stream of training problems, a held-out set disjoint from it, a reference
    solution for the SFT warm start, and a verifier."""

    name: str

    def alphabet(self) -> str:
        """Every character a prompt or answer may contain; the built-in tokenizer is made from it."""
        ...

    def train_problems(self, seed: int) -> Iterator[Problem]:
        """An endless, seeded stream of training problems, none of them in ``eval_problems()``."""
        ...

    def eval_problems(self) -> list[Problem]: ...

    def reference(self, problem: Problem) -> str:
        """A correct response (the SFT target)."""
        ...

    def verify(self, problem: Problem, response: str) -> RewardResult: ...


@runtime_checkable
class AgentTask(Task, Protocol):
    """A task whose episodes are multi-turn: the agent loop plays each problem against an environment, and the SFT
    warm start imitates whole demonstrated episodes."""

    def make_env(self) -> Env | SyncEnv:
        """A fresh environment for one episode; the loop resets it with the problem."""
        ...

    def demonstration(self, problem: Problem) -> list[tuple[str, str]]:
        """A demonstrated episode as (source, text) turns: ``"prompt"`` first, then ``"model"`` turns (trained, each
        ending with EOS) and ``"env"`` observations (context only)."""
        ...
