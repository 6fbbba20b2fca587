"""Continuous batching: a rollout worker's text requests are batched at every decoding step, not per whole batch.

Episodes submit requests independently. A driver on the worker's event loop hands the requests waiting (up to
``max_batch`` rows in flight) to the engine thread, where the engine's ``DecodeSession`` admits them into the running
batch (prefilled, then decoded beside the others) and steps: one token for every row per step. A row that ends is
answered at once (its episode goes on while the others decode); a request that arrives while others decode ends the
engine's run of steps, so it joins at the next step instead of waiting for the whole batch to end. Steps run on the
engine thread without a hop back to the event loop while nothing arrives: for a small model a hop per step would
cost as much as the step.

Weights: a forward pass never mixes two versions, and neither does a ``Generation``. New weights are picked up (the
worker's safe point) only when the session is empty. Once a newer version is published (checked at most every
``poll`` seconds, and only while requests are waiting to be admitted) the session admits no new rows, its rows in
flight finish on the old weights (at most their ``max_new_tokens`` steps), then the weights are loaded and the
waiting requests are admitted on them. We drain rather than re-prefill the rows in flight on the new weights: a
response stays one version, as with whole-batch ``generate``, at the cost of a short pause in admissions. Anything
else on the engine thread that loads weights (an evaluation) calls ``drain`` first.

Faults: an engine exception fails every request in flight or being admitted with ``InfraError`` (the episode ends
as ``Status.INFRA_ERROR``); requests that arrive later start a new session. A request whose asker gave up (the engine
or episode timeout cancelled it) is dropped from the session at the next step.

The engine's busy time is recorded as "generate" spans: one per busy period (from the first row admitted into an
empty session until it is empty again), cut every ``span_every`` seconds so a session that never empties still
reports; ``samples`` is the rows admitted in it, ``steps`` the decoding steps.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from rollflow.api import Generation, InfraError, SamplingParams
from rollflow.api.engines import DecodeSession, SessionEngine
from rollflow.runtime.stage import Span


def offers_sessions(engine: Any) -> bool:
    """Whether ``engine`` decodes continuously (``api.SessionEngine``); others get whole-batch ``generate`` calls."""
    return callable(getattr(engine, "open_session", None))


@dataclass(eq=False)
class _Request:
    prompt: list[int]
    params: SamplingParams
    future: asyncio.Future
    slot: int | None = None  # its row in the session, once admitted (set on the engine thread)


class Requests:
    """The batcher of one episode's sampling parameters: ``submit(prompt_ids)``, like ``rollout.Batcher``'s."""

    def __init__(self, batcher: ContinuousBatcher, params: SamplingParams) -> None:
        self.batcher, self.params = batcher, params

    async def submit(self, prompt_ids: list[int]) -> Generation:
        return await self.batcher.submit(prompt_ids, self.params)


class ContinuousBatcher:
    """Continuous batching of text requests on a ``SessionEngine`` (see the module docstring).

    ``executor``: the worker's single engine thread. ``newer()``: whether a newer weight version than the engine's
    is published; ``pick_up()`` loads it (called only while the session is empty); ``record`` takes the spans.

    Threads: ``_waiting`` belongs to the event loop; the session, ``_rows`` and the busy period to the engine thread
    (the loop reads ``_rows``' size between two runs of steps, when the engine thread leaves it alone). Answers go to
    the loop with ``call_soon_threadsafe``; give-ups come to the engine thread through ``_gone``."""

    def __init__(self, engine: SessionEngine, executor: Executor, max_batch: int, newer: Callable[[], bool],
                 pick_up: Callable[[], None], record: Callable[[Span], None], poll: float = 0.01,
                 span_every: float = 1.0) -> None:
        self.engine, self.executor, self.max_batch = engine, executor, max_batch
        self.newer, self.pick_up, self.record = newer, pick_up, record
        self.poll, self.span_every = poll, span_every
        self._waiting: deque[_Request] = deque()
        self._driver: asyncio.Task | None = None
        self._wake = threading.Event()  # a request arrived or gave up: the engine thread ends its run of steps
        self._gone: deque[_Request] = deque()  # requests whose askers gave up, for the engine thread to drop
        self._loop: asyncio.AbstractEventLoop | None = None  # where the answers go
        self._session: DecodeSession | None = None
        self._rows: dict[int, _Request] = {}  # slot -> request, in the session
        self._draining = False  # newer weights are waiting: admit nothing until the session is empty
        self._polled = float("-inf")
        self._failed: BaseException | None = None  # raised in ``drain``: fails what the next run of steps holds
        self._period: dict[str, Any] | None = None  # the busy period being recorded

    def bind(self, params: SamplingParams) -> Requests:
        return Requests(self, params)

    @property
    def idle(self) -> bool:
        """Nothing waiting, in flight or left to drop (read on the event loop)."""
        return not (self._waiting or self._rows or self._gone)

    async def settle(self) -> None:
        """Wait until nothing is waiting, in flight or left to drop (the driver has stopped)."""
        while self._driver is not None and not self._driver.done():
            await asyncio.wait([self._driver])

    async def submit(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        if not prompt_ids:
            raise ValueError("an empty prompt cannot be decoded: give at least one token (e.g. BOS)")
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={params.max_new_tokens}: a request must allow at least 1 new token")
        loop = asyncio.get_running_loop()
        if self._driver is not None and self._driver.get_loop() is not loop:
            # A new event loop (e.g. a new inline backend): the old loop's requests can no longer be answered.
            self._gone.extend(self._rows.values())
            self._waiting.clear()
            self._driver = None
        request = _Request(list(prompt_ids), params, loop.create_future())
        request.future.add_done_callback(lambda future: self._gave_up(request))
        self._waiting.append(request)
        self._wake.set()
        if self._driver is None or self._driver.done():
            self._driver = loop.create_task(self._drive())
        return await request.future

    # -- the event loop -------------------------------------------------------------------------------------------
    def _gave_up(self, request: _Request) -> None:
        if request.future.cancelled():
            self._gone.append(request)
            self._wake.set()

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.idle:
            await asyncio.sleep(0)  # one turn of the loop: every episode that is ready to ask asks first
            waiting = [r for r in self._waiting if not r.future.done()]
            room = max(self.max_batch - len(self._rows), 0)
            offer, self._waiting = waiting[:room], deque(waiting[room:])
            self._wake.clear()  # what arrives from now on ends the run of steps below
            try:
                taken = await loop.run_in_executor(self.executor, self._run, offer, loop)
            except RuntimeError as e:  # the engine thread is gone (its executor was shut down)
                _fail(offer, e)
                break
            self._waiting.extendleft(reversed(offer[taken:]))  # not taken: newer weights are loaded first

    # -- the engine thread ----------------------------------------------------------------------------------------
    def _run(self, offer: list[_Request], loop: asyncio.AbstractEventLoop) -> int:
        """Admit ``offer`` (none while draining), then decode until a request arrives or gives up, or no row is
        left. Returns how many of ``offer`` were taken (admitted, or failed with the engine)."""
        self._loop = loop
        try:
            if self._failed is not None:
                error, self._failed = self._failed, None
                raise error
            self._drop_gone()
            if self._session is None or not len(self._session):
                self._end_period()
                if not offer:
                    return 0
                self.pick_up()  # the safe point: no row in flight
                self._session, self._draining = self.engine.open_session(), False
            elif offer and not self._draining and time.monotonic() - self._polled >= self.poll:
                self._polled = time.monotonic()
                self._draining = self.newer()
            if self._draining:
                offer = []
            if self._period is None:
                self._period = {"start": time.time(), "samples": 0, "steps": 0, "version": self.engine.version}
            for request in offer:
                if not request.future.done():
                    request.slot = self._session.add(request.prompt, request.params)
                    self._rows[request.slot] = request
                    self._period["samples"] += 1
            self._step()
            while len(self._session) and not self._wake.is_set():
                self._step()
            if not len(self._session) or time.time() - self._period["start"] >= self.span_every:
                self._end_period()
            return len(offer)
        except Exception as e:
            self._fail_rows(e, offer)
            return len(offer)

    def _step(self) -> None:
        finished = self._session.step()
        if self._period is not None:
            self._period["steps"] += 1
        if not len(self._session):
            self._end_period()  # before the answers, so the rollout call they complete reports it
        for slot, generation in finished:
            self._answer(self._rows.pop(slot), generation)
        self._drop_gone()

    def _drop_gone(self) -> None:
        while self._gone:
            request = self._gone.popleft()
            if request.slot is not None and self._rows.get(request.slot) is request:  # not a slot of a later session
                del self._rows[request.slot]
                self._session.drop(request.slot)

    def _answer(self, request: _Request, generation: Generation) -> None:
        try:
            self._loop.call_soon_threadsafe(_resolve, request.future, generation)
        except RuntimeError:  # its loop is closed: nobody is waiting
            pass

    def _fail_rows(self, error: BaseException, offer: list[_Request]) -> None:
        """The session failed: every request in it or being admitted gets ``InfraError``; the session is dropped."""
        requests = {id(r): r for r in [*self._rows.values(), *offer]}.values()
        self._rows.clear()
        self._session = None
        self._end_period()
        try:
            self._loop.call_soon_threadsafe(_fail, list(requests), error)
        except RuntimeError:
            pass

    def drain(self) -> None:
        """On the engine thread, before anything else loads weights (an evaluation's pick-up): decode the rows in
        flight to their end, answering each as it ends."""
        if self._session is None or not len(self._session):
            return
        try:
            while len(self._session):
                self._step()
        except Exception as e:
            self._failed = e  # the driver's next run of steps fails them
            return
        self._end_period()

    def _end_period(self) -> None:
        if self._period is None:
            return
        period, self._period = self._period, None
        start = period.pop("start")
        self.record(Span("generate", start, time.time(), period))


def _resolve(future: asyncio.Future, generation: Generation) -> None:
    if not future.done():
        future.set_result(generation)


def _fail(requests: list[_Request], error: BaseException) -> None:
    failed = InfraError(f"the inference engine failed while decoding: {type(error).__name__}: {error}")
    failed.__cause__ = error
    for request in requests:
        if not request.future.done():
            request.future.set_exception(failed)
