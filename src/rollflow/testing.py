"""Fakes for testing code built on rollflow (and rollflow itself), shipped with the library.

- ``FakeEngine``: an ``InferenceEngine`` that answers from a script, records every batch it is asked for, and takes
  weight versions as a real engine would (one version per batch, per-token versions in every generation).
- ``FakeTextEnv``: an ``Env`` whose steps take scripted, variable time and answer from a script.
- ``ScriptedBackend``: an inline backend on a virtual clock: every call runs when submitted, and finishes after the
  duration a script gives it, so calls complete out of submission order, the same way on every run.

They are small on purpose: a test reads what they did (``FakeEngine.batches``, ``FakeTextEnv.actions``,
``ScriptedBackend.finished``) and asserts on it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Any

from rollflow.api import Generation, SamplingParams, StepResult, VersionedWeights
from rollflow.runtime.backend import InlineBackend


class FakeEngine:
    """``respond(prompt_ids) -> response ids`` (default: the prompt's last id plus one, then ``eos``). Every response
    token gets log-prob ``logprob`` and the engine's version; ``text`` turns ids into the response text."""

    def __init__(self, respond: Callable[[list[int]], list[int]] | None = None, eos: int = 0, logprob: float = -0.5,
                 text: Callable[[list[int]], str] = lambda ids: " ".join(map(str, ids))) -> None:
        self.respond = respond or (lambda ids: [ids[-1] + 1, eos])
        self.eos, self.logprob, self.text = eos, logprob, text
        self.batches: list[list[list[int]]] = []  # the prompts of every generate call, in order
        self.loaded: list[int] = []  # versions loaded, in order
        self._version = 0

    @property
    def version(self) -> int:
        return self._version

    def load_weights(self, weights: VersionedWeights) -> None:
        self.loaded.append(weights.version)
        self._version = weights.version

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Generation]:
        self.batches.append([list(p) for p in prompt_ids])
        out = []
        for prompt in prompt_ids:
            ids = self.respond(list(prompt))[: params.max_new_tokens]
            shown = ids[:-1] if ids and ids[-1] == self.eos else ids
            out.append(Generation(ids, self.text(shown), [self.logprob] * len(ids), [self._version] * len(ids),
                                  "eos" if ids and ids[-1] == self.eos else "length"))
        return out


class FakeTextEnv:
    """Answers each action with ``observe(task, turn, action)`` after ``durations(task, turn)`` seconds (an
    ``asyncio.sleep``, so other episodes run meanwhile); done after ``turns`` steps, with ``reward(task, action)`` on the
    last one. ``actions`` records (task, turn, action) in the order they arrived."""

    def __init__(self, turns: int = 2, durations: Callable[[Any, int], float] = lambda task, turn: 0.0,
                 observe: Callable[[Any, int, str], str] = lambda task, turn, action: "1",
                 reward: Callable[[Any, str], float] = lambda task, action: 1.0,
                 prompt: Callable[[Any], str] = str) -> None:
        self.turns, self.durations, self.observe, self.reward, self.prompt = turns, durations, observe, reward, prompt
        self.actions: list[tuple[Any, int, str]] = []
        self.task: Any = None
        self.turn = 0

    async def reset(self, task: Any) -> str:
        self.task, self.turn = task, 0
        return self.prompt(task)

    async def step(self, action: str) -> StepResult:
        await asyncio.sleep(self.durations(self.task, self.turn))
        self.actions.append((self.task, self.turn, action))
        self.turn += 1
        done = self.turn >= self.turns
        reward = self.reward(self.task, action) if done else 0.0
        return StepResult(self.observe(self.task, self.turn, action), reward, done)


class _Scripted:
    def __init__(self, value: Any, error: BaseException | None) -> None:
        self.value, self.error = value, error
        self.finished = False

    def done(self) -> bool:
        return self.finished


class ScriptedBackend(InlineBackend):
    """An inline backend whose calls finish in the order of a virtual clock. ``duration(worker, method, args)``
    says how long each call takes (default 0: submission order); a call submitted at virtual time t finishes at
    t + duration, and ``wait`` hands back the earliest-finishing call still pending and moves the clock there.
    Calls run (to completion, async ones too) when submitted. ``finished`` lists (method, virtual time) in order."""

    name = "scripted"

    def __init__(self, duration: Callable[[Any, str, tuple], float] = lambda worker, method, args: 0.0) -> None:
        super().__init__()
        self.duration = duration
        self.now = 0.0
        self.finished: list[tuple[str, float]] = []
        self._queue: list[tuple[float, int, _Scripted, str]] = []
        self._order = itertools.count()

    def submit(self, worker: Any, method: str, *args: Any, **kwargs: Any) -> _Scripted:
        call = super().submit(worker, method, *args, **kwargs)
        try:
            value, error = super().result(call), None
        except Exception as e:  # handed to whoever asks for the result, as a remote error would be
            value, error = None, e
        scripted = _Scripted(value, error)
        heapq.heappush(self._queue, (self.now + self.duration(worker, method, args), next(self._order), scripted, method))
        return scripted

    def wait(self, calls: list[Any], timeout: float | None = None) -> list[Any]:
        pending = {id(c) for c in calls}
        for at, _, call, method in sorted(self._queue):
            if id(call) in pending:
                self._queue.remove((at, _, call, method))
                heapq.heapify(self._queue)
                self.now = max(self.now, at)
                call.finished = True
                self.finished.append((method, at))
                return [call]
        return []

    def result(self, call: _Scripted) -> Any:
        if call.error is not None:
            raise call.error
        return call.value
