"""The worker roles besides rollout (``runtime.rollout``): reward, reference, trainer. Each wraps a contract from
``api`` and nothing more: the verifier, the frozen reference engine, and the trainer's step function are handed in by
the recipe, so no RL maths lives here.

Workers return what they did with wall-clock spans (``time.time()``), which the controller turns into metrics and
the trace. They never talk to each other: bulk values move through the backend's payload store and weight transport."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    TrainBatch,
    TrainEngine,
    TrainStep,
    TrajectoryCell,
    WeightTransport,
)
from rollflow.runtime.backend import LocalPayloads, Payloads
from rollflow.runtime.group import Mode, dispatch
from rollflow.runtime.stage import Produced, StageOutput


class ReferenceWorker:
    """The frozen reference policy of a KL term: scores trajectories with the weights it took when RL began."""

    def __init__(self, engine: ScoringEngine, transport: WeightTransport, pad_id: int, payloads: Payloads | None = None) -> None:
        self.engine, self.transport, self.pad_id = engine, transport, pad_id
        self.payloads = payloads or LocalPayloads()

    @dispatch(Mode.BROADCAST)
    def freeze(self) -> int:
        """Take the newest published weights (the policy RL starts from) for good; returns their version."""
        latest = self.transport.latest(newer_than=self.engine.version)
        if latest is not None:
            self.engine.load_weights(latest)
        if self.engine.version < 0:
            raise RuntimeError("the reference policy found no published weights: publish the policy before freezing it")
        return self.engine.version

    def score(self, items: list[tuple[int, TrajectoryCell]]) -> StageOutput:
        """``items``: (uid, trajectory cell). Each value: the reference log-prob of every token of the trajectory
        (``api.engines`` convention: entry t scores token t given tokens before it)."""
        started = time.time()
        trajectories = self.payloads.get([cell.payload for _, cell in items])
        logp = self.engine.compute_logprobs(TrainBatch.from_trajectories(trajectories, self.pad_id))  # (B, T)
        finished = time.time()
        return StageOutput([Produced(uid, logp[i, : len(t.tokens)].tolist(), started, finished)
                            for i, ((uid, _), t) in enumerate(zip(items, trajectories))])


class RewardWorker:
    """Scores samples, ``concurrency`` at a time (threads: slow verifiers mostly wait). ``score(task, trajectory
    cell)`` is the recipe's: it reads the light cell (the text, the status, a reward the environment gave)."""

    def __init__(self, score: Callable[[Any, TrajectoryCell], RewardResult], concurrency: int = 1) -> None:
        self.score_one = score
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="reward") if concurrency > 1 else None

    def _one(self, item: tuple[int, Any, TrajectoryCell]) -> Produced:
        uid, task, cell = item
        started, t = time.time(), time.perf_counter()
        result = self.score_one(task, cell)
        return Produced(uid, RewardCell(result, time.perf_counter() - t), started, time.time())

    def score(self, items: list[tuple[int, Any, TrajectoryCell]]) -> StageOutput:
        if self.pool is None or len(items) == 1:
            return StageOutput([self._one(item) for item in items])
        return StageOutput(list(self.pool.map(self._one, items)))


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
