"""The ledger: an append-only record of every sample's life, so that "nothing lost, nothing trained twice" is
checked rather than assumed.

One JSON line per event, ``{"event", "uid", "t", ...}``: ``admitted`` (group, version), ``produced`` (column;
version for a versioned one), ``retried`` (column, why), ``dropped`` (why: rejected by its workflow, filtered),
``trained`` (step). ``check`` reads a ledger back and reports what breaks the invariant: a uid trained more than once,
a uid trained without having been admitted, and the uids neither trained nor dropped (in flight when the run ended,
or lost).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENTS = ("admitted", "produced", "retried", "dropped", "trained")


class Ledger:
    """Writes events to ``path`` (a new file per run); ``Ledger(None)`` records nothing."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._file = open(self.path, "w", encoding="utf-8") if self.path is not None else None

    def record(self, event: str, uid: int, **fields: Any) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"event": event, "uid": uid, "t": round(time.time(), 6), **fields}) + "\n")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class LedgerReport:
    counts: dict[str, int]  # events by kind
    trained_twice: list[int] = field(default_factory=list)
    trained_unknown: list[int] = field(default_factory=list)  # trained but never admitted
    unaccounted: list[int] = field(default_factory=list)  # admitted, never trained nor dropped: in flight or lost

    @property
    def clean(self) -> bool:
        """Nothing trained twice and nothing trained that was not admitted (in-flight rows are reported, not faults:
        a run admits ahead of the trainer only within its staleness bound, and stops when its steps are done)."""
        return not self.trained_twice and not self.trained_unknown

    def summary(self) -> str:
        parts = [f"{self.counts.get(e, 0)} {e}" for e in EVENTS]
        verdict = "clean" if self.clean else "NOT clean"
        lines = [f"ledger {verdict}: " + ", ".join(parts) + f"; {len(self.unaccounted)} admitted, neither trained nor dropped"]
        if self.trained_twice:
            lines.append(f"trained more than once: {_few(self.trained_twice)}")
        if self.trained_unknown:
            lines.append(f"trained but never admitted: {_few(self.trained_unknown)}")
        return "\n".join(lines)


def check(path: str | Path) -> LedgerReport:
    """Read ledger ``path`` and check its invariants (see ``LedgerReport``). A line that is not a JSON event is an
    error naming the file and line."""
    counts: Counter[str] = Counter()
    admitted, dropped, trained = set(), set(), Counter()
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            kind, uid = event["event"], int(event["uid"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a ledger event ({e}): {line[:80]!r}") from None
        counts[kind] += 1
        if kind == "admitted":
            admitted.add(uid)
        elif kind == "dropped":
            dropped.add(uid)
        elif kind == "trained":
            trained[uid] += 1
    return LedgerReport(
        dict(counts),
        trained_twice=sorted(u for u, k in trained.items() if k > 1),
        trained_unknown=sorted(set(trained) - admitted),
        unaccounted=sorted(admitted - set(trained) - dropped),
    )


def _few(uids: list[int]) -> str:
    return ", ".join(map(str, uids[:10])) + (f" … ({len(uids)} in all)" if len(uids) > 10 else "")
