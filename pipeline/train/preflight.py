"""Checks of a training run that must fail before the cluster does any work.

In:  the `FluidConfig`, a resolved model folder, the storage URL. Out: nothing, or a one-line
`FluidError`: `validate` (settings that cannot work together), `check_model` (a causal-LM head and a
context that holds `data.seq_len`), `check_storage` (the run storage is writable now, not after an hour).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import FluidConfig
from pipeline.errors import FluidError


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
    if t.lora_layers and t.drafter != "adapter":
        raise FluidError("train.lora_layers limits the frozen-base drafter (train.drafter=adapter) to some layers; "
                         "with train.drafter=full it has no effect (drop it)")



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
