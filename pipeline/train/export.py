"""Hugging Face export of an adapted model, with its FLUID metadata (the format: pipeline/export_format.py).

In (export_hf): a trained model — plain, peft-wrapped (LoRA is merged), a frozen base with its gated
     drafter (the base files are copied unchanged, the drafter goes to drafter.safetensors), or FSDP2-sharded (every rank
     must call; the full state dict is gathered to rank 0's CPU and only rank 0 writes) — its
     tokenizer, and `fluid_meta` (the keys of REQUIRED_META; values may be None where unknown).
Out: `out_dir/` with model.safetensors + config.json (save_pretrained), the tokenizer files and
     `fluid.json` (written by `write_fluid_meta`). Everything is written into a temporary sibling folder
     which is then renamed into place, so a crash never leaves a half-written export (an old export
     is replaced whole). Loading an export back is `pipeline.decode.load.load_export`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

import pipeline
from pipeline.errors import FluidError
from pipeline.export_format import FORMAT_VERSION, FluidMeta, write_fluid_meta


def code_version() -> str:
    """pipeline.__version__, plus '+g<commit>' when the source lives in a git checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(pipeline.__file__).parent,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{pipeline.__version__}+g{sha}" if sha else pipeline.__version__


def _jsonable(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    return x


def _full_state_dict(model) -> dict[str, torch.Tensor]:
    """Full CPU state dict; collective when the model is FSDP2-sharded (all ranks must call)."""
    from pipeline.model.parallelize import is_sharded

    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _plain_model_to_save(model):
    """An unsharded, LoRA-merged PreTrainedModel with the trained weights (rank 0 only)."""
    from pipeline.model.parallelize import is_sharded

    is_peft = callable(getattr(model, "merge_and_unload", None)) and hasattr(model, "peft_config")
    sharded = is_sharded(model)
    if not is_peft and not sharded:
        return model
    from transformers import AutoModelForCausalLM

    state = _full_state_dict(model)
    base = model.get_base_model() if is_peft else model
    dtype = next(iter(v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    fresh = AutoModelForCausalLM.from_config(base.config, dtype=dtype)
    if is_peft:
        from peft import get_peft_model

        fresh = get_peft_model(fresh, model.peft_config[model.active_adapter])
    fresh.load_state_dict(state, strict=True)
    return fresh.merge_and_unload() if is_peft else fresh


def export_hf(model, tokenizer, out_dir: str | Path, *, fluid_meta: dict, base_dir=None) -> Path | None:
    """Write the export (see module docstring). Returns out_dir on rank 0, None on other ranks.
    A frozen-base drafter (pipeline/model/drafter.py) is exported as the unchanged files of `base_dir`
    (byte-identical; the adapter is never merged) plus `drafter.safetensors`."""
    from pipeline.model.drafter import find_drafter

    if find_drafter(model) is not None:
        return _export_drafter(model, tokenizer, Path(out_dir), fluid_meta=fluid_meta, base_dir=base_dir)
    meta = _jsonable(dict(fluid_meta))
    meta.pop("code_version", None)
    meta = {"format_version": FORMAT_VERSION, **meta, "code_version": code_version()}
    FluidMeta.from_dict(meta)  # refuse incomplete metadata before any work
    from pipeline.model.parallelize import is_sharded

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    if is_sharded(model) and rank != 0:
        _full_state_dict(model)  # take part in the collective gather; rank 0 writes
        dist.barrier()
        return None
    if rank != 0:  # unsharded replicas: every rank has the same weights, rank 0 writes
        dist.barrier()
        return None

    out = Path(out_dir)
    try:
        to_save = _plain_model_to_save(model)
        # inference wants the KV cache, whatever the training run set (HF generate reads these)
        to_save.config.use_cache = True
        if getattr(to_save, "generation_config", None) is not None:
            to_save.generation_config.use_cache = True
        vocab = to_save.get_input_embeddings().num_embeddings
        if meta["mask_token_id"] >= vocab:
            raise FluidError(f"mask_token_id {meta['mask_token_id']} is outside the model's {vocab} embeddings")
        with _atomic_dir(out) as tmp:
            to_save.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            write_fluid_meta(tmp, meta)
    finally:
        if distributed:
            dist.barrier()
    return out


def _export_drafter(model, tokenizer, out: Path, *, fluid_meta: dict, base_dir) -> Path | None:
    from safetensors.torch import save_file

    from pipeline.model.drafter import DRAFTER_FILE, drafter_state

    if base_dir is None:
        raise FluidError("exporting a frozen-base drafter needs the base model folder (base_dir)")
    spec = dict(getattr(model.config, "fluid_drafter", None) or {})
    meta = _jsonable({**fluid_meta, "drafter": {**spec, "mask_token_id": int(fluid_meta["mask_token_id"])}})
    meta.pop("code_version", None)
    meta = {"format_version": FORMAT_VERSION, **meta, "code_version": code_version()}
    FluidMeta.from_dict(meta)  # refuse incomplete metadata before any work
    state = drafter_state(_full_state_dict(model))  # collective when sharded
    distributed = dist.is_available() and dist.is_initialized()
    if distributed and dist.get_rank() != 0:
        dist.barrier()
        return None
    try:
        base = Path(base_dir)
        files = [f for f in base.iterdir() if f.is_file() and (f.suffix == ".safetensors" or f.name in (
            "config.json", "generation_config.json", "model.safetensors.index.json"))]
        with _atomic_dir(out) as tmp:
            tmp.mkdir()
            for f in files:
                shutil.copyfile(f, tmp / f.name)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            save_file({k: v.detach().cpu() for k, v in state.items()}, str(tmp / DRAFTER_FILE))
            write_fluid_meta(tmp, meta)
    finally:
        if distributed:
            dist.barrier()
    return out


@contextlib.contextmanager
def _atomic_dir(out: Path):
    """Yield a temporary sibling folder to fill; on success it replaces `out` whole, on failure it is removed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        _replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` is moved aside first and removed afterwards."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_meta(cfg, mask_token_id: int, base_sha256: str | None, step: int) -> dict:
    """The `fluid.json` content of an export of a training run with config `cfg` after `step` steps."""
    d = cfg.to_dict()
    return {
        "mask_token": cfg.model.mask_token,
        "mask_token_id": mask_token_id,
        "k_max": cfg.noise.k_max,
        "policy_defaults": {"policy": cfg.sampler.policy, "gamma": cfg.sampler.gamma,
                            "max_horizon": min(cfg.sampler.max_horizon, cfg.noise.k_max)},
        "base_model": {"spec": cfg.model.spec, "sha256": base_sha256},
        "data_config": {"data": d["data"], "noise": d["noise"]},
        "train_config": {**d["train"], "steps_done": step},
    }


def export_plain_model(spec: str, output: str) -> str:
    """An export of an untrained model: its weights, an `[M]` row, fluid.json with steps_done 0."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.config import FluidConfig
    from pipeline.model.causal_lm import add_mask_token, load_causal_lm
    from pipeline.sources.model_source import resolve_model
    from pipeline.train.outputs import export_to

    cfg = FluidConfig()
    cfg.model.spec = spec
    cfg.sampler.policy = "verify"  # lossless whatever the drafts are
    resolved = resolve_model(spec, cfg.model.cache_dir, mask_token=cfg.model.mask_token)
    model = load_causal_lm(resolved.path, dtype=torch.float32, use_safetensors=True)
    add_mask_token(model, resolved.mask_token_id)
    meta = export_meta(cfg, resolved.mask_token_id, resolved.meta.get("sha256"), 0)
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    return export_to(str(output), lambda out: export_hf(model, tokenizer, out, fluid_meta=meta))


def export_checkpoint(checkpoint: str, output: str) -> str:
    """An export of a training checkpoint (a folder or an fsspec URL): the model the run's saved configuration
    builds (base + `[M]` row, LoRA or the frozen-base drafter), its DCP weights loaded in one process."""
    import tempfile

    from pipeline.config import from_dict
    from pipeline.model.causal_lm import build_model
    from pipeline.sources.model_source import resolve_model
    from pipeline.train.checkpoint import load_model_weights, read_trainer_state

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(checkpoint)
        if "://" in checkpoint:
            import fsspec

            fs, root = fsspec.core.url_to_fs(checkpoint)
            fs.get(root.rstrip("/") + "/", tmp + "/", recursive=True)
            local = Path(tmp)
        if not local.is_dir():
            raise FluidError(f"checkpoint folder not found: {checkpoint}")
        state = read_trainer_state(local)
        cfg = from_dict(state["config"])
        resolved = resolve_model(cfg.model.spec, cfg.model.cache_dir, mask_token=cfg.model.mask_token)
        import torch

        model = build_model(cfg, str(resolved.path), resolved.mask_token_id, torch.device("cpu"))  # + LoRA/drafter
        load_model_weights(local, model)
        from transformers import AutoTokenizer

        from pipeline.train.outputs import export_to

        meta = export_meta(cfg, resolved.mask_token_id, resolved.meta.get("sha256"), int(state["step"]))
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        return export_to(str(output), lambda out: export_hf(model, tokenizer, out, fluid_meta=meta,
                                                            base_dir=resolved.path))
