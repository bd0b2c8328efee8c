"""A training run on Ray Train: the training shards and held-out rows, then the TorchTrainer.

In:  the `FluidConfig`, the resolved model, the run storage (a path every node sees, or a URL).
Out: `run_training(...)` / `fit(...)` → {"metrics", "checkpoint", "export", "metrics_jsonl"} of the run;
     `build_training_datasets` → the row groups of the training shards and the held-out `Rows`.
A run folder that holds a checkpoint is resumed, after `resume.check_resume` compared what it trained on.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.config import FluidConfig
from pipeline.errors import FluidError
from pipeline.train.outputs import METRICS


def run_training(cfg: FluidConfig, resolved, storage: str, *, ray_address: str | None = None) -> dict:
    from pipeline.data.ray_pipeline import init_ray
    from pipeline.sources.staging import stage_folder
    from pipeline.train.cluster import stage_root

    init_ray(**({"address": ray_address} if ray_address else
                {"num_cpus": max(4, cfg.train.workers * cfg.train.cpus_per_worker + 2)}))
    root = stage_root(storage)  # multi-node: what only this node has goes to storage first
    model_ref = stage_folder(resolved.path, root) if root else str(resolved.path)
    return fit(cfg, resolved, storage, build_training_datasets(cfg, resolved, stage_root=root), model_ref=model_ref)



def build_training_datasets(cfg: FluidConfig, resolved, stage_root: str | None = None) -> dict:
    """`train_blocks`: the row groups of the training shards (`data.preprocessed`, or the corpus
    preprocessed here into `<run>/data/train`, reused by a re-submitted run), which every worker streams
    its share of (pipeline/data/streaming.py); `validation`: the held-out rows evaluation reads
    (`train.eval_batches` global micro-batches, and the first `train.eval_decode_prompts` rows as
    decoding prompts), as `Rows` every worker gets whole, if there are any."""
    import dataclasses

    from pipeline.data.ray_pipeline import build_dataset, collect_rows
    from pipeline.data.streaming import list_blocks
    from pipeline.train.shards import prepare_train_shards

    path = cfg.data.preprocessed or prepare_train_shards(cfg, resolved, run_dir(cfg), stage_root=stage_root)
    out: dict = {"train_blocks": [dataclasses.asdict(b) for b in list_blocks(path)]}
    t = cfg.train
    needed = max(t.eval_batches * (t.global_batch_size // t.grad_accum), t.eval_decode_prompts)
    try:
        val = build_dataset(cfg.data, cfg.noise, tokenizer_path=str(resolved.path),
                            mask_token_id=resolved.mask_token_id, split="validation", epoch=0,
                            cache_dir=cfg.model.cache_dir, stage_root=stage_root)
        rows = collect_rows(val.select_columns(batch_columns(cfg)), needed)
        if rows is not None:
            out["validation"] = rows
    except FluidError as e:
        print(f"[fluid] no validation data ({e}); skipping held-out evaluation", file=sys.stderr)
    return out



def run_dir(cfg: FluidConfig) -> str:
    """`<storage_path>/<run_name>`: a URL, or an absolute path."""
    storage = cfg.train.storage_path
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return f"{storage.rstrip('/')}/{cfg.train.run_name}"



def batch_columns(cfg: FluidConfig) -> list[str]:
    from pipeline.batch import columns_for

    return list(columns_for(cfg.noise.mode))



def fit(cfg: FluidConfig, resolved, storage: str, datasets: dict, model_ref: str | None = None) -> dict:
    """Run the TorchTrainer on prepared datasets; resumes if the run folder holds a checkpoint."""
    import ray

    from pipeline.train.resume import check_resume, latest_checkpoint, trained_on
    from pipeline.train.tracking import tracked

    run = f"{storage.rstrip('/')}/{cfg.train.run_name}"  # outputs all go under the storage
    export_dir = cfg.train.export_dir or f"{run}/export"
    want = trained_on(cfg, resolved)
    last = latest_checkpoint(run)
    if last is not None:
        check_resume(last[1].get("trained_on"), want, mode=cfg.train.resume, checkpoint=last[0])
    loop_config = {
        "trained_on": want,
        "fluid": cfg.to_dict(), "model_path": model_ref or str(resolved.path), "mask_token_id": resolved.mask_token_id,
        "base_sha256": resolved.meta.get("sha256"), "run_dir": run, "export_dir": export_dir,
        "validation": ray.put(datasets["validation"]) if "validation" in datasets else None,
        "eval_batches": cfg.train.eval_batches, "threads": cfg.train.cpus_per_worker,
        "train_blocks": datasets.get("train_blocks"),
    }
    with tracked(cfg.train.tracking, run, cfg.train.run_name, cfg.to_dict(), resume=True) as tracker:
        loop_config["tracking"] = tracker.spec() if tracker else None  # rank 0 logs each step
        result = _trainer(cfg, storage, loop_config).fit()
        if result.error:
            raise result.error
        if tracker:
            tracker.set_tags({"fluid.export": export_dir, "fluid.run_dir": run})
            tracker.log_artifacts([f"{run}/{METRICS}"])
    return {"metrics": {k: v for k, v in (result.metrics or {}).items() if k in ("step", "loss", "ar_ce", "draft_ce", "masked_ce")},
            "checkpoint": result.checkpoint.path if result.checkpoint else None, "export": export_dir,
            "metrics_jsonl": f"{run}/{METRICS}"}


def _trainer(cfg: FluidConfig, storage: str, loop_config: dict):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.logs import one_copy_of_prints, train_log_level
    from pipeline.train.loop import train_loop_per_worker

    one_copy_of_prints()

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.train.run_name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            logging_config=LoggingConfig(log_level=train_log_level(cfg.train.verbose)),
        ),
    )
