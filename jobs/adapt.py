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
from pathlib import Path

from jobs.common import parse_job_args, run_job
from pipeline.config import FluidConfig
from pipeline.errors import FluidError
from pipeline.train.outputs import METRICS


def validate(cfg: FluidConfig) -> None:
    """Configuration errors that must surface before the cluster does any work."""
    t = cfg.train
    if not 1 <= cfg.noise.k_max <= 127:
        raise FluidError(f"noise.k_max must be in 1..127 (the batch's k column is int8), got {cfg.noise.k_max}")
    if cfg.data.seq_len < 2:
        raise FluidError(f"data.seq_len must be ≥ 2, got {cfg.data.seq_len}")
    for name in ("workers", "global_batch_size", "grad_accum", "max_steps", "checkpoint_every", "keep_checkpoints"):
        if getattr(t, name) < 1:
            raise FluidError(f"train.{name} must be ≥ 1, got {getattr(t, name)}")
    if t.global_batch_size % (t.grad_accum * t.workers):
        raise FluidError(f"train.global_batch_size ({t.global_batch_size}) must be divisible by train.grad_accum × "
                         f"train.workers ({t.grad_accum} × {t.workers})")
    if min(t.eval_decode_prompts, t.eval_decode_tokens) < 0 or t.eval_decode_prompt_len < 1:
        raise FluidError("train.eval_decode_prompts and train.eval_decode_tokens must be ≥ 0, "
                         "train.eval_decode_prompt_len ≥ 1")
    if t.lr <= 0 or t.grad_clip <= 0:
        raise FluidError("train.lr and train.grad_clip must be > 0")
    if not 0 <= cfg.noise.rho <= 1:
        raise FluidError(f"noise.rho must be in [0, 1], got {cfg.noise.rho}")
    if cfg.model.dtype == "float16":
        raise FluidError("model.dtype=float16 is not supported for training (fp16 needs loss scaling, which this "
                         "trainer does not do): use bfloat16 on GPUs, or float32")
    if cfg.data.distilled and cfg.noise.mode != "causal":
        raise FluidError("data.distilled needs noise.mode=causal (distilled drafts are two-stream spans)")
    if cfg.data.distilled and cfg.data.preprocessed:
        raise FluidError("data.distilled mixes distilled rows into the shards adapt preprocesses itself; "
                         "it cannot be combined with data.preprocessed (drop one of them)")
    if not 0 <= cfg.data.distill_mix <= 1:
        raise FluidError(f"data.distill_mix must be in [0, 1], got {cfg.data.distill_mix}")
    if t.drafter == "adapter" and t.lora_rank < 0:
        raise FluidError(f"train.lora_rank must be ≥ 0, got {t.lora_rank}")


def check_model(path: Path, seq_len: int) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    mcfg = AutoConfig.from_pretrained(path)
    if mcfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise FluidError(f"model type {mcfg.model_type!r} at {path} has no causal-LM head (AutoModelForCausalLM)")
    ctx = getattr(mcfg, "max_position_embeddings", None) or getattr(mcfg, "n_positions", None)
    if ctx is not None and seq_len > ctx:
        raise FluidError(f"data.seq_len {seq_len} exceeds the model's context of {ctx} tokens")


def check_storage(storage_path: str) -> str:
    """Make sure the run storage is writable now, not after an hour of training."""
    import uuid

    import fsspec

    if "://" not in storage_path:
        storage_path = str(Path(storage_path).expanduser().resolve())
    probe = f"{storage_path.rstrip('/')}/.fluid-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs, p = fsspec.core.url_to_fs(probe)
        fs.makedirs(storage_path.split("://", 1)[-1], exist_ok=True)
        fs.pipe_file(p, b"ok")
        fs.rm_file(p)
    except Exception as e:
        raise FluidError(f"train.storage_path {storage_path} is not writable ({type(e).__name__}: {e})") from None
    return storage_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fluid adapt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (default: start or join local)")
    args, cfg = parse_job_args(parser, argv)
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

    from jobs.train_data import prepare_train_shards
    from pipeline.data.ray_pipeline import build_dataset, collect_rows
    from pipeline.data.streaming import list_blocks

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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.loop import train_loop_per_worker
    from pipeline.train.resume import check_resume, latest_checkpoint, trained_on

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
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.train.run_name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return {"metrics": {k: v for k, v in (result.metrics or {}).items() if k in ("step", "loss", "ar_ce", "draft_ce", "masked_ce")},
            "checkpoint": result.checkpoint.path if result.checkpoint else None, "export": export_dir,
            "metrics_jsonl": f"{run}/{METRICS}"}


if __name__ == "__main__":
    sys.exit(run_job(main))
