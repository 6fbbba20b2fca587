"""A verifier that takes time: the same task, with each reward delayed by a log-normal duration.

Rewards that run generated code (tests, a sandbox, an ML training job) take a variable time per sample with a long
tail. ``with_reward_latency`` reproduces that for any task, so the asynchronous pipeline can be measured against it
(``benchmarks/async_vs_sync.py`` scenario (b)). The delay is a sleep, i.e. waiting, not CPU work, as with a
subprocess; it is a deterministic function of (seed, prompt, response), so reruns see the same delays.
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
import time

from rollflow.api import Problem, RewardResult, Task


def latency(seed: int, problem: Problem, response: str, median: float, sigma: float, cap: float) -> float:
    """Seconds the reward of (problem, response) takes: median·exp(σ·z), z ~ N(0, 1) from a hash, at most ``cap``."""
    digest = hashlib.blake2b(f"{seed}|{problem.prompt}|{response}".encode(), digest_size=8).digest()
    z = random.Random(int.from_bytes(digest, "little")).gauss(0.0, 1.0)
    return min(cap, median * math.exp(sigma * z))


def with_reward_latency(task: Task, median: float, sigma: float, cap: float, seed: int = 0) -> Task:
    """``task`` whose ``verify`` first sleeps ``latency(...)`` seconds."""
    verify = task.verify
    slow = copy.copy(task)

    def timed_verify(problem: Problem, response: str) -> RewardResult:
        time.sleep(latency(seed, problem, response, median, sigma, cap))
        return verify(problem, response)

    slow.verify = timed_verify  # type: ignore[method-assign]
    return slow
