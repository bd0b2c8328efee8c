"""Training metrics: one JSON line per step or evaluation in `<run>/metrics.jsonl`, a short console line.

In:  metric dicts from `pipeline.train.step`. Out: appended JSONL records (rank 0 only), each with
`time`, and `[fluid] …` progress lines every 10 steps and at each evaluation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def scalars(metrics: dict) -> dict:
    """The numeric entries of a metrics dict (what Ray Train's report accepts)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


class MetricsLog:
    """Appends records to a JSONL file and prints progress; a no-op on ranks other than 0."""

    def __init__(self, path: str | Path, rank: int = 0):
        self.path, self.rank = Path(path), rank

    def write(self, record: dict) -> None:
        if self.rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"time": time.time(), **scalars(record), **{k: v for k, v in record.items() if isinstance(v, str)}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        line = progress_line(record)
        if line:
            print(line, flush=True)

    def eval(self, step: int, metrics: dict) -> None:
        self.write({"event": "eval", "step": step, **{f"val_{k}": v for k, v in metrics.items()}})


def progress_line(record: dict) -> str | None:
    """The console line of a record: every evaluation, step 1 and every 10th step."""
    if "event" in record:
        keys = ("val_ar_ce", "val_draft_ce", "val_ce_k2", "val_ce_k4", "val_ce_k8")
        return f"[fluid] eval at step {record['step']}: " + "  ".join(
            f"{k[4:]} {record[k]:.3f}" for k in keys if k in record)
    if record.get("step", 0) == 1 or record.get("step", 0) % 10 == 0:
        return (f"[fluid] step {record['step']}  loss {record['loss']:.3f}  ar {record['ar_ce']:.3f}  draft "
                f"{record['draft_ce']:.3f}  {record['tokens_per_s']:.0f} tok/s  wait {record['data_wait_share']:.0%}")
    return None
