"""The single controller: drives prompts through the worker groups and the store, within the staleness budget.

The recipe calls ``admit`` → ``produce`` → ``next_batch`` once per step; this class owns the bookkeeping between
those calls (which rows each stage still owes, retries of infrastructure faults, timings). With the inline
backend every call runs to completion in order, so η = 0 is exactly synchronous on-policy training.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from rollflow.api import GENERATION, PROMPT, REWARD, Problem, PromptCell, SampleRow, Status
from rollflow.runtime.group import WorkerGroup
from rollflow.runtime.staleness import StalenessBudget
from rollflow.runtime.store import SampleStore


class Controller:
    def __init__(
        self,
        store: SampleStore,
        budget: StalenessBudget,
        rollout: WorkerGroup,
        reward: WorkerGroup,
        problems: Iterator[Problem],
        encode: Callable[[str], list[int]],
        group_size: int,
        max_retries: int = 2,
    ) -> None:
        self.store, self.budget = store, budget
        self.rollout, self.reward = rollout, reward
        self.problems, self.encode = problems, encode
        self.group_size, self.max_retries = group_size, max_retries
        self._next_group = 0
        self._retries: dict[int, int] = {}  # uid → infra retries so far
        self.infra_retries = 0

    def admit(self, version: int) -> int:
        """Admit whole groups while the staleness budget at ``version`` has room; returns samples admitted."""
        admitted = 0
        while self.budget.admit(version, self.group_size):
            problem = next(self.problems)
            ids = self.encode(problem.prompt)
            self.store.admit([PromptCell(self._next_group, problem, ids)] * self.group_size)
            self._next_group += 1
            admitted += self.group_size
        return admitted

    def produce(self) -> dict[str, float]:
        """Generate and score every row that needs it; rows hit by an infrastructure fault are retried up to
        ``max_retries`` times, then kept as ``infra_error`` (the trainer masks them; they never become a 0 reward)."""
        t = {"generate": 0.0, "reward": 0.0}
        while pending := self.store.pending(GENERATION):
            t0 = time.perf_counter()
            items = [(uid, self.store.get(uid, PROMPT).prompt_ids) for uid in pending]
            for g in self.rollout.generate(items):
                self.store.put(g.uid, GENERATION, g.generation, started=g.started, finished=g.finished)
            t["generate"] += time.perf_counter() - t0

            t0 = time.perf_counter()
            items = [(u, self.store.get(u, PROMPT).problem, self.store.get(u, GENERATION).response_text) for u in self.store.pending(REWARD)]
            for uid, cell in self.reward.score(items):
                if cell.result.status is Status.INFRA_ERROR and self._retries.get(uid, 0) < self.max_retries:
                    self._retries[uid] = self.store.retry(uid)
                    self.infra_retries += 1
                    continue
                self.store.put(uid, REWARD, cell, finished=time.time())
            t["reward"] += time.perf_counter() - t0
        return t

    def next_batch(self, groups: int, timeout: float | None = None) -> list[list[SampleRow]]:
        return self.store.take_groups(groups, timeout)

