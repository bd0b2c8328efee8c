"""Frozen-base drafter: a separate `[M]` vector plus a LoRA that only draft-stream tokens pass through.

In:  a Hugging Face causal LM (its weights stay frozen and untouched), the mask id, LoRA rank, alpha
     and target module names (e.g. q_proj … down_proj).
Out: the same model with (a) its input embedding wrapped by `DraftEmbedding`: `[M]` reads a trainable
     vector of its own (the embedding matrix is shared with clean tokens and, in SmolLM2, tied to the
     LM head, so its rows are never trained), and (b) each target `nn.Linear` wrapped by `GatedLoRA`:
     y = W·x for clean tokens, y = W·x + s·B·A·x for draft-stream tokens (the adapter's input is x with
     clean rows zeroed, so a clean token's output is the base layer's output plus an exact 0).

The gate (which tokens are draft stream) is per token: in training, span_id ≥ 0 (a span may open with a
restored true token: still draft stream), set with `draft_gate(model, span_id >= 0)`; otherwise the
`[M]` positions of the input (the sampler's step input is clean tokens, then masks). Clean queries never
attend to draft keys (two-stream mask; in decoding the masks come last), so clean logits and the KV
entries of committed tokens equal the base model's: `verify` reproduces the base model's greedy output.

Why not peft's Activated LoRA (`alora_invocation_tokens`): it switches the adapter on from the last
invocation sequence of a row to its end. A training row may open its first span with a restored true
token (before any `[M]`), so that token would miss the adapter, and `[M]` = a new id outside the base
vocabulary would need the embedding resized — which changes the base weights we export unchanged.
"""

from __future__ import annotations

import contextlib
import math
import re

import torch
from torch import nn

from pipeline.errors import FluidError
from pipeline.export_format import FLUID_META_FILE

DRAFTER_FILE = "drafter.safetensors"
KIND = "gated_lora"


class _Gate:
    """Shared by the embedding (which sets it at each forward) and every GatedLoRA (which reads it).
    What every adapter needs is derived once per forward here, not in each of the ~120 modules:
    `active` (any draft-stream token at all), `weight` ([..., 1], 1.0 on draft-stream tokens; the
    training form) and `rows`, where the draft-stream tokens are in the flattened [B·T] input (the
    decoding form): a slice when they are one run of positions — one row's step input is clean tokens,
    then masks — else the index tensor."""

    def __init__(self) -> None:
        self.explicit: torch.Tensor | None = None
        self.current: torch.Tensor | None = None
        self.active = False
        self.weight: torch.Tensor | None = None
        self.rows: slice | torch.Tensor | None = None
        self.row_path = True  # False: decoding too takes the training form (benchmarks compare the two)

    def set(self, gate: torch.Tensor, dtype: torch.dtype) -> None:
        self.current = gate
        self.active = bool(gate.any())
        self.rows = _draft_rows(gate) if self.active and self.row_path and not torch.is_grad_enabled() else None
        self.weight = gate[..., None].to(dtype) if self.active and self.rows is None else None  # training form only


def _draft_rows(gate: torch.Tensor) -> slice | torch.Tensor:
    """Flat indices of the True entries of `gate` [B, T]: a slice when they are contiguous."""
    idx = gate.reshape(-1).nonzero().squeeze(1)
    first, last = int(idx[0]), int(idx[-1])
    return slice(first, last + 1) if last - first + 1 == idx.numel() else idx


class DraftEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, mask_token_id: int, gate: _Gate):
        super().__init__()
        self.base, self.mask_token_id, self._gate = base, int(mask_token_id), gate
        with torch.no_grad():
            init = base.weight[: min(base.num_embeddings, self.mask_token_id)].float().mean(0)
        self.mask_vector = nn.Parameter(init.to(base.weight.dtype))

    @property
    def weight(self) -> torch.Tensor:  # the (tied) base matrix, for code that reads embeddings.weight
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return max(self.base.num_embeddings, self.mask_token_id + 1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_mask = input_ids == self.mask_token_id
        out = self.base(input_ids.masked_fill(is_mask, 0))
        out = torch.where(is_mask[..., None], self.mask_vector.to(out.dtype), out)
        g = self._gate.explicit
        # kept until the next forward: activation checkpointing recomputes layers during backward
        self._gate.set(is_mask if g is None else g.to(device=input_ids.device, dtype=torch.bool), out.dtype)
        return out


class GatedLoRA(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, gate: _Gate):
        super().__init__()
        self.base, self._gate, self.scale = base, gate, alpha / rank
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the base module itself, not F.linear of its weight: decoding puts it in the operand order that is
        # fastest here (pipeline/decode/matmul.py), and a clean row is then the base model's output bit for bit
        y = self.base(x)
        gate = self._gate
        if not gate.active or gate.current.shape != x.shape[:-1]:
            return y
        if gate.rows is not None:
            return self._add_on_draft_rows(x, y, gate.rows)
        # Training (autograd): y + s·B·A·(x ⊙ g): clean rows of x are zeroed, so their product is exactly
        # 0 and their output is the base layer's; three ops whatever the layout of the draft tokens.
        low = nn.functional.linear(x * gate.weight.to(x.dtype), self.lora_A.weight)
        out = torch.addmm(y.reshape(-1, y.shape[-1]), low.reshape(-1, low.shape[-1]),
                          self.lora_B.weight.t().to(low.dtype), alpha=self.scale)
        return out.view(y.shape)

    def _add_on_draft_rows(self, x: torch.Tensor, y: torch.Tensor, rows) -> torch.Tensor:
        """Decoding (no autograd): the delta is computed on the draft rows only and added into them in
        place; clean rows are never touched, so they are the base layer's output bit for bit. A step's
        masks are usually one run of positions, so this is a view, one narrow product and one addmm_.
        Below float32 on a CPU the rank-r products run in float32 (`_low_rank_fp32`)."""
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            a, b_t = self._low_rank_fp32()
            part = flat_x[rows] if isinstance(rows, slice) else flat_x.index_select(0, rows)
            delta = torch.mm(nn.functional.linear(part.float(), a), b_t).to(y.dtype)
            if isinstance(rows, slice):
                flat_y[rows].add_(delta, alpha=self.scale)
            else:
                flat_y.index_add_(0, rows, delta, alpha=self.scale)
            return y
        b_t = self.lora_B.weight.t()
        if isinstance(rows, slice):
            flat_y[rows].addmm_(nn.functional.linear(flat_x[rows], self.lora_A.weight), b_t, alpha=self.scale)
        else:
            low = nn.functional.linear(flat_x.index_select(0, rows), self.lora_A.weight)
            flat_y.index_add_(0, rows, low @ b_t, alpha=self.scale)
        return y

    def _low_rank_fp32(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 copies of A and Bᵀ (made again when the weights change). A CPU's bf16 matrix product has
        a fixed cost of ~25 µs per call whatever its size, float32 ~4 µs: the two rank-32
        products of 120 adapted modules cost a bf16 step ~7 ms (10 % of it on one core), in float32 ~2 ms."""
        wa, wb = self.lora_A.weight, self.lora_B.weight
        key = (wa.data_ptr(), wa._version, wb.data_ptr(), wb._version)
        cached = getattr(self, "_fp32_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, wa.detach().float(), wb.detach().float().t().contiguous())
            self._fp32_cache = cached
        return cached[1], cached[2]


def attach_drafter(model, mask_token_id: int, *, rank: int, alpha: float, targets: list[str],
                   layers: list[int] | None = None):
    """Freeze `model` and add the gated drafter (module docstring) in place; returns the model.
    `layers`: the decoder layers (indices, negative from the end) whose `targets` get the LoRA; None
    or empty = all. Fewer modules make a draft step cheaper (each adapted module adds two small
    products to it) at some cost in draft quality."""
    if rank < 1:
        raise FluidError(f"the drafter's LoRA rank must be ≥ 1, got {rank}")
    if find_drafter(model) is not None:
        raise FluidError("the model already has a drafter")
    chosen = _resolve_layers(model, layers)
    for p in model.parameters():
        p.requires_grad_(False)
    gate = _Gate()
    model.set_input_embeddings(DraftEmbedding(model.get_input_embeddings(), mask_token_id, gate))
    wrapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear) and (
                    chosen is None or _layer_of(f"{name}.{child_name}") in chosen):
                setattr(module, child_name, GatedLoRA(child, rank, alpha, gate))
                wrapped += 1
    if wrapped == 0:
        raise FluidError(f"no nn.Linear modules named {targets} in {type(model).__name__} (train.lora_targets)")
    model.config.fluid_drafter = {"kind": KIND, "rank": rank, "alpha": alpha, "targets": list(targets),
                                  "layers": sorted(chosen) if chosen is not None else None}
    return model


_LAYER_PATH = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def _layer_of(module_path: str) -> int | None:
    """The decoder-layer index in a module path (model.layers.3.mlp.down_proj -> 3; HF's layer lists)."""
    m = _LAYER_PATH.search(module_path)
    return int(m.group(1)) if m else None


def _resolve_layers(model, layers: list[int] | None) -> set[int] | None:
    if not layers:
        return None
    n = getattr(model.config, "num_hidden_layers", None)
    if n is None:
        raise FluidError(f"{type(model).__name__} has no config.num_hidden_layers: train.lora_layers needs it")
    bad = [i for i in layers if not -n <= int(i) < n]
    if bad:
        raise FluidError(f"train.lora_layers {bad} out of range for a model of {n} layers (0..{n - 1}, or "
                         f"-{n}..-1 from the end)")
    return {int(i) % n for i in layers}


def find_drafter(model) -> DraftEmbedding | None:
    for m in model.modules():
        if isinstance(m, DraftEmbedding):
            return m
    return None


@contextlib.contextmanager
def draft_gate(model, gate: torch.Tensor):
    """Within the block, the drafter's per-token gate is `gate` [B, T] (no-op without a drafter)."""
    emb = find_drafter(model)
    if emb is None:
        yield
        return
    emb._gate.explicit = gate
    try:
        yield
    finally:
        emb._gate.explicit = None


def drafter_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The drafter's own tensors of a full state dict (the `[M]` vector and the LoRA matrices)."""
    return {k: v.contiguous() for k, v in state_dict.items()
            if k.endswith("mask_vector") or ".lora_A." in k or ".lora_B." in k}


def load_drafter(model, folder, spec: dict):
    """Attach the drafter described by fluid.json's `drafter` and load its weights from `folder`."""
    from pathlib import Path

    from safetensors.torch import load_file

    if spec.get("kind") != KIND:
        raise FluidError(f"unknown drafter kind {spec.get('kind')!r} in {FLUID_META_FILE} (this code reads {KIND!r})")
    path = Path(folder) / DRAFTER_FILE
    if not path.is_file():
        raise FluidError(f"{folder}: {FLUID_META_FILE} names a drafter but {DRAFTER_FILE} is missing")
    attach_drafter(model, int(spec["mask_token_id"]), rank=int(spec["rank"]), alpha=float(spec["alpha"]),
                   targets=list(spec["targets"]), layers=spec.get("layers"))  # no "layers" (older exports): all
    weights = load_file(str(path))
    expected = set(drafter_state(model.state_dict()))
    if set(weights) != expected:
        raise FluidError(f"{path}: tensors do not match the drafter ({len(weights)} vs {len(expected)} expected)")
    model.load_state_dict(weights, strict=False)
    return model
