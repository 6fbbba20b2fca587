"""Versioned weights and the transport that carries them from the trainer to rollout engines."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Protocol

import torch


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class WeightChecksumError(RuntimeError):
    pass


@dataclass(frozen=True)
class VersionedWeights:
    version: int
    tensors: dict[str, torch.Tensor]
    checksum: str
    published_at: float = 0.0  # time.time() when packed: pick-up delay = load time − this

    @classmethod
    def pack(cls, version: int, tensors: dict[str, torch.Tensor]) -> VersionedWeights:
        tensors = {k: v.detach().cpu().clone() for k, v in tensors.items()}
        return cls(version, tensors, checksum(tensors), time.time())

    def verify(self) -> None:
        """Raise if the tensors are not the ones the checksum was computed on."""
        got = checksum(self.tensors)
        if got != self.checksum:
            raise WeightChecksumError(
                f"weights of version {self.version} arrived corrupted: checksum {got[:12]}… != published "
                f"{self.checksum[:12]}…; the engine keeps its previous weights"
            )


class WeightTransport(Protocol):
    """Carries each published version from the trainer to every rollout engine."""

    def publish(self, weights: VersionedWeights) -> None: ...

    def latest(self, newer_than: int) -> VersionedWeights | None:
        """The newest published version if it is newer than ``newer_than``, else None (nothing is fetched)."""
        ...

    def newest_version(self) -> int:
        """The newest published version (-1 before the first), without fetching any weights: a cheap poll."""
        ...

    def pin(self, name: str, weights: VersionedWeights | None = None) -> None:
        """Keep ``weights`` (default: the newest published) under ``name`` for workers that need one version for
        good, e.g. a reference policy, also when rebuilt after a crash."""
        ...

    def pinned(self, name: str) -> VersionedWeights | None: ...
