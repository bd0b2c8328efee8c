"""One record format and one table style for every benchmark (`fluid bench data|sampler|serve`).

JSON schema "fluid-bench/1" (one object per benchmark run):
  {"schema": "fluid-bench/1", "benchmark": "data" | "sampler" | "serve", "date": "YYYY-MM-DD HH:MM",
   "machine": {"cpus", "cpu_model", "platform", "torch", "torch_threads", "load_before", "load_after"},
   "commit": "<git commit of the checkout>[+dirty]", "command": "…", "settings": {…},
   "columns": [names], "rows": [{column: value, …}], "goals": [{"goal", "value", "met"}]}
A record committed under benchmarks/records/ backs a figure of README.md or BENCHMARKS.md (the figure
links it; tests/test_records.py checks that the quoted number is one of the record's values).
The table is Markdown (pastes into BENCHMARKS.md as is): a header line with machine, date and
command, the rows, then one line per goal.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

SCHEMA = "fluid-bench/1"


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (from /proc/cpuinfo; the platform's processor elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """The checkout's commit (with "+dirty" when tracked files differ from it), or None outside git."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine(load_before: float | None = None) -> dict:
    import torch

    return {"cpus": os.cpu_count(), "cpu_model": cpu_model(), "platform": f"{platform.system()} {platform.machine()}",
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def record(benchmark: str, columns: list[str], rows: list[dict], *, settings: dict | None = None,
           goals: list[dict] | None = None, load_before: float | None = None, command: str | None = None,
           figure: str | None = None, commit: str | None = None) -> dict:
    """One benchmark run as a record (the module docstring's schema); `figure` names the figure of
    README.md / BENCHMARKS.md the run measures, when it measures one; `commit` is the checkout's
    commit when the run started (default: now)."""
    rec = {"schema": SCHEMA, "benchmark": benchmark, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
           "machine": machine(load_before), "commit": commit or git_commit(),
           "command": command or shlex.join(["fluid", "bench", benchmark, *sys.argv[2:]]),
           "settings": settings or {}, "columns": columns, "rows": rows, "goals": goals or []}
    if figure:
        rec["figure"] = figure
    return rec


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return "—" if v is None else str(v)


def markdown(rec: dict) -> str:
    m = rec["machine"]
    load = "" if m.get("load_before") is None else f", load average {m['load_before']:.1f} → {m['load_after']:.1f}"
    lines = [f"**{rec['benchmark']}** — {rec['date']}, {m['cpus']} CPUs ({m.get('cpu_model', '?')}, "
             f"{m['platform']}, torch {m['torch']}){load}, commit {rec.get('commit') or '?'}",
             f"`{rec['command']}`", "",
             "| " + " | ".join(rec["columns"]) + " |", "|" + "---|" * len(rec["columns"])]
    for r in rec["rows"]:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in rec["columns"]) + " |")
    for g in rec["goals"]:
        lines.append(f"\n- goal {g['goal']}: {_cell(g['value'])} — {'met' if g['met'] else 'NOT met'}")
    return "\n".join(lines) + "\n"


def emit(rec: dict, json_path: str | Path | None) -> None:
    """Print the Markdown table; write the record as JSON when a path is given."""
    print(markdown(rec))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rec, indent=1) + "\n")
        print(f"[fluid] benchmark record: {json_path}")
