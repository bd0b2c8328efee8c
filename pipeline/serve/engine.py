"""Continuous batching for the elastic-horizon sampler on an asyncio loop (pure: no Ray, no HTTP).

In:  `Engine.submit(GenerationRequest)` from request handlers running on one asyncio loop.
Out: a `Ticket` whose `chunks()` yields one `StreamChunk` per decoding step (several tokens each; the
     last one carries the `GenerationResult`; with stream=False only that last one), or `Overloaded`
     (→ HTTP 429) when the wait queue is full, or `InvalidRequest` (bad arguments, or a request that
     alone exceeds the KV budget).

How (iteration-level scheduling, as Orca and vLLM do): one `sampler.decoder` holds every running
request. Between two steps, waiting requests join it (FIFO) while rows are free (`max_batch_size`) and
the KV budget allows; finished and cancelled rows leave it after the step that ended them. The budget
counts context tokens per row (prompt + max_tokens + the masks one step feeds, `Sampler.step_masks`,
+ 1) times the rows, at the widest row's
count, because the rows share one cache length. Steps run in a single worker thread, so the event
loop keeps serving HTTP. With nothing running, the first waiting request waits at most
`batch_wait_timeout_s` for company. Cancel (client gone): a waiting request leaves the queue; a
running row is ended before the next step, and its row and KV reservation are freed at once.
`metrics` (optional) receives counters and gauges (see `Metrics`); the Serve app backs it with Ray's.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from pipeline.decode.detok import TextDeltas
from pipeline.decode.policies import GenerationRequest, InvalidRequest
from pipeline.decode.sampler import GenerationResult, Sampler, StreamChunk


class Overloaded(Exception):
    """The wait queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Metrics:
    """What the engine reports; these defaults do nothing (the Serve app passes Ray metrics)."""

    def step(self, committed: list[int], rows: int, kv_entries: int) -> None:
        """One decoding step: tokens committed per row, rows decoded, cache entries held."""

    def finished(self, result: GenerationResult) -> None:
        """A request finished (not cancelled)."""

    def rejected(self) -> None:
        """A request was refused with 429."""

    def queue(self, waiting: int, running: int) -> None:
        """Queue depth and running rows changed."""


class Ticket:
    """One submitted request: its chunks arrive on an asyncio queue."""

    def __init__(self, engine: Engine, resolved, cost: int, stream: bool):
        self.engine, self.resolved, self.cost, self.stream = engine, resolved, cost, stream
        self.queue: asyncio.Queue = asyncio.Queue()
        self.row = None
        self.deltas: TextDeltas | None = None
        self.batch_size = 0  # the most rows decoded together while it ran
        self.t_submit = time.perf_counter()
        self.queue_time_s = 0.0
        self.state = "waiting"  # waiting | running | done | cancelled

    async def chunks(self):
        """Yield StreamChunks until the final one; raises the decoding error if the step failed."""
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    async def result(self) -> GenerationResult:
        async for ch in self.chunks():
            if ch.result is not None:
                return ch.result
        raise RuntimeError("stream ended without a result")  # pragma: no cover

    def cancel(self) -> None:
        self.engine._cancel(self)


DEFAULT_KV_ROWS = 8  # default KV budget: 8 full-context requests (memory), whatever max_batch_size is


class Engine:
    def __init__(self, sampler: Sampler, *, max_batch_size: int = 64, batch_wait_timeout_s: float = 0.01,
                 max_queued_requests: int = 64, max_kv_tokens: int | None = None, metrics: Metrics | None = None):
        self.s = sampler
        self.max_batch = max(1, int(max_batch_size))
        self.batch_wait = max(0.0, float(batch_wait_timeout_s))
        self.max_queued = max(0, int(max_queued_requests))
        self.step_room = sampler.step_masks + 1  # a row's transient masks in one step (+1: as k_max was)
        self.kv_budget = int(max_kv_tokens or DEFAULT_KV_ROWS * ((sampler.context or 4096) + self.step_room))
        self.metrics = metrics or Metrics()
        self.waiting: deque[Ticket] = deque()
        self.running: list[Ticket] = []
        self.decoder = None
        self.error: BaseException | None = None
        self.served = 0
        self.steps = 0
        self._latency_ema = 1.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fluid-decode")
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    # ------------------------------------------------------------ API (event-loop thread)

    def submit(self, req: GenerationRequest, *, stream: bool = True) -> Ticket:
        """Queue `req`; with stream=False only the final chunk (with the result) is delivered."""
        self.check()
        r = self.s.resolve(req)  # InvalidRequest on bad arguments
        cost = len(r.prompt_ids) + r.max_tokens + self.step_room
        if cost > self.kv_budget:
            raise InvalidRequest(f"max_tokens: prompt + max_tokens ({cost - self.step_room} tokens) exceed this "
                                 f"replica's KV budget of {self.kv_budget - self.step_room} tokens")
        free_rows = max(0, self.max_batch - len(self.running))
        if len(self.waiting) >= self.max_queued + free_rows:
            self.metrics.rejected()
            retry = max(1, math.ceil(self._latency_ema * (len(self.waiting) + 1) / self.max_batch))
            raise Overloaded(f"the server is busy ({len(self.waiting)} requests waiting); retry later", retry)
        t = Ticket(self, r, cost, stream)
        self.waiting.append(t)
        self._queue_changed()
        self._ensure_loop()
        self._wake.set()
        return t

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting),
                "kv_tokens_reserved": self.kv_reserved(), "kv_token_budget": self.kv_budget,
                "kv_tokens_held": self.decoder.kv_entries() if self.decoder else 0,
                "max_batch_size": self.max_batch, "served": self.served, "steps": self.steps}

    def kv_reserved(self, extra: list[Ticket] = ()) -> int:
        rows = [*self.running, *extra]
        return len(rows) * max((t.cost for t in rows), default=0)

    def check(self) -> None:
        """Raise if the decoding loop died (Serve's health check restarts the replica)."""
        if self.error is not None:
            raise RuntimeError(f"the decoding loop failed: {self.error!r}") from self.error

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ internals

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _queue_changed(self) -> None:
        self.metrics.queue(len(self.waiting), len(self.running))

    def _cancel(self, t: Ticket) -> None:
        if t.state == "waiting":
            try:
                self.waiting.remove(t)
            except ValueError:
                pass
        elif t.state == "running":
            self.running.remove(t)
            if t.row.finish is None:  # the decoder drops it at its next step (an attribute write is atomic)
                t.row.finish = "cancelled"
        if t.state in ("waiting", "running"):
            t.state = "cancelled"
            self._queue_changed()

    def _admit(self) -> None:
        """Move waiting requests into the decoder (FIFO) while rows and the KV budget allow."""
        take: list[Ticket] = []
        for t in self.waiting:
            if len(self.running) + len(take) >= self.max_batch or self.kv_reserved([*take, t]) > self.kv_budget:
                break
            take.append(t)
        if not take:
            return
        for _ in take:
            self.waiting.popleft()
        try:
            if self.decoder is None:
                self.decoder = self.s.decoder([])
            rows = self.decoder.add([t.resolved for t in take])
        except Exception as e:  # resolve() passed at submit; anything here fails these requests only
            for t in take:
                t.state = "done"
                t.queue.put_nowait(e)
            return
        now = time.perf_counter()
        for t, row in zip(take, rows, strict=True):
            t.row, t.state = row, "running"
            t.queue_time_s = now - t.t_submit
            t.deltas = TextDeltas(row.r.stop)
        self.running.extend(take)
        self._queue_changed()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.running and not self.waiting:
                    self.decoder = None  # only cancelled rows can be left in it
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if not self.running:  # an idle batch: wait a little for company, then start
                    delay = self.waiting[0].t_submit + self.batch_wait - time.perf_counter()
                    if delay > 0 and len(self.waiting) < self.max_batch:
                        await asyncio.sleep(delay)
                        continue
                self._admit()
                if not self.running:
                    await asyncio.sleep(0.005)  # nothing admissible yet: yield to the handlers
                    continue
                running = list(self.running)
                items = await loop.run_in_executor(self._pool, self._step, running)
                self._dispatch(running, items)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug in the loop itself: fail everything, report unhealthy
            self.error = e
            for t in [*self.waiting, *self.running]:
                t.queue.put_nowait(RuntimeError(f"decoding loop failed: {e!r}"))
            raise

    def _step(self, running: list[Ticket]):
        """Worker thread: one decoder step; returns ([(ticket, chunk)], tokens per row, KV entries held)
        or the step's exception."""
        dec = self.decoder
        try:
            events = dec.step()
        except Exception as e:
            return e
        by_row = {id(t.row): t for t in running}
        items = []
        for row, toks in events:
            t = by_row.get(id(row))
            if t is None or row.finish == "cancelled":  # cancelled from the loop thread during this step
                continue
            t.batch_size = max(t.batch_size, len(events))
            if row.finish is None:
                if t.stream:
                    items.append((t, StreamChunk(toks, t.deltas.push(row.new_text), step=row.stats.forwards - 1)))
            else:
                res = self.s.result(row)
                delta = t.deltas.finish(res.text) if t.stream else res.text
                items.append((t, StreamChunk(toks, delta, row.finish, res, step=row.stats.forwards - 1)))
        return items, [len(toks) for _, toks in events], dec.kv_entries()

    def _dispatch(self, running: list[Ticket], items) -> None:
        now = time.perf_counter()
        self.steps += 1
        if isinstance(items, BaseException):  # the batch's state is unknown: fail its rows, start afresh
            self.decoder = None
            for t in running:
                if t.state == "running":
                    self.running.remove(t)
                    t.state = "done"
                    t.queue.put_nowait(items)
            self._queue_changed()
            return
        items, committed, kv_entries = items
        self.metrics.step(committed, len(committed), kv_entries)
        for t, ch in items:
            if t.state != "running":
                continue
            t.queue.put_nowait(ch)
            if ch.finish_reason is not None:
                self.running.remove(t)
                t.state = "done"
                self.served += 1
                self.metrics.finished(ch.result)
                self._latency_ema = 0.8 * self._latency_ema + 0.2 * (now - t.t_submit)
        if self.decoder is not None and self.decoder.done:
            self.decoder = None  # nothing left: a fresh cache next time
        self._queue_changed()
