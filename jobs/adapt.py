"""`fluid adapt` / `python -m jobs.adapt`: Stage I causal-alignment adaptation on Ray Train (FSDP2).

Checks the configuration before any worker starts (sequence length vs the model's context, K_max,
batch divisibility, data present, storage writable, causal-LM head), resolves the model, builds the
noised two-stream datasets with Ray Data, and runs `TorchTrainer` with sharded DCP checkpoints
every `train.checkpoint_every` steps (the last `train.keep_checkpoints` kept) under
`<train.storage_path>/<train.run_name>`. Re-running the same command with the same run name resumes
from the last checkpoint; worker failures are retried `train.max_failures` times from the last
checkpoint. At the end the model is exported as a Hugging Face folder with `fluid.json`.

Metrics: `<storage>/<run>/metrics.jsonl` (one line per step, plus `eval` lines before and after).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.common import parse_job_args, run_job
from pipeline.config import FluidConfig
from pipeline.errors import FluidError


def validate(cfg: FluidConfig) -> None:
    """Configuration errors that must surface before the cluster does any work."""
    t = cfg.train
    if cfg.noise.k_max < 1:
        raise FluidError(f"noise.k_max must be ≥ 1, got {cfg.noise.k_max}")
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
    if not 0 <= cfg.data.distill_mix <= 1:
        raise FluidError(f"data.distill_mix must be in [0, 1], got {cfg.data.distill_mix}")
    if t.drafter == "adapter" and t.lora_rank < 0:
        raise FluidError(f"train.lora_rank must be ≥ 0, got {t.lora_rank}")
    if t.use_gpu is False and cfg.model.dtype in ("bfloat16", "float16"):
        raise FluidError(f"model.dtype={cfg.model.dtype} needs train.use_gpu=true (CPU training runs in fp32)")


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

    init_ray(**({"address": ray_address} if ray_address else
                {"num_cpus": max(4, cfg.train.workers * cfg.train.cpus_per_worker + 2)}))
    return fit(cfg, resolved, storage, build_training_datasets(cfg, resolved))


def build_training_datasets(cfg: FluidConfig, resolved) -> dict:
    """Materialized `train` (enough epochs for max_steps, each noised with its own epoch seed) and
    `validation` datasets, in the deterministic order of pipeline/data/ray_pipeline.py (seeded shuffle included).
    With `data.preprocessed`, the train rows come from `fluid preprocess` Parquet shards instead."""
    from pipeline.data.ray_pipeline import build_dataset, read_preprocessed

    columns = batch_columns(cfg)

    def make(split: str, epoch: int):
        if split == "train" and cfg.data.preprocessed:
            return read_preprocessed(cfg.data.preprocessed).select_columns(columns)
        return build_dataset(cfg.data, cfg.noise, tokenizer_path=str(resolved.path),
                             mask_token_id=resolved.mask_token_id, split=split, epoch=epoch,
                             cache_dir=cfg.model.cache_dir).select_columns(columns)

    total = cfg.train.max_steps * cfg.train.global_batch_size
    needed = total
    if cfg.data.distilled:
        from pipeline.data.distilled import is_distilled

        needed = sum(not is_distilled(i, cfg.data.distill_mix) for i in range(total))
    datasets, n_rows, epoch = [], 0, 0
    while n_rows < max(needed, 1):
        ds = make("train", epoch).materialize()
        count = ds.count()
        if count == 0:
            raise FluidError("the training split produced no sequences: add data or lower data.seq_len")
        datasets.append(ds)
        n_rows += count
        epoch += 1
        if epoch > 1000:
            raise FluidError("training would need over 1000 epochs: lower train.max_steps")
    out = {"train": datasets[0] if len(datasets) == 1 else datasets[0].union(*datasets[1:])}
    if cfg.data.distilled:
        out["train"] = mix_distilled(cfg, resolved, out["train"], total)
    out["train"].context.execution_options.preserve_order = True
    try:
        val = make("validation", 0).materialize()
        if val.count() > 0:
            out["validation"] = val
    except FluidError as e:
        print(f"[fluid] no validation data ({e}); skipping held-out evaluation", file=sys.stderr)
    for ds in out.values():  # workers iterate materialized rows: a progress bar per worker is only noise
        ds.context.enable_progress_bars = False
    return out


def mix_distilled(cfg: FluidConfig, resolved, natural, total: int):
    """The training rows with `data.distill_mix` of them distilled (pipeline/data/distilled.py), in order."""
    import ray.data

    from pipeline.data.distill import read_distilled
    from pipeline.data.distilled import distilled_examples, mix
    from pipeline.data.local import make_params

    prompts, conts = read_distilled(cfg.data.distilled)
    params = make_params(cfg.data, cfg.noise, tokenizer_path=resolved.path, mask_token_id=resolved.mask_token_id)
    natural_rows = natural.iter_rows() if cfg.data.distill_mix < 1 else iter(())
    rows = list(mix(natural_rows, distilled_examples(prompts, conts, params), cfg.data.distill_mix, total))
    print(f"[fluid] training rows: {len(rows)} ({cfg.data.distill_mix:.0%} distilled from {len(prompts)} "
          f"continuations in {cfg.data.distilled})", flush=True)
    return ray.data.from_items(rows)


def batch_columns(cfg: FluidConfig) -> list[str]:
    from pipeline.batch import columns_for

    return list(columns_for(cfg.noise.mode))


def fit(cfg: FluidConfig, resolved, storage: str, datasets: dict) -> dict:
    """Run the TorchTrainer on prepared datasets; resumes if the run folder holds a checkpoint."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.loop import train_loop_per_worker

    run_dir = f"{storage.rstrip('/')}/{cfg.train.run_name}"
    local_run_dir = run_dir if "://" not in run_dir else str(Path("runs") / cfg.train.run_name)
    export_dir = cfg.train.export_dir or (f"{local_run_dir}/export")
    loop_config = {
        "fluid": cfg.to_dict(), "model_path": str(resolved.path), "mask_token_id": resolved.mask_token_id,
        "base_sha256": resolved.meta.get("sha256"), "run_dir": local_run_dir, "export_dir": export_dir,
        "has_validation": "validation" in datasets, "eval_batches": cfg.train.eval_batches,
        "threads": cfg.train.cpus_per_worker,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),  # every worker reads the same global order
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
            "metrics_jsonl": f"{local_run_dir}/metrics.jsonl"}


if __name__ == "__main__":
    sys.exit(run_job(main))
