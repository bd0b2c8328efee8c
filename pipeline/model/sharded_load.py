"""Sharded model load: build on the meta device, shard with FSDP2, read each rank's rows from safetensors.

In:  a Hugging Face model folder (config.json + `*.safetensors`, one file or an index), the `[M]` id,
     the device, the parameter dtype, an initialised process group (gloo or NCCL).
Out: the FSDP2-sharded causal LM with the pretrained weights, `[M]`'s row set to the mean of the other
     rows (when the checkpoint has no such row), as `causal_lm.build_model` + `apply_fsdp2` would give.

The torchtitan pattern: no rank ever holds the full model. The model is built with parameters on the
meta device (buffers such as rotary frequencies stay real: accelerate's `init_empty_weights`),
`fully_shard` per layer and root, then
`to_empty` allocates only this rank's shards, and each shard is filled with the rows
[offset, offset + local rows) read lazily from the safetensors file (`get_slice`): the largest
tensor a rank materializes while loading is one parameter's shard, not the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.errors import FluidError

# Every slice the loader reads (name, shape): tests check that no rank reads more than its shards.
READ_LOG: list[tuple[str, tuple[int, ...]]] = []


def _weight_files(folder: Path) -> dict[str, Path]:
    """Parameter name → the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FluidError(f"{folder} has no .safetensors weights")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            out.update({k: f for k in fh.keys()})
    return out


def _local_rows(param) -> tuple[int, int]:
    """(first global row, number of rows) of this rank's shard of a dim-0-sharded DTensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return (int(offset[0]) if len(offset) else 0), (int(shape[0]) if len(shape) else 0)


def load_sharded(model_path: str | Path, mask_token_id: int, device: torch.device, *, dtype=torch.float32,
                 attn_implementation: str = "sdpa", mixed_precision: bool = False,
                 activation_checkpointing: bool = False):
    """The sharded model (module docstring). Collective: every rank calls it."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.model.causal_lm import MASK_MARKER
    from pipeline.model.parallelize import apply_activation_checkpointing, apply_fsdp2

    folder = Path(model_path)
    mcfg = AutoConfig.from_pretrained(folder)
    mcfg._attn_implementation = attn_implementation
    from accelerate import init_empty_weights

    # parameters on the meta device; buffers (rotary frequencies, computed in __init__) for real
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(mcfg, dtype=dtype)
        n_old = model.get_input_embeddings().num_embeddings
        if mask_token_id >= n_old:
            model.resize_token_embeddings(mask_token_id + 1, mean_resizing=False)
    out_emb = model.get_output_embeddings()
    if getattr(mcfg, "tie_word_embeddings", False) and out_emb is not None:
        out_emb.weight = model.get_input_embeddings().weight  # init_empty_weights leaves them untied
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # to_empty() below would wipe them
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_fsdp2(model, mixed_precision=mixed_precision)
    model.to_empty(device=device)
    _restore_buffers(model, buffers, device)

    fresh_mask = getattr(mcfg, MASK_MARKER, None) is None  # as add_mask_token: [M] starts at the mean row
    tables = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    files = _weight_files(folder)
    handles: dict[Path, object] = {}
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                key = name.replace("_checkpoint_wrapped_module.", "")
                if key not in files:
                    raise FluidError(f"{folder}: no weights for parameter {key}")
                fh = handles.get(files[key]) or handles.setdefault(files[key], safe_open(str(files[key]), "pt"))
                src = fh.get_slice(key)
                first, rows = _local_rows(param)
                stored = src.get_shape()[0]
                local = param.to_local()
                local.zero_()
                have = max(0, min(rows, stored - first))  # rows past the checkpoint: the new [M] row
                if have:
                    piece = src[first:first + have]
                    READ_LOG.append((key, tuple(piece.shape)))
                    local[:have].copy_(piece.to(local.dtype))
                if id(param) in tables and (fresh_mask or stored < param.shape[0]):
                    _mean_row(param, mask_token_id, min(stored, n_old))
    finally:
        handles.clear()
    setattr(model.config, MASK_MARKER, mask_token_id)
    return model


def _restore_buffers(model, buffers: dict, device) -> None:
    for name, value in buffers.items():
        if value is None:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        getattr(module, attr).copy_(value.to(device))


def _mean_row(param, row: int, n_old: int) -> None:
    """Set global row `row` of a dim-0-sharded parameter to the mean of its other rows among the first
    `n_old` (the pre-existing vocabulary), as `causal_lm.add_mask_token` does. Collective."""
    first, rows = _local_rows(param)
    local = param.to_local()
    upto = max(0, min(rows, n_old - first))
    total = torch.zeros(local.shape[1:], dtype=torch.float32, device=local.device)
    if upto:
        total += local[:upto].sum(0, dtype=torch.float32)
        if first <= row < first + upto:
            total -= local[row - first].float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    if first <= row < first + rows:
        local[row - first].copy_((total / (n_old - (1 if row < n_old else 0))).to(local.dtype))
