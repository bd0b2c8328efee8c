"""Benchmark (not a test): the Ray Data pipeline vs a plain single-process loop doing the same work.

In:  a config (`--config`, `--data.*` / `--noise.*` overrides; default corpus and default model's
     tokenizer; its train split), `--max-docs` / `--max-tokens` to bound it (to its first train
     documents, copied as .txt files to a temporary folder), `--repeats`, `--actors`.
Out: a table on stdout. Per variant, the median over interleaved repeats of: wall time from start to
     the last example consumed by this process (numpy batches of 256 for Ray, rows for the loop),
     corpus tokens/s (document tokens + EOS entering the packer), time to the first batch, and
     tokens/s after the first batch (without shuffle only). Ray start-up (`ray.init`) and the first,
     cold Ray run (worker processes starting) are reported on their own lines, in no median. Every variant sets
     TOKENIZERS_PARALLELISM explicitly (the loop in-process, Ray inside each tokenizer actor); the
     `cores` column says what each side ran on (the loop: one process; Ray: every core). An
     order-sensitive checksum proves both sides produced the same examples in the same order. Then
     draft targets per processed token (goal ≥ 0.5) and supervised targets per input token, and where
     the goal "Ray Data ≤ 10 % over the best single-process loop" (`--max-overhead`) stands.
Exit status: 0 when every goal is met, 1 when one is not (overhead, draft targets or checksum).
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import parse_job_args, run_job
from pipeline.bench.data import run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-docs", type=int, default=None, help="use at most this many train documents")
    parser.add_argument("--max-tokens", type=int, default=None, help="stop adding documents past this many tokens")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per variant (median reported)")
    parser.add_argument("--actors", default="1,2", help="tokenizer actor counts to try, comma-separated")
    parser.add_argument("--repeat-corpus", type=int, default=1,
                        help="use the (bounded) train documents this many times (large sizes, where start-up is small)")
    parser.add_argument("--parallelism", choices=("both", "false", "true"), default="both",
                        help="TOKENIZERS_PARALLELISM values to try for the loop and the 1-actor Ray run "
                             "(with 2 cores, 'false' halves the passes of a large run)")
    parser.add_argument("--max-overhead", type=float, default=0.10,
                        help="the goal: the best Ray variant's wall time at most this fraction over the best "
                             "single-process loop (exit status 1 when not met)")
    parser.add_argument("--json", help="write rows and goals as JSON here (fluid bench data: pipeline/records.py)")
    args, cfg = parse_job_args(parser, argv)
    return run(args, cfg)


if __name__ == "__main__":
    sys.exit(run_job(main))
