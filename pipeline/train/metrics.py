"""Training metrics: one JSON line per step or evaluation in `<run>/metrics.jsonl`, a short console line.

In:  metric dicts from `pipeline.train.step` and the `Evaluator`. Out: appended JSONL records (rank 0
only), each with `time`; `[fluid] …` progress lines every 10 steps and at each evaluation; each record
also goes to the log's `MetricsHook`s (trackers plug in there).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.logs import say


def scalars(metrics: dict) -> dict:
    """The numeric entries of a metrics dict (what Ray Train's report accepts)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


MetricsHook = Callable[[dict], None]
"""Called with every record the log writes (rank 0 only), as it stands in the JSONL file: where a
tracker (MLflow, TensorBoard, …) plugs in. A record is a step's metrics, or an evaluation's
(`"event": "eval"`, keys prefixed `val_`); both carry `step` and `time`."""


class MetricsLog:
    """Appends records to a JSONL file, prints progress and passes each record to its `hooks`; a no-op on
    ranks other than 0.

    `resume_step`: the step the run (re)starts from. Records a failed attempt wrote past it — steps
    that will now be replayed — are dropped first, so every step appears once and curves stay monotone.
    """

    def __init__(self, path: str | Path, rank: int = 0, *, resume_step: int | None = None,
                 hooks: Sequence[MetricsHook] = ()):
        self.path, self.rank, self.hooks = Path(path), rank, list(hooks)
        if rank == 0 and resume_step is not None and self.path.is_file():
            drop_replayed(self.path, resume_step)

    def write(self, record: dict) -> None:
        if self.rank != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"time": time.time(), **scalars(record), **{k: v for k, v in record.items() if isinstance(v, str)}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        for hook in self.hooks:
            hook(record)
        line = progress_line(record)
        if line:
            say(line)

    def eval(self, step: int, metrics: dict) -> None:
        self.write({"event": "eval", "step": step, **{f"val_{k}": v for k, v in metrics.items()}})


def drop_replayed(path: Path, resume_step: int) -> int:
    """Rewrite `path` (atomically) without the records that the run will write again: steps after
    `resume_step`, and evaluations at it (the start evaluation on a restart from 0, the final one on
    a resume from the last checkpoint). Returns how many were dropped."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        try:
            rec = json.loads(ln)
            step = int(rec.get("step", 0))
        except (ValueError, AttributeError):
            continue  # a line cut by the failure
        if step < resume_step or (step == resume_step > 0 and rec.get("event") != "eval"):
            keep.append(ln)
    if len(keep) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        tmp.replace(path)
    return len(lines) - len(keep)


def progress_line(record: dict) -> str | None:
    """The console line of a record: every evaluation, step 1 and every 10th step."""
    if "event" in record:
        keys = ("val_ar_ce", "val_masked_ce", "val_draft_ce", "val_ce_k2", "val_ce_k4", "val_ce_k8", "val_verify_tpf")
        return f"[fluid] eval at step {record['step']}: " + "  ".join(
            f"{k[4:]} {record[k]:.3f}" for k in keys if k in record)
    if record.get("step", 0) == 1 or record.get("step", 0) % 10 == 0:
        ces = "  ".join(f"{name} {record[key]:.3f}" for key, name in
                        (("ar_ce", "ar"), ("draft_ce", "draft"), ("masked_ce", "masked")) if key in record)
        return (f"[fluid] step {record['step']}  loss {record['loss']:.3f}  {ces}  {record['tokens_per_s']:.0f} tok/s"
                f"  wait {record['data_wait_share']:.0%}")
    return None
