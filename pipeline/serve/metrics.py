"""Replica metrics through `ray.util.metrics`: Ray exports them, next to its own, on each node's metrics
export port (`ray start --metrics-export-port`, 8080 in cluster/), where Prometheus scrapes them.

In:  the engine's reports (engine.Metrics: per step, per finished request, per 429, queue changes).
Out: Prometheus series (Ray prefixes custom metrics with `ray_`), each tagged with the model id:
     fluid_generated_tokens (counter), fluid_forwards (counter, decoding steps of the batch),
     fluid_requests_finished (counter), fluid_requests_rejected (counter, HTTP 429),
     fluid_tokens_per_forward (histogram, per finished request), fluid_accepted_length (histogram,
     tokens a row committed in one step), fluid_batch_rows (histogram, rows per step),
     fluid_queue_depth, fluid_running_requests, fluid_kv_tokens_held (gauges).
Without Ray (tests of the engine alone), `replica_metrics` returns the engine's no-op Metrics.
"""

from __future__ import annotations

from pipeline.serve.engine import Metrics

_STEPS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
_ROWS = [1, 2, 4, 8, 16, 32, 64, 128]


class RayMetrics(Metrics):
    def __init__(self, model: str):
        from ray.util import metrics as m

        tags = ("model",)
        self.tokens = m.Counter("fluid_generated_tokens", "tokens generated", tag_keys=tags)
        self.forwards = m.Counter("fluid_forwards", "decoding steps (one batched forward each)", tag_keys=tags)
        self.finished_n = m.Counter("fluid_requests_finished", "requests completed", tag_keys=tags)
        self.rejected_n = m.Counter("fluid_requests_rejected", "requests refused with 429 (queue full)",
                                    tag_keys=tags)
        self.tpf = m.Histogram("fluid_tokens_per_forward", "tokens per forward of finished requests",
                               boundaries=_STEPS, tag_keys=tags)
        self.accepted = m.Histogram("fluid_accepted_length", "tokens one row committed in one step",
                                    boundaries=_STEPS, tag_keys=tags)
        self.rows = m.Histogram("fluid_batch_rows", "rows decoded in one step", boundaries=_ROWS, tag_keys=tags)
        self.waiting = m.Gauge("fluid_queue_depth", "requests waiting for a row", tag_keys=tags)
        self.running = m.Gauge("fluid_running_requests", "requests being decoded", tag_keys=tags)
        self.kv = m.Gauge("fluid_kv_tokens_held", "KV cache entries held (rows x cache length)", tag_keys=tags)
        self.tags = {"model": model}
        for metric in (self.tokens, self.forwards, self.finished_n, self.rejected_n, self.tpf, self.accepted,
                       self.rows, self.waiting, self.running, self.kv):
            metric.set_default_tags(self.tags)
        self.queue(0, 0)  # gauges exist from the start (Ray's counters refuse inc(0): they appear on first use)
        self.kv.set(0)

    def step(self, committed: list[int], rows: int, kv_entries: int) -> None:
        if committed:
            if total := sum(committed):  # a step may commit nothing (Ray's Counter refuses inc(0))
                self.tokens.inc(total)
            self.forwards.inc(1)
            self.rows.observe(rows)
            for n in committed:
                self.accepted.observe(n)
        self.kv.set(kv_entries)

    def finished(self, result) -> None:
        self.finished_n.inc(1)
        st = result.stats
        if st.forwards:
            self.tpf.observe(st.tokens / st.forwards)

    def rejected(self) -> None:
        self.rejected_n.inc(1)

    def queue(self, waiting: int, running: int) -> None:
        self.waiting.set(waiting)
        self.running.set(running)


def replica_metrics(model: str) -> Metrics:
    """Ray metrics inside a Ray worker (a Serve replica), else the no-op Metrics."""
    try:
        import ray

        if ray.is_initialized():
            return RayMetrics(model)
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return Metrics()
