"""Load test of the OpenAI-compatible endpoint: N concurrent clients, a fixed number of requests.

    python -m jobs.load_test --url http://127.0.0.1:8000 --clients 16 --requests 128
    python -m jobs.load_test --compare --tiny                     # local tiny-model server: 1 vs 16 clients
    python -m jobs.load_test --compare --serve.model=EXPORT_DIR   # a local server for your export
    python -m jobs.load_test --url http://127.0.0.1:8000 --levels 1,4,16,64 --requests 64   # a sweep
    fluid bench serve --policies ar,verify --serve.model=EXPORT_DIR   # ar vs verify at 1/4/16/64 clients

In:  a running endpoint on this machine (127.0.0.1 / localhost only), or `--tiny` / `--serve.model`
     to start one here (local Ray + Serve, stopped at the end); request settings (max tokens, policy…).
Out: a table per run — requests, errors, wall time, requests/s, generated tokens/s, latency p50/p95/p99
     (ms), time to first chunk with --stream, tokens per forward — and with --compare the aggregate
     throughput ratio of 16 clients vs 1: the median of per-round ratios over --rounds interleaved
     rounds (shared machines are noisy); goal ≥ 4× thanks to batching, zero errors (exit status 1
     otherwise). `--levels` runs each client count in turn with --requests requests per level and checks
     the serving goals: tokens/s not falling from the second-highest level to the highest, the 16-client
     level ≥ 4× the 1-client level, p99 ≤ 2× p50 at the highest level, zero errors.
     `--policies ar,verify` (pipeline/bench/serve_sweep.py): the same held-out prompts (--corpus-prompts, or
     --prompts FILE; built-in ones with --tiny), 128 tokens each, at each --levels client count (default
     1,4,16,64), ar then verify, in --rounds interleaved rounds against one server (the policy travels
     in each request); per (policy, clients) tokens/s, TTFT p50, per-token latency p50/p99, verify ÷ ar;
     goals: greedy outputs identical across levels and policies and to the sampler's own single-request
     float32 output (a local server runs float32 unless serve.dtype says otherwise), verify ≥
     --min-ratio × ar at every level and ≥ --min-speedup × ar at 1 and 4 clients.
     `--out FILE.jsonl` appends one JSON record per run (per table row with --policies).
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
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds of --compare (default 3) or "
                   "--policies (default 2); medians of rounds")
    p.add_argument("--max-tokens", type=int, default=None, help="default 32, 128 with --policies")
    p.add_argument("--policies", help="comma-separated policies compared on one server, e.g. ar,verify")
    p.add_argument("--prompts", help="--policies: a text file, one prompt per line")
    p.add_argument("--corpus-prompts", type=int, default=32, help="--policies: held-out corpus prompts")
    p.add_argument("--min-ratio", type=float, default=1.0, help="--policies goal: verify/ar tok/s at every level")
    p.add_argument("--min-speedup", type=float, default=1.3, help="--policies goal: verify/ar at 1 and 4 clients")
    p.add_argument("--prompt", default="Once upon a time there was a city")
    p.add_argument("--policy", default=None, help="sampler policy per request (default: the server's)")
    p.add_argument("--stream", action="store_true", help="stream responses (adds time to first chunk)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--max-seconds", type=float, default=300.0, help="deadline of each run")
    p.add_argument("--out", help="append one JSON record per run to this JSONL file")
    args, cfg = parse_job_args(p, argv)
    args.rounds = args.rounds or (2 if args.policies else 3)
    args.max_tokens = args.max_tokens or (128 if args.policies else 32)
    if args.clients < 1 or (args.requests is not None and args.requests < 1):
        raise FluidError("--clients and --requests must be >= 1")
    return run(args, cfg)


if __name__ == "__main__":
    sys.exit(run_job(main))
