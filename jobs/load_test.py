"""Load test of the OpenAI-compatible endpoint: N concurrent clients, a fixed number of requests.

    python -m jobs.load_test --url http://127.0.0.1:8000 --clients 16 --requests 128
    python -m jobs.load_test --compare --tiny                     # local tiny-model server: 1 vs 16 clients
    python -m jobs.load_test --compare --serve.model=EXPORT_DIR   # a local server for your export
    python -m jobs.load_test --url http://127.0.0.1:8000 --levels 1,4,16,64 --requests 64   # a sweep

In:  a running endpoint on this machine (127.0.0.1 / localhost only), or `--tiny` / `--serve.model`
     to start one here (local Ray + Serve, stopped at the end); request settings (max tokens, policy…).
Out: a table per run — requests, errors, wall time, requests/s, generated tokens/s, latency p50/p95/p99
     (ms), time to first chunk with --stream, tokens per forward — and with --compare the aggregate
     throughput ratio of 16 clients vs 1: the median of per-round ratios over --rounds interleaved
     rounds (shared machines are noisy); goal ≥ 4× thanks to batching, zero errors (exit status 1
     otherwise). `--levels` runs each client count in turn with --requests requests per level and checks
     the serving goals: tokens/s not falling from the second-highest level to the highest, the 16-client
     level ≥ 4× the 1-client level, p99 ≤ 2× p50 at the highest level, zero errors.
     `--out FILE.jsonl` appends one JSON record per run.
Each client is a thread running requests back to back; every request has a timeout, the whole run a
deadline (--max-seconds), so the test always ends. Greedy, ignore_eos: every request makes max_tokens.
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import parse_job_args, run_job
from pipeline.bench.load_test import run
from pipeline.errors import FluidError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.load_test", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="base URL of a running server (default http://127.0.0.1:<serve.port>)")
    p.add_argument("--tiny", action="store_true", help="start a local server with a tiny random model")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=None, help="requests in all (default 16 per client)")
    p.add_argument("--compare", action="store_true", help="run 1 client and --clients clients, and compare")
    p.add_argument("--levels", help="comma-separated client counts, each with --requests requests (a sweep)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of --compare (median ratio)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt", default="Once upon a time there was a city")
    p.add_argument("--policy", default=None, help="sampler policy per request (default: the server's)")
    p.add_argument("--stream", action="store_true", help="stream responses (adds time to first chunk)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--max-seconds", type=float, default=300.0, help="deadline of each run")
    p.add_argument("--out", help="append one JSON record per run to this JSONL file")
    args, cfg = parse_job_args(p, argv)
    if args.clients < 1 or (args.requests is not None and args.requests < 1):
        raise FluidError("--clients and --requests must be >= 1")
    return run(args, cfg)


if __name__ == "__main__":
    sys.exit(run_job(main))
