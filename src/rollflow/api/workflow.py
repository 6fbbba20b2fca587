"""Rollout workflows: how one task instance becomes one trajectory (or fragment).

A workflow is one async method. It may call the inference engine several times and an environment in between, and
returns what it produced, or ``Reject`` to say that this task instance should not be trained on (its group is
dropped and replaced). Rollout workers run many episodes at once; the engine batches whatever requests are waiting.

Every engine and environment call goes through the episode's context, which applies the run's timeouts and
classifies faults: an environment call that runs past ``env_timeout``, or an episode past ``episode_timeout``, is the
agent's outcome (``Status.TIMEOUT``, trained with what it produced so far); an engine that does not answer, or an
environment that raises, is the infrastructure's (``InfraError`` → ``Status.INFRA_ERROR``: retried, then masked).
Any other exception from the workflow's own code is a bug and stops the run with its message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from rollflow.api.sample import Generation, SamplingParams
from rollflow.api.trajectory import Fragment, Trajectory, TrajectoryBuilder

T = TypeVar("T")


class InfraError(RuntimeError):
    """The infrastructure failed an episode (the engine did not answer, the environment crashed): never a reward."""


@dataclass(frozen=True)
class Reject:
    """Returned by a workflow instead of a trajectory: do not train on this task instance."""

    reason: str = ""


class EngineClient(Protocol):
    """The policy as a workflow sees it: requests from concurrent episodes are batched into one engine call, each
    between two weight pick-ups (a call never mixes versions)."""

    @property
    def version(self) -> int:
        """The version of the weights the engine holds now (the next request may run on a newer one)."""
        ...

    async def generate(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Generation:
        """Sample one response to ``prompt_ids`` (a text policy)."""
        ...

    async def act(self, observation: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """Sample one action for ``observation`` (a non-text policy): (action, its log-prob, the policy version)."""
        ...

    async def act_batch(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Sample one action for each of ``observations`` (N, *obs) in one forward pass: actions (N, *act),
        log-probs (N,), the policy version. For a workflow that steps several environments in lockstep."""
        ...


class EpisodeContext(Protocol):
    """What the runtime gives one episode."""

    engine: EngineClient  # a request without sampling parameters is sampled with ``params``
    params: SamplingParams  # this episode's: the run's, or greedy decoding when it is an evaluation
    trajectory: TrajectoryBuilder  # write text turns here: an episode cut off by its timeout keeps what it has

    async def env(self, fn: Callable[..., T | Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Call the environment (``fn`` sync or async) under the run's ``env_timeout``: past it the episode ends as
        ``Status.TIMEOUT``; an exception from ``fn`` ends it as ``Status.INFRA_ERROR``."""
        ...


class RolloutWorkflow(Protocol):
    """Produces one trajectory for one task instance. ``task`` is the value of the store's admission column
    (a ``Problem`` for text tasks, whatever the recipe admits otherwise)."""

    async def run(self, task: Any, ctx: EpisodeContext) -> Trajectory | Fragment | Reject: ...


class BatchWorkflow(Protocol):
    """Produces one trajectory (or fragment) for each task instance of a rollout call, all together: a vectorised
    simulator actor steps one environment per instance in lockstep, with one engine request per step for all of
    them. A rollout worker calls ``run_batch`` instead of ``run`` when the workflow has it.

    The context's timeouts apply to the whole call; faults of one instance are the workflow's to classify (it returns
    that instance's ``Trajectory`` built with the status, e.g. ``Status.INFRA_ERROR``, and the others as usual)."""

    async def run_batch(self, tasks: list[Any], ctx: EpisodeContext) -> list[Trajectory | Fragment | Reject]: ...
