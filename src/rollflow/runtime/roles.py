"""The worker roles of an RL run: rollout, reward, trainer. Each wraps a contract from ``api`` and nothing more;
the algorithm (advantage estimator, loss) is handed to the trainer by the recipe."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rollflow.api import (
    Generation,
    InferenceEngine,
    LossFn,
    Problem,
    RewardCell,
    RewardResult,
    SampleRow,
    SamplingParams,
    Status,
    TrainEngine,
    WeightTransport,
)
from rollflow.runtime.batch import collate
from rollflow.runtime.group import Mode, dispatch


@dataclass
class Generated:
    uid: int
    generation: Generation
    started: float
    finished: float


class RolloutWorker:
    def __init__(self, engine: InferenceEngine, transport: WeightTransport, params: SamplingParams) -> None:
        self.engine, self.transport, self.params = engine, transport, params
        self.load_seconds = 0.0

    @dispatch(Mode.BROADCAST)
    def sync_weights(self) -> int:
        """Load the newest published version if it is newer than ours. Called only between generate calls,
        so one generate call (and every forward pass in it) sees one version."""
        latest = self.transport.latest()
        if latest is not None and latest.version > self.engine.version:
            t = time.perf_counter()
            self.engine.load_weights(latest)
            self.load_seconds = time.perf_counter() - t
        return self.engine.version

    @dispatch(Mode.SPLIT)
    def generate(self, items: list[tuple[int, list[int]]], params: SamplingParams | None = None) -> list[Generated]:
        """``items``: (uid, prompt token ids). One engine batch, so every response in it shares one version."""
        started = time.time()
        gens = self.engine.generate([ids for _, ids in items], params or self.params)
        finished = time.time()
        return [Generated(uid, g, started, finished) for (uid, _), g in zip(items, gens)]


class RewardWorker:
    def __init__(self, verify: Callable[[Problem, str], RewardResult]) -> None:
        self.verify = verify

    @dispatch(Mode.SPLIT)
    def score(self, items: list[tuple[int, Problem, str]]) -> list[tuple[int, RewardCell]]:
        out = []
        for uid, problem, response in items:
            t = time.perf_counter()
            result = self.verify(problem, response)
            out.append((uid, RewardCell(result, time.perf_counter() - t)))
        return out


# (rewards (G, n)) -> advantages (G, n)
AdvantageFn = Callable[[torch.Tensor], torch.Tensor]


class TrainerWorker:
    def __init__(
        self,
        engine: TrainEngine,
        transport: WeightTransport,
        pad_id: int,
        advantage_fn: AdvantageFn,
        loss_fn: LossFn,
        minibatches: int,
        epochs: int,
    ) -> None:
        self.engine, self.transport, self.pad_id = engine, transport, pad_id
        self.advantage_fn, self.loss_fn = advantage_fn, loss_fn
        self.minibatches, self.epochs = minibatches, epochs

    @dispatch(Mode.FIRST)
    def train(self, groups: list[list[SampleRow]]) -> dict[str, float]:
        """One RL step on complete groups: advantages → loss → optimizer updates → publish the new version.

        Samples whose status is ``infra_error`` take part in no group statistic and no loss (masked)."""
        rows = [r for g in groups for r in g]
        usable = torch.tensor([r.status is not Status.INFRA_ERROR for r in rows]).view(len(groups), -1)  # (G, n)
        rewards = torch.tensor([r.reward.result.reward for r in rows]).view(len(groups), -1)  # (G, n)
        if usable.all():
            advantages = self.advantage_fn(rewards)
        else:  # each group's statistics over its usable rows only
            advantages = torch.zeros_like(rewards)
            for g in range(len(groups)):
                if usable[g].any():
                    advantages[g, usable[g]] = self.advantage_fn(rewards[g, usable[g]][None])[0]
        advantages = advantages.flatten().tolist()
        batch = collate(
            [r.prompt.prompt_ids for r in rows],
            [r.generation.response_ids for r in rows],
            self.pad_id,
            old_logprobs=[r.generation.logprobs for r in rows],
            advantages=advantages,
            versions=[r.generation.versions for r in rows],
        )
        batch.response_mask *= usable.flatten()[:, None].float()
        trained_at = self.engine.version
        metrics = self.engine.train_step(batch, self.loss_fn, self.minibatches, self.epochs)
        token_versions = batch.versions[batch.response_mask.bool()]
        lag = trained_at - token_versions
        metrics.update({"staleness/max": float(lag.max()) if lag.numel() else 0.0, "staleness/mean": lag.float().mean().item() if lag.numel() else 0.0})
        metrics["time/publish"] = self.publish()
        return metrics

    @dispatch(Mode.FIRST)
    def sft(self, prompts: list[list[int]], targets: list[list[int]], loss_fn: LossFn) -> dict[str, float]:
        """One supervised step on (prompt, target) token pairs; does not publish."""
        return self.engine.train_step(collate(prompts, targets, self.pad_id), loss_fn, 1, 1)

    @dispatch(Mode.FIRST)
    def publish(self) -> float:
        """Publish the current weights as a new version; returns the seconds it took."""
        t = time.perf_counter()
        self.transport.publish(self.engine.export_weights())
        return time.perf_counter() - t
