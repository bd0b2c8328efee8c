"""`fluid preprocess`: corpora → tokenized, packed, noised two-stream examples as Parquet shards.

In:  a config (`--config FILE.yaml`, `--data.corpus=…`, `--noise.k_max=…` overrides): the corpus, the
     model whose tokenizer is used (`model.spec`, resolved and cached; `[M]` added), packing and noise
     settings; `--output PATH` (local folder or fsspec URL), `--split`, `--epoch`.
Out: Parquet shards under PATH (rows in the batch format of docs/method.md §3 plus `seq_index`; training
     reads them back with `pipeline.data.ray_pipeline.read_preprocessed`), the run summary printed as a table and
     written as JSON next to the shards (`fluid_summary.json`). Ray Data shows its progress meanwhile.

Expected errors (no output, empty corpus, missing path, output already holding shards) are one line.
"""

from __future__ import annotations

import argparse
import sys
import time

from jobs.common import parse_job_args, run_job
from pipeline.errors import FluidError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluid preprocess", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", help="folder or fsspec URL (s3://…, gs://…, memory://…) for the Parquet shards")
    parser.add_argument("--split", default="train", choices=["train", "validation", "test"])
    parser.add_argument("--epoch", type=int, default=0, help="noise epoch (seeds are rng_for(seed, epoch, seq_index))")
    parser.add_argument("--overwrite", action="store_true", help="replace shards already under --output")
    args, cfg = parse_job_args(parser, argv)
    if not args.output:
        raise FluidError("no output given: pass --output PATH (a folder or fsspec URL for the Parquet shards)")

    from pipeline.data import ray_pipeline as data
    from pipeline.sources.model_source import resolve_model

    existing = data.parquet_files(args.output)
    if existing and not args.overwrite:
        raise FluidError(f"{args.output} already holds {len(existing)} Parquet shards; pass --overwrite or "
                         "choose another --output")
    resolved = resolve_model(cfg.model.spec, cfg.model.cache_dir, mask_token=cfg.model.mask_token)
    data.init_ray()
    from pipeline.train.cluster import stage_root

    # multi-node: a local corpus and the tokenizer are staged under train.storage_path for the readers
    root = stage_root(cfg.train.storage_path)
    stats = data.PipelineStats()
    build = dict(tokenizer_path=resolved.path, mask_token_id=resolved.mask_token_id, split=args.split,
                 epoch=args.epoch, stats=stats, cache_dir=cfg.model.cache_dir, stage_root=root)
    if existing:
        data.remove_files(args.output, existing)
    t0 = time.perf_counter()
    from pipeline.data.streaming import ROW_GROUP_ROWS  # the unit a training worker reads

    if cfg.data.shuffle:  # one globally sorted order: written from this process, in that order
        data.write_parquet(data.build_dataset(cfg.data, cfg.noise, **build), args.output, row_group_rows=ROW_GROUP_ROWS)
    else:  # storage order: each unit written by the pipeline's own tasks, one shard per unit
        data.write_shards(cfg.data, cfg.noise, args.output, row_group_rows=ROW_GROUP_ROWS, **build)
    summary = stats.summary(seconds=time.perf_counter() - t0)
    summary.update(output=str(args.output), split=args.split, epoch=args.epoch, model=cfg.model.spec,
                   mask_token_id=resolved.mask_token_id, config={"data": vars(cfg.data), "noise": vars(cfg.noise)})
    print(data.format_summary(summary))
    where = data.write_summary(summary, args.output)
    if summary["documents"]["kept"] == 0:
        raise FluidError(f"the corpus {cfg.data.corpus} has no usable {args.split} documents "
                         f"(read {summary['documents']['read']}, skipped {summary['documents']['skipped']})")
    if summary["sequences"] == 0:
        raise FluidError(f"no sequence was packed: {summary['tokens']} tokens in the {args.split} split are fewer "
                         f"than data.seq_len={cfg.data.seq_len} per packing unit")
    print(f"wrote {summary['sequences']:,} examples to {args.output} (summary: {where})")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
