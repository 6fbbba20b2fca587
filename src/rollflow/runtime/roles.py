"""The worker roles besides rollout (``runtime.rollout``): reward, reference, trainer. Each wraps a contract from
``api`` and nothing more: the verifier, the frozen reference engine, and the trainer's step function are handed in by
the recipe, so no RL maths lives here.

Workers return what they did with wall-clock spans (``time.time()``), which the controller turns into metrics and
the trace. They never talk to each other: bulk values move through the backend's payload store and weight transport."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass
from typing import Any

import torch

from rollflow.api import (
    CriticEngine,
    LossFn,
    RewardCell,
    RewardResult,
    SampleRow,
    ScoringEngine,
    Status,
    TrainBatch,
    TrainEngine,
    TrainStep,
    TrajectoryCell,
    WeightTransport,
)
from rollflow.runtime.backend import LocalPayloads, Payloads
from rollflow.runtime.group import Mode, dispatch
from rollflow.runtime.stage import Produced, StageOutput
from rollflow.runtime.threads import DaemonPool

REFERENCE = "reference"  # the pinned weights the reference policy scores with


class ReferenceWorker:
    """The frozen reference policy of a KL term: scores trajectories with the weights it took when RL began."""

    def __init__(self, engine: ScoringEngine, transport: WeightTransport, pad_id: int, payloads: Payloads | None = None) -> None:
        self.engine, self.transport, self.pad_id = engine, transport, pad_id
        self.payloads = payloads or LocalPayloads()

    @dispatch(Mode.BROADCAST)
    def freeze(self) -> int:
        """Load the reference weights the driver pinned (``transport.pin(REFERENCE)``: the policy RL starts from)
        and keep them; returns their version. A worker rebuilt after a crash loads them again at its first call."""
        if self.engine.version < 0:
            pinned = self.transport.pinned(REFERENCE)
            if pinned is None:
                raise RuntimeError("the reference policy found no pinned weights: pin the policy before freezing it")
            self.engine.load_weights(pinned)
        return self.engine.version

    def score(self, items: list[tuple[int, TrajectoryCell]]) -> StageOutput:
        """``items``: (uid, trajectory cell). Each value: the reference log-prob of every token of the trajectory
        (``api.engines`` convention: entry t scores token t given tokens before it)."""
        self.freeze()
        started = time.time()
        trajectories = self.payloads.get([cell.payload for _, cell in items])
        logp = self.engine.compute_logprobs(TrainBatch.from_trajectories(trajectories, self.pad_id))  # (B, T)
        finished = time.time()
        return StageOutput([Produced(uid, logp[i, : len(t.tokens)].tolist(), started, finished)
                            for i, ((uid, _), t) in enumerate(zip(items, trajectories))])


class RewardWorker:
    """Scores samples, ``concurrency`` at a time over all of its calls (threads: slow verifiers mostly wait).
    ``score(task, trajectory cell)`` is the recipe's: it reads the light cell (the text, the status, a reward the
    environment gave).

    With a ``timeout``, a sample whose score runs longer than ``timeout`` seconds (counted from when a thread takes
    it) is given up on: its value is ``infra_error`` with the breakdown ``{"timeout_s": timeout}`` (the controller
    scores it again on the same trajectory, up to its retries, then masks it). Python cannot kill a thread: the hung
    one is abandoned, still running, and a fresh thread takes its place (``runtime.threads.DaemonPool``); the Ray
    backend's call timeout can also kill a worker process that hangs as a whole."""

    def __init__(self, score: Callable[[Any, TrajectoryCell], RewardResult], concurrency: int = 1,
                 timeout: float | None = None) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"reward timeout must be a positive number of seconds or None, got {timeout!r}")
        self.score_one, self.timeout = score, timeout
        # Concurrency 1 without a timeout scores in the caller's thread: nothing to overlap, nothing to give up on.
        self.pool = DaemonPool(concurrency, "reward") if concurrency > 1 or timeout is not None else None

    def _one(self, item: tuple[int, Any, TrajectoryCell]) -> Produced:
        uid, task, cell = item
        started, t = time.time(), time.perf_counter()
        result = self.score_one(task, cell)
        return Produced(uid, RewardCell(result, time.perf_counter() - t), started, time.time())

    def score(self, items: list[tuple[int, Any, TrajectoryCell]]) -> StageOutput:
        if self.pool is None:
            return StageOutput([self._one(item) for item in items])
        pending = {self.pool.submit(self._one, item): i for i, item in enumerate(items)}
        values: list[Produced | None] = [None] * len(items)
        while pending:
            # Sleep until a value arrives or the oldest running sample runs out of time; a sample still queued
            # (every thread busy) has no deadline yet, so look again after one timeout at most.
            began = [job.began for job in pending if job.began is not None]
            deadline = min(began) + self.timeout if began and self.timeout is not None else None
            wait_s = self.timeout if deadline is None else max(0.0, deadline - time.perf_counter())
            wait([job.future for job in pending], timeout=wait_s, return_when=FIRST_COMPLETED)
            now = time.perf_counter()
            for job, i in list(pending.items()):
                if job.future.done():
                    values[i] = job.future.result()  # the reward's own error, if it raised, stops the call
                elif (self.timeout is not None and job.began is not None and now - job.began >= self.timeout
                      and self.pool.abandon(job)):
                    verdict = RewardResult(0.0, {"timeout_s": self.timeout}, Status.INFRA_ERROR)
                    values[i] = Produced(items[i][0], RewardCell(verdict, now - job.began), job.began_at, time.time())
                else:
                    continue
                del pending[job]
        return StageOutput(values)  # type: ignore[arg-type]  # every slot is filled once `pending` is empty


@dataclass
class TrainResult:
    metrics: dict[str, float]
    version: int  # the trainer's version after the step (published)
    started: float
    finished: float
    publish_started: float


class TrainerWorker:
    """Holds the training engine (and the critic, if any) and runs the recipe's ``step`` on each batch of groups,
    then publishes the new version."""

    def __init__(self, engine: TrainEngine, transport: WeightTransport, step: TrainStep,
                 payloads: Payloads | None = None, critic: CriticEngine | None = None) -> None:
        self.engine, self.transport, self.step, self.critic = engine, transport, step, critic
        self.payloads = payloads or LocalPayloads()

    @dispatch(Mode.FIRST)
    def train(self, groups: list[list[SampleRow]]) -> TrainResult:
        """One RL step: resolve the trajectories from the payload store, ``step``, publish the new version."""
        started = time.time()
        metrics = self.step(self._resolve(groups), self.engine, self.critic)
        publish_started = time.time()
        metrics["time/publish"] = self.publish()
        return TrainResult(metrics, self.engine.version, started, time.time(), publish_started)

    def _resolve(self, groups: list[list[SampleRow]]) -> list[list[SampleRow]]:
        """Copies of the rows with each trajectory cell replaced by the trajectory (or fragment) it stands for (the
        caller's rows keep their light cells, on every backend)."""
        cells = [c for g in groups for r in g for c in r.cells.values() if isinstance(c, TrajectoryCell)]
        full = dict(zip(map(id, cells), self.payloads.get([c.payload for c in cells])))
        return [[SampleRow(r.uid, r.group_id, {k: full.get(id(c), c) for k, c in r.cells.items()}, r.timestamps) for r in g]
                for g in groups]

    @dispatch(Mode.FIRST)
    def sft(self, batch: TrainBatch, loss_fn: LossFn, lr: float | None = None) -> dict[str, float]:
        """One supervised step on a batch (one update, at ``lr`` if given); does not publish."""
        if lr is not None:
            self.engine.set_lr(lr)  # type: ignore[attr-defined]
        return self.engine.train_step(batch, loss_fn, 1, 1)

    @dispatch(Mode.FIRST)
    def init_critic(self) -> bool:
        """Start the critic (if any) from the policy as it is now, i.e. after SFT; returns whether there is one."""
        if self.critic is None:
            return False
        self.critic.init_from(self.engine.model)  # type: ignore[attr-defined]  # the policy lives in the engine
        return True

    @dispatch(Mode.FIRST)
    def freeze_reference(self) -> int:
        """Keep the policy as it is now as the engine's frozen reference (a simulator recipe's KL term to its warm
        start); returns the version kept."""
        self.engine.freeze_reference()  # type: ignore[attr-defined]
        return self.engine.version

    @dispatch(Mode.FIRST)
    def set_threads(self, n: int) -> None:
        """torch threads of the trainer's process, per phase (SFT runs alone; RL shares the cores with rollout)."""
        torch.set_num_threads(n)

    @dispatch(Mode.FIRST)
    def set_lr(self, lr: float) -> None:
        self.engine.set_lr(lr)  # type: ignore[attr-defined]

    @dispatch(Mode.FIRST)
    def version(self) -> int:
        return self.engine.version

    @dispatch(Mode.FIRST)
    def publish(self) -> float:
        """Publish the current weights as a new version; returns the seconds it took."""
        t = time.perf_counter()
        self.transport.publish(self.engine.export_weights())
        return time.perf_counter() - t

    @dispatch(Mode.FIRST)
    def save(self, save: Callable[[Any], None]) -> None:
        """Run ``save(model)`` where the model lives (e.g. writing a Hugging Face checkpoint)."""
        save(self.engine.model)  # type: ignore[attr-defined]

    @dispatch(Mode.FIRST)
    def save_state(self, path: str) -> int:
        """Write the engine's and the critic's state (weights, optimizer, RNG, version) to ``path`` (a checkpoint
        folder on a filesystem the driver reads); returns the version saved."""
        state = {"engine": self.engine.state_dict(), "critic": self.critic.state_dict() if self.critic else None}
        torch.save(state, path)
        return self.engine.version

    @dispatch(Mode.FIRST)
    def load_state(self, path: str) -> int:
        """Continue from ``save_state``'s file; returns the version restored (published by the caller)."""
        state = torch.load(path, weights_only=False)
        self.engine.load_state_dict(state["engine"])
        if self.critic is not None:
            if state["critic"] is None:
                raise RuntimeError(f"{path} holds no critic state, but this run trains a critic")
            self.critic.load_state_dict(state["critic"])
        return self.engine.version
