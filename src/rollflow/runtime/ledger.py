"""The ledger: an append-only record of every sample's life, so that "nothing lost, nothing trained twice" is
checked rather than assumed.

One JSON line per event, ``{"event", "uid", "t", ...}``: ``admitted`` (group, version), ``produced`` (column;
version for a versioned one), ``retried`` (column, why: its value was an infrastructure fault), ``readmitted``
(column, why: its worker was lost; or the run resumed from a checkpoint holding it), ``hung`` (its call ran past the
call timeout and its worker was killed), ``dropped`` (why: rejected by its workflow, filtered), ``trained`` (step),
``unfinished`` (in flight when the run ended, its steps done).

A run that goes back to a checkpoint (``--resume``, or a restart after the trainer died) appends
``{"event": "resumed", "step", "void_from"}``: every line from byte ``void_from`` (the ledger's size when that
checkpoint was written) up to this one describes work the checkpoint does not hold, which is done again after it, so
``check`` does not count those lines. The file itself is never rewritten.

``check`` reads a ledger back and reports what breaks the invariant: a uid trained more than once, a uid trained
without having been admitted, and (lost) an admitted uid neither trained, dropped nor unfinished at the end.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENTS = ("admitted", "produced", "retried", "readmitted", "hung", "dropped", "trained", "unfinished")


class Ledger:
    """Writes events to ``path`` (a new file, or with ``append`` the end of an existing one); ``Ledger(None)``
    records nothing."""

    def __init__(self, path: str | Path | None, append: bool = False) -> None:
        self.path = Path(path) if path is not None else None
        self._file = None
        if self.path is not None:
            self._file = open(self.path, "a" if append else "w", encoding="utf-8")
            if append and self._file.tell() and _last_byte(self.path) != b"\n":
                self._file.write("\n")  # a line cut off by a crash: end it, so the next event starts its own line

    def record(self, event: str, uid: int, **fields: Any) -> None:
        if self._file is not None:
            self._file.write(json.dumps({"event": event, "uid": uid, "t": round(time.time(), 6), **fields}) + "\n")

    def resumed(self, step: int, void_from: int) -> None:
        """The run went back to the checkpoint of ``step``, written when the ledger was ``void_from`` bytes long."""
        if self._file is not None:
            self._file.write(json.dumps({"event": "resumed", "step": step, "void_from": void_from, "t": round(time.time(), 6)}) + "\n")
            self._file.flush()

    def size(self) -> int:
        """Bytes written so far (flushed first): where a checkpoint taken now would resume the ledger from."""
        if self._file is None:
            return 0
        self._file.flush()
        return self._file.tell()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1)


@dataclass
class LedgerReport:
    counts: dict[str, int]  # events by kind (void lines left out)
    trained_twice: list[int] = field(default_factory=list)
    trained_unknown: list[int] = field(default_factory=list)  # trained but never admitted
    unaccounted: list[int] = field(default_factory=list)  # admitted; never trained, dropped nor unfinished at the end
    resumes: int = 0  # times the run went back to a checkpoint
    void_lines: int = 0  # lines of work redone after a resume

    @property
    def clean(self) -> bool:
        """Nothing trained twice, nothing trained that was not admitted, nothing lost."""
        return not self.trained_twice and not self.trained_unknown and not self.unaccounted

    def summary(self) -> str:
        parts = [f"{self.counts.get(e, 0)} {e}" for e in EVENTS]
        verdict = "clean" if self.clean else "NOT clean"
        lines = [f"ledger {verdict}: " + ", ".join(parts) + f"; {len(self.unaccounted)} lost"
                 + (f"; {self.resumes} resume(s), {self.void_lines} line(s) of redone work not counted" if self.resumes else "")]
        if self.trained_twice:
            lines.append(f"trained more than once: {_few(self.trained_twice)}")
        if self.trained_unknown:
            lines.append(f"trained but never admitted: {_few(self.trained_unknown)}")
        if self.unaccounted:
            lines.append(f"admitted but neither trained, dropped nor unfinished at the end (lost): {_few(self.unaccounted)}")
        return "\n".join(lines)


def check(path: str | Path) -> LedgerReport:
    """Read ledger ``path`` and check its invariants (see ``LedgerReport``). A line that is not a JSON event is an
    error naming the file and line, except a last line cut off by a crash (no newline), which is skipped; so is a
    line a later resume voids (cut off or not)."""
    data = Path(path).read_bytes()
    lines: list[tuple[int, int, bytes]] = []  # (line number, byte offset, text)
    offset = 0
    for n, line in enumerate(data.split(b"\n"), 1):
        lines.append((n, offset, line))
        offset += len(line) + 1
    events: list[tuple[int, int, dict[str, Any]]] = []
    voids: list[tuple[int, int]] = []  # [from, to) byte ranges of redone work
    for n, at, line in lines:
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            kind = event["event"]
            if kind == "resumed":
                voids.append((int(event["void_from"]), at))
                continue
            event["uid"] = int(event["uid"])
        except (ValueError, KeyError, TypeError) as e:
            if n == len(lines) or any(a <= at < b for a, b in voids) or _voided_later(at, lines[n:]):
                continue  # cut off by a crash (the last line, or one a later resume voids)
            raise ValueError(f"{path}:{n}: not a ledger event ({e}): {line[:80]!r}") from None
        events.append((n, at, event))
    counts: Counter[str] = Counter()
    admitted, dropped, unfinished, trained = set(), set(), set(), Counter()
    void = 0
    for _, at, event in events:
        if any(a <= at < b for a, b in voids):
            void += 1
            continue
        kind, uid = event["event"], event["uid"]
        counts[kind] += 1
        if kind == "admitted":
            admitted.add(uid)
        elif kind == "dropped":
            dropped.add(uid)
        elif kind == "unfinished":
            unfinished.add(uid)
        elif kind == "trained":
            trained[uid] += 1
    return LedgerReport(
        dict(counts),
        trained_twice=sorted(u for u, k in trained.items() if k > 1),
        trained_unknown=sorted(set(trained) - admitted),
        unaccounted=sorted(admitted - set(trained) - dropped - unfinished),
        resumes=len(voids),
        void_lines=void,
    )


def _voided_later(at: int, rest: list[tuple[int, int, bytes]]) -> bool:
    """Whether a later ``resumed`` line voids byte ``at`` (a line a crash cut off, before the run resumed)."""
    for _, _, line in rest:
        if b'"resumed"' in line:
            try:
                if int(json.loads(line)["void_from"]) <= at:
                    return True
            except (ValueError, KeyError, TypeError):
                continue
    return False


def _few(uids: list[int]) -> str:
    return ", ".join(map(str, uids[:10])) + (f" … ({len(uids)} in all)" if len(uids) > 10 else "")
