"""`python -m jobs.bench_drafter_step` (`fluid bench drafter-step` records it): what the frozen-base drafter adds to a step.

    python -m jobs.bench_drafter_step                                   # SmolLM2-135M, fp32 and bf16
    python -m jobs.bench_drafter_step --layers=-8,-7,-6,-5,-4,-3,-2,-1 --layers=-15,...  # fewer layers too

For each dtype: the drafter (rank, targets as the default drafter recipe; random weights — a step's cost
does not depend on them) on the base model, and per width w the masked-step cost ratio: a step of one
clean token and w − 1 masks ÷ a step of w clean tokens (medians of interleaved rounds), for decoding's
form (the delta on the masks' rows only) and the training form on every row (decoding's former path).
Exit status 1 when decoding's form on all layers is above --target at some width, 2 on an error.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from jobs.common import run_job
from pipeline.bench.drafter_step import goals, run
from pipeline.records import markdown, record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.bench_drafter_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="base model spec")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--targets", default="q_proj,o_proj,gate_proj,down_proj")
    p.add_argument("--layers", action="append", default=[],
                   help="also measure the drafter on these layers only (comma-separated, negative from the end); repeatable")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--target", type=float, default=1.10)
    p.add_argument("--json", help="write rows, goals and settings as JSON here (fluid bench drafter-step: a record)")
    args = p.parse_args(argv)
    layer_sets = [None] + [[int(x) for x in s.split(",") if x.strip()] for s in args.layers]
    rows = run(args.model, dtypes=args.dtypes.split(","), rank=args.rank, targets=args.targets.split(","),
               layer_sets=layer_sets, repeats=args.repeats, threads=args.threads)
    g = goals(rows, args.target)
    settings = {"model": args.model, "rank": args.rank, "targets": args.targets, "repeats": args.repeats}
    print(markdown(record("drafter-step", list(rows[0]), rows, goals=g, settings=settings,
                          command=shlex.join(["python", "-m", "jobs.bench_drafter_step", *(argv or sys.argv[1:])]))))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "goals": g, "settings": settings}, indent=1))
    return 0 if all(x["met"] for x in g) else 1


if __name__ == "__main__":
    sys.exit(run_job(main))
