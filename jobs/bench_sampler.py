"""Benchmark the sampler's policies against HF greedy `generate` and our own `ar` loop (docs/method.md §13).

    python -m jobs.bench_sampler                       # tiny random model (untrained mask: worst case)
    python -m jobs.bench_sampler --model-dir EXPORT    # a FLUID export (fluid.json gives the mask id)
    python -m jobs.bench_sampler --model-dir HF_DIR --mask-token-id 0

Per policy: tokens per forward, tokens/s (median of rounds), speed-up vs HF greedy generate and vs
our `ar` policy (medians of paired runs: each prompt under both methods, next to each other, the order
of methods rotating from prompt to prompt), agreement with AR greedy (share of tokens before the first divergence, token match rate)
and mask tokens fed per generated token. Timing ratios are the result; absolute times are noise.
`x ar cpu` is the same ratio in process CPU time, a cross-check when other jobs share the machine.
`=base`: share of tokens before the first divergence from the BASE model's greedy output (an adapted
model may have drifted from it; a frozen-base drafter must score 1). Before the rounds it prints what
drafting adds to a step: a step of one clean token and w − 1 masks ÷ a step of w clean tokens, at
w = 2, 4, 8, 16 (`masked_step_ratio` in the JSON; 1.0 = the drafter's masks cost nothing extra).

Goals (exit status 1 when one is not met, 2 on an error): `entropy` and `verify` at least
`--min-speedup` (0.95) × our `ar` loop; in float32, `verify`'s output equal to AR greedy.
"""

from __future__ import annotations

import sys

from jobs.common import bench_main
from pipeline.bench.sampler import build_parser, run


def main(argv: list[str] | None = None) -> int:
    return bench_main(build_parser, run, __doc__, argv, threads=True)


if __name__ == "__main__":
    sys.exit(main())
