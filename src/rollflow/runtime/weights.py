"""Weight publishing: the trainer publishes each version once; rollout workers pull the newest at a safe point."""

from __future__ import annotations

import threading

from rollflow.api import VersionedWeights


class InlineWeightTransport:
    """In-process transport: keeps the latest published version. Engines verify the checksum on load."""

    def __init__(self) -> None:
        self._latest: VersionedWeights | None = None
        self._pins: dict[str, VersionedWeights] = {}
        self._lock = threading.Lock()

    def publish(self, weights: VersionedWeights) -> None:
        with self._lock:
            if self._latest is not None and weights.version <= self._latest.version:
                raise ValueError(f"version {weights.version} published after version {self._latest.version}; versions must increase")
            self._latest = weights

    def latest(self, newer_than: int) -> VersionedWeights | None:
        with self._lock:
            return self._latest if self._latest is not None and self._latest.version > newer_than else None

    def newest_version(self) -> int:
        with self._lock:
            return -1 if self._latest is None else self._latest.version

    def pin(self, name: str, weights: VersionedWeights | None = None) -> None:
        with self._lock:
            chosen = weights if weights is not None else self._latest
            if chosen is None:
                raise ValueError(f"nothing to pin as {name!r}: no version published yet")
            self._pins[name] = chosen

    def pinned(self, name: str) -> VersionedWeights | None:
        with self._lock:
            return self._pins.get(name)
