"""The training shards of `fluid adapt` when no `data.preprocessed` is given: preprocess once, reuse.

In:  the config, the resolved model (tokenizer + `[M]` id), the run folder (local, shared or a URL) and
     the staging root of a multi-node cluster (pipeline/train/cluster.py).
Out: the URL/path of Parquet shards under `<run>/data/train` (row groups of ROW_GROUP_ROWS rows: the unit
     a worker reads). They are written once by the Ray Data pipeline, in global-index order (the
     training reader shuffles: no global sort here) with `fluid_summary.json` recording what made them;
     a re-submitted run with the same data, noise and model settings reuses them, other settings are a
     one-line error rather than silently mixed data.

With `data.distilled` (a `fluid distill` corpus) the driver writes the shards itself: the natural rows
of the same pipeline, in order, with distilled rows at the exact global positions of
pipeline/data/distilled.py `mix` (a `data.distill_mix` share of every prefix), so every row group holds
the mix and the reader's shuffle keeps it. One epoch of the shards is every natural row once (with
distill_mix = 1: `DISTILLED_PASSES` passes over the distilled pairs, each with new draft spans).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

from pipeline.errors import FluidError
from pipeline.train.resume import changed_keys, fingerprint

DISTILLED_PASSES = 8
WRITE_ROWS = 4096  # rows per Parquet file the driver writes (row groups of ROW_GROUP_ROWS)


def prepare_train_shards(cfg, resolved, run: str, *, stage_root: str | None = None) -> str:
    from pipeline.data import ray_pipeline as data
    from pipeline.data.streaming import ROW_GROUP_ROWS
    from pipeline.sources.staging import _fs, join

    path = join(run, "data", "train")
    want = fingerprint(cfg, resolved)
    existing = data.parquet_files(path)
    fs, summary = _fs(join(path, data.SUMMARY_FILE))
    if existing and fs.exists(summary):
        have = json.loads(fs.cat_file(summary)).get("fingerprint") or {}
        keys = changed_keys(have, want)
        if not keys:
            print(f"[fluid] reusing the training shards under {path}", flush=True)
            return path
        raise FluidError(f"{path} holds training shards made with other settings ({', '.join(keys)}); use a new "
                         "train.run_name (or delete that folder)")
    if existing:  # an interrupted write: no summary, so start over
        data.remove_files(path, existing)
    stats = data.PipelineStats()
    t0 = time.perf_counter()
    if cfg.data.distilled:
        s = write_mixed(cfg, resolved, path, stage_root=stage_root)
    else:
        data.write_shards(cfg.data, cfg.noise, path, row_group_rows=ROW_GROUP_ROWS, tokenizer_path=resolved.path,
                          mask_token_id=resolved.mask_token_id, split="train", epoch=0, stats=stats,
                          cache_dir=cfg.model.cache_dir, stage_root=stage_root)
        s = stats.summary(seconds=time.perf_counter() - t0)
    if s["sequences"] == 0:
        raise FluidError("the training split produced no sequences: add data or lower data.seq_len")
    print(f"[fluid] preprocessed {s['sequences']:,} training examples into {path}", flush=True)
    data.write_summary({**s, "fingerprint": want}, path)  # last: marks the shards complete
    return path


def write_mixed(cfg, resolved, path: str, *, stage_root: str | None = None) -> dict:
    """Natural and distilled rows, mixed in order (module docstring), as Parquet under `path`."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipeline.batch import DTYPES, columns_for
    from pipeline.data import ray_pipeline as data
    from pipeline.data.distill import read_distilled
    from pipeline.data.distilled import distilled_examples, mix
    from pipeline.data.local import make_params
    from pipeline.data.streaming import ROW_GROUP_ROWS

    share = cfg.data.distill_mix
    prompts, continuations = read_distilled(cfg.data.distilled)
    params = make_params(cfg.data, cfg.noise, tokenizer_path=resolved.path, mask_token_id=resolved.mask_token_id)
    columns = list(columns_for(cfg.noise.mode))
    if share < 1:
        ds = data.build_dataset(dataclasses.replace(cfg.data, shuffle=False), cfg.noise,
                                tokenizer_path=resolved.path, mask_token_id=resolved.mask_token_id, split="train",
                                epoch=0, cache_dir=cfg.model.cache_dir, stage_root=stage_root)
        natural, total = ds.select_columns(columns).iter_rows(), sys.maxsize  # until the natural rows end
    else:
        natural, total = iter(()), DISTILLED_PASSES * len(prompts)
    fs, root, _ = data._fs(path)
    fs.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    n_rows = n_files = 0
    chunk: list[dict] = []

    def flush() -> None:
        nonlocal n_files
        table = data.arrow_table({c: np.stack([np.asarray(r[c]) for r in chunk]).astype(DTYPES[c])
                                  for c in columns})
        pq.write_table(table, f"{root}/part-{n_files:06d}.parquet", filesystem=data._arrow_fs(fs),
                       row_group_size=ROW_GROUP_ROWS)
        n_files += 1
        chunk.clear()

    for row in mix(natural, distilled_examples(prompts, continuations, params), share, total):
        chunk.append(row)
        n_rows += 1
        if len(chunk) == WRITE_ROWS:
            flush()
            print(f"[fluid] training shards: {n_rows:,} rows written", flush=True)
    if chunk:
        flush()
    n_distilled = int(n_rows * share)  # = Σ_{i<n} is_distilled(i, share): the rule's sums telescope
    print(f"[fluid] training rows: {n_rows:,}, {n_distilled:,} distilled from {len(prompts)} continuations in "
          f"{cfg.data.distilled} (data.distill_mix = {share})", flush=True)
    return {"sequences": n_rows, "distilled_rows": n_distilled, "seconds": round(time.perf_counter() - t0, 2)}
