"""The rollout worker: runs rollout workflows, many episodes at once, on one inference engine.

Each call (``rollout``) is one or more whole groups; their episodes run concurrently on the worker's event loop, as
do the episodes of every other call in flight. Episodes ask the engine for tokens (or actions) independently, and
the worker batches whatever is waiting, on its single engine thread (so environment steps go on meanwhile):

- text requests to an engine with decode sessions (``HFInferenceEngine``) join the running batch at the next
  decoding step and leave it when they end (``decode.ContinuousBatcher``: continuous batching, as vLLM does);
- action requests, and text requests to other engines, go as whole batches (``Batcher``).

Newly published weights are picked up only at a safe point: between two whole batches, or when the decode session
has drained (new rows wait meanwhile). One forward pass never mixes two versions, and every token records the
version that chose it.

Timeouts (``Limits``) are applied per episode and per engine / environment call, and classified as
``api.workflow`` says: the agent's side is ``Status.TIMEOUT``, the infrastructure's ``Status.INFRA_ERROR``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from rollflow.api import (
    Generation,
    InfraError,
    Reject,
    RolloutWorkflow,
    SamplingParams,
    Status,
    TrajectoryBuilder,
    TrajectoryCell,
    WeightTransport,
)
from rollflow.runtime.backend import LocalPayloads, Payloads
from rollflow.runtime.decode import ContinuousBatcher, Requests, offers_sessions
from rollflow.runtime.group import Mode, dispatch
from rollflow.runtime.stage import Produced, Span, StageOutput

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """Seconds allowed (None: no limit)."""

    episode: float | None = None  # a whole episode; past it: Status.TIMEOUT with what it produced so far
    engine: float | None = None  # one engine request, from asking to answer; past it: Status.INFRA_ERROR
    env: float | None = None  # one environment call; past it: Status.TIMEOUT (the agent's action ran too long)


class EpisodeTimeout(Exception):
    """An environment call ran past ``Limits.env``."""


class Batcher:
    """Gathers the requests of concurrent episodes and runs them as one call of ``run`` (items → results, in order)
    on ``executor``. While a batch runs, new requests wait for the next one; at most ``max_batch`` per call.

    Requests that belong together (a step's groups, sent as separate calls) arrive a little apart when they come from
    another process, and the engine's cost per batch is mostly per decoding step, not per sequence: so a batch starts
    only once no new request arrived for ``gather`` seconds (at most ``max_wait`` after its first), or it is full.

    Action requests, and text requests to an engine without decode sessions, are batched here; text requests to an
    engine with them are batched at every decoding step instead (``decode.ContinuousBatcher``)."""

    def __init__(self, run: Callable[[list[Any]], list[Any]], executor: ThreadPoolExecutor, max_batch: int,
                 gather: float = 0.0, max_wait: float = 0.05) -> None:
        self.run, self.executor, self.max_batch = run, executor, max_batch
        self.gather, self.max_wait = gather, max_wait
        self._waiting: list[tuple[Any, asyncio.Future]] = []
        self._drainer: asyncio.Task | None = None

    async def submit(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((item, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            await asyncio.sleep(0)  # one turn of the loop: every episode that is ready to ask asks first
            first, seen = loop.time(), len(self._waiting)
            while self.gather and seen < self.max_batch and loop.time() - first < self.max_wait:
                await asyncio.sleep(self.gather)
                if len(self._waiting) == seen:
                    break
                seen = len(self._waiting)
            batch = [(i, f) for i, f in self._waiting[: self.max_batch] if not f.done()]  # done: its asker gave up
            del self._waiting[: self.max_batch]
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.run, [i for i, _ in batch])
            except Exception as e:  # the engine failed: every asker of the batch gets the error
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_result(r)


class _Client:
    """``api.EngineClient`` over a rollout worker's batchers, with the engine timeout; a request without sampling
    parameters uses ``params`` (the episode's)."""

    def __init__(self, worker: RolloutWorker, params: SamplingParams) -> None:
        self.worker, self.params = worker, params

    @property
    def version(self) -> int:
        return self.worker.engine.version

    async def generate(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Generation:
        return await self._answer(self.worker.batcher(params or self.params).submit(prompt_ids))

    async def act(self, observation: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        return await self._answer(self.worker.batcher(None).submit(observation))

    async def act_batch(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.worker._act_batch(observations, check=True)

    async def _answer(self, request: Awaitable[T]) -> T:
        try:
            return await asyncio.wait_for(request, self.worker.limits.engine)
        except TimeoutError:
            raise InfraError(f"the inference engine did not answer within {self.worker.limits.engine} s") from None


class _BatchClient(_Client):
    """The engine as one ``BatchWorkflow`` call sees it. A vectorised actor asks once per environment step, so its
    requests run on the event loop's thread (under the engine lock: a hop to the engine thread costs several times a
    small policy's forward pass), and newer weights are looked for at the call's first request, then at most every
    ``RolloutWorker.pickup_interval`` seconds (asking the transport may be a remote call). The first look keeps the
    staleness bound: the call starts on weights at least as new as those its admission counted on."""

    def __init__(self, worker: RolloutWorker, params: SamplingParams) -> None:
        super().__init__(worker, params)
        self._checked: float | None = None

    async def act_batch(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        now = time.perf_counter()
        check = self._checked is None or now - self._checked >= self.worker.pickup_interval
        if check:
            self._checked = now
        remote = getattr(self.worker.engine, "act_async", None)
        if remote is not None:  # inference runs in a policy worker, which picks weights up itself when told to
            return await self._answer(remote(observations, check))
        return self.worker._act_batch(observations, check)


class _Context:
    """``api.EpisodeContext`` of one episode."""

    def __init__(self, worker: RolloutWorker, params: SamplingParams | None = None) -> None:
        self.params = params or worker.params
        self.engine = worker.client if params is None else _Client(worker, params)
        self.trajectory = TrajectoryBuilder()
        self.limits = worker.limits

    async def env(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        name = getattr(fn, "__qualname__", repr(fn))

        async def call() -> Any:
            # A plain function runs in a thread, so a slow one (running code) does not stop the other episodes.
            result = fn(*args, **kwargs) if inspect.iscoroutinefunction(fn) else await asyncio.to_thread(fn, *args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        try:
            return await asyncio.wait_for(call(), self.limits.env)
        except TimeoutError:
            raise EpisodeTimeout(f"environment call {name} ran past env_timeout={self.limits.env} s") from None
        except (InfraError, asyncio.CancelledError):
            raise
        except Exception as e:
            raise InfraError(f"environment call {name} raised {type(e).__name__}: {e}") from e


class RolloutWorker:
    """Runs ``workflow`` episodes on ``engine`` (an ``InferenceEngine`` for text, a ``PolicyEngine`` otherwise);
    ``max_batch`` and ``gather`` shape its engine batches (see ``Batcher``); ``continuous`` batches text requests at
    every decoding step when the engine offers decode sessions (``decode.ContinuousBatcher``), else in whole batches."""

    def __init__(
        self,
        engine: Any,
        transport: WeightTransport,
        workflow: RolloutWorkflow,
        params: SamplingParams | None = None,
        payloads: Payloads | None = None,
        limits: Limits = Limits(),
        threads: int = 1,
        max_batch: int = 256,
        gather: float = 0.0,
        continuous: bool = True,
        pickup_interval: float = 0.05,
    ) -> None:
        self.engine, self.transport, self.workflow = engine, transport, workflow
        self.params = params or SamplingParams()
        self.payloads = payloads or LocalPayloads()
        self.limits, self.max_batch, self.gather, self.continuous = limits, max_batch, gather, continuous
        self.pickup_interval = pickup_interval  # a batch workflow's calls look for new weights at most this often
        self.client = _Client(self, self.params)
        # One engine thread: engine calls, weight loads and evaluations run one at a time, off the event loop.
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="engine", initializer=torch.set_num_threads, initargs=(threads,))
        self._batchers: dict[SamplingParams | None, Batcher] = {}
        self._decoder: ContinuousBatcher | None = None  # text requests, when the engine decodes continuously
        self._spans: list[Span] = []  # engine batches and weight loads since the last call returned
        self._lock = threading.Lock()
        # Held by whatever uses the engine: the engine thread's calls, and a vectorised actor's requests, which run on
        # the event loop's thread (``_act_batch``). Reentrant: a request picks weights up under it.
        self._engine_lock = threading.RLock()

    # -- the stage ------------------------------------------------------------------------------------------------
    async def rollout(self, items: list[tuple[int, Any]]) -> StageOutput:
        """``items``: (uid, task instance). Runs every episode at once (a ``BatchWorkflow``: all in one call); the
        values are ``TrajectoryCell``s (their bulk in the payload store) or ``Reject``s."""
        if hasattr(self.workflow, "run_batch"):
            outcomes = await self._batch([task for _, task in items])
        else:
            outcomes = await asyncio.gather(*(self._episode(task) for _, task in items), return_exceptions=True)
        for (uid, _), out in zip(items, outcomes):
            if isinstance(out, BaseException):
                name = type(self.workflow).__name__
                raise RuntimeError(f"rollout workflow {name} failed on sample {uid}: {type(out).__name__}: {out}") from out
        produced = [(uid, out) for (uid, _), out in zip(items, outcomes)]
        kept = [t for _, (t, _, _) in produced if not isinstance(t, Reject)]
        handles = iter(self.payloads.put(kept))
        values = [Produced(uid, t if isinstance(t, Reject) else TrajectoryCell.of(t, next(handles)), started, finished)
                  for uid, (t, started, finished) in produced]
        with self._lock:
            spans, self._spans = self._spans, []
        return StageOutput(values, spans)

    async def _episode(self, task: Any, params: SamplingParams | None = None) -> tuple[Any, float, float]:
        ctx, started = _Context(self, params), time.time()
        try:
            out = await asyncio.wait_for(self.workflow.run(task, ctx), self.limits.episode)
        except (TimeoutError, EpisodeTimeout) as e:
            out = ctx.trajectory.build(status=Status.TIMEOUT, error=str(e) or f"episode ran past episode_timeout={self.limits.episode} s")
        except InfraError as e:
            out = ctx.trajectory.build(status=Status.INFRA_ERROR, error=str(e))
        return out, started, time.time()

    async def _batch(self, tasks: list[Any]) -> list[Any]:
        """``BatchWorkflow.run_batch`` on ``tasks`` as ``_episode`` runs one: a timeout or an infrastructure fault of
        the whole call is every instance's outcome; an exception of the workflow's own code is returned (a bug)."""
        ctx, started = _Context(self), time.time()
        ctx.engine = _BatchClient(self, self.params)
        try:
            outs = await asyncio.wait_for(self.workflow.run_batch(tasks, ctx), self.limits.episode)
        except (TimeoutError, EpisodeTimeout) as e:
            why = str(e) or f"the call ran past episode_timeout={self.limits.episode} s"
            outs = [TrajectoryBuilder().build(status=Status.TIMEOUT, error=why) for _ in tasks]
        except InfraError as e:
            outs = [TrajectoryBuilder().build(status=Status.INFRA_ERROR, error=str(e)) for _ in tasks]
        except Exception as e:
            return [e] * len(tasks)
        if len(outs) != len(tasks):
            bug = RuntimeError(f"run_batch returned {len(outs)} results for {len(tasks)} task instances")
            return [bug] * len(tasks)
        finished = time.time()
        self._record(Span("run_batch", started, finished, {"samples": len(tasks)}))  # the call is the engine's work
        return [(out, started, finished) for out in outs]

    def batcher(self, params: SamplingParams | None) -> Batcher | Requests:
        """The batcher of text requests with ``params``, or (None) of action requests: ``submit(item)``. Text requests
        to an engine that decodes continuously go to the worker's ``ContinuousBatcher`` (batched at every decoding
        step); any other engine gets whole batches from a ``Batcher``."""
        if params is not None and self.continuous and offers_sessions(self.engine):
            return self.decoder().bind(params)
        if params not in self._batchers:
            run = self._act if params is None else lambda prompts: self._generate(prompts, params)
            self._batchers[params] = Batcher(run, self.executor, self.max_batch, self.gather)
        return self._batchers[params]

    def decoder(self) -> ContinuousBatcher:
        """The continuous batcher of this worker's text requests (made at first use, from either thread)."""
        with self._lock:
            if self._decoder is None:
                def newer() -> bool:  # polled while requests wait: reads the board's version, not the weights
                    return self.transport.newest_version() > self.engine.version

                self._decoder = ContinuousBatcher(self.engine, self.executor, self.max_batch, newer, self._pick_up, self._record)
            return self._decoder

    # -- the engine thread ----------------------------------------------------------------------------------------
    def _generate(self, prompts: list[list[int]], params: SamplingParams, record: bool = True) -> list[Generation]:
        with self._engine_lock:
            return self._generate_locked(prompts, params, record)

    def _generate_locked(self, prompts: list[list[int]], params: SamplingParams, record: bool) -> list[Generation]:
        if self._decoder is not None:
            self._decoder.drain()  # rows decoding on the old weights end first: the pick-up must not land under them
        self._pick_up()
        started = time.time()
        out = self.engine.generate(prompts, params)
        if record:  # an evaluation's batch is not the stage's work
            self._record(Span("generate", started, time.time(), {"samples": len(prompts), "version": self.engine.version}))
        return out

    def _act(self, observations: list[torch.Tensor]) -> list[tuple[torch.Tensor, float, int]]:
        with self._engine_lock:
            self._pick_up()
            started = time.time()
            actions, logprobs = self.engine.act(torch.stack(observations))
            version = self.engine.version
        self._record(Span("act", started, time.time(), {"samples": len(observations), "version": version}))
        return [(a, float(lp), version) for a, lp in zip(actions, logprobs)]

    def _act_batch(self, observations: torch.Tensor, check: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
        # No span per call: a vectorised actor asks once per environment step; its whole call is the stage's span.
        with self._engine_lock:
            if check:
                self._pick_up()
            actions, logprobs = self.engine.act(observations)
            return actions, logprobs, self.engine.version

    def _exclusive(self, fn: Callable[[], T]) -> T:
        with self._engine_lock:
            return fn()

    def _pick_up(self) -> None:
        # The safe point: only here, between two engine batches, so every forward pass sees one version.
        latest = self.transport.latest(newer_than=self.engine.version)
        if latest is None:
            return
        t = time.perf_counter()
        self.engine.load_weights(latest)  # verifies the checksum first; on mismatch the old weights stay
        now = time.time()
        self._record(Span("load weights", now - (time.perf_counter() - t), now,
                          {"version": latest.version, "published_at": latest.published_at}))

    def _record(self, span: Span) -> None:
        with self._lock:
            self._spans.append(span)

    # -- driver calls ---------------------------------------------------------------------------------------------
    @dispatch(Mode.SPLIT)
    def generate(self, items: list[tuple[int, list[int]]], params: SamplingParams | None = None) -> list[tuple[int, Generation]]:
        """``items``: (uid, prompt token ids). One batch with the newest weights (e.g. an evaluation), on the engine
        thread, so it never runs beside an episode's batch."""
        gens = self.executor.submit(self._generate, [ids for _, ids in items], params or self.params, False).result()
        return [(uid, g) for (uid, _), g in zip(items, gens)]

    @dispatch(Mode.SPLIT)
    async def episodes(self, items: list[tuple[int, Any]], params: SamplingParams) -> list[tuple[int, Any]]:
        """``items``: (uid, task instance). Whole episodes of the workflow sampled with ``params`` (an evaluation's
        greedy decoding of a multi-turn agent), all at once; each value is a ``TrajectoryCell`` without its payload
        (the light facts: text, reward, status, info), or a ``Reject``."""
        outcomes = await asyncio.gather(*(self._episode(task, params) for _, task in items))
        return [(uid, t if isinstance(t, Reject) else dataclasses.replace(TrajectoryCell.of(t), payload=None))
                for (uid, _), (t, _, _) in zip(items, outcomes)]

    @dispatch(Mode.FIRST)
    def save(self, save: Callable[[Any], None]) -> int:
        """Run ``save(model)`` on the weights this worker last generated with (e.g. the ones just evaluated);
        returns their version."""
        return self.executor.submit(self._exclusive, lambda: (save(self.engine.model), self.engine.version)[1]).result()

    @dispatch(Mode.BROADCAST)
    def rng_state(self) -> Any:
        """The engine's sampling RNG state (None if it has none), for a checkpoint; read on the engine thread,
        between two batches."""
        generator = getattr(self.engine, "generator", None)
        return None if generator is None else self.executor.submit(self._exclusive, generator.get_state).result()

    def set_rng_state(self, state: Any) -> None:
        """Continue the engine's sampling RNG from ``rng_state``'s value (worker by worker: each has its own)."""
        generator = getattr(self.engine, "generator", None)
        if generator is not None and state is not None:
            self.executor.submit(self._exclusive, lambda: generator.set_state(state)).result()

    @dispatch(Mode.BROADCAST)
    def set_threads(self, n: int) -> None:
        """torch threads of the engine thread (``runtime.staleness=auto`` changes them when it settles η)."""
        self.executor.submit(torch.set_num_threads, n).result()
