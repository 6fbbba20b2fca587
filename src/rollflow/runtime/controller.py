"""The single controller: streams prompts through the worker groups and the store, within the staleness budget.

``Controller.run(steps)`` is the whole asynchronous pipeline in one loop. Each pass it

1. admits whole groups while the staleness budget allows (``StalenessBudget``: capacity ``(v + η + 1)·B − admitted``);
2. hands the oldest rows that need generating to every idle rollout worker, whole groups at a time, so no worker
   idles while rows wait (load balancing by pull);
3. hands every generated group to the least loaded reward worker (and, when the run has a frozen reference
   policy, to the least loaded reference worker, which fills the ``reference`` column side by side with rewards);
   a group whose rewards the ``keep_group`` filter rejects (dynamic sampling) is dropped and its room in the budget
   given back, so admission refills the step;
4. starts a train step as soon as the store can form a batch for the trainer's version (``try_take_groups``: every
   group that would otherwise exceed η, plus the oldest other complete groups);
5. waits for whichever call finishes first and records it (store columns, metrics, trace), yielding each finished
   train step to the recipe.

Back-pressure is explicit: admission stops at the budget, so producers never run more than η versions ahead. With
η = 0 the same loop is synchronous on-policy training: a batch is admitted only after the previous step is trained.
With the inline backend every call runs as it is submitted, so a run is deterministic.

An infrastructure fault (a worker lost, a reward returning ``infra_error``) sends the rows back to be produced
again, at most ``max_retries`` times each; after that a reward fault is kept as ``infra_error`` (masked by the
trainer) and a lost worker stops the run with the error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rollflow.api import GENERATION, PROMPT, REFERENCE, REWARD, Problem, PromptCell, RewardResult, SampleRow, Status
from rollflow.runtime.group import WorkerGroup
from rollflow.runtime.roles import RolloutResult, Scored, TrainResult
from rollflow.runtime.staleness import StalenessBudget
from rollflow.runtime.store import SampleStore
from rollflow.runtime.trace import Tracer


@dataclass
class StepResult:
    step: int
    groups: list[list[SampleRow]]
    train: TrainResult
    metrics: dict[str, float]  # the pipeline's side of the step: queues, waits, weight pick-ups, staleness budget


@dataclass
class _Call:
    kind: str  # "generate" | "reward" | "reference" | "train"
    worker: int
    uids: list[int] = field(default_factory=list)
    groups: list[list[SampleRow]] = field(default_factory=list)  # the batch of a train call
    inputs: dict[int, Any] = field(default_factory=dict)  # uid → the generation cell a reward/reference call works on


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) spans: time during which at least one of them was running."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(spans):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


class Controller:
    def __init__(
        self,
        store: SampleStore,
        budget: StalenessBudget,
        rollout: WorkerGroup,
        reward: WorkerGroup,
        trainer: WorkerGroup,
        problems: Iterator[Problem],
        encode: Callable[[str], list[int]],
        group_size: int,
        groups_per_step: int,
        generate_batch: int,
        reward_groups: int = 1,
        version: int = 0,
        max_retries: int = 2,
        tracer: Tracer | None = None,
        reference: WorkerGroup | None = None,
        keep_group: Callable[[list[RewardResult]], bool] | None = None,
        max_dropped: int = 0,
    ) -> None:
        self.store, self.budget = store, budget
        self.rollout, self.reward, self.trainer, self.reference = rollout, reward, trainer, reference
        if (reference is not None) != (REFERENCE in store.columns):
            raise ValueError("a reference worker group and the store's 'reference' column go together")
        self.keep_group = keep_group  # dynamic sampling: False drops a scored group before it is trained
        self.max_dropped = max_dropped  # most groups dropped per step; past it, groups are kept (a stream of
        # all-equal groups, e.g. a solved task, must not stall the run)
        self.backend = rollout.backend
        self.problems, self.encode = problems, encode
        self.group_size, self.groups_per_step = group_size, groups_per_step
        self.generate_groups = max(1, generate_batch // group_size)
        self.reward_groups = reward_groups  # groups per reward call
        self.version0 = self.version = version  # trainer version when RL starts / now
        self.max_retries = max_retries
        self.tracer = tracer if tracer is not None else Tracer(enabled=False)  # an empty Tracer is falsy (len 0)
        self.infra_retries = 0
        self.spans: dict[str, list[tuple[float, float]]] = {"generate": [], "reward": [], "reference": [], "train": []}
        self.dropped_groups = 0
        self._dropped_this_step = 0
        self._next_group = 0
        self._retries: dict[int, int] = {}  # uid → infra retries so far
        self._calls: dict[Any, _Call] = {}
        # rows each stage is working on right now (reward and reference work on the same rows side by side)
        self._claimed: dict[str, set[int]] = {"generate": set(), "reward": set(), "reference": set(), "train": set()}
        self._rollout_busy: set[int] = set()
        # samples each reward / reference worker is scoring now: calls go to the least loaded
        self._load = {"reward": [0] * len(reward), "reference": [0] * (len(reference) if reference is not None else 0)}
        self._reward_lanes: list[list[float]] = [[] for _ in range(len(reward))]  # trace lanes: end time of each
        self._training = False
        self._pickups: list[tuple[float, float]] = []  # (pick-up delay, load seconds) since the last step
        self._mark = {"generate": 0, "reward": 0, "reference": 0}  # spans already counted in an earlier step's metrics

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self, steps: int) -> Iterator[StepResult]:
        """Train ``steps`` RL steps, yielding each as it finishes; admits exactly ``steps`` batches of samples."""
        total = steps * self.budget.batch_size
        trained, self.started = 0, time.time()
        last_step_end = self.started
        while trained < steps:
            self._admit(total)
            self._dispatch_generation()
            self._dispatch_scoring("reward", self.reward, REWARD,
                                   lambda u, cell: (u, self.store.get(u, PROMPT).problem, cell.response_text))
            if self.reference is not None:
                self._dispatch_scoring("reference", self.reference, REFERENCE,
                                       lambda u, cell: (u, self.store.get(u, PROMPT).prompt_ids, cell.payload))
            if not self._training:
                self._maybe_train(last_step_end)
            if not self._calls:
                raise RuntimeError(f"pipeline stalled at version {self.version}: nothing in flight and no batch can be "
                                   f"formed ({self.store.counts()}); this is a bug in admission or the store")
            for call in self.backend.wait(list(self._calls)):
                info = self._calls.pop(call)
                if info.kind == "generate":
                    self._on_generated(call, info)
                elif info.kind == "reward":
                    self._on_scored(call, info)
                elif info.kind == "reference":
                    self._on_referenced(call, info)
                else:
                    result: TrainResult = self.backend.result(call)
                    self._training = False
                    self._dropped_this_step = 0
                    trained += 1
                    self.version = result.version
                    self.spans["train"].append((result.started, result.finished))
                    if trained == steps:
                        self.finished = time.time()  # the pipeline's clock stops before the recipe's final eval
                    self.tracer.span("trainer", "train step", result.started, result.publish_started, version=result.version)
                    self.tracer.span("trainer", "publish weights", result.publish_started, result.finished, version=result.version)
                    yield self._step_result(trained, info.groups, result, last_step_end)
                    last_step_end = result.finished

    def _admit(self, total: int) -> None:
        rl_version = self.version - self.version0
        while self.budget.admitted < total and self.budget.admit(rl_version, self.group_size):
            problem = next(self.problems)
            cell = PromptCell(self._next_group, problem, self.encode(problem.prompt))
            self.store.admit([cell] * self.group_size, version=self.version)
            self._next_group += 1

    def _dispatch_generation(self) -> None:
        idle = [i for i in range(len(self.rollout)) if i not in self._rollout_busy]
        if not idle:
            return
        groups = self._by_group([u for u in self.store.pending(GENERATION) if not self._busy(u)])
        # Share what is waiting evenly among the idle workers, whole groups, at most generate_batch samples each.
        per_worker = min(self.generate_groups, -(-len(groups) // len(idle))) if groups else 0
        for i in idle:
            part, groups = groups[:per_worker], groups[per_worker:]
            if not part:
                break
            uids = [u for g in part for u in g]
            items = [(u, self.store.get(u, PROMPT).prompt_ids) for u in uids]
            self._submit(self.rollout, i, "rollout", _Call("generate", i, uids), items)
            self._rollout_busy.add(i)

    def _dispatch_scoring(self, kind: str, group: WorkerGroup, column: str, item: Callable[[int, Any], Any]) -> None:
        """Send each generated group waiting for ``column`` (``reward_groups`` at a time) to the least loaded worker
        of ``group``; ``item(uid, generation cell)`` is what the worker's ``score`` gets per row."""
        load = self._load[kind]
        groups = self._by_group([u for u in self.store.pending(column) if u not in self._claimed[kind]])
        for k in range(0, len(groups), self.reward_groups):
            uids = [u for g in groups[k : k + self.reward_groups] for u in g]
            i = min(range(len(group)), key=load.__getitem__)
            cells = {u: self.store.get(u, GENERATION) for u in uids}
            self._submit(group, i, "score", _Call(kind, i, uids, inputs=cells), [item(u, cells[u]) for u in uids])
            load[i] += len(uids)

    def _maybe_train(self, idle_since: float) -> None:
        groups = self.store.try_take_groups(self.groups_per_step, self.version, self.budget.eta)
        if groups is None:
            return
        now = time.time()
        self.tracer.span("trainer", "wait for data", idle_since, max(idle_since, now))
        self._submit(self.trainer, 0, "train", _Call("train", 0, groups=groups), groups)
        self._training = True

    def _submit(self, group: WorkerGroup, worker: int, method: str, info: _Call, *args: Any) -> None:
        self._claimed[info.kind].update(info.uids)
        self._calls[group.submit(worker, method, *args)] = info

    # -- results --------------------------------------------------------------------------------------------------
    def _on_generated(self, call: Any, info: _Call) -> None:
        self._rollout_busy.discard(info.worker)
        self._claimed[info.kind].difference_update(info.uids)
        try:
            result: RolloutResult = self.backend.result(call)
        except Exception as e:
            self._lost(e, info, "rollout")
            return
        track = f"rollout/{info.worker}"
        if result.pickup is not None:
            p = result.pickup
            self.tracer.span(track, "load weights", p.loaded_at - p.load_seconds, p.loaded_at, version=p.version)
            self._pickups.append((p.loaded_at - p.published_at, p.load_seconds))
        self.tracer.span(track, "generate", result.started, result.finished, samples=len(result.items), version=result.version)
        self.spans["generate"].append((result.started, result.finished))
        for g in result.items:
            self.store.put(g.uid, GENERATION, g.cell, started=g.started, generated=g.finished)

    def _on_scored(self, call: Any, info: _Call) -> None:
        self._load["reward"][info.worker] -= len(info.uids)
        self._claimed[info.kind].difference_update(info.uids)
        try:
            scored: list[Scored] = self.backend.result(call)
        except Exception as e:
            self._lost(e, info, "reward")
            return
        start, end = min(s.started for s in scored), max(s.finished for s in scored)
        self.tracer.span(self._reward_track(info.worker, start, end), "reward", start, end, samples=len(scored))
        self.spans["reward"].append((start, end))
        for s in scored:
            if not self._still_current(s.uid, info):
                continue
            if s.cell.result.status is Status.INFRA_ERROR and self._retries.get(s.uid, 0) < self.max_retries:
                self._retry(s.uid)
                continue
            self.store.put(s.uid, REWARD, s.cell, finished=s.finished)
        if self.keep_group is not None:
            for uid in {s.uid for s in scored}:
                self._filter(uid)

    def _filter(self, uid: int) -> None:
        """Dynamic sampling: once every row of ``uid``'s group has a reward, drop the group if ``keep_group`` rejects
        it, unless this step already dropped ``max_dropped`` groups or a stage still works on one of its rows."""
        uids = self.store.group_rows(uid)
        if uids is None or self._dropped_this_step >= self.max_dropped or any(map(self._busy, uids)):
            return
        if self.keep_group([self.store.get(u, REWARD).result for u in uids]):
            return
        self.store.drop_group(uids)
        self.budget.release(len(uids))
        self.dropped_groups += 1
        self._dropped_this_step += 1

    def _on_referenced(self, call: Any, info: _Call) -> None:
        self._load["reference"][info.worker] -= len(info.uids)
        self._claimed[info.kind].difference_update(info.uids)
        try:
            result = self.backend.result(call)
        except Exception as e:
            self._lost(e, info, "reference")
            return
        self.tracer.span(f"reference/{info.worker}", "reference log-probs", result.started, result.finished, samples=len(info.uids))
        self.spans["reference"].append((result.started, result.finished))
        for uid, logprobs in result.items:
            if self._still_current(uid, info):
                self.store.put(uid, REFERENCE, logprobs)
        if self.keep_group is not None:
            for uid in info.uids:
                self._filter(uid)

    def _lost(self, error: Exception, info: _Call, role: str) -> None:
        """A call failed. A lost worker (the backend says so) is an infrastructure fault: its rows go back to be
        produced again. Anything else is a bug or a user error and stops the run with its own message."""
        if not self.backend.is_worker_lost(error) or any(self._retries.get(u, 0) >= self.max_retries for u in info.uids):
            raise error
        self.tracer.instant(f"{role}/{info.worker}", "worker lost", time.time(), error=type(error).__name__)
        for uid in info.uids:
            self._retry(uid)

    def _retry(self, uid: int) -> None:
        self._retries[uid] = self.store.retry(uid)
        self.infra_retries += 1

    # -- bookkeeping ----------------------------------------------------------------------------------------------
    def _still_current(self, uid: int, info: _Call) -> bool:
        """Whether row ``uid`` still holds the generation ``info``'s call worked on: a retry started by another stage
        may have cleared the row, or even regenerated it, while the call ran; its result is then dropped."""
        return self.store.peek(uid, GENERATION) is info.inputs[uid]

    def _busy(self, uid: int) -> bool:
        return any(uid in claimed for claimed in self._claimed.values())

    def _by_group(self, uids: list[int]) -> list[list[int]]:
        groups: dict[int, list[int]] = {}
        for u in uids:
            groups.setdefault(self.store.get(u, PROMPT).group_id, []).append(u)
        return list(groups.values())

    def _reward_track(self, worker: int, start: float, end: float) -> str:
        # Concurrent calls on one reward worker go on separate lanes so that the trace's spans never overlap.
        lanes = self._reward_lanes[worker]
        lane = next((k for k, free_at in enumerate(lanes) if free_at <= start), len(lanes))
        if lane == len(lanes):
            lanes.append(end)
        lanes[lane] = end
        return f"reward/{worker}" + (f".{lane}" if lane else "")

    def _step_result(self, step: int, groups: list[list[SampleRow]], result: TrainResult, last_step_end: float) -> StepResult:
        rows = [r for g in groups for r in g]
        counts = self.store.counts()
        self.tracer.counter("store", result.finished, in_flight=counts["in_flight"], ready=counts["ready"])
        metrics: dict[str, float] = {
            "store/admitted": float(self.budget.admitted),
            "store/in_flight": float(counts["in_flight"]),
            "store/ready": float(counts["ready"]),
            "store/consumed": float(counts["consumed"]),
            "store/dropped": float(counts["dropped"]),
            "queue/admit_to_start_s": _mean([r.timestamps["started"] - r.timestamps["admitted"] for r in rows]),
            "queue/ready_to_consumed_s": _mean([r.timestamps["consumed"] - r.timestamps["finished"] for r in rows]),
            "queue/sample_latency_s": _mean([r.timestamps["finished"] - r.timestamps["started"] for r in rows]),
            "queue/trainer_wait_s": max(0.0, result.started - last_step_end),
            "time/reward_mean_s": _mean([r.reward.duration for r in rows]),
        }
        for stage in ("generate", "reward", "reference"):  # busy time of the stage since the previous step's metrics
            metrics[f"time/{stage}"] = union_seconds(self.spans[stage][self._mark[stage]:])
            self._mark[stage] = len(self.spans[stage])
        if self._pickups:
            metrics["weights/pickup_delay_s"] = _mean([d for d, _ in self._pickups])
            metrics["weights/load_s"] = _mean([s for _, s in self._pickups])
            self._pickups = []
        return StepResult(step, groups, result, metrics)

    def pipeline_summary(self) -> dict[str, float]:
        """How busy the pipeline was over ``run``: the producers' (any generate or reward running) and the trainer's
        busy time, and efficiency = the bound max(producers, trainer) over the time achieved."""
        wall = self.finished - self.started
        producers = union_seconds(self.spans["generate"] + self.spans["reward"] + self.spans["reference"])
        train = union_seconds(self.spans["train"])
        return {
            "pipeline_seconds": wall,
            "producer_busy_seconds": producers,
            "trainer_busy_seconds": train,
            "trainer_busy_fraction": train / wall,
            "pipeline_efficiency": max(producers, train) / wall,
        }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
