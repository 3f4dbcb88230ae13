"""The engine: one thread owns the model and drives one `BatchGenerator`; HTTP handlers talk to it.

Continuous batching. Every generation request of every client becomes rows of one running
batch. Between two decode steps the engine thread runs any `run_exclusive` functions,
drops the rows of requests whose client has gone, prefills newcomers from the waiting
queue (as long as the batch has room for their rows), then steps the batch once: one new
token for every row, and rows that finished leave. A bug in a step fails the requests of
the batch (500) and the engine starts a new batch; it never stops serving.

    event loop (HTTP handlers)                    engine thread
    ticket = engine.submit(jobs)   ----------->   waiting queue --between steps--> batch.add (prefill)
    async for delta in ticket      <-----------   batch.step() -> ChoiceText.push -> call_soon_threadsafe
    engine.cancel(ticket)          ----------->   the ticket's rows are removed before the next step
    await engine.run_exclusive(fn) ----------->   fn() runs between steps; its result comes back

Only the engine thread runs the model, so forward passes never overlap (on a CPU they
would only compete for the same cores) and hooks attached by a `run_exclusive` function
never see the batch's passes. On a CPU, decode steps of a small batch leave one core to the
HTTP side (`step_threads`). The waiting queue is bounded: `submit` raises
`QueueFullError` when it is full, and the HTTP layer answers 429.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..batch import BatchGenerator
from ..errors import LucidError
from ..penalties import LogitControls
from ..sampling import SamplingParams, make_sampler
from .choices import ChoiceText, Delta
from .metrics import Metrics

logger = logging.getLogger("lucidlm.server")

# Decode steps of fewer rows than this run on one CPU thread fewer than the process has.
ALL_THREADS_FROM_ROWS = 5


def step_threads(rows: int, threads: int) -> int:
    """CPU threads for a decode step of `rows` rows in a server whose passes otherwise use `threads`.

    A decode step is ~270 short parallel regions, each as slow as its slowest thread. With a
    thread on every core, the event loop (answering each token to its client) takes a core from
    one of them at every token and the whole step waits. One thread fewer leaves it a core:
    SmolLM2 on 2 cores, one streaming client: 187 tok/s instead of 99-115 (the library alone:
    200 on one thread, 290 on two). From about 5 rows, a step's larger matmuls make the second
    thread worth it again (6 clients: 299-315 tok/s on two threads, 288-296 on one; 16 clients:
    385 against 298). bench/RESULTS.md, "HTTP server throughput", session 17.
    """
    return threads if threads <= 1 or rows >= ALL_THREADS_FROM_ROWS else threads - 1


class QueueFullError(Exception):
    """The waiting queue is full: the client should retry later."""


class EngineClosedError(Exception):
    """The engine has been shut down."""


@dataclass(frozen=True)
class GenerationJob:
    """One prompt to complete `n` times: what the HTTP layer hands the engine, validated."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    controls: LogitControls | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no log-probs; k: each token's, with the k most likely alternatives
    first_index: int = 0  # the response's choice index of the first of the n choices


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # each prompt once, however many choices it has
    completion_tokens: int  # every token generated, a final stop token included


_CANCELLED = object()  # put in a ticket's queue by `cancel`, to end its consumer


@dataclass(eq=False)
class Ticket:
    """One HTTP request's jobs and the results coming back; `async for delta in ticket`
    yields `Delta`s until every choice has finished (then `ticket.usage` is set), raises
    the error that failed the request, or stops early once the ticket is cancelled."""

    jobs: list[GenerationJob]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    usage: Usage | None = None
    cancelled: bool = False  # the client went away (set under the engine's lock)
    finished: bool = False  # every choice has ended or the request failed (set under the engine's lock)
    # Kept by the engine thread only:
    jobs_left: int = 0
    completion_tokens: int = 0
    first_token_seen: bool = False

    def __post_init__(self):
        self.jobs_left = len(self.jobs)

    async def __aiter__(self):
        while True:
            item = await self.queue.get()
            if isinstance(item, Delta):
                yield item
            elif isinstance(item, Usage):
                self.usage = item
                return
            elif isinstance(item, BaseException):
                raise item
            else:  # _CANCELLED
                return

    def post(self, item) -> None:
        """Hand an item to the ticket's event loop (called from the engine thread)."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass


@dataclass
class _Running:
    """A job whose rows are in the batch."""

    ticket: Ticket
    choices: list[ChoiceText]
    open: int  # choices not finished yet


class Engine:
    """Serves one decoder LucidModel; see the module docstring."""

    def __init__(self, model, *, max_batch: int = 16, max_queue: int = 64, metrics: Metrics | None = None):
        if model.is_encoder:
            raise LucidError(f"{model.name} is an encoder: it cannot generate text")
        self.model = model  # the LucidModel (the explorer's introspection reads it through run_exclusive)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.metrics = metrics or Metrics()
        self.stop_ids = model.stop_ids
        self._batch = BatchGenerator(model.model)
        self._cond = threading.Condition()
        self._waiting: deque[tuple[Ticket, GenerationJob]] = deque()
        self._exclusive: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._running: dict[int, _Running] = {}  # batch request id -> job state (engine thread only)
        self._closed = False
        self.rows = 0  # rows in the batch after the last step
        # prefills and `run_exclusive` work use all of the process's threads, decode steps `step_threads`
        # (the count when the engine starts: PyTorch's default, or the caller's torch.set_num_threads)
        self.threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, name="lucid-engine", daemon=True)
        self._thread.start()

    # ----- called from the event loop -----

    def submit(self, jobs: list[GenerationJob]) -> Ticket:
        """Queue a request's jobs; raises QueueFullError when the waiting queue has no room."""
        ticket = Ticket(jobs, asyncio.get_running_loop())
        with self._cond:
            if self._closed:
                raise EngineClosedError("the server is shutting down")
            if len(self._waiting) + len(jobs) > self.max_queue:
                raise QueueFullError(f"the server is busy: {len(self._waiting)} requests are waiting "
                                     f"(at most {self.max_queue}); retry later")
            self._waiting.extend((ticket, job) for job in jobs)
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Forget a request whose client has gone: its waiting jobs leave the queue now, its
        rows leave the batch before the next step. No-op for a finished ticket."""
        with self._cond:
            if ticket.finished or ticket.cancelled:
                return
            ticket.cancelled = True
            self._waiting = deque(w for w in self._waiting if w[0] is not ticket)
            self._cond.notify()
        self.metrics.request_cancelled()
        ticket.queue.put_nowait(_CANCELLED)

    async def run_exclusive(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the engine thread between decode steps; return its result or raise its error."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                raise EngineClosedError("the server is shutting down")
            self._exclusive.append((fn, future))
            self._cond.notify()
        return await asyncio.wrap_future(future)

    def gauges(self) -> dict[str, tuple[str, float]]:
        """Current state for /metrics: name -> (help, value)."""
        return {
            "lucid_queue_depth": ("Generation jobs waiting to join the batch.", len(self._waiting)),
            "lucid_running_requests": ("Generation jobs in the running batch.", len(self._running)),
            "lucid_batch_rows": ("Rows (choices) in the running batch.", self.rows),
        }

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still waiting or running fail with EngineClosedError."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    # ----- the engine thread -----

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._exclusive or self._waiting or self._batch.active)
                if self._closed:
                    break
                exclusive, self._exclusive = list(self._exclusive), deque()
                cancelled = [i for i, r in self._running.items() if r.ticket.cancelled]
            for fn, future in exclusive:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # handed to the caller, whatever it is
                        future.set_exception(e)
            try:
                for request_id in cancelled:  # a gone client's slot is free before the next step
                    self._batch.remove(request_id)
                    del self._running[request_id]
                for ticket, job in self._admit():
                    self._start(ticket, job)
                if self._batch.active:
                    with _threads(step_threads(len(self._batch.rows), self.threads)):
                        self._step()
            except Exception as e:  # a bug of ours: the batch's requests fail, the engine goes on
                logger.exception("engine step failed")
                self._reset(e)
            self.rows = len(self._batch.rows)
        self._shut_down()

    def _admit(self) -> list[tuple[Ticket, GenerationJob]]:
        """Take waiting jobs, oldest first, while the batch has room for their rows."""
        admitted = []
        with self._cond:
            rows = len(self._batch.rows)
            while self._waiting and rows + self._waiting[0][1].n <= self.max_batch:
                ticket, job = self._waiting.popleft()
                admitted.append((ticket, job))
                rows += job.n
        return admitted

    def _start(self, ticket: Ticket, job: GenerationJob) -> None:
        """Prefill a job and add its rows to the batch."""
        if ticket.cancelled or ticket.finished:
            return
        tokenizer = self.model.tokenizer
        choices = [ChoiceText(job.first_index + i, tokenizer, self.stop_ids, job.stop, job.logprobs)
                   for i in range(job.n)]
        try:
            request_id = self._batch.add(job.prompt_ids, make_sampler(job.sampling), job.max_new_tokens,
                                         self.stop_ids, job.controls, job.n)
        except LucidError as e:  # checked before anything changes; the HTTP layer has checked it already
            self._fail(ticket, e)
            return
        except Exception as e:  # a bug of ours, maybe half-way through the join: start a new batch
            logger.exception("prefill failed")
            self._fail(ticket, e)
            self._reset(e)
            return
        self.metrics.tokens(prompt=len(job.prompt_ids))
        if job.max_new_tokens == 0:  # nothing to generate: the batch has no rows for it
            for choice in choices:
                ticket.post(Delta(choice.index, "", [], "length"))
            self._job_done(ticket)
            return
        self._running[request_id] = _Running(ticket, choices, job.n)

    def _step(self) -> None:
        started = time.perf_counter()
        events = self._batch.step()
        now = time.perf_counter()
        self.metrics.decode_step(now - started, len(events))
        self.metrics.tokens(generated=len(events))
        for event in events:
            running = self._running[event.request_id]
            ticket, choice = running.ticket, running.choices[event.sample_index]
            if not ticket.first_token_seen:
                ticket.first_token_seen = True
                self.metrics.time_to_first_token(now - ticket.submitted)
            ticket.completion_tokens += 1
            delta = choice.push(event.step, event.finish_reason)
            if delta is not None:
                ticket.post(delta)
            if not choice.finished:
                continue
            if event.finish_reason is None:  # a stop string ended it: the batch still has its row
                self._batch.remove(event.request_id, event.sample_index)
            running.open -= 1
            if running.open == 0:
                del self._running[event.request_id]
                self._job_done(ticket)

    def _reset(self, error: BaseException) -> None:
        """After a failure whose effect on the batch is unknown: fail every request in it, start afresh."""
        failed = list(self._running.values())
        self._batch, self._running = BatchGenerator(self.model.model), {}
        for running in failed:
            self._fail(running.ticket, error)

    def _job_done(self, ticket: Ticket) -> None:
        ticket.jobs_left -= 1
        if ticket.jobs_left == 0:
            prompt_tokens = sum(len(job.prompt_ids) for job in ticket.jobs)
            with self._cond:
                ticket.finished = True
            ticket.post(Usage(prompt_tokens, ticket.completion_tokens))

    def _fail(self, ticket: Ticket, error: BaseException) -> None:
        """End a request with an error: its other jobs leave the queue and the batch."""
        with self._cond:
            if ticket.finished:
                return
            ticket.finished = True
            self._waiting = deque(w for w in self._waiting if w[0] is not ticket)
        for request_id in [i for i, r in self._running.items() if r.ticket is ticket]:
            self._batch.remove(request_id)
            del self._running[request_id]
        ticket.post(error)

    def _shut_down(self) -> None:
        error = EngineClosedError("the server is shutting down")
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
            exclusive, self._exclusive = list(self._exclusive), deque()
        for ticket in {id(t): t for t, _ in waiting}.values():
            self._fail(ticket, error)
        for running in list(self._running.values()):
            self._fail(running.ticket, error)
        for _, future in exclusive:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)


@contextlib.contextmanager
def _threads(threads: int):
    """Run the block on `threads` CPU threads, then go back to the engine thread's own count.
    (torch.set_num_threads sets the calling thread's count, and also the count of threads that
    start using PyTorch later: going back at once keeps the change to this step.)"""
    before = torch.get_num_threads()
    if threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
