"""Loading a causal LM, adding the `[M]` mask token, and the two-stream forward (docs/method.md §1–§3).

In:  a Hugging Face model path or directory; a batch dict of [B, T] int tensors following the
     batch-format table (`input_ids`, `position_ids`, `span_id`, `anchor`; other columns ignored).
Out: a `PreTrainedModel` (AutoModelForCausalLM); logits [B, T, V] for the batch.

The dense [B, 1, T, T] attention mask is built here, on the batch's device, from the three short
per-token vectors. transformers 5 returns a 4-D mask unchanged (`masking_utils` exits early) and its
SDPA path sets `is_causal=False` whenever a mask is given, so a custom 4-D mask fully defines who
attends to whom: the bidirectional baseline needs no model surgery (tests check both directions).
SDPA gets a boolean mask (True = may attend); eager adds the mask to the scores, so it gets the
additive float form — a boolean mask there would silently add 1.0 / 0.0 instead of masking.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from pipeline.errors import FluidError
from pipeline.model.attention import (
    annealed_bidirectional_mask,
    bidirectional_mask,
    to_additive,
    two_stream_mask,
)

# Marker stored in the model config once `[M]` has its row (kept through save_pretrained), so that
# add_mask_token is idempotent and never re-initialises a trained row of a reloaded model.
MASK_MARKER = "fluid_mask_token_id"
_MASK_IMPLS = {"sdpa", "eager"}


def load_causal_lm(
    path_or_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    **from_pretrained_kwargs,
):
    """Load `path_or_dir` with AutoModelForCausalLM; expected failures become FluidError."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path_or_dir),
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            **from_pretrained_kwargs,
        )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "AutoModelForCausalLM" in str(e):
            raise FluidError(
                f"{path_or_dir}: not a causal language model (AutoModelForCausalLM cannot load it: "
                f"{str(e).splitlines()[0]}). Use a decoder-only model with a causal-LM head."
            ) from e
        raise FluidError(f"{path_or_dir}: cannot load model: {str(e).splitlines()[0]}") from e
    except OSError as e:
        raise FluidError(f"{path_or_dir}: cannot load model (missing or unreadable): {e}") from e
    if model.get_output_embeddings() is None:
        raise FluidError(f"{path_or_dir}: the loaded model has no output (LM head) embeddings")
    return model


@torch.no_grad()
def add_mask_token(model, mask_token_id: int):
    """Give `[M]` (= `mask_token_id`) an input embedding row initialised to the mean of the others.

    Resizes the embeddings only if the id is outside the current matrix (HF's mean_resizing is off:
    we initialise ourselves). An untied output head gets the mean of its other rows for `[M]`
    (so its logit starts at the mean logit); rows of existing tokens are never touched. With tied
    embeddings the `[M]` output row is the input row. Idempotent: a model whose config already
    records this mask id is returned unchanged. Returns the model.
    """
    if mask_token_id < 0:
        raise FluidError(f"mask_token_id must be >= 0, got {mask_token_id}")
    done = getattr(model.config, MASK_MARKER, None)
    emb = model.get_input_embeddings()
    if done is not None:
        if done != mask_token_id:
            raise FluidError(f"model already has mask token id {done}; refusing to add {mask_token_id}")
        if mask_token_id < emb.num_embeddings:
            return model
    n_old = emb.num_embeddings
    if mask_token_id >= n_old:
        model.resize_token_embeddings(mask_token_id + 1, mean_resizing=False)
        emb = model.get_input_embeddings()
    others = _rows_except(emb.weight.shape[0], mask_token_id, n_old, emb.weight.device)
    emb.weight[mask_token_id] = emb.weight[others].mean(0)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not emb.weight:
        head_others = _rows_except(head.weight.shape[0], mask_token_id, n_old, head.weight.device)
        if mask_token_id < head.weight.shape[0]:
            head.weight[mask_token_id] = head.weight[head_others].mean(0)
            if getattr(head, "bias", None) is not None:
                head.bias[mask_token_id] = head.bias[head_others].mean()
    setattr(model.config, MASK_MARKER, mask_token_id)
    return model


def _rows_except(n_rows: int, skip: int, n_old: int, device) -> torch.Tensor:
    """Indices of the pre-existing rows (< n_old) other than `skip` (new rows are not averaged)."""
    idx = torch.arange(min(n_rows, n_old), device=device)
    return idx[idx != skip]


def build_attention_mask(model, batch: dict[str, torch.Tensor], mode: str = "causal", *, anneal: float = 1.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """The [B, 1, T, T] mask for `batch` in the form the model's attention implementation wants.

    `anneal` < 1 (bidirectional mode only) lets each future token be seen with that probability
    (DiffuLLaMA's attention-mask annealing, pipeline/model/attention.py)."""
    span_id = batch["span_id"]
    if mode == "causal":
        mask = two_stream_mask(batch["position_ids"], span_id, batch["anchor"])
    elif mode == "bidirectional":
        mask = (bidirectional_mask(span_id) if anneal >= 1.0 else
                annealed_bidirectional_mask(batch["position_ids"], span_id, anneal, generator))
    else:
        raise FluidError(f"unknown attention mode {mode!r} (expected 'causal' or 'bidirectional')")
    impl = getattr(model.config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        return mask
    if impl == "eager":
        return to_additive(mask, _compute_dtype(model))
    raise FluidError(
        f"attention implementation {impl!r} cannot take a custom 4-D mask; load the model with "
        f"attn_implementation='sdpa' or 'eager' (supported: {sorted(_MASK_IMPLS)})"
    )


def forward_outputs(model, batch: dict[str, torch.Tensor], *, mode: str = "causal", anneal: float = 1.0,
                    generator: torch.Generator | None = None, **model_kwargs):
    """Run `model` on a two-stream (or bidirectional-baseline) batch; returns the model output
    (`model_kwargs`, e.g. output_hidden_states=True, go to the model).

    Never passes HF `labels=` (batch labels are already shifted). Padding rows get position 0.
    """
    from pipeline.model.drafter import draft_gate

    input_ids = batch["input_ids"].long()
    position_ids = batch["position_ids"].long().clamp_min(0)
    mask = build_attention_mask(model, batch, mode, anneal=anneal, generator=generator)
    with draft_gate(model, batch["span_id"] >= 0):  # a frozen-base drafter adapts the draft stream only
        return model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                     **model_kwargs)


def forward_batch(model, batch: dict[str, torch.Tensor], *, mode: str = "causal", anneal: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Logits [B, T, V] of `forward_outputs`."""
    return forward_outputs(model, batch, mode=mode, anneal=anneal, generator=generator).logits


def _compute_dtype(model) -> torch.dtype:
    """The dtype activations are computed in (FSDP2 mixed precision casts parameters on the fly)."""
    mp = getattr(model, "_fluid_param_dtype", None)
    if mp is not None:
        return mp
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def build_model(cfg, model_path: str, mask_token_id: int, device: torch.device):
    """The model a training run starts from: the pretrained weights (or, with `train.from_scratch`,
    a random init of the same architecture), with the `[M]` row added, on `device`. With
    `train.drafter=adapter` the base stays frozen and unchanged and gets the gated drafter instead
    (pipeline/model/drafter.py); with `train.lora_rank > 0` (full drafter) peft LoRA wraps it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.train.from_scratch:
        mcfg = AutoConfig.from_pretrained(model_path)
        mcfg._attn_implementation = cfg.model.attn_implementation
        model = AutoModelForCausalLM.from_config(mcfg, dtype=torch.float32)
    else:
        model = load_causal_lm(model_path, attn_implementation=cfg.model.attn_implementation,
                               trust_remote_code=cfg.model.trust_remote_code)
    t = cfg.train
    if t.drafter == "adapter":
        from pipeline.model.drafter import attach_drafter

        attach_drafter(model, mask_token_id, rank=t.lora_rank or 16, alpha=t.lora_alpha, targets=t.lora_targets,
                       layers=t.lora_layers)
        return model.to(device)
    add_mask_token(model, mask_token_id)  # training forwards pass use_cache=False themselves
    if t.lora_rank > 0:
        from pipeline.model.parallelize import apply_lora

        model = apply_lora(model, rank=t.lora_rank, alpha=t.lora_alpha, targets=t.lora_targets)
    return model.to(device)


def cache_kwarg(model) -> str:
    """The keyword `model.forward` takes the KV cache by: transformers 5.x renamed `past_key_values`
    to `cache` (the old name is deprecated). Looked up once per model class (the training step calls it)."""
    return _cache_kwarg_of(type(model))


@functools.cache
def _cache_kwarg_of(cls) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def clean_prefix_len(span_id: torch.Tensor) -> int | None:
    """L such that every row is [clean stream or padding][draft spans or padding] split at L: the
    last clean position + 1, provided no draft token comes before it; None otherwise."""
    clean_any = (span_id == -1).any(0)
    if not bool(clean_any.any()):
        return None
    length = int(clean_any.nonzero().max()) + 1
    if length >= span_id.shape[1] or bool((span_id[:, :length] >= 0).any()):
        return None
    return length


def drafter_forward_batch(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits [B, T, V] of a two-stream batch for a frozen-base drafter, with autograd on the draft
    stream only (equal to `forward_batch` up to float rounding; the tests check 1e-5).

    Why it is exact: with the drafter (pipeline/model/drafter.py) clean tokens never pass the adapter
    and never attend to draft tokens, so the clean stream's outputs and keys/values are the frozen base
    model's and no trained parameter touches them. So the clean stream runs once under no_grad with
    the KV cache on, and the draft stream runs after it on that cache (its rows of the same two-stream
    mask). Backward then costs the draft tokens only, not the whole [clean + draft] sequence. Falls
    back to `forward_batch` when the batch is not split into a clean and a draft part."""
    span_id = batch["span_id"]
    length = clean_prefix_len(span_id)
    if length is None:
        return forward_batch(model, batch)
    from transformers import DynamicCache

    from pipeline.model.drafter import draft_gate

    input_ids = batch["input_ids"].long()
    position_ids = batch["position_ids"].long().clamp_min(0)
    mask = build_attention_mask(model, batch, "causal")
    cache = DynamicCache(config=model.config)
    kwarg = cache_kwarg(model)
    with torch.no_grad(), draft_gate(model, torch.zeros_like(span_id[:, :length], dtype=torch.bool)):
        clean = model(input_ids=input_ids[:, :length], attention_mask=mask[:, :, :length, :length],
                      position_ids=position_ids[:, :length], use_cache=True, **{kwarg: cache})
    with draft_gate(model, span_id[:, length:] >= 0):
        drafts = model(input_ids=input_ids[:, length:], attention_mask=mask[:, :, length:, :],
                       position_ids=position_ids[:, length:], use_cache=True, **{kwarg: cache})
    return torch.cat([clean.logits, drafts.logits], dim=1)
