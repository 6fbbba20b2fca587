"""The worker roles of an RL run: rollout, reward, trainer. Each wraps a contract from ``api`` and nothing more;
the algorithm (advantage estimator, loss, off-policy correction) is handed to the trainer by the recipe.

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
    Generation,
    GenerationCell,
    InferenceEngine,
    LossFn,
    Problem,
    RewardCell,
    RewardResult,
    SampleRow,
    SamplingParams,
    Status,
    CriticEngine,
    LossOutput,
    ScoringEngine,
    TrainBatch,
    TrainEngine,
    WeightTransport,
)
from rollflow.runtime.backend import LocalPayloads, Payloads
from rollflow.runtime.batch import collate, outcome_token_rewards
from rollflow.runtime.group import Mode, dispatch


@dataclass
class Generated:
    uid: int
    cell: GenerationCell
    started: float
    finished: float


@dataclass
class WeightPickup:
    """A rollout worker loading a new version: when it was published, when it was in place, how long loading took."""

    version: int
    published_at: float
    loaded_at: float
    load_seconds: float


@dataclass
class RolloutResult:
    items: list[Generated]
    version: int
    started: float
    finished: float
    pickup: WeightPickup | None


class RolloutWorker:
    def __init__(self, engine: InferenceEngine, transport: WeightTransport, params: SamplingParams, payloads: Payloads | None = None) -> None:
        self.engine, self.transport, self.params = engine, transport, params
        self.payloads = payloads or LocalPayloads()

    @dispatch(Mode.BROADCAST)
    def sync_weights(self) -> int:
        """Load the newest published version if it is newer than ours; returns the version now held."""
        self._pick_up()
        return self.engine.version

    def _pick_up(self) -> WeightPickup | None:
        # The safe point: called only at the start of a generate call, so every forward pass of a call sees one version.
        latest = self.transport.latest(newer_than=self.engine.version)
        if latest is None:
            return None
        t = time.perf_counter()
        self.engine.load_weights(latest)  # verifies the checksum first; on mismatch the old weights stay
        return WeightPickup(latest.version, latest.published_at, time.time(), time.perf_counter() - t)

    @dispatch(Mode.SPLIT)
    def generate(self, items: list[tuple[int, list[int]]], params: SamplingParams | None = None) -> list[Generated]:
        """``items``: (uid, prompt token ids). Picks up the newest weights, then samples every item at one version."""
        return self.rollout(items, params).items

    def rollout(self, items: list[tuple[int, list[int]]], params: SamplingParams | None = None) -> RolloutResult:
        """``generate`` with what the controller records: the version used, the call's span and any weight pick-up.
        The bulk of each generation goes to the payload store; the returned cells hold handles to it."""
        pickup = self._pick_up()
        started = time.time()
        gens = self.engine.generate([ids for _, ids in items], params or self.params)
        handles = self.payloads.put(gens)
        finished = time.time()
        cells = [Generated(uid, GenerationCell.of(g, h), started, finished) for (uid, _), g, h in zip(items, gens, handles)]
        return RolloutResult(cells, self.engine.version, started, finished, pickup)

    @dispatch(Mode.FIRST)
    def save(self, save: Callable[[Any], None]) -> int:
        """Run ``save(model)`` on the weights this worker last generated with (e.g. the ones just evaluated);
        returns their version."""
        save(self.engine.model)  # type: ignore[attr-defined]  # the HF engine's model; other engines name theirs so
        return self.engine.version


@dataclass
class Referenced:
    items: list[tuple[int, list[float]]]  # (uid, reference log-prob of each response token)
    started: float
    finished: float


class ReferenceWorker:
    """The frozen reference policy of a KL term: scores generated responses with the weights it took when RL began."""

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

    @dispatch(Mode.SPLIT)
    def score(self, items: list[tuple[int, list[int], Any]]) -> Referenced:
        """``items``: (uid, prompt ids, generation payload). Log-probs of each response token under the reference."""
        started = time.time()
        gens: list[Generation] = self.payloads.get([payload for _, _, payload in items])
        batch = collate([ids for _, ids, _ in items], [g.response_ids for g in gens], self.pad_id)
        logp = self.engine.compute_logprobs(batch)  # (B, T)
        starts = [len(ids) for _, ids, _ in items]
        out = [(uid, logp[i, s : s + len(g.response_ids)].tolist()) for i, ((uid, _, _), s, g) in enumerate(zip(items, starts, gens))]
        return Referenced(out, started, time.time())


@dataclass
class Scored:
    uid: int
    cell: RewardCell
    started: float
    finished: float


class RewardWorker:
    """Scores samples with the task's verifier, ``concurrency`` at a time (threads: slow verifiers mostly wait)."""

    def __init__(self, verify: Callable[[Problem, str], RewardResult], concurrency: int = 1) -> None:
        self.verify = verify
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="reward") if concurrency > 1 else None

    def _score_one(self, item: tuple[int, Problem, str]) -> Scored:
        uid, problem, response = item
        started, t = time.time(), time.perf_counter()
        result = self.verify(problem, response)
        return Scored(uid, RewardCell(result, time.perf_counter() - t), started, time.time())

    @dispatch(Mode.SPLIT)
    def score(self, items: list[tuple[int, Problem, str]]) -> list[Scored]:
        if self.pool is None or len(items) == 1:
            return [self._score_one(item) for item in items]
        return list(self.pool.map(self._score_one, items))


# (rewards (G, n)) -> advantages (G, n)
AdvantageFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TrainResult:
    metrics: dict[str, float]
    version: int  # the trainer's version after the step (published)
    started: float
    finished: float
    publish_started: float


@dataclass(frozen=True)
class Algorithm:
    """The trainer's side of an RL algorithm, built by the recipe from registered parts chosen by name:
    reward shaping → advantage estimation (outcome-level on (G, n) rewards, or token-level on (B, T) rewards with an
    optional critic) → the policy loss, which carries its off-policy correction and KL term."""

    advantage: Callable[..., Any]  # outcome: (G, n) -> (G, n); token-level: (rewards, mask, values) -> (adv, returns)
    loss: LossFn
    token_level: bool = False
    needs_critic: bool = False
    proximal: str = "behaviour"  # π_old of the ratio: "behaviour" (as recorded), "recomputed" (by the trainer), "current"
    shape: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (rewards (B,), lengths (B,)) -> (B,)
    kl_reward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (behav, ref) (B, T) -> reward (B, T)
    value_loss: Callable[[torch.Tensor, TrainBatch], LossOutput] | None = None  # (values (B, T), batch) -> loss
    lr_scale: Callable[[torch.Tensor, torch.Tensor], float] | None = None  # (advantages, mask) (B, T) -> step's lr factor


class TrainerWorker:
    def __init__(
        self,
        engine: TrainEngine,
        transport: WeightTransport,
        pad_id: int,
        algorithm: Algorithm,
        minibatches: int,
        epochs: int,
        payloads: Payloads | None = None,
        critic: CriticEngine | None = None,
        whole_groups: bool = True,
    ) -> None:
        if algorithm.needs_critic and (critic is None or algorithm.value_loss is None):
            raise ValueError("the advantage estimator needs a critic: build the trainer with a critic engine and a value loss")
        self.engine, self.transport, self.pad_id = engine, transport, pad_id
        self.algo, self.critic = algorithm, critic
        self.minibatches, self.epochs, self.whole_groups = minibatches, epochs, whole_groups
        self.payloads = payloads or LocalPayloads()

    @dispatch(Mode.FIRST)
    def train(self, groups: list[list[SampleRow]]) -> TrainResult:
        """One RL step on complete groups: rewards → advantages → loss → optimizer updates → publish the new version.

        Samples whose status is ``infra_error`` take part in no group statistic and no loss (masked). When some
        tokens come from an older version and the correction asks for it, π_old is recomputed with the current
        weights first (the behaviour log-probs stay as recorded)."""
        started = time.time()
        rows = [r for g in groups for r in g]
        gens: list[Generation] = self.payloads.get([r.generation.payload for r in rows])
        usable = torch.tensor([r.status is not Status.INFRA_ERROR for r in rows])  # (B,)
        rewards = torch.tensor([r.reward.result.reward for r in rows])  # (B,)
        metrics: dict[str, float] = {}
        if self.algo.shape is not None:
            shaped = self.algo.shape(rewards, torch.tensor([len(g.response_ids) for g in gens], dtype=torch.float))
            metrics["reward/shaping"] = (shaped - rewards)[usable].mean().item() if usable.any() else 0.0
            rewards = shaped
        batch = collate(
            [r.prompt.prompt_ids for r in rows],
            [g.response_ids for g in gens],
            self.pad_id,
            old_logprobs=[g.logprobs for g in gens],
            versions=[g.versions for g in gens],
            ref_logprobs=[r.reference for r in rows] if rows[0].reference is not None else None,
        )
        batch.response_mask *= usable[:, None].float()
        mask = batch.response_mask
        kl = None
        if self.algo.kl_reward is not None and batch.ref_logprobs is not None:
            kl = self.algo.kl_reward(batch.behav_logprobs, batch.ref_logprobs) * mask  # (B, T) per-token reward
            metrics["kl/reward_penalty"] = (kl.sum(-1)[usable].mean().item()) if usable.any() else 0.0
        if self.algo.token_level:
            token_rewards = outcome_token_rewards(rewards * usable, mask) + (kl if kl is not None else 0.0)
            values = self.critic.compute_values(batch) * mask if self.algo.needs_critic else None  # type: ignore[union-attr]
            batch.advantages, batch.returns = self.algo.advantage(token_rewards, mask, values)
            batch.values = values
        else:
            seq = rewards + (kl.sum(-1) if kl is not None else 0.0)  # a KL penalty folds into the sequence reward
            batch.advantages = self._outcome_advantages(seq.view(len(groups), -1), usable.view(len(groups), -1)).flatten()[:, None] * mask
        trained_at = self.engine.version
        lag = trained_at - batch.versions[mask.bool()]  # (tokens,)
        recompute = self.algo.proximal == "recomputed" and lag.numel() > 0 and bool((lag > 0).any())
        if recompute:
            batch.old_logprobs = torch.where(mask.bool(), self.engine.compute_logprobs(batch), batch.behav_logprobs)
        if self.whole_groups:
            batch.group_ids = torch.arange(len(groups)).repeat_interleave(torch.tensor([len(g) for g in groups]))  # (B,)
        lr_scale = self.algo.lr_scale(batch.advantages, mask) if self.algo.lr_scale is not None else 1.0
        metrics["train/lr_scale"] = lr_scale
        metrics.update(self.engine.train_step(batch, self.algo.loss, self.minibatches, self.epochs, lr_scale=lr_scale))
        if self.critic is not None and self.algo.value_loss is not None:
            critic_metrics = self.critic.train_step(batch, self.algo.value_loss, self.minibatches, self.epochs)
            metrics.update({f"critic/{k}": v for k, v in critic_metrics.items()})
        metrics["correction/recomputed"] = float(recompute)
        metrics.update(staleness_metrics(trained_at, [r.generation.version for r in rows], lag))
        publish_started = time.time()
        metrics["time/publish"] = self.publish()
        return TrainResult(metrics, self.engine.version, started, time.time(), publish_started)

    def _outcome_advantages(self, rewards: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
        """(G, n) advantages of an outcome estimator; each group's statistics over its usable rows only."""
        if usable.all():
            return self.algo.advantage(rewards)
        advantages = torch.zeros_like(rewards)
        for g in range(rewards.shape[0]):
            if usable[g].any():
                advantages[g, usable[g]] = self.algo.advantage(rewards[g, usable[g]][None])[0]
        return advantages

    @dispatch(Mode.FIRST)
    def sft(self, prompts: list[list[int]], targets: list[list[int]], loss_fn: LossFn) -> dict[str, float]:
        """One supervised step on (prompt, target) token pairs; does not publish."""
        return self.engine.train_step(collate(prompts, targets, self.pad_id), loss_fn, 1, 1)

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
        self.engine.set_lr(lr)

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
        save(self.engine.model)


def staleness_metrics(trained_at: int, sample_versions: list[int], token_lag: torch.Tensor) -> dict[str, float]:
    """Versions behind the trainer: min/mean/max over trained tokens, and the share of samples at each lag."""
    if token_lag.numel() == 0:
        return {"staleness/min": 0.0, "staleness/mean": 0.0, "staleness/max": 0.0}
    out = {"staleness/min": float(token_lag.min()), "staleness/mean": token_lag.float().mean().item(), "staleness/max": float(token_lag.max())}
    lags = [trained_at - v for v in sample_versions]
    for k in sorted(set(lags)):
        out[f"staleness/samples_lag{k}"] = lags.count(k) / len(lags)
    return out
