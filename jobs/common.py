"""Shared plumbing of the job entrypoints: argument parsing into a `FluidConfig`, and error handling.

Every job accepts `--config FILE.yaml` and `--section.key=value` overrides (see pipeline/config.py).
Expected errors (`FluidError`) print one line and exit with status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pipeline.config import FluidConfig, load_config
from pipeline.errors import FluidError
from pipeline.logs import set_verbose

OVERRIDE_HELP = (
    "Settings: --config FILE.yaml and/or overrides like --train.lr=3e-4 --data.corpus=s3://bucket/docs/ "
    "(sections: model, data, noise, train, sampler, horizon, distill, serve, eval, ablate, demo; see pipeline/config.py "
    "for every key and default)."
)


def parse_job_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, FluidConfig]:
    parser.add_argument("--config", help="YAML config file (sections as in pipeline/config.py)")
    parser.epilog = (parser.epilog + "\n\n" if parser.epilog else "") + OVERRIDE_HELP
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "." in r.split("=", 1)[0])]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    overrides, i = [], 0
    while i < len(rest):  # accept both --a.b=value and --a.b value
        item = rest[i]
        if "=" not in item and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            item = f"{item}={rest[i + 1]}"
            i += 1
        overrides.append(item)
        i += 1
    cfg = load_config(args.config, overrides)
    set_verbose(cfg.train.verbose)  # Ray's own logs follow train.verbose (pipeline/logs.py)
    return args, cfg


def run_job(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Run a job's main; expected errors become a one-line message and exit status 2."""
    try:
        return int(main(argv) or 0)
    except FluidError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def bench_main(build_parser: Callable[[str | None], argparse.ArgumentParser], run: Callable[[argparse.Namespace], int],
               doc: str | None, argv: list[str] | None, threads: bool = False) -> int:
    """A benchmark's `main`: parse its options (`--threads N` sets torch's threads first when `threads`),
    run it; an expected error prints one line and returns 2 (benchmarks exit 1 for a goal not met)."""
    args = build_parser(doc).parse_args(argv)
    if threads and args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return run(args)
    except FluidError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
