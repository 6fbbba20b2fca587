"""Checkpoint directories: written atomically, the last K kept, a half-written one never loaded.

``run_dir/checkpoints/step_000040/`` holds the files the recipe writes (the trainer's state, the driver's) and
``meta.json``, written last. The directory is first written under a temporary name, every file and the directory
fsynced, then renamed into place and its parent fsynced: a crash at any point leaves the previous checkpoints whole
and at most a temporary directory, which ``latest`` never returns and the next ``save`` removes. A checkpoint without
a readable ``meta.json`` is not a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PREFIX, TMP = "step_", ".tmp-"


class RunDirError(ValueError):
    """A run directory cannot be used as asked (a new run over an old one, a resume without a checkpoint or with an
    incompatible config); the message says what to do."""


def fsync_tree(path: Path) -> None:
    """fsync every file under ``path``, then the directories bottom-up, so a rename after it publishes whole files."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpoints:
    """The checkpoints of one run, in ``root``; ``keep`` newest are kept."""

    def __init__(self, root: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep at least one checkpoint, got keep={keep}")
        self.root, self.keep = Path(root), keep

    def save(self, step: int, write: Callable[[Path], dict[str, Any]], name: str | None = None) -> Path:
        """Checkpoint ``step``: ``write(folder)`` writes its files into ``folder`` and returns what ``meta.json``
        should record besides the step; returns the checkpoint's path, ``name`` (default ``step_NNNNNN``). Steps
        order the checkpoints, whatever their names (SFT's come before RL's, at steps ≤ 0)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(TMP + "*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)
        name = name or f"{PREFIX}{step:06d}"
        tmp = self.root / f"{TMP}{name}"
        tmp.mkdir()
        meta = {"step": step, "written": time.time(), **write(tmp)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        fsync_tree(tmp)
        final = self.root / name
        if final.exists():  # the same step saved again (a stop right after a periodic checkpoint): replace it
            old = self.root / f"{TMP}old-{name}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        fsync_dir(self.root)
        for path in self.complete()[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        return final

    def complete(self) -> list[Path]:
        """Every whole checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = [(meta["step"], p) for p in self.root.iterdir()
                 if p.is_dir() and not p.name.startswith(TMP) and (meta := read_meta(p)) is not None]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None


def read_meta(path: Path) -> dict[str, Any] | None:
    """A checkpoint's ``meta.json``, or None if it has none that parses (not a whole checkpoint)."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("step"), int) else None
