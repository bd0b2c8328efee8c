"""What training buys: a run's checkpoints at given training minutes, each exported and measured.

    python -m jobs.bench_curve --run runs/drafter --minutes 15,30,60,120

Per point and dtype: greedy verify's tokens per forward where every width costs one AR step (flat
cost: the drafter's quality, hardware aside), its tokens per forward and speed against our ar loop on
this machine's kernels in that dtype (prompt by prompt in rotating order, medians of per-prompt ratios),
and the share of prompts whose verify output differs from AR's (0 in float32: verify is lossless).
Writes <run>/curve.json and <run>/curve.png; `fluid evaluate` of <run>/export shows them.
Train with checkpoints kept (e.g. --train.checkpoint_every=20 --train.keep_checkpoints=200).
"""

from __future__ import annotations

import sys

from jobs.common import bench_main
from pipeline.bench.curve import build_parser, run


def main(argv: list[str] | None = None) -> int:
    return bench_main(build_parser, run, __doc__, argv, threads=True)


if __name__ == "__main__":
    sys.exit(main())
