"""`python -m jobs.bench_load`: peak memory per rank while loading a model for FSDP2 training, 1 vs N ranks.

Builds a randomly initialised Llama of about `--gb` GB in fp32 (parameters dominate), saves it as
safetensors, then loads it in fresh processes (gloo, CPU) in two ways and prints a table:
  * full:    every rank loads the whole model (`build_model`), then `fully_shard` (the old path);
  * sharded: meta device → `fully_shard` → each rank reads its own rows (pipeline/model/sharded_load.py).
Peak memory is the process's peak resident set size (ru_maxrss, which includes touched pages of the
memory-mapped weight file) and, separately, its growth over the process's start-up baseline.
"""

from __future__ import annotations

import argparse

from pipeline.bench.load import run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.bench_load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="model size in GB (fp32)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=["full", "sharded"], choices=["full", "sharded"])
    parser.add_argument("--dir", default=None, help="where to write the random model (default: a temp folder)")
    args = parser.parse_args(argv)
    return run(args.gb, args.workers, args.modes, args.dir)


if __name__ == "__main__":
    raise SystemExit(main())
