"""A recorder of a run's worker activity as a Chrome trace-event JSON file.

Spans (a worker generating, scoring, training), instants (a weight sync landing) and counters (queue depth) are
kept in memory and written as ``{"traceEvents": [...], "displayTimeUnit": "ms"}``, one thread per named track.
To look at it, open ui.perfetto.dev and drag trace.json onto it (chrome://tracing opens it too).

Times are wall-clock ``time.time()`` seconds as reported by the workers, so they are comparable only on one machine
or across an NTP-synced cluster. They are written as microseconds relative to ``t0 = min(construction time,
earliest event)``, taken at write time, so every ``ts`` is >= 0 even when a worker reports an event that began
before the tracer existed. Not covered: flow arrows between tracks, multiple processes, streaming to disk.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class _Event:
    ph: str  # "X" span, "i" instant, "C" counter
    track: str | None  # None for counters, which Perfetto draws per process
    name: str
    t: float  # seconds, absolute
    dur: float  # seconds; 0 for instants and counters
    args: dict[str, object]


def _us(seconds: float) -> float:
    # Nanosecond rounding hides float noise such as (1000.1 - 1000.0) * 1e6 == 99999.9999999
    return round(seconds * 1e6, 3)


class Tracer:
    """Thread-safe (one lock). With ``enabled=False`` recording is a no-op and ``write`` writes an empty trace."""

    def __init__(self, enabled: bool = True, process: str = "rollflow") -> None:
        self.enabled, self.process = enabled, process
        self._t0 = time.time()
        self._tids: dict[str, int] = {}  # track name → tid, in first-seen order
        self._events: list[_Event] = []
        self._lock = threading.Lock()

    def _record(self, event: _Event) -> None:
        # Checked here rather than at write time so the error points at the caller that passed the bad value
        for k, v in event.args.items():
            if not isinstance(v, _SCALARS):
                where = f" on track {event.track!r}" if event.track is not None else ""
                raise TypeError(
                    f"{event.name!r}{where}: arg {k!r} is a {type(v).__name__}; "
                    "trace args must be str, int, float, bool or None"
                )
        with self._lock:
            if event.track is not None and event.track not in self._tids:
                self._tids[event.track] = len(self._tids) + 1
            self._events.append(event)

    def span(self, track: str, name: str, start: float, end: float, **args: object) -> None:
        """A complete event from ``start`` to ``end`` (``time.time()`` seconds) on ``track``."""
        if not self.enabled:
            return
        if end < start:
            raise ValueError(
                f"span {name!r} on track {track!r} ends before it starts (start={start}, end={end}); "
                "pass the worker's time.time() at start and at end"
            )
        self._record(_Event("X", track, name, start, end - start, args))

    def instant(self, track: str, name: str, at: float, **args: object) -> None:
        if not self.enabled:
            return
        self._record(_Event("i", track, name, at, 0.0, args))

    def counter(self, name: str, at: float, **values: float) -> None:
        """One sample of the counter series ``name``; each keyword is a series drawn under it."""
        if not self.enabled:
            return
        self._record(_Event("C", None, name, at, 0.0, dict(values)))

    def write(self, path: str | os.PathLike[str]) -> Path:
        with self._lock:
            events, tids = list(self._events), dict(self._tids)
        t0 = min([self._t0, *(e.t for e in events)])
        meta: list[dict[str, object]] = [
            {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": self.process}}
        ]
        for track, tid in tids.items():
            meta.append({"ph": "M", "name": "thread_name", "pid": 1, "tid": tid, "args": {"name": track}})
            meta.append({"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": tid, "args": {"sort_index": tid}})
        body: list[dict[str, object]] = []
        for e in sorted(events, key=lambda e: e.t):  # stable: ties keep recording order
            ev: dict[str, object] = {"ph": e.ph, "name": e.name, "pid": 1, "ts": _us(e.t - t0), "args": e.args}
            if e.track is not None:
                ev["tid"] = tids[e.track]
            if e.ph == "X":
                ev["dur"] = _us(e.dur)
            elif e.ph == "i":
                ev["s"] = "t"
            body.append(ev)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"traceEvents": meta + body, "displayTimeUnit": "ms"}))
        return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)
