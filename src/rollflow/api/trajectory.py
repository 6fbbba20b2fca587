"""What a rollout workflow produces: a ``Trajectory`` of a text agent, or a ``Fragment`` of a simulator agent.

A trajectory keeps every token exactly as it was produced (the prompt, each model turn, each environment turn) with
per-token columns: the loss mask (model tokens 1, everything else 0), the behaviour log-prob and the policy version
of each model token, and the turns' boundaries and wall-clock spans. Nothing is ever re-tokenised: the trainer
trains on these ids. A fragment is the same idea for non-text agents: T steps of one environment as tensors of any
shape, each step with the log-prob and policy version of its action.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from rollflow.api.sample import Generation, RewardResult, Status

PROMPT, MODEL, ENV = "prompt", "model", "env"  # who added a turn's tokens


@dataclass(frozen=True)
class Turn:
    """Tokens ``[start, end)`` of a trajectory, added by ``source`` between ``started`` and ``finished``."""

    start: int
    end: int
    source: str  # PROMPT | MODEL | ENV
    started: float
    finished: float

    @property
    def duration(self) -> float:
        return self.finished - self.started


@dataclass
class Trajectory:
    """One episode of a text agent. ``tokens``, ``loss_mask``, ``logprobs`` and ``versions`` have one entry per token;
    ``logprobs`` is 0 and ``versions`` -1 where ``loss_mask`` is 0 (tokens the model did not choose)."""

    tokens: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    versions: list[int]
    turns: list[Turn]
    text: str  # what a verifier reads: the model's final answer
    finish_reason: str = "eos"
    status: Status = Status.OK
    reward: RewardResult | None = None  # given by the environment; None: a reward stage scores ``text``
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if not len(self.loss_mask) == len(self.logprobs) == len(self.versions) == n:
            raise ValueError(f"trajectory columns differ in length: tokens {n}, loss_mask {len(self.loss_mask)}, "
                             f"logprobs {len(self.logprobs)}, versions {len(self.versions)}")

    @property
    def version(self) -> int:
        """The lowest policy version of its model tokens (-1 if it has none)."""
        return min((v for v, m in zip(self.versions, self.loss_mask) if m), default=-1)

    @property
    def size(self) -> int:
        """Model tokens (what the trainer trains on)."""
        return sum(self.loss_mask)

    @property
    def prompt_length(self) -> int:
        """Tokens before the first model token."""
        return next((i for i, m in enumerate(self.loss_mask) if m), len(self.tokens))

    @property
    def started(self) -> float:
        return self.turns[0].started if self.turns else 0.0

    @property
    def finished(self) -> float:
        return self.turns[-1].finished if self.turns else 0.0


class TrajectoryBuilder:
    """Appends turns as an episode runs. A workflow writes to the one its context holds, so that an episode cut off
    by its timeout still leaves what it produced so far."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []
        self.turns: list[Turn] = []
        self.last_text = ""
        self.last_finish = "eos"

    def prompt(self, ids: list[int], started: float | None = None) -> None:
        self._add(ids, PROMPT, started)

    def env(self, ids: list[int], started: float | None = None) -> None:
        """Environment or tool tokens: part of the context, never trained."""
        self._add(ids, ENV, started)

    def model(self, generation: Generation, started: float | None = None) -> None:
        """A model turn: its tokens, log-probs and versions exactly as the engine produced them."""
        start = len(self.tokens)
        self.tokens += generation.response_ids
        self.loss_mask += [1] * len(generation.response_ids)
        self.logprobs += generation.logprobs
        self.versions += generation.versions
        now = time.time()
        self.turns.append(Turn(start, len(self.tokens), MODEL, now if started is None else started, now))
        self.last_text, self.last_finish = generation.response_text, generation.finish_reason

    def _add(self, ids: list[int], source: str, started: float | None) -> None:
        start = len(self.tokens)
        self.tokens += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.versions += [-1] * len(ids)
        now = time.time()
        self.turns.append(Turn(start, len(self.tokens), source, now if started is None else started, now))

    def build(self, text: str | None = None, status: Status = Status.OK, reward: RewardResult | None = None,
              finish_reason: str | None = None, **info: Any) -> Trajectory:
        """The trajectory so far; ``text`` defaults to the last model turn's text."""
        return Trajectory(list(self.tokens), list(self.loss_mask), list(self.logprobs), list(self.versions),
                          list(self.turns), self.last_text if text is None else text,
                          finish_reason or self.last_finish, status, reward, info)


@dataclass
class Fragment:
    """T consecutive steps of one simulator environment (an episode may end and restart inside it).

    ``observations`` holds T + 1 observations: the one each action saw, and the one after the last step (for
    bootstrapping a value). ``dones[t]``: the episode ended with step t (terminated or truncated);
    ``terminated[t]``: it ended in a terminal state (nothing follows; a truncated episode, cut by a time limit, still
    had a future worth bootstrapping). ``final_observations``: the last observation of each episode that ended, in
    step order (the environment was reset right after, so ``observations[t + 1]`` is the next episode's first);
    ``next_observations()`` puts them in place. Without ``terminated`` every end counts as terminal; without
    ``final_observations`` an ended episode has no observation after it (``next_observations`` refuses)."""

    observations: torch.Tensor  # (T + 1, *obs)
    actions: torch.Tensor  # (T, *act)
    rewards: torch.Tensor  # (T,)
    dones: torch.Tensor  # (T,) bool
    logprobs: torch.Tensor  # (T,) behaviour log-prob of each action
    versions: torch.Tensor  # (T,) long, policy version that chose each action
    terminated: torch.Tensor | None = None  # (T,) bool, a subset of dones; None: every done is terminal
    final_observations: torch.Tensor | None = None  # (number of dones, *obs)
    started: float = 0.0
    finished: float = 0.0
    episode_returns: list[float] = field(default_factory=list)  # undiscounted returns of episodes that ended in it
    status: Status = Status.OK
    info: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    finish_reason: str = "length"
    reward: RewardResult | None = None

    def __post_init__(self) -> None:
        T = self.actions.shape[0]
        if self.observations.shape[0] != T + 1 or not self.rewards.shape == self.dones.shape == self.logprobs.shape == self.versions.shape == (T,):
            raise ValueError(f"fragment of {T} steps needs {T + 1} observations and ({T},) rewards, dones, logprobs, "
                             f"versions; got {self.observations.shape[0]}, {tuple(self.rewards.shape)}, "
                             f"{tuple(self.dones.shape)}, {tuple(self.logprobs.shape)}, {tuple(self.versions.shape)}")
        if self.terminated is None:
            self.terminated = self.dones.bool().clone()
        elif self.terminated.shape != (T,) or bool((self.terminated.bool() & ~self.dones.bool()).any()):
            raise ValueError(f"fragment of {T} steps needs ({T},) terminated within dones (a terminated step is done); "
                             f"got shape {tuple(self.terminated.shape)}")
        ends = int(self.dones.bool().sum())
        if self.final_observations is not None and (
                self.final_observations.shape[0] != ends or self.final_observations.shape[1:] != self.observations.shape[1:]):
            raise ValueError(f"fragment with {ends} episode ends needs final_observations of shape "
                             f"({ends}, {', '.join(map(str, self.observations.shape[1:]))}); "
                             f"got {tuple(self.final_observations.shape)}")

    @property
    def truncated(self) -> torch.Tensor:
        """(T,) bool: the episode was cut with step t (done, not terminated)."""
        return self.dones.bool() & ~self.terminated.bool()

    def next_observations(self) -> torch.Tensor:
        """(T, *obs): the observation after each step, before any reset: ``observations[1:]`` with each ended step's
        final observation in its place (what a value bootstraps from after a truncation)."""
        after = self.observations[1:].clone()
        ended = self.dones.bool()
        if bool(ended.any()):
            if self.final_observations is None:
                raise ValueError("this fragment has episode ends but no final_observations: the observation after an "
                                 "ended step is unknown (record them in the workflow, as GymFragments does)")
            after[ended] = self.final_observations.to(after.dtype)
        return after

    @property
    def version(self) -> int:
        return int(self.versions.min()) if self.versions.numel() else -1

    @property
    def size(self) -> int:
        return self.actions.shape[0]


@dataclass
class TrajectoryCell:
    """The light facts of a produced trajectory or fragment, which the controller and the logs read. ``payload`` is
    the object itself (inline backend) or a handle to it in the backend's object store (Ray), resolved only by the
    worker that consumes it, so token ids and tensors never pass through the driver."""

    version: int  # the lowest policy version of any trained token or action
    size: int  # trained tokens / steps
    status: Status
    text: str
    finish_reason: str
    started: float
    finished: float
    reward: RewardResult | None
    info: dict[str, Any]
    payload: Any

    @classmethod
    def of(cls, t: Trajectory | Fragment, payload: Any = None) -> TrajectoryCell:
        return cls(t.version, t.size, t.status, t.text, t.finish_reason, t.started, t.finished, t.reward, t.info,
                   t if payload is None else payload)
