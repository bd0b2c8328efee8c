"""`fluid distill` / `python -m jobs.distill`: self-distillation by Ray Data batch inference.

Cuts `distill.count` prompts of `distill.prompt_len` tokens from the training split (seeded, the same
on every machine), splits them into shards of `distill.shard_size`, and runs an actor pool
(`distill.actors` replicas of the base model; one GPU each when the cluster has GPUs) that generates
each prompt's greedy continuation of `distill.new_tokens` tokens with the KV cache, `distill.batch_size`
prompts per call. Each shard is written as one Parquet file (`prompt_ids`, `continuation_ids`, `text`)
under `distill.output` (local folder or fsspec URL) as soon as it is done; re-running the same command
skips the shards that exist, so an interrupted run resumes. `distill.json` records the settings (a
resume with other settings is refused) and `summary.json` the counts and timing.

Train on it with `fluid adapt --data.distilled=OUTPUT --data.distill_mix=0.5` (the share of training
examples that are distilled; natural text keeps the clean stream from drifting).
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import parse_job_args, run_job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluid distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (default: start or join local)")
    parser.add_argument("--local", action="store_true",
                        help="run the model in this process, without Ray (one machine; same shards and output)")
    args, cfg = parse_job_args(parser, argv)
    import dataclasses

    from pipeline.train.self_distill import distill, validate
    from pipeline.train.tracking import tracked

    validate(cfg)
    params = {"model": cfg.model.spec, "corpus": cfg.data.corpus, "distill": dataclasses.asdict(cfg.distill)}
    with tracked(cfg.train.tracking, cfg.distill.output, "distill", params) as tracker:  # store: <output>/mlflow.db
        summary = distill(cfg, ray_address=args.ray_address, local=args.local)
        if tracker:
            tracker.log_metrics(summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
