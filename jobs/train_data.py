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

# Settings a re-submitted run may change: where and how it runs, how long, what it evaluates and where it
# exports. Every other data/noise/model/train setting changes what is trained (`trained_on`): a resume
# compares them with the checkpoint's (`check_resume`), and reused shards with the shards' own.
RESUBMIT_MAY_CHANGE = frozenset({
    "model.cache_dir", "data.tokenizer_actors",
    "train.workers", "train.use_gpu", "train.cpus_per_worker", "train.max_failures", "train.fail_at_step",
    "train.max_steps", "train.time_budget_s", "train.checkpoint_every", "train.keep_checkpoints",
    "train.storage_path", "train.run_name", "train.export_dir", "train.verbose", "train.resume",
    "train.activation_checkpointing",  # recomputes the same activations: memory, not maths
    "train.eval_batches", "train.eval_decode_prompts", "train.eval_decode_tokens", "train.eval_decode_prompt_len",
})
# Settings that decide in which order the reader takes the shards' rows, not what the shards hold.
_READ_ONLY_KEYS = frozenset({"data.preprocessed", "data.preprocessed_sha256", "data.shuffle", "data.seed",
                             "data.shuffle_buffer"})
_SECTIONS = ("model", "data", "noise", "train")
DISTILLED_PASSES = 8
WRITE_ROWS = 4096  # rows per Parquet file the driver writes (row groups of ROW_GROUP_ROWS)


def trained_on(cfg, resolved) -> dict:
    """{dotted key: value} of everything that decides what a run trains: the data, noise, model and train
    settings less `RESUBMIT_MAY_CHANGE`, the model's sha256 and `[M]` id, and `data.preprocessed` /
    `data.distilled` as the sha256 of their shards' content (a folder's path may change, its rows not)."""
    from pipeline.sources.staging import content_manifest

    out = {f"{section}.{k}": v for section in _SECTIONS for k, v in getattr(cfg, section).__dict__.items()}
    for key in ("data.preprocessed", "data.distilled"):
        if out.pop(key):
            out[f"{key}_sha256"] = content_manifest(getattr(cfg.data, key.split(".")[1]))["sha256"]
    out.update({"model.sha256": resolved.meta.get("sha256"), "model.mask_token_id": resolved.mask_token_id})
    return {k: v for k, v in sorted(out.items()) if k not in RESUBMIT_MAY_CHANGE}


def fingerprint(cfg, resolved) -> dict:
    """What the training shards `prepare_train_shards` writes hold: `trained_on` less the train section and
    the reader's order settings."""
    return {k: v for k, v in trained_on(cfg, resolved).items()
            if not k.startswith("train.") and k not in _READ_ONLY_KEYS}


def changed_keys(have: dict, want: dict) -> list[str]:
    """The keys whose values differ between two fingerprints (missing on one side counts)."""
    return sorted(k for k in have.keys() | want.keys() if have.get(k, "<unset>") != want.get(k, "<unset>"))


def check_resume(saved: dict | None, want: dict, *, mode: str, checkpoint: str) -> None:
    """Before a re-submitted run resumes from `checkpoint`: its saved `trained_on` must equal `want`.
    A difference is a one-line error naming the keys (`train.resume=auto`), or a warning (`force`)."""
    if saved is None:
        print(f"[fluid] warning: {checkpoint} records no settings to compare (written before resume checks); "
              "resuming as asked", file=sys.stderr, flush=True)
        return
    keys = changed_keys(saved, want)
    if not keys:
        return
    listed = ", ".join(f"{k} ({saved.get(k, '<unset>')!r} -> {want.get(k, '<unset>')!r})" for k in keys)
    if mode == "force":
        print(f"[fluid] warning: train.resume=force: resuming {checkpoint} although these settings changed: "
              f"{listed}", file=sys.stderr, flush=True)
        return
    raise FluidError(f"cannot resume {checkpoint}: settings that change what is trained differ from the "
                     f"checkpoint's: {listed}; use a new train.run_name, or train.resume=force")


def latest_checkpoint(run: str) -> tuple[str, dict] | None:
    """(folder, saved trainer state) of the run's checkpoint with the highest step, or None: the one a
    re-submitted Ray Train run resumes from."""
    from pipeline.sources.staging import _fs, join
    from pipeline.train.checkpoint import STATE_FILE

    fs, root = _fs(run)
    if not fs.isdir(root):
        return None
    found = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        state = join(entry, STATE_FILE)
        if name.startswith("checkpoint_") and fs.exists(state):
            found.append((json.loads(fs.cat_file(state)).get("step", 0), name, state))
    if not found:
        return None
    step, name, state = max(found)
    return join(run, name), json.loads(fs.cat_file(state))


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
