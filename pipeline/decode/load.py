"""One way to get a `Sampler`: from an export folder, or from a plain model with its `[M]` row.

In:  an export folder (HF model + tokenizer + `fluid.json`, optional `horizon_head.safetensors`), a
     local Hugging Face folder plus an explicit mask id, or any model spec (`pipeline.sources`).
Out: a ready `Sampler` on the requested device and dtype, its forward cost by width (which greedy
     `verify` plans its horizon with) given or measured here on the device (`cost_model.calibrate`);
     `load_export(folder)` → (model, tokenizer or None, the fluid.json dict) for tools that want the
     bare model. Weights are read with `use_safetensors=True` only (nothing is unpickled); fluid.json
     is read and validated first by pipeline/export_format.py.

The export is the normal case (`fluid generate`, `fluid bench sampler`, the Serve replica). A plain
model gets a mask row initialised from the mean embedding: its drafts are untrained, so `verify`
runs at AR speed — the worst case, which the benchmarks measure on purpose.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import NoiseConfig
from pipeline.decode.horizon_head import HorizonHead
from pipeline.decode.matmul import apply_matmul
from pipeline.decode.sampler import Sampler
from pipeline.errors import FluidError
from pipeline.export_format import HORIZON_HEAD_FILE, TOKENIZER_FILES, is_export, read_fluid_meta


def load_sampler(spec: str | Path, *, device=None, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                 mask_token_id: int | None = None, k_max: int = NoiseConfig.k_max, cache_dir=None,
                 forward_cost: list[float] | None = None, matmul: str = "auto") -> Sampler:
    """The Sampler of an export folder, or of a plain model (`mask_token_id` given, or a resolvable spec).
    `forward_cost`: relative cost of a forward by width 1, 2, … (None or empty: measure it now).
    `matmul`: the operand order of narrow products (pipeline/decode/matmul.py): auto = the faster one
    measured on this device, before the forward cost is (the cost table depends on it)."""
    sampler = _load(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                    mask_token_id=mask_token_id, k_max=k_max, cache_dir=cache_dir, forward_cost=forward_cost or None)
    apply_matmul(sampler.model, matmul, token_id=sampler.clean_probe_id, mask_token_id=sampler.mask_token_id)
    _ = sampler.forward_cost  # calibrate at load, not in the first request
    return sampler


def _load(spec, *, device, dtype, trust_remote_code, mask_token_id, k_max, cache_dir, forward_cost) -> Sampler:
    if is_export(spec) and mask_token_id is None:
        return _from_export(Path(spec), device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                            forward_cost=forward_cost)
    from transformers import AutoTokenizer

    from pipeline.model.causal_lm import add_mask_token, load_causal_lm

    if mask_token_id is not None:
        path = Path(spec)
        if not path.is_dir():
            raise FluidError(f"{spec} is not a folder (an explicit mask token id needs a local model folder)")
    else:
        from pipeline.sources.model_source import resolve_model

        resolved = resolve_model(str(spec), cache_dir)
        path, mask_token_id = resolved.path, resolved.mask_token_id
    model = load_causal_lm(path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
                           use_safetensors=True)
    add_mask_token(model, mask_token_id)  # idempotent; a new row is untrained (mean embedding)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return Sampler(model, tokenizer, mask_token_id=mask_token_id, k_max=k_max, device=device,
                   forward_cost=forward_cost)


def load_export(export_dir: str | Path, *, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                trust_remote_code: bool = False):
    """Load an export → (model, tokenizer or None, meta dict); safetensors only, metadata validated.
    `trust_remote_code` runs the model's own code (only when the user's config allows it)."""
    from pipeline.model.causal_lm import MASK_MARKER, load_causal_lm

    meta = read_fluid_meta(export_dir)
    model = load_causal_lm(export_dir, dtype=dtype, attn_implementation=attn_implementation, use_safetensors=True,
                           trust_remote_code=trust_remote_code)
    if meta.drafter:  # frozen base + gated drafter (pipeline/model/drafter.py)
        from pipeline.model.drafter import load_drafter

        load_drafter(model, export_dir, meta.drafter)
    vocab = model.get_input_embeddings().num_embeddings
    if meta.mask_token_id >= vocab:
        raise FluidError(f"{export_dir}: mask_token_id {meta.mask_token_id} outside the {vocab} embeddings")
    setattr(model.config, MASK_MARKER, meta.mask_token_id)
    tokenizer = None
    if any((Path(export_dir) / f).is_file() for f in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(export_dir), trust_remote_code=trust_remote_code)
    model.eval()
    return model, tokenizer, meta.to_dict()


def _from_export(path: Path, *, device, dtype, trust_remote_code: bool, forward_cost) -> Sampler:
    model, tokenizer, meta = load_export(path, dtype=dtype or torch.float32,  # validates fluid.json
                                         trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise FluidError(f"{path} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    head_path = path / HORIZON_HEAD_FILE
    head = HorizonHead.load(head_path) if head_path.is_file() else None
    return Sampler(model, tokenizer, mask_token_id=int(meta["mask_token_id"]), k_max=int(meta["k_max"]),
                   horizon_head=head, device=device, policy_defaults=meta.get("policy_defaults"),
                   forward_cost=forward_cost)
