"""The streaming sample store: rows keyed by uid, filled column by column, handed out as complete groups.

Stages write the column they produce (``prompt`` at admission, ``generation``, ``reward``, and ``reference`` when the
store is built with it); a row is complete when every column of the store is filled, and a group when all its rows
are. A stage's work queue is the rows that have what it reads (``api.NEEDS``) and lack its column, so stages that
read the same column (reward and reference both read the generation) run side by side. Consumers take the oldest complete
groups first, in whatever order they completed, except that a group which would otherwise go too stale must be
taken now (see ``take_groups``). A ledger records each uid's life (admitted → complete → consumed)
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

from rollflow.api import COLUMNS, GENERATION, NEEDS, PROMPT, REFERENCE, REWARD, PromptCell, SampleRow


class StoreError(RuntimeError):
    pass


@dataclass
class _Row:
    cells: dict[str, Any] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    consumed: bool = False
    retries: int = 0
    admitted_version: int = 0
    version: int = 0  # a lower bound on the version of every token the row holds or will hold


class SampleStore:
    def __init__(self, columns: tuple[str, ...] = COLUMNS) -> None:
        unknown = [c for c in columns if c not in (*COLUMNS, *NEEDS)]
        if unknown or any(c not in columns for c in COLUMNS):
            raise StoreError(f"store columns {columns} must include {COLUMNS} and may add {REFERENCE!r}")
        self.columns = columns
        self._rows: dict[int, _Row] = {}
        self._groups: OrderedDict[int, list[int]] = OrderedDict()  # group id → uids, in admission order
        self._uids = itertools.count()
        self._cond = threading.Condition()
        self.consumed_total = 0
        self.dropped_total = 0

    def admit(self, cells: list[PromptCell], version: int = 0) -> list[int]:
        """Create one row per prompt cell, admitted while the trainer is at ``version``; all cells of a call share
        a group id."""
        with self._cond:
            uids = []
            for cell in cells:
                uid = next(self._uids)
                self._rows[uid] = _Row({PROMPT: cell}, {"admitted": time.time()}, admitted_version=version, version=version)
                self._groups.setdefault(cell.group_id, []).append(uid)
                uids.append(uid)
            return uids

    def put(self, uid: int, column: str, value: Any, **times: float) -> None:
        """Fill ``column`` of row ``uid``; ``times`` (e.g. started=, finished=) are recorded on the row."""
        if column not in self.columns or column == PROMPT:
            raise StoreError(f"column '{column}' cannot be written; writable columns: {', '.join(self.columns[1:])}")
        with self._cond:
            row = self._row(uid)
            if column in row.cells:
                raise StoreError(f"row {uid} already has column '{column}'; a stage wrote it twice")
            row.cells[column] = value
            row.times.update(times)
            if column == GENERATION and getattr(value, "version", -1) >= 0:
                row.version = max(row.version, value.version)
            if self._complete(row):
                self._cond.notify_all()

    def retry(self, uid: int) -> int:
        """Clear everything but the prompt so the row is produced again; returns how often it was retried."""
        with self._cond:
            row = self._row(uid)
            row.cells = {PROMPT: row.cells[PROMPT]}
            row.version = row.admitted_version
            row.retries += 1
            return row.retries

    def pending(self, column: str) -> list[int]:
        """Rows that have every column ``column``'s stage reads (``api.NEEDS``) and lack ``column``: its work queue."""
        needs = NEEDS[column]
        with self._cond:
            return [u for u, r in self._rows.items() if column not in r.cells and all(c in r.cells for c in needs)]

    def group_rows(self, uid: int) -> list[int] | None:
        """The uids of ``uid``'s group if every one of them has a reward, else None (also once it left the store)."""
        with self._cond:
            if uid not in self._rows:
                return None
            uids = self._groups[self._rows[uid].cells[PROMPT].group_id]
            return list(uids) if all(REWARD in self._rows[u].cells for u in uids) else None

    def drop_group(self, uids: list[int]) -> None:
        """Remove a whole group that will not be trained on (dynamic sampling filtered it out), with its ledger entry:
        the rows count as dropped, never as consumed."""
        with self._cond:
            gid = self._row(uids[0]).cells[PROMPT].group_id
            if sorted(self._groups.get(gid, [])) != sorted(uids):
                raise StoreError(f"drop_group needs every row of group {gid}; got {uids}")
            for uid in self._groups.pop(gid):
                del self._rows[uid]
            self.dropped_total += len(uids)

    def __contains__(self, uid: int) -> bool:
        with self._cond:
            return uid in self._rows

    def peek(self, uid: int, column: str) -> Any:
        """Row ``uid``'s ``column``, or None if the row lacks it or has left the store (consumed or dropped)."""
        with self._cond:
            row = self._rows.get(uid)
            return row.cells.get(column) if row is not None else None

    def get(self, uid: int, column: str) -> Any:
        with self._cond:
            return self._row(uid).cells[column]

    def take_groups(self, k: int, timeout: float | None = None, version: int | None = None, eta: int | None = None) -> list[list[SampleRow]]:
        """Block until a batch of ``k`` complete groups can be handed out (see ``try_take_groups``), then mark them
        consumed. Without ``version``/``eta`` it is simply the oldest ``k`` complete groups."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._choose(k, version, eta) is not None, timeout):
                raise TimeoutError(f"only {len(self._ready())} of {k} groups became complete within {timeout}s")
            return self._consume(self._choose(k, version, eta) or [])

    def try_take_groups(self, k: int, version: int, eta: int) -> list[list[SampleRow]] | None:
        """The next batch for a trainer at ``version`` under bound ``eta``, or None if it cannot be formed yet.

        A group's *deadline* is ``m + eta`` with ``m`` the lowest version any of its tokens has or will have:
        trained any later, a token of it would be more than ``eta`` versions behind. Taking a young group ahead of an
        older unfinished one uses up a step the older one may need, so the batch first takes the groups that
        earliest-deadline-first scheduling says cannot wait (all groups past their deadline, and enough of the
        next ones that each later step still has room for what is due by then). Those must be complete: the
        trainer waits for a slow one rather than let it go stale. The rest of the batch is the oldest other complete
        groups. The admission budget guarantees that no more than ``k`` groups are ever forced into one step."""
        with self._cond:
            chosen = self._choose(k, version, eta)
            return None if chosen is None else self._consume(chosen)

    def _choose(self, k: int, version: int | None, eta: int | None) -> list[int] | None:
        ready = self._ready()
        if version is None or eta is None:
            return ready[:k] if len(ready) >= k else None
        # Deadline of a group: the last version that may train it. Steps v, v+1, … each take k groups, so the
        # groups with deadline ≤ v + j must fit in j + 1 steps (earliest-deadline-first feasibility). This step must
        # therefore take the `need` earliest-deadline groups (complete ones first among equal deadlines).
        complete = set(ready)
        position = {g: i for i, g in enumerate(self._groups)}
        deadline = {g: min(self._rows[u].version for u in uids) + eta for g, uids in self._groups.items()}
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
            uids = self._groups.pop(gid)
            rows = []
            for uid in uids:
                row = self._rows.pop(uid)
                if row.consumed:  # unreachable while the ledger holds; kept as the invariant's guard
                    raise StoreError(f"row {uid} consumed twice")
                row.consumed = True
                row.times["consumed"] = now
                rows.append(SampleRow(uid, row.cells[PROMPT], row.cells[GENERATION], row.cells[REWARD], row.times,
                                      row.cells.get(REFERENCE)))
            out.append(rows)
        self.consumed_total += sum(map(len, out))
        return out

    def _ready(self) -> list[int]:
        return [g for g, uids in self._groups.items() if all(self._complete(self._rows[u]) for u in uids)]

    def _complete(self, row: _Row) -> bool:
        return all(c in row.cells for c in self.columns)

    def _row(self, uid: int) -> _Row:
        try:
            return self._rows[uid]
        except KeyError:
            raise StoreError(f"row {uid} is not in the store (never admitted, or already consumed)") from None

    def counts(self) -> dict[str, int]:
        """Rows by stage: in flight (admitted, incomplete), ready (complete, not consumed), consumed so far."""
        with self._cond:
            done = sum(self._complete(r) for r in self._rows.values())
            return {"in_flight": len(self._rows) - done, "ready": done, "consumed": self.consumed_total,
                    "dropped": self.dropped_total}
