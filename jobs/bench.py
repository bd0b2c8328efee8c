"""`fluid bench data|sampler|serve|drafter-step [options]`: the benchmarks, one table style and one JSON schema.

  fluid bench data          Ray Data pipeline vs the best single-process loop (jobs/bench_data.py)
  fluid bench sampler       decoding policies vs HF greedy generate (jobs/bench_sampler.py)
  fluid bench serve         Ray Serve throughput, N clients vs 1, or --policies ar,verify at 1-64 clients (jobs/load_test.py)
  fluid bench drafter-step  what the drafter adds to a step of each width (jobs/bench_drafter_step.py)
  fluid bench curve         what training buys: a run's checkpoints by training minutes (jobs/bench_curve.py)

Options after the name go to that benchmark (`fluid bench sampler --help`); `--record FILE.json`
(default runs/bench/<name>.json) receives the result in the schema of pipeline/records.py (with
`--figure NAME`, the name of the figure it backs: commit such records under benchmarks/records/), and the
same result is printed as a Markdown table (machine, date, command, rows, goals) for BENCHMARKS.md.
Benchmarks print tables and exit 1 when a goal they state is not met (data: Ray Data ≤ 10 % over the
loop, ≥ 0.5 draft targets per token, the same examples in the same order; sampler: entropy and verify
≥ 0.95× our ar loop, verify lossless in float32; serve: the load test's goals — with --policies, outputs
identical across loads and to the sampler's, verify >= ar at every level and >= 1.3x at 1 and 4 clients; drafter-step: a masked
step ≤ 1.10× a plain one of the same width), 2 on an error; they
are not tests.
"""

from __future__ import annotations

import importlib
import os
import shlex
import sys
import tempfile
from pathlib import Path

from pipeline.errors import FluidError

BENCHES = {"data": "jobs.bench_data", "sampler": "jobs.bench_sampler", "serve": "jobs.load_test",
           "drafter-step": "jobs.bench_drafter_step", "curve": "jobs.bench_curve"}
OUTPUT = {"data": ("--json", "out.json"), "sampler": ("--json", "out.json"), "serve": ("--out", "out.jsonl"),
          "drafter-step": ("--json", "out.json"), "curve": ("--json", "out.json")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        raise FluidError(f"unknown benchmark {name!r} (known: {', '.join(BENCHES)})")
    record_path = Path(_take(rest, "--record") or Path("runs/bench") / f"{name}.json")
    figure = _take(rest, "--figure")
    if any(a in ("-h", "--help") for a in rest):
        return int(importlib.import_module(BENCHES[name]).main(["--help"]) or 0)
    command = shlex.join(["fluid", "bench", name, *rest])
    from pipeline.records import git_commit

    load0, meta = os.getloadavg()[0], {"figure": figure, "commit": git_commit()}  # the commit it started on
    return _run(name, rest, record_path, command, load0, meta)


def _take(rest: list[str], option: str) -> str | None:
    """Remove `option VALUE` from rest and return VALUE (None when the option is absent)."""
    if option not in rest:
        return None
    i = rest.index(option)
    if i + 1 >= len(rest):
        raise FluidError(f"{option} needs a value")
    value = rest[i + 1]
    del rest[i:i + 2]
    return value


def _run(name, rest, record_path, command, load0, meta) -> int:
    """Run benchmark `name` with its output in a temporary file; emit the record made of that output."""
    flag, file = OUTPUT[name]
    with tempfile.TemporaryDirectory() as d:
        rc = importlib.import_module(BENCHES[name]).main([*rest, flag, f"{d}/{file}"])
        text = Path(f"{d}/{file}").read_text() if Path(f"{d}/{file}").is_file() else None
    if text is None and name != "serve":  # an error before any measurement
        return int(rc or 2)
    from pipeline.bench.report import bench_record
    from pipeline.records import emit

    emit(bench_record(name, text or "", load_before=load0, command=command, **meta), record_path)
    return int(rc or 0)


if __name__ == "__main__":
    from jobs.common import run_job

    sys.exit(run_job(main))
