"""The records of `fluid bench data|sampler|serve|drafter-step`: a benchmark's raw output → one record each.

In:  the benchmark's name and the text it wrote (data, sampler: the JSON of `--json`; serve: the JSONL
     of `--out`, one run a line, or with --policies one table row a line), plus the record's context (load before, command, figure, commit).
Out: a record in the schema of pipeline/records.py (columns named for the table, rows, goals,
     settings), for `records.emit` to print as Markdown and write as JSON.
"""

from __future__ import annotations

import json

from pipeline.bench.load_test import COLUMNS as SERVE_COLUMNS
from pipeline.bench.serve_sweep import COLUMNS as SWEEP_COLUMNS
from pipeline.records import record

DATA_COLUMNS = ["pipeline", "TOKENIZERS_PARALLELISM", "cores", "wall s", "tokens/s", "1st batch s", "vs best loop %"]
SAMPLER_COLUMNS = {"policy": "policy", "tokens_per_forward": "tokens/forward", "tokens_per_s": "tokens/s",
                   "speedup_vs_hf": "× HF", "speedup_vs_hf_stock": "× HF (stock matmul)", "speedup_vs_ar": "× ar",
                   "prefix_agreement": "prefix agreement", "match_rate": "match rate", "base_nll": "base NLL"}


def data_record(raw: dict, **context) -> dict:
    return record("data", DATA_COLUMNS, raw["rows"], settings=raw["settings"], goals=raw["goals"], **context)


def sampler_record(raw: dict, **context) -> dict:
    names = SAMPLER_COLUMNS
    rows = [{names[k]: v for k, v in r.items() if k in names} for r in raw["rows"]]
    return record("sampler", list(names.values()), rows, goals=raw["goals"], **context,
                  settings={"hf_tokens_per_s": raw["hf_tokens_per_s"], "ar_equals_hf": raw["ar_equals_hf"],
                            "hf_stock_tokens_per_s": raw["hf_stock_tokens_per_s"], "matmul": raw["matmul"],
                            "dtype": raw.get("dtype"), "masked_step_ratio": raw.get("masked_step_ratio"),
                            "noise_floor": raw.get("noise_floor")})


def serve_record(rows: list[dict], **context) -> dict:
    known = SWEEP_COLUMNS if rows and "policy" in rows[0] else SERVE_COLUMNS  # --policies: its table's rows
    cols = [c for c in known if rows and c in rows[0]] or (list(rows[0]) if rows else [])
    return record("serve", cols, rows, **context)


def bench_record(name: str, text: str, **context) -> dict:
    """The record of benchmark `name` from the text it wrote; `context`: record()'s keyword arguments
    (load_before, command, figure, commit)."""
    if name == "serve":
        return serve_record([json.loads(x) for x in text.splitlines() if x.strip()], **context)
    raw = json.loads(text)
    if name == "curve":
        from pipeline.bench.curve import COLUMNS, record_rows

        return record(name, COLUMNS, record_rows(raw), settings={k: v for k, v in raw.items() if k != "rows"},
                      **context)
    if name == "drafter-step":
        return record(name, list(raw["rows"][0]), raw["rows"], goals=raw["goals"], settings=raw["settings"], **context)
    return data_record(raw, **context) if name == "data" else sampler_record(raw, **context)
