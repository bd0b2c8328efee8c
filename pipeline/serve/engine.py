"""Request batching for the elastic-horizon sampler on an asyncio loop (pure: no Ray, no HTTP).

In:  `Engine.submit(GenerationRequest)` from request handlers running on one asyncio loop.
Out: a `Ticket` whose `chunks()` yields one `StreamChunk` per decoding step (several tokens each; the
     last one carries the `GenerationResult`; with stream=False only that last one), or `Overloaded`
     (→ HTTP 429) when the wait queue is full, or `InvalidRequest` (bad arguments, or a request that
     alone exceeds the KV budget).

How: waiting requests are grouped into *cohorts* of up to `max_batch_size` rows in all, within a KV
budget (context tokens reserved per row: prompt + max_tokens + k_max, times the cohort's rows, since
the rows share one cache length). A cohort is one `sampler.decoder(...)`; every round advances each
live cohort by one forward, in a single worker thread, so the event loop keeps serving HTTP. A
request arriving while others decode starts a new cohort as soon as rows are free (the sampler's
decoder takes no rows mid-flight); the first waiting request waits at most `batch_wait_timeout_s` for
company. Cancel (client gone): a waiting request leaves the queue; a running row is marked finished,
leaves its batch after at most one more forward, and its rows and KV reservation are freed at once.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from pipeline.decode.policies import GenerationRequest, InvalidRequest
from pipeline.decode.sampler import GenerationResult, Sampler, StreamChunk, TextDeltas


class Overloaded(Exception):
    """The wait queue is full; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Ticket:
    """One submitted request: its chunks arrive on an asyncio queue."""

    def __init__(self, engine: Engine, req: GenerationRequest, cost: int, stream: bool):
        self.engine, self.req, self.cost, self.stream = engine, req, cost, stream
        self.queue: asyncio.Queue = asyncio.Queue()
        self.row = None
        self.deltas: TextDeltas | None = None
        self.reserved = 0  # KV tokens reserved while running
        self.batch_size = 0  # rows of the cohort it started in
        self.t_submit = time.perf_counter()
        self.queue_time_s = 0.0
        self.state = "waiting"  # waiting | running | done | cancelled

    async def chunks(self):
        """Yield StreamChunks until the final one; raises the decoding error if the batch failed."""
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


class _Cohort:
    def __init__(self, decoder, tickets: list[Ticket]):
        self.decoder, self.tickets = decoder, tickets


class Engine:
    def __init__(self, sampler: Sampler, *, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01,
                 max_queued_requests: int = 64, max_kv_tokens: int | None = None):
        self.s = sampler
        self.max_batch = max(1, int(max_batch_size))
        self.batch_wait = max(0.0, float(batch_wait_timeout_s))
        self.max_queued = max(0, int(max_queued_requests))
        self.kv_budget = int(max_kv_tokens or self.max_batch * ((sampler.context or 4096) + sampler.k_max))
        self.waiting: deque[Ticket] = deque()
        self.cohorts: list[_Cohort] = []
        self.rows_used = 0
        self.kv_used = 0
        self.error: BaseException | None = None
        self.served = 0
        self._latency_ema = 1.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fluid-decode")
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    # ------------------------------------------------------------ API (event-loop thread)

    def submit(self, req: GenerationRequest, *, stream: bool = True) -> Ticket:
        """Queue `req`; with stream=False only the final chunk (with the result) is delivered."""
        self.check()
        r = self.s.resolve(req)  # InvalidRequest on bad arguments
        cost = len(r.prompt_ids) + r.max_tokens + self.s.k_max
        if cost > self.kv_budget:
            raise InvalidRequest(f"max_tokens: prompt + max_tokens ({cost - self.s.k_max} tokens) exceed this "
                                 f"replica's KV budget of {self.kv_budget - self.s.k_max} tokens")
        free_rows = max(0, self.max_batch - self.rows_used)
        if len(self.waiting) >= self.max_queued + free_rows:
            retry = max(1, math.ceil(self._latency_ema * (len(self.waiting) + 1) / self.max_batch))
            raise Overloaded(f"the server is busy ({len(self.waiting)} requests waiting); retry later", retry)
        t = Ticket(self, req, cost, stream)
        self.waiting.append(t)
        self._ensure_loop()
        self._wake.set()
        return t

    def stats(self) -> dict:
        return {"running": self.rows_used, "waiting": len(self.waiting), "batches": len(self.cohorts),
                "kv_tokens_reserved": self.kv_used, "kv_token_budget": self.kv_budget,
                "max_batch_size": self.max_batch, "served": self.served}

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

    def _cancel(self, t: Ticket) -> None:
        if t.state == "waiting":
            try:
                self.waiting.remove(t)
            except ValueError:
                pass
        elif t.state == "running":
            self._release(t)  # the worker marks the row finished before the next forward
        if t.state in ("waiting", "running"):
            t.state = "cancelled"

    def _release(self, t: Ticket) -> None:
        """Free a running ticket's row and KV reservation (called once, on leaving the running state)."""
        self.rows_used -= 1
        self.kv_used -= t.reserved
        t.reserved = 0

    def _admit(self) -> None:
        """Start one cohort from the head of the queue (FIFO, within rows and KV budget)."""
        take: list[Ticket] = []
        width = 0
        for t in self.waiting:
            w = max(width, t.cost)
            if self.rows_used + len(take) + 1 > self.max_batch or (len(take) + 1) * w > self.kv_budget - self.kv_used:
                break
            take.append(t)
            width = w
        if not take:
            return
        for _ in take:
            self.waiting.popleft()
        try:
            dec = self.s.decoder([t.req for t in take])
        except Exception as e:  # resolve() passed at submit; anything here fails these requests only
            for t in take:
                t.state = "done"
                t.queue.put_nowait(e)
            return
        now = time.perf_counter()
        for t, row in zip(take, dec.rows, strict=True):
            t.row, t.state, t.reserved, t.batch_size = row, "running", width, len(take)
            t.queue_time_s = now - t.t_submit
            t.deltas = TextDeltas(self.s.decode, row.r.stop)
        self.rows_used += len(take)
        self.kv_used += width * len(take)
        self.cohorts.append(_Cohort(dec, take))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.cohorts and not self.waiting:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                # group arrivals: admit once the free rows are filled or the oldest waited batch_wait
                delay = self.waiting[0].t_submit + self.batch_wait - time.perf_counter() if self.waiting else 0
                admit = delay <= 0 or len(self.waiting) >= self.max_batch - self.rows_used
                if not admit and not self.cohorts:
                    await asyncio.sleep(delay)
                    continue
                while admit and self.waiting and self.rows_used < self.max_batch:  # else: admit later
                    n = len(self.cohorts)
                    self._admit()
                    if len(self.cohorts) == n:
                        break
                if not self.cohorts:
                    await asyncio.sleep(0.005)  # nothing admissible yet: yield to the handlers
                    continue
                cohorts = list(self.cohorts)
                results = await loop.run_in_executor(self._pool, self._step_all, cohorts)
                self._dispatch(cohorts, results)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug in the loop itself: fail everything, report unhealthy
            self.error = e
            for t in [*self.waiting, *(t for c in self.cohorts for t in c.tickets)]:
                t.queue.put_nowait(RuntimeError(f"decoding loop failed: {e!r}"))
            raise

    def _step_all(self, cohorts: list[_Cohort]) -> list:
        """Worker thread: one forward per cohort; returns per cohort a list of (ticket, chunk) or an error."""
        out = []
        for c in cohorts:
            for t in c.tickets:
                if t.state == "cancelled" and t.row.finish is None:
                    t.row.finish = "cancelled"  # dropped from the batch by the next step
            if all(t.row.finish is not None for t in c.tickets):
                out.append([])
                continue
            try:
                events = c.decoder.step()
            except Exception as e:
                out.append(e)
                continue
            by_row = {id(t.row): t for t in c.tickets}
            items = []
            for row, toks in events:
                t = by_row[id(row)]
                if t.state != "running":
                    continue
                if row.finish is None:
                    if t.stream:
                        items.append((t, StreamChunk(toks, t.deltas.push(row.generated))))
                else:
                    res = self.s.result(row)
                    delta = t.deltas.push(row.generated, final=res.text) if t.stream else res.text
                    items.append((t, StreamChunk(toks, delta, row.finish, res)))
            out.append(items)
        return out

    def _dispatch(self, cohorts: list[_Cohort], results: list) -> None:
        now = time.perf_counter()
        for c, res in zip(cohorts, results, strict=True):
            if isinstance(res, BaseException):
                for t in c.tickets:
                    if t.state == "running":
                        self._release(t)
                        t.state = "done"
                        t.queue.put_nowait(res)
                self.cohorts.remove(c)
                continue
            for t, ch in res:
                if t.state != "running":
                    continue
                t.queue.put_nowait(ch)
                if ch.finish_reason is not None:
                    self._release(t)
                    t.state = "done"
                    self.served += 1
                    self._latency_ema = 0.8 * self._latency_ema + 0.2 * (now - t.t_submit)
            if c.decoder.done or all(t.state != "running" for t in c.tickets):
                self.cohorts.remove(c)
