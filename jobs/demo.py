"""`make demo` / `fluid demo`: the whole product on one machine — adapt a model, then decode faster with it.

Stages (each shows progress; a finished stage is reused when the demo runs again with the same
settings; Ctrl-C stops at once and the next run resumes — training from its last checkpoint):
  1 data      Ray Data: corpus → tokenized, packed, noised two-stream examples (Parquet shards)
  2 drafts    the draft-target recipe `demo.drafts` (docs/method.md §12)
  3 adapt     Ray Train: Stage I causal alignment for the training share of the budget → export
  4 horizon   Ray Train: Stage II horizon head on the frozen export
  5 evaluate  held-out CE vs the base model, LAMBADA, the sampler table, plots (fluid evaluate)
  6 serve     Ray Serve: start the OpenAI-compatible endpoint, stream one completion, stop it
Then a summary table: wall time per stage, tokens per forward, speed vs AR, AR CE vs the base model,
and where the report, plots and export are.

One budget, `demo.budget_s` (default 900 s): the training stage gets what the fixed stages leave.
All outputs go under `demo.output` (default runs/demo). Settings for a small CPU are built in (seq_len
128, batch 4, small evaluation); every key can be overridden, e.g. `--demo.budget_s=3600`.
"""

from __future__ import annotations

import argparse
import sys

import jobs.adapt
import jobs.fit_horizon
import jobs.preprocess
from jobs.common import parse_job_args, run_job
from pipeline.demo.runner import DEMO_DEFAULTS, Demo, summary

# the jobs the demo's stages run, each with --config <demo.output>/demo_config.yaml
ENTRYPOINTS = {"preprocess": jobs.preprocess.main, "adapt": jobs.adapt.main, "fit_horizon": jobs.fit_horizon.main}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluid demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fresh", action="store_true", help="ignore finished stages and run everything again")
    args, cfg = parse_job_args(parser, DEMO_DEFAULTS + list(sys.argv[1:] if argv is None else argv))
    demo = Demo(cfg, fresh=args.fresh, entrypoints=ENTRYPOINTS)
    report, served = demo.run()
    print(summary(demo, report, served), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
