"""The single controller: streams task instances through the stage table and the store, within the staleness budget.

``Controller.run(steps)`` is the whole asynchronous pipeline in one loop. Each pass it

1. admits whole groups while the staleness budget allows (``StalenessBudget``: capacity ``(v + η + 1)·B − admitted``);
2. for every stage of the table (``runtime.stage``), sends the rows that have what it reads and lack its column,
   whole groups at a time, to the least loaded worker of its group that has room for another call;
3. starts a train step as soon as the store can form a batch for the trainer's version (``try_take_groups``: every
   group that would otherwise exceed η, plus the oldest other complete groups);
4. waits for whichever call finishes first and records it (store columns, metrics, trace), yielding each finished
   train step to the recipe.

Back-pressure is explicit: admission stops at the budget, so producers never run more than η versions ahead. With
η = 0 the same loop is synchronous on-policy training: a batch is admitted only after the previous step is trained.

A group leaves early in two ways: a stage's value is ``api.Reject`` (its workflow declined the task instance), or
``keep_group`` rejects the complete group (dynamic sampling, at most ``max_dropped`` per step); its room in the budget
is given back, so admission refills the step. An infrastructure fault (a worker lost, a value whose status is
``infra_error``) sends the row back to the stage that failed (a reward is computed again on the same trajectory; a
lost rollout is rolled out again), at most ``max_retries`` times a row; after that the value is kept as
``infra_error`` (masked by the trainer), or, for a row lost with its worker, its group is dropped. A lost worker is
sent nothing until a probe finds it rebuilt; a call past ``call_timeout`` has its worker killed (hung). A lost
trainer raises ``TrainerLost``: the recipe goes back to its last checkpoint (``snapshot``/``restore``).

Every sample's life goes to the ledger (``runtime.ledger``), every fault to ``faults`` and ``fault_log``.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rollflow.api import Reject, SampleRow, Status, TrajectoryCell
from rollflow.runtime.backend import WorkerGone
from rollflow.runtime.group import WorkerGroup
from rollflow.runtime.ledger import Ledger
from rollflow.runtime.roles import TrainResult
from rollflow.runtime.stage import Span, Stage, StageOutput
from rollflow.runtime.staleness import StalenessBudget
from rollflow.runtime.store import SampleStore
from rollflow.runtime.trace import Tracer

TRAIN = "train"
PROBE = "probe"  # a call asking a lost worker whether it is back
REJECTED = "rejected by its workflow"


@dataclass
class StepResult:
    step: int
    groups: list[list[SampleRow]]
    train: TrainResult
    metrics: dict[str, float]  # the pipeline's side of the step: queues, waits, stage busy time, weight pick-ups


@dataclass
class _Call:
    stage: str  # a stage's column, or TRAIN
    worker: int
    inputs: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # uid → the cells the call was given (a result
    # counts only if the row still holds these very cells: a retry may have cleared or replaced them meanwhile)
    groups: list[list[SampleRow]] = field(default_factory=list)  # the batch of a train call
    sent: float = field(default_factory=time.time)
    killed: bool = False  # its worker was killed for running past the call timeout
    probe_of: str = ""  # a probe's stage


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) spans: time during which at least one of them was running."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(spans):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


class TrainerLost(RuntimeError):
    """The trainer worker died during a step: its model and optimizer are gone, so the run goes back to its last
    checkpoint (the recipe restarts it, up to ``runtime.max_restarts``)."""


class Controller:
    def __init__(
        self,
        store: SampleStore,
        budget: StalenessBudget,
        stages: list[Stage],
        trainer: WorkerGroup,
        tasks: Iterator[Any],
        group_size: int,
        groups_per_step: int,
        version: int = 0,
        max_retries: int = 2,
        tracer: Tracer | None = None,
        keep_group: Callable[[list[SampleRow]], bool] | None = None,
        max_dropped: int = 0,
        ledger: Ledger | None = None,
        call_timeout: float | None = None,
    ) -> None:
        if budget.batch_size != group_size * groups_per_step:
            raise ValueError(f"the staleness budget counts {budget.batch_size} samples per step but a step takes "
                             f"{groups_per_step} groups of {group_size}")
        declared = [c for c in store.columns if c != store.admission]
        if sorted(s.column for s in stages) != sorted(declared):
            raise ValueError(f"every column but the admission column needs exactly one stage: columns {declared}, "
                             f"stages {[s.column for s in stages]}")
        backends = {id(s.group.backend) for s in stages} | {id(trainer.backend)}
        if len(backends) > 1:
            raise ValueError("every worker group of a controller must run on the same backend")
        self.store, self.budget, self.trainer = store, budget, trainer
        self.stages = {s.column: s for s in stages}
        self.backend = trainer.backend
        self.tasks = tasks
        self.group_size, self.groups_per_step = group_size, groups_per_step
        self.version0 = self.version = version  # trainer version when RL starts / now
        self.max_retries = max_retries
        self.call_timeout = call_timeout  # a call running longer is hung: its worker is killed and replaced
        self.trained = 0  # RL steps done
        self.faults: Counter[str] = Counter()  # infrastructure faults by kind, since RL began
        self.fault_log: list[str] = []  # one line per fault, for the recipe to show and keep (it empties the list)
        self._down: set[tuple[str, int]] = set()  # (stage, worker) lost and not yet back: sent nothing
        self._reprobe: list[tuple[str, int, float]] = []  # (stage, worker, when) lost workers to ask again
        self.tracer = tracer if tracer is not None else Tracer(enabled=False)
        self.ledger = ledger if ledger is not None else Ledger(None)
        self.keep_group = keep_group  # dynamic sampling: False drops a complete group before it is trained
        self.max_dropped = max_dropped  # most groups dropped per step; past it, groups are kept (a stream of
        # all-equal groups, e.g. a solved task, must not stall the run)
        self.infra_retries = 0
        self.dropped_groups = 0
        self.rejected_groups = 0
        self.spans: dict[str, list[tuple[float, float]]] = {name: [] for name in [*self.stages, TRAIN]}
        self._mark = dict.fromkeys(self.stages, 0)  # spans already counted in an earlier step's metrics
        self._dropped_this_step = 0
        self._rejected_this_step = 0
        self.max_rejected = 100 * groups_per_step  # rejects in a row before the run stops as unable to fill a step
        self._next_group = 0
        self._retries: dict[int, int] = {}  # uid → infra retries so far
        self._calls: dict[Any, _Call] = {}
        self._claimed: dict[str, set[int]] = {name: set() for name in self.stages}  # rows each stage works on now
        self._load = {name: [[0, 0] for _ in range(len(s.group))] for name, s in self.stages.items()}  # [calls, rows]
        self._leaving: dict[int, str] = {}  # group → why it is dropped once no stage works on it (its workflow
        # rejected it, or a row was lost with its worker too often)
        self._lanes: dict[str, list[float]] = {}  # trace track → end time of each lane
        self._training = False
        self._pickups: list[tuple[float, float]] = []  # (pick-up delay, load seconds) since the last step

    @property
    def between_steps(self) -> bool:
        """No train step is running: the trainer's state matches ``trained`` (a checkpoint may be taken)."""
        return not self._training

    def set_staleness(self, eta: int) -> None:
        """Change η from now on (groups admitted earlier keep theirs)."""
        self.budget.set_eta(eta)

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self, steps: int) -> Iterator[StepResult]:
        """Train until ``steps`` RL steps are done in all (a restored controller goes on from its checkpoint),
        yielding each as it finishes; admits exactly ``steps`` batches of samples."""
        total = steps * self.budget.batch_size
        self.started = time.time()
        last_step_end = self.started
        while self.trained < steps:
            self._feed(total)
            if not self._training:
                self._maybe_train(last_step_end)
            if not self._calls and not self._reprobe:
                raise RuntimeError(f"pipeline stalled at version {self.version}: nothing in flight and no batch can be "
                                   f"formed ({self.store.counts()}); this is a bug in admission or the store")
            for call in self._done(self._watch()):
                info = self._calls.pop(call)
                if info.stage == PROBE:
                    self._on_probe(call, info)
                    continue
                if info.stage != TRAIN:
                    self._on_output(call, info)
                    continue
                try:
                    result: TrainResult = self.backend.result(call)
                except Exception as e:
                    if self.backend.is_worker_lost(e):
                        raise TrainerLost(f"the trainer was lost during step {self.trained + 1} "
                                          f"({type(e).__name__})") from e
                    raise
                self.trained += 1
                for row in (r for g in info.groups for r in g):
                    self.ledger.record("trained", row.uid, step=self.trained, version=result.version)
                self.ledger.flush()
                self._training = False
                self._dropped_this_step = self._rejected_this_step = 0
                self.version = result.version
                self.spans[TRAIN].append((result.started, result.finished))
                if self.trained == steps:
                    self.finished = time.time()  # the pipeline's clock stops before the recipe's final eval
                self.tracer.span("trainer", "train step", result.started, result.publish_started, version=result.version)
                self.tracer.span("trainer", "publish weights", result.publish_started, result.finished, version=result.version)
                # Start the next batch before handing the step to the recipe (its logging, an evaluation), so that
                # with η = 0 the producers need not wait for it.
                self._feed(total)
                yield self._step_result(self.trained, info.groups, result, last_step_end)
                last_step_end = result.finished

    def _done(self, timeout: float | None) -> list[Any]:
        """The calls done within ``timeout`` (none: only lost workers wait to be asked again, later)."""
        if not self._calls:
            time.sleep(timeout or 0.0)
            return []
        return self.backend.wait(list(self._calls), timeout=timeout)

    def _watch(self) -> float | None:
        """Kill the workers of calls running past ``call_timeout`` (hung: the backend replaces them and their calls
        fail as lost, so their rows are produced again) and probe again the lost workers that are due; returns how
        long until either may next be needed (None: no limit)."""
        now, waits = time.time(), []
        for column, worker, due in list(self._reprobe):
            if due <= now:
                self._reprobe.remove((column, worker, due))
                self._probe(column, worker)
            else:
                waits.append(due - now)
        if self.call_timeout is not None:
            for info in self._calls.values():
                if info.stage == PROBE:
                    continue
                late = now - info.sent - self.call_timeout
                if late < 0:
                    waits.append(-late)
                elif not info.killed:
                    self._kill_hung(info, now)
        return max(min(waits), 0.05) if waits else None

    def _kill_hung(self, info: _Call, now: float) -> None:
        group = self.trainer if info.stage == TRAIN else self.stages[info.stage].group
        info.killed = self.backend.kill(group.workers[info.worker])
        if info.killed:
            self.faults["hung_killed"] += 1
            self.fault_log.append(f"{group.name}/{info.worker}: a call ran past runtime.call_timeout="
                                  f"{self.call_timeout:g} s; killed, to be replaced")
            self.tracer.instant(f"{group.name}/{info.worker}", "killed: hung", now, timeout=self.call_timeout)
            for uid in info.inputs:
                self.ledger.record("hung", uid, column=info.stage, timeout=self.call_timeout)

    def _probe(self, column: str, worker: int) -> None:
        """Ask lost worker ``worker`` of stage ``column`` whether it is back (rebuilt by the backend)."""
        self._calls[self.backend.ping(self.stages[column].group.workers[worker])] = _Call(PROBE, worker, probe_of=column)

    def _on_probe(self, call: Any, info: _Call) -> None:
        try:
            self.backend.result(call)
        except Exception as e:
            if not self.backend.is_worker_lost(e):
                raise
            if not self.backend.is_restarting(e):
                raise WorkerGone(f"{self.stages[info.probe_of].group.name}/{info.worker} was lost and is not coming "
                                 f"back ({type(e).__name__})") from e
            self._reprobe.append((info.probe_of, info.worker, time.time() + 0.25))  # still being rebuilt
            return
        self._down.discard((info.probe_of, info.worker))
        group = self.stages[info.probe_of].group
        self.fault_log.append(f"{group.name}/{info.worker} is back")
        self.tracer.instant(f"{group.name}/{info.worker}", "worker back", time.time())

    def _feed(self, total: int) -> None:
        """Admit what the budget allows, then give every stage the rows waiting for it."""
        self._admit(total)
        for stage in self.stages.values():
            self._dispatch(stage)

    def _admit(self, total: int) -> None:
        rl_version = self.version - self.version0
        while self.budget.admitted < total and self.budget.admit(rl_version, self.group_size):
            task = next(self.tasks)
            uids = self.store.admit(self._next_group, [task] * self.group_size, version=self.version, eta=self.budget.eta)
            for uid in uids:
                self.ledger.record("admitted", uid, group=self._next_group, version=self.version)
            self._next_group += 1

    def _dispatch(self, stage: Stage) -> None:
        """Send the groups waiting for ``stage`` to its least loaded workers, at most ``groups_per_call`` a call and
        shared evenly over the workers with room for a call, so no worker idles while groups wait."""
        load = self._load[stage.column]
        waiting = [u for u in self.store.pending(stage.column) if not self._busy(u)]
        groups = [g for g in self._by_group(waiting) if self.store.group_of(g[0]) not in self._leaving]
        if not stage.whole_groups:
            groups = [[u] for g in groups for u in g]
        up = [i for i in range(len(stage.group)) if (stage.column, i) not in self._down]
        open_workers = sum(load[i][0] < stage.calls_per_worker for i in up)
        if not groups or not open_workers:
            return
        per_call = min(stage.groups_per_call, -(-len(groups) // open_workers))
        for k in range(0, len(groups), per_call):
            free = [i for i in up if load[i][0] < stage.calls_per_worker]
            if not free:
                return
            i = min(free, key=lambda w: (load[w][1], load[w][0]))
            uids = [u for g in groups[k : k + per_call] for u in g]
            cells = {u: self.store.cells(u) for u in uids}
            reads = self.store.columns[stage.column].reads
            items = [stage.item(u, cells[u]) for u in uids]
            info = _Call(stage.column, i, {u: tuple(cells[u].get(c) for c in reads) for u in uids})
            self._claimed[stage.column].update(uids)
            self._calls[stage.group.submit(i, stage.method, items)] = info
            load[i][0] += 1
            load[i][1] += len(uids)

    def _maybe_train(self, idle_since: float) -> None:
        groups = self.store.try_take_groups(self.groups_per_step, self.version)
        if groups is None:
            return
        self.tracer.span("trainer", "wait for data", idle_since, max(idle_since, time.time()))
        self._calls[self.trainer.submit(0, "train", groups)] = _Call(TRAIN, 0, groups=groups)
        self._training = True

    # -- results --------------------------------------------------------------------------------------------------
    def _on_output(self, call: Any, info: _Call) -> None:
        stage = self.stages[info.stage]
        load = self._load[info.stage][info.worker]
        load[0] -= 1
        load[1] -= len(info.inputs)
        self._claimed[info.stage].difference_update(info.inputs)
        try:
            output: StageOutput = self.backend.result(call)
        except Exception as e:
            self._lost(e, info, stage)
            return
        self._record(stage, info.worker, output)
        touched = set()
        for p in output.values:
            if p.uid not in self.store or not _same(self._inputs(info.stage, p.uid), info.inputs[p.uid]):
                continue  # the row was retried (or dropped) while the call ran: this value is for an older attempt
            gid = self.store.group_of(p.uid)
            touched.add(gid)
            if isinstance(p.value, Reject):
                self._leaving[gid] = REJECTED
            elif getattr(p.value, "status", None) is Status.INFRA_ERROR and self._retries.get(p.uid, 0) < self.max_retries:
                error = (getattr(p.value, "info", None) or {}).get("error", "")
                self._retry(p.uid, info.stage, f"infra_error: {error}" if error else "infra_error")
                self.fault_log.append(f"{info.stage} of sample {p.uid}: infrastructure fault ({error or 'no detail'}); "
                                      f"produced again (retry {self._retries[p.uid]} of {self.max_retries})")
            else:
                self.store.put(p.uid, info.stage, p.value, started=p.started, finished=p.finished)
                extra = {"version": p.value.version} if self.store.columns[info.stage].versioned else {}
                status = getattr(p.value, "status", Status.OK)
                self.ledger.record("produced", p.uid, column=info.stage, status=status.value, **extra)
        for gid in touched:
            self._settle(gid)

    def _settle(self, gid: int) -> None:
        """Drop group ``gid`` if a workflow rejected one of its rows or, once complete, ``keep_group`` rejects it;
        only once no stage works on any of its rows."""
        uids = self.store.group_uids(gid)
        if not uids or any(map(self._busy, uids)):
            return
        if gid in self._leaving:
            why = self._leaving.pop(gid)
            self._drop(gid, uids, why)
            if why != REJECTED:  # not the workflow's doing: not counted against it
                return
            self.rejected_groups += 1
            self._rejected_this_step += 1
            if self._rejected_this_step > self.max_rejected:
                raise RuntimeError(f"the rollout workflow rejected {self._rejected_this_step} groups since the last "
                                   f"train step (the last: group {gid}); a workflow that rejects nearly every task "
                                   f"instance would never fill a step: check its Reject conditions")
            return
        if self.keep_group is None or self._dropped_this_step >= self.max_dropped or self.store.complete_group(uids[0]) is None:
            return
        rows = [SampleRow(u, gid, self.store.cells(u), {}) for u in uids]
        if not self.keep_group(rows):
            self._drop(gid, uids, "filtered (keep_group)")
            self.dropped_groups += 1
            self._dropped_this_step += 1

    def _drop(self, gid: int, uids: list[int], why: str) -> None:
        self.budget.release(self.store.drop_group(gid))
        for uid in uids:
            self.ledger.record("dropped", uid, group=gid, why=why)

    def _lost(self, error: Exception, info: _Call, stage: Stage) -> None:
        """A call failed. A lost worker (the backend says so, and rebuilds it) is an infrastructure fault: the worker is
        sent nothing until a probe finds it back, and its rows go back to be produced again, at most ``max_retries``
        times a row, after which the row's group is dropped (counted, with why). Any other error is a bug or a user
        error and stops the run with its own message."""
        if not self.backend.is_worker_lost(error):
            raise error
        where = f"{stage.group.name}/{info.worker}"
        if (stage.column, info.worker) not in self._down:
            self._down.add((stage.column, info.worker))
            self.faults["worker_lost"] += 1
            self.fault_log.append(f"{where} lost ({type(error).__name__}): its rows go back to be produced again")
            self.tracer.instant(where, "worker lost", time.time(), error=type(error).__name__)
            self._probe(stage.column, info.worker)
        for uid in [u for u in info.inputs if u in self.store]:
            if self._retries.get(uid, 0) >= self.max_retries:
                gid = self.store.group_of(uid)
                self.faults["dropped_after_faults"] += 1
                self.fault_log.append(f"sample {uid} was on a lost worker {self._retries[uid] + 1} times: its group "
                                      f"{gid} is dropped (runtime.max_retries={self.max_retries})")
                self._leaving[gid] = f"its worker was lost {self._retries[uid] + 1} times"
                continue
            self._retry(uid, stage.column, f"worker lost: {type(error).__name__}", event="readmitted")
        for gid in {self.store.group_of(u) for u in info.inputs if u in self.store}:
            self._settle(gid)

    def _retry(self, uid: int, column: str, why: str, event: str = "retried") -> None:
        self._retries[uid] = self.store.retry(uid, column)
        self.infra_retries += 1
        self.ledger.record(event, uid, column=column, why=why)

    def _inputs(self, column: str, uid: int) -> tuple[Any, ...]:
        cells = self.store.cells(uid)
        return tuple(cells.get(c) for c in self.store.columns[column].reads)

    # -- bookkeeping ----------------------------------------------------------------------------------------------
    def _record(self, stage: Stage, worker: int, output: StageOutput) -> None:
        spans = output.spans
        if spans is None:
            spans = [Span(stage.method, min(p.started for p in output.values), max(p.finished for p in output.values))] if output.values else []
        for span in spans:
            track = self._track(f"{stage.group.name}/{worker}", span.start, span.end)
            self.tracer.span(track, span.name, span.start, span.end, **span.meta)
            if span.name == "load weights":
                self._pickups.append((span.end - span.meta.get("published_at", span.end), span.end - span.start))
            else:
                self.spans[stage.column].append((span.start, span.end))

    def _track(self, track: str, start: float, end: float) -> str:
        # Spans that overlap on one worker (concurrent calls) go on separate lanes: a trace track never overlaps.
        lanes = self._lanes.setdefault(track, [])
        lane = next((k for k, free_at in enumerate(lanes) if free_at <= start), len(lanes))
        if lane == len(lanes):
            lanes.append(end)
        lanes[lane] = end
        return track + (f".{lane}" if lane else "")

    def _busy(self, uid: int) -> bool:
        return any(uid in claimed for claimed in self._claimed.values())

    def _by_group(self, uids: list[int]) -> list[list[int]]:
        groups: dict[int, list[int]] = {}
        for u in uids:
            groups.setdefault(self.store.group_of(u), []).append(u)
        return list(groups.values())

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
            "queue/sample_latency_s": _mean([r.duration for r in rows]),
            "queue/trainer_wait_s": max(0.0, result.started - last_step_end),
            "staleness/eta": float(self.budget.eta),
            "faults/infra_retries": float(self.infra_retries),  # cumulative, like the counts below
            **{f"faults/{kind}": float(n) for kind, n in sorted(self.faults.items())},
        }
        for name in self.stages:  # busy time of each stage since the previous step's metrics
            metrics[f"time/{name}"] = union_seconds(self.spans[name][self._mark[name]:])
            self._mark[name] = len(self.spans[name])
        if self._pickups:
            metrics["weights/pickup_delay_s"] = _mean([d for d, _ in self._pickups])
            metrics["weights/load_s"] = _mean([s for _, s in self._pickups])
            self._pickups = []
        return StepResult(step, groups, result, metrics)

    def close(self) -> None:
        """The run's steps are done: the rows still in the store (admitted ahead within the staleness bound) are
        recorded as ``unfinished``."""
        for uid in self.store.uids():
            self.ledger.record("unfinished", uid)
        self.ledger.flush()

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The state a checkpoint needs, taken between steps: the budget, versions, counters, the task stream's
        position and the store, every produced trajectory resolved from the payload store (a handle would not
        outlive this run). Calls in flight are not saved: their rows are saved without what those calls would have
        written, and are produced again after a restore."""
        pack = _swap_payloads([self.store.cells(uid) for uid in self.store.uids()], self.backend.payloads.get)
        return {
            "store": self.store.snapshot(pack), "admitted": self.budget.admitted, "eta": self.budget.eta,
            "version0": self.version0, "version": self.version, "trained": self.trained, "next_group": self._next_group,
            "retries": dict(self._retries), "leaving": dict(self._leaving),
            "infra_retries": self.infra_retries,
            "dropped_groups": self.dropped_groups, "rejected_groups": self.rejected_groups, "faults": dict(self.faults),
        }

    def restore(self, state: dict[str, Any], why: str) -> None:
        """Continue from ``snapshot``'s state (a new controller, before ``run``): the task stream is advanced past
        the groups already drawn, and every row the store held is re-admitted (ledger: ``readmitted``, ``why``)."""
        if self._next_group or self._calls:
            raise RuntimeError("restore a controller before it runs")
        for _ in range(state["next_group"]):
            next(self.tasks)
        self._next_group = state["next_group"]
        rows = state["store"]["rows"].values()
        self.store.restore(state["store"], _swap_payloads([row.cells for row in rows], self.backend.payloads.put))
        self.budget.admitted = state["admitted"]
        self.budget.set_eta(state["eta"])
        self.version0, self.version, self.trained = state["version0"], state["version"], state["trained"]
        self._retries, self._leaving = dict(state["retries"]), dict(state["leaving"])
        self.infra_retries, self.faults = state["infra_retries"], Counter(state["faults"])
        self.dropped_groups, self.rejected_groups = state["dropped_groups"], state["rejected_groups"]
        for uid in self.store.uids():
            self.ledger.record("readmitted", uid, why=why)
        for gid in list(self._leaving):
            self._settle(gid)

    def pipeline_summary(self) -> dict[str, float]:
        """How busy the pipeline was over ``run``: the producers' (any stage running) and the trainer's busy time,
        and efficiency = the bound max(producers, trainer) over the time achieved."""
        wall = self.finished - self.started
        producers = union_seconds([s for name in self.stages for s in self.spans[name]])
        train = union_seconds(self.spans[TRAIN])
        return {
            "pipeline_seconds": wall,
            "producer_busy_seconds": producers,
            "trainer_busy_seconds": train,
            "trainer_busy_fraction": train / wall,
            "pipeline_efficiency": max(producers, train) / wall,
        }


def _swap_payloads(rows: list[dict[str, Any]], swap: Callable[[list[Any]], list[Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """For the cells of ``rows``: a function giving a row's cells with each trajectory cell's payload replaced by
    what ``swap`` (one call for all of them: resolve handles to values, or store values as handles) made of it."""
    cells = [c for row in rows for c in row.values() if isinstance(c, TrajectoryCell)]
    new = dict(zip(map(id, cells), swap([c.payload for c in cells])))
    return lambda row: {k: dataclasses.replace(c, payload=new[id(c)]) if id(c) in new else c for k, c in row.items()}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))
