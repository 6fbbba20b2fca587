"""The streaming sample store: rows keyed by uid, filled column by column, handed out as complete groups.

Stages write the column they produce (``prompt`` at admission, ``generation``, ``reward``); a row is complete when
every column in ``api.COLUMNS`` is filled, and a group when all its rows are. Consumers take the oldest complete
groups first, in whatever order they completed. A ledger records each uid's life (admitted → complete → consumed)
so no row is lost or consumed twice; a row hit by an infrastructure fault is reset with ``retry`` rather than scored.

Thread-safe: one lock, one condition that wakes waiting consumers when a group completes.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from rollflow.api import COLUMNS, GENERATION, PROMPT, REWARD, PromptCell, SampleRow


class StoreError(RuntimeError):
    pass


@dataclass
class _Row:
    cells: dict[str, Any] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    consumed: bool = False
    retries: int = 0

    def complete(self) -> bool:
        return all(c in self.cells for c in COLUMNS)


class SampleStore:
    def __init__(self) -> None:
        self._rows: dict[int, _Row] = {}
        self._groups: OrderedDict[int, list[int]] = OrderedDict()  # group id → uids, in admission order
        self._uids = itertools.count()
        self._cond = threading.Condition()
        self.consumed_total = 0

    def admit(self, cells: list[PromptCell]) -> list[int]:
        """Create one row per prompt cell; all cells of a call share a group id."""
        with self._cond:
            uids = []
            for cell in cells:
                uid = next(self._uids)
                self._rows[uid] = _Row({PROMPT: cell}, {"admitted": time.time()})
                self._groups.setdefault(cell.group_id, []).append(uid)
                uids.append(uid)
            return uids

    def put(self, uid: int, column: str, value: Any, **times: float) -> None:
        """Fill ``column`` of row ``uid``; ``times`` (e.g. started=, finished=) are recorded on the row."""
        if column not in COLUMNS or column == PROMPT:
            raise StoreError(f"column '{column}' cannot be written; writable columns: {', '.join(COLUMNS[1:])}")
        with self._cond:
            row = self._row(uid)
            if column in row.cells:
                raise StoreError(f"row {uid} already has column '{column}'; a stage wrote it twice")
            row.cells[column] = value
            row.times.update(times)
            if row.complete():
                self._cond.notify_all()

    def retry(self, uid: int) -> int:
        """Clear everything but the prompt so the row is produced again; returns how often it was retried."""
        with self._cond:
            row = self._row(uid)
            row.cells = {PROMPT: row.cells[PROMPT]}
            row.retries += 1
            return row.retries

    def pending(self, column: str) -> list[int]:
        """Rows that have every column before ``column`` and lack ``column``: the work queue of its stage."""
        before = COLUMNS[: COLUMNS.index(column)]
        with self._cond:
            return [u for u, r in self._rows.items() if column not in r.cells and all(c in r.cells for c in before)]

    def get(self, uid: int, column: str) -> Any:
        with self._cond:
            return self._row(uid).cells[column]

    def take_groups(self, k: int, timeout: float | None = None) -> list[list[SampleRow]]:
        """Block until ``k`` groups are complete, then hand out the oldest ``k`` of them and mark them consumed."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._ready()) >= k, timeout):
                raise TimeoutError(f"only {len(self._ready())} of {k} groups became complete within {timeout}s")
            now, out = time.time(), []
            for gid in self._ready()[:k]:
                uids = self._groups.pop(gid)
                rows = []
                for uid in uids:
                    row = self._rows.pop(uid)
                    if row.consumed:  # unreachable while the ledger holds; kept as the invariant's guard
                        raise StoreError(f"row {uid} consumed twice")
                    row.consumed = True
                    row.times["consumed"] = now
                    rows.append(SampleRow(uid, row.cells[PROMPT], row.cells[GENERATION], row.cells[REWARD], row.times))
                out.append(rows)
            self.consumed_total += sum(map(len, out))
            return out

    def _ready(self) -> list[int]:
        return [g for g, uids in self._groups.items() if all(self._rows[u].complete() for u in uids)]

    def _row(self, uid: int) -> _Row:
        try:
            return self._rows[uid]
        except KeyError:
            raise StoreError(f"row {uid} is not in the store (never admitted, or already consumed)") from None

    def counts(self) -> dict[str, int]:
        """Rows by stage: in flight (admitted, incomplete), ready (complete, not consumed), consumed so far."""
        with self._cond:
            done = sum(r.complete() for r in self._rows.values())
            return {"in_flight": len(self._rows) - done, "ready": done, "consumed": self.consumed_total}
