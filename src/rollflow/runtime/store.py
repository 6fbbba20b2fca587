"""The streaming sample store: rows keyed by uid, filled column by column, handed out as complete groups.

The recipe declares the columns (``api.Column``). The first is written at admission; every other one by the stage
that produces it, once the row has the columns that stage reads. A stage's work queue is the rows that have what it
reads and lack its column, so stages that read the same column (GRPO's reward and reference both read the
trajectory) run side by side. A row is complete when every column is filled, a group when all its rows are.
Consumers take the oldest complete groups first, in whatever order they completed, except that a group which would
otherwise go too stale must be taken now (see ``try_take_groups``). A row hit by an infrastructure fault is reset
with ``retry`` rather than scored. ``consumed_total`` and ``dropped_total`` count the rows that left.

Thread-safe: one lock.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from rollflow.api import Column, SampleRow


class StoreError(RuntimeError):
    pass


@dataclass
class _Row:
    group: int
    cells: dict[str, Any] = field(default_factory=dict)
    admitted: float = 0.0
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)  # column → (started, finished)
    retries: int = 0
    admitted_version: int = 0
    version: int = 0  # a lower bound on the version of every token the row holds or will hold


class SampleStore:
    def __init__(self, columns: Sequence[Column]) -> None:
        if not columns or columns[0].reads:
            raise StoreError("the first column is written at admission: declare it first, reading nothing")
        seen: set[str] = set()
        for c in columns:
            if c.name in seen:
                raise StoreError(f"column '{c.name}' is declared twice")
            if unknown := [r for r in c.reads if r not in seen]:
                raise StoreError(f"column '{c.name}' reads {unknown}, which no earlier column provides")
            seen.add(c.name)
        self.columns = {c.name: c for c in columns}
        self.admission = columns[0].name
        self._rows: dict[int, _Row] = {}
        self._groups: OrderedDict[int, list[int]] = OrderedDict()  # group id → uids, in admission order
        self._eta: dict[int, int] = {}  # group id → the staleness bound in force when it was admitted
        self._uids = itertools.count()
        self._issued = 0  # the next uid
        self._lock = threading.Lock()
        self.consumed_total = 0
        self.dropped_total = 0

    def admit(self, group_id: int, values: list[Any], version: int = 0, eta: int = 0) -> list[int]:
        """Create one row per value of the admission column, all in group ``group_id``, admitted while the trainer
        is at ``version`` under staleness bound ``eta``."""
        with self._lock:
            if group_id in self._groups:
                raise StoreError(f"group {group_id} is already in the store")
            uids = [next(self._uids) for _ in values]
            self._issued = uids[-1] + 1 if uids else self._issued
            for uid, value in zip(uids, values):
                self._rows[uid] = _Row(group_id, {self.admission: value}, time.time(),
                                       admitted_version=version, version=version)
            self._groups[group_id] = uids
            self._eta[group_id] = eta
            return uids

    def put(self, uid: int, column: str, value: Any, started: float | None = None, finished: float | None = None) -> None:
        """Fill ``column`` of row ``uid``, produced from ``started`` to ``finished`` (default: now). The row keeps
        the earliest start and the latest finish of its columns, and each column's finish under its name."""
        if column not in self.columns or column == self.admission:
            writable = [c for c in self.columns if c != self.admission]
            raise StoreError(f"column '{column}' cannot be written; writable columns: {', '.join(writable)}")
        with self._lock:
            row = self._row(uid)
            if column in row.cells:
                raise StoreError(f"row {uid} already has column '{column}'; a stage wrote it twice")
            row.cells[column] = value
            now = time.time()
            row.spans[column] = (now if started is None else started, now if finished is None else finished)
            if self.columns[column].versioned and getattr(value, "version", -1) >= 0:
                row.version = max(row.version, value.version)

    def retry(self, uid: int, column: str | None = None) -> int:
        """Clear ``column`` of row ``uid`` and every column that reads it, directly or not, so they are produced again
        (None: everything but the admission column); returns how often the row was retried. A reward that failed for
        the infrastructure's sake is thus computed again on the same trajectory, not on a new one (which would bias
        training toward samples that do not break the reward)."""
        with self._lock:
            row = self._row(uid)
            cleared = set(self.columns) - {self.admission} if column is None else self._downstream(column)
            row.cells = {c: v for c, v in row.cells.items() if c not in cleared}
            row.spans = {c: span for c, span in row.spans.items() if c in row.cells}
            if any(self.columns[c].versioned for c in cleared):
                row.version = row.admitted_version
            row.retries += 1
            return row.retries

    def _downstream(self, column: str) -> set[str]:
        """``column`` and every column that reads it, directly or through others."""
        out = {column}
        for c in self.columns.values():  # declared in order: a reader comes after what it reads
            if any(r in out for r in c.reads):
                out.add(c.name)
        return out

    def pending(self, column: str) -> list[int]:
        """Rows that have every column ``column`` reads and lack ``column``: its stage's work queue."""
        reads = self.columns[column].reads
        with self._lock:
            return [u for u, r in self._rows.items() if column not in r.cells and all(c in r.cells for c in reads)]

    def group_of(self, uid: int) -> int:
        with self._lock:
            return self._row(uid).group

    def complete_group(self, uid: int) -> list[int] | None:
        """The uids of ``uid``'s group if every one of its rows is complete, else None (also once it left the store)."""
        with self._lock:
            row = self._rows.get(uid)
            if row is None:
                return None
            uids = self._groups[row.group]
            return list(uids) if all(self._complete(self._rows[u]) for u in uids) else None

    def group_uids(self, group_id: int) -> list[int]:
        with self._lock:
            return list(self._groups.get(group_id, []))

    def drop_group(self, group_id: int) -> int:
        """Remove a whole group that will not be trained on (filtered out, or rejected by its workflow); its rows
        count as dropped, never as consumed. Returns how many rows it had."""
        with self._lock:
            if group_id not in self._groups:
                raise StoreError(f"group {group_id} is not in the store")
            uids = self._groups.pop(group_id)
            del self._eta[group_id]
            for uid in uids:
                del self._rows[uid]
            self.dropped_total += len(uids)
            return len(uids)

    def uids(self) -> list[int]:
        """Every row in the store, in admission order."""
        with self._lock:
            return list(self._rows)

    def __contains__(self, uid: int) -> bool:
        with self._lock:
            return uid in self._rows

    def cells(self, uid: int) -> dict[str, Any]:
        """Every column row ``uid`` has, by name."""
        with self._lock:
            return dict(self._row(uid).cells)

    def get(self, uid: int, column: str) -> Any:
        with self._lock:
            return self._row(uid).cells[column]

    def try_take_groups(self, k: int, version: int) -> list[list[SampleRow]] | None:
        """The next batch of ``k`` complete groups for a trainer at ``version``, or None if it cannot be formed yet.

        A group's *deadline* is ``m + η`` with ``m`` the lowest version any of its tokens has or will have and ``η``
        the bound it was admitted under: trained any later, a token of it would be more than ``η`` versions behind.
        Taking a young group ahead of an older unfinished one uses up a step the older one may need, so the batch
        first takes the groups that earliest-deadline-first scheduling says cannot wait (all groups past their
        deadline, and enough of the next ones that each later step still has room for what is due by then). Those
        must be complete: the trainer waits for a slow one rather than let it go stale. The rest of the batch is the
        oldest other complete groups. The admission budget guarantees that no more than ``k`` groups are ever forced
        into one step."""
        with self._lock:
            chosen = self._choose(k, version)
            return None if chosen is None else self._consume(chosen)

    def _choose(self, k: int, version: int) -> list[int] | None:
        ready = self._ready()
        # Steps v, v+1, … each take k groups, so the groups with deadline ≤ v + j must fit in j + 1 steps
        # (earliest-deadline-first feasibility). This step must therefore take the `need` earliest-deadline groups
        # (complete ones first among equal deadlines).
        complete = set(ready)
        position = {g: i for i, g in enumerate(self._groups)}
        deadline = {g: min(self._rows[u].version for u in uids) + self._eta[g] for g, uids in self._groups.items()}
        order = sorted(self._groups, key=lambda g: (deadline[g], g not in complete, position[g]))
        need = 0
        for count, g in enumerate(order, 1):
            need = max(need, count - k * max(0, deadline[g] - version))
        if need > k:
            raise StoreError(f"{need} groups must be trained at version {version} but a step takes {k}; admission "
                             f"exceeded the staleness budget")
        mandatory = order[:need]
        if any(g not in complete for g in mandatory):
            return None  # wait for a group that would otherwise go too stale
        chosen = set(mandatory)
        rest = [g for g in ready if g not in chosen]
        return mandatory + rest[: k - need] if need + len(rest) >= k else None

    def _consume(self, gids: list[int]) -> list[list[SampleRow]]:
        now, out = time.time(), []
        for gid in gids:
            del self._eta[gid]
            rows = []
            for uid in self._groups.pop(gid):
                row = self._rows.pop(uid)
                rows.append(SampleRow(uid, gid, row.cells, _timestamps(row, now)))
            out.append(rows)
        self.consumed_total += sum(map(len, out))
        return out

    def _ready(self) -> list[int]:
        return [g for g, uids in self._groups.items() if all(self._complete(self._rows[u]) for u in uids)]

    def _complete(self, row: _Row) -> bool:
        return len(row.cells) == len(self.columns)

    def _row(self, uid: int) -> _Row:
        try:
            return self._rows[uid]
        except KeyError:
            raise StoreError(f"row {uid} is not in the store (never admitted, or already consumed)") from None

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def snapshot(self, pack: Callable[[dict[str, Any]], dict[str, Any]] = dict) -> dict[str, Any]:
        """The store's whole state, for a checkpoint: every row not yet consumed with the columns it has (``pack``
        turns a row's cells into what can be saved, e.g. payload handles into their values), in admission order."""
        with self._lock:
            rows = {uid: replace(row, cells=pack(row.cells), spans=dict(row.spans)) for uid, row in self._rows.items()}
            return {"rows": rows, "groups": {g: list(u) for g, u in self._groups.items()}, "eta": dict(self._eta),
                    "next_uid": self._issued,
                    "consumed": self.consumed_total, "dropped": self.dropped_total}

    def restore(self, state: dict[str, Any], unpack: Callable[[dict[str, Any]], dict[str, Any]] = dict) -> None:
        """Take the state ``snapshot`` gave (into an empty store); ``unpack`` undoes its ``pack``."""
        with self._lock:
            if self._rows or self._groups:
                raise StoreError("restore needs an empty store")
            self._rows = {uid: replace(row, cells=unpack(row.cells)) for uid, row in state["rows"].items()}
            self._groups = OrderedDict((g, list(u)) for g, u in state["groups"].items())
            self._eta = dict(state["eta"])
            self._issued = state["next_uid"]
            self._uids = itertools.count(self._issued)
            self.consumed_total, self.dropped_total = state["consumed"], state["dropped"]

    def counts(self) -> dict[str, int]:
        """Rows by stage: in flight (admitted, incomplete), ready (complete, not consumed), consumed and dropped so far."""
        with self._lock:
            done = sum(self._complete(r) for r in self._rows.values())
            return {"in_flight": len(self._rows) - done, "ready": done, "consumed": self.consumed_total,
                    "dropped": self.dropped_total}


def _timestamps(row: _Row, consumed: float) -> dict[str, float]:
    """A consumed row's timestamps: admitted, the earliest start and latest finish of its columns, each column's
    finish under its name, consumed."""
    starts, ends = [a for a, _ in row.spans.values()], [b for _, b in row.spans.values()]
    return {"admitted": row.admitted, "started": min(starts, default=row.admitted),
            "finished": max(ends, default=row.admitted), **{c: b for c, (_, b) in row.spans.items()}, "consumed": consumed}
