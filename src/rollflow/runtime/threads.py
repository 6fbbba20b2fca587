"""A thread pool whose caller may give up on a job that runs too long.

Python cannot kill a thread. A job given up on (``DaemonPool.abandon``) keeps its thread until its function returns,
if it ever does; a fresh thread takes the thread's place at once, so the pool keeps ``size`` threads serving the
queue, and the old one exits when its function returns. The threads are daemons: one stuck for good does not keep the
process from exiting (Python joins a ``ThreadPoolExecutor``'s threads at exit, so one stuck there would).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Job:
    """One submitted call: its future, and when a thread took it (``None`` while it waits in the queue)."""

    future: Future = field(default_factory=Future)
    began: float | None = None  # time.perf_counter()
    began_at: float | None = None  # time.time()
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _finished: bool = False
    _abandoned: bool = False


class DaemonPool:
    """Up to ``size`` daemon threads (started as jobs arrive) taking jobs from one queue, first in, first out.
    The threads end when the pool is garbage-collected."""

    def __init__(self, size: int, name: str = "pool") -> None:
        self.name, self.size = name, size
        self.abandoned = 0  # jobs given up on so far (their threads may still be running)
        self._queue: queue.SimpleQueue[tuple[Job, Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._threads = 0  # serving the queue (an abandoned thread no longer counts)
        self._names = itertools.count()
        self._lock = threading.Lock()
        # The threads hold the queue, not the pool: when the pool goes, one None each tells them to stop.
        weakref.finalize(self, _stop, self._queue, size)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Job:
        job = Job()
        self._queue.put((job, fn, args))
        with self._lock:
            if self._threads < self.size:
                self._spawn()
        return job

    def abandon(self, job: Job) -> bool:
        """Give up on a running ``job`` and start a thread in its place; False (nothing done) if it has just
        finished, in which case its future holds the result."""
        with job._lock:
            if job._finished:
                return False
            job._abandoned = True
        with self._lock:
            self.abandoned += 1
            self._threads -= 1
            self._spawn()
        return True

    def _spawn(self) -> None:
        self._threads += 1
        threading.Thread(target=_serve, args=(self._queue,), name=f"{self.name}-{next(self._names)}", daemon=True).start()


def _stop(jobs: queue.SimpleQueue[Any], size: int) -> None:
    for _ in range(size):  # at most `size` threads serve the queue; a None left over is never read
        jobs.put(None)


def _serve(jobs: queue.SimpleQueue[tuple[Job, Callable[..., Any], tuple[Any, ...]] | None]) -> None:
    while (item := jobs.get()) is not None:
        job, fn, args = item
        if not job.future.set_running_or_notify_cancel():
            continue
        job.began_at, job.began = time.time(), time.perf_counter()
        try:
            result, error = fn(*args), None
        except BaseException as e:  # handed to the waiter, as a ThreadPoolExecutor does
            result, error = None, e
        with job._lock:
            job._finished = True
            abandoned = job._abandoned
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)
        if abandoned:
            return  # its replacement serves the queue now
