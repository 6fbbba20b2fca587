"""Policy workers: batched action inference served to many actor workers, for environments whose steps are costly.

With ``sim.inference=policy_workers`` an actor holds no weights. Each of its lockstep steps sends the observations of
its environments to one policy worker (``RemotePolicy``, actors spread over the policy workers), which gathers the
requests of every actor that arrive together into one forward pass (``rollout.Batcher``) on its own engine thread,
and picks newer weights up from the transport before each batch: a batch never mixes versions, and each answer
carries the version that chose it. A policy worker that dies or does not answer within ``rollout.engine_timeout``
fails the actor's call as an infrastructure fault (its fragments are produced again; the worker is rebuilt).

Actors then only step environments, and one process's inference serves all of them: the placement for simulators
whose steps cost more than a forward pass. With cheap environments (CartPole) the round trip per step costs more
than the forward pass it saves; there ``sim.inference=actor`` (inference inside the actor) is the faster placement.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from rollflow.api import InfraError, WeightTransport
from rollflow.runtime.backend import Peer
from rollflow.runtime.rollout import Batcher


class PolicyWorker:
    """Serves ``act`` to actor workers from ``engine`` (an ``api.PolicyEngine``), batching concurrent requests (at
    most ``max_batch`` observations a forward pass; a batch starts once no request came for ``gather`` seconds)."""

    def __init__(self, engine: Any, transport: WeightTransport, threads: int = 1, max_batch: int = 4096,
                 gather: float = 0.0005) -> None:
        self.engine, self.transport = engine, transport
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="policy", initializer=torch.set_num_threads,
                                           initargs=(threads,))
        self.batcher = Batcher(self._act, self.executor, max_batch, gather)
        self.requests = self.batches = 0
        self._checked = float("-inf")

    async def act(self, observations: torch.Tensor, fresh: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Actions (N, *act), log-probs (N,) and the version for ``observations`` (N, *obs) of one actor's step.
        ``fresh``: look for newer weights before answering (an actor call's first request, which keeps the staleness
        bound); otherwise weights are looked for at most every ``pickup_interval`` seconds."""
        self.requests += 1
        return await self.batcher.submit((observations, fresh))

    pickup_interval = 0.05  # asking the transport may be a remote call: not before every batch

    def _act(self, requests: list[tuple[torch.Tensor, bool]]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        now = time.perf_counter()
        if any(fresh for _, fresh in requests) or now - self._checked >= self.pickup_interval:
            self._checked = now
            latest = self.transport.latest(newer_than=self.engine.version)  # the safe point: between two batches
            if latest is not None:
                self.engine.load_weights(latest)
        self.batches += 1
        sizes = [len(r) for r, _ in requests]
        actions, logprobs = self.engine.act(torch.cat([r for r, _ in requests]))  # (ΣN, *act), (ΣN,)
        version = self.engine.version
        return [(a, lp, version) for a, lp in zip(actions.split(sizes), logprobs.split(sizes))]

    def stats(self) -> dict[str, int]:
        """Requests served and forward passes run so far (requests per batch: how many actors share one)."""
        return {"requests": self.requests, "batches": self.batches}


class RemotePolicy:
    """The policy engine of an actor whose inference runs in a policy worker (``peer``): ``act_async`` is what a
    batch workflow's requests call (``RolloutWorker`` looks for it); the actor itself never loads weights."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.version = -1  # the version of the last answer

    async def act_async(self, observations: torch.Tensor, fresh: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
        started = time.perf_counter()
        try:
            actions, logprobs, version = await self.peer.call("act", observations, fresh)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise InfraError(f"the policy worker failed after {time.perf_counter() - started:.1f} s: "
                             f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from e
        self.version = version
        return actions, logprobs, version

    def act(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise TypeError("RemotePolicy answers batch workflows only (act_async); run the simulator actor workflow")

    def load_weights(self, weights: Any) -> None:
        pass  # the policy worker holds the weights; an actor has none to load
