"""`fluid adapt` / `python -m jobs.adapt`: Stage I causal-alignment adaptation on Ray Train (FSDP2).

Checks the configuration before any worker starts (sequence length vs the model's context, K_max,
batch divisibility, data present, storage writable, causal-LM head), resolves the model, preprocesses
the corpus into Parquet shards under the run folder with Ray Data (unless `data.preprocessed` names
shards; reused on re-submission), and runs `TorchTrainer`: each worker streams its share of the shards
(seeded span order per epoch, bounded shuffle window); the few held-out rows evaluation reads go to
every worker whole, by object reference. Sharded DCP checkpoints every
`train.checkpoint_every` steps (the last `train.keep_checkpoints` kept) go under
`<train.storage_path>/<train.run_name>` (a path every node sees, or `s3://` / `gs://`). Re-submitting
the same command with the same run name resumes from the last checkpoint; worker failures are retried
`train.max_failures` times from the last checkpoint. At the end the model is exported as a Hugging Face
folder with `fluid.json` (default `<run>/export`). On a multi-node cluster the driver stages the model
and a local corpus content-addressed under `<storage>/.fluid/` and each node fetches its own copy once.

Metrics: `<storage>/<run>/metrics.jsonl` (one line per step, plus `eval` lines before and after).
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import parse_job_args, run_job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluid adapt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (default: start or join local)")
    args, cfg = parse_job_args(parser, argv)
    from pipeline.train.fit import run_training
    from pipeline.train.preflight import check_model, check_storage, validate

    validate(cfg)
    storage = check_storage(cfg.train.storage_path)

    from pipeline.sources.corpus import list_sources
    from pipeline.sources.model_source import resolve_model

    list_sources(cfg.data.corpus, cache_dir=cfg.model.cache_dir, val_fraction=cfg.data.val_fraction,
                 test_fraction=cfg.data.test_fraction, split_seed=cfg.data.split_seed)  # fails early if empty
    resolved = resolve_model(cfg.model.spec, cfg.model.cache_dir, mask_token=cfg.model.mask_token)
    check_model(resolved.path, cfg.data.seq_len)
    result = run_training(cfg, resolved, storage, ray_address=args.ray_address)
    print(f"[fluid] done: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(main))
