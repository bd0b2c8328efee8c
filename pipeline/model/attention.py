"""Attention masks for the two-stream layout (docs/method.md §2), built on the device.

In:  three int vectors per token, shape [B, T]: `position_ids`, `span_id` (−1 clean, s ≥ 0 draft
     span s, −2 padding) and `anchor` (clean: own position; draft: the span's cursor c; pad: −1).
Out: a boolean mask [B, 1, T, T] where mask[b, 0, i, j] is True iff query i may attend to key j,
     or the additive float form (0 / −inf) for attention implementations that add masks to scores.

Rule (strictly causal): i sees j  ⇔  (span_j = −1 ∧ pos_j ≤ anchor_i)
                                   ∨ (span_j = span_i ≥ 0 ∧ pos_j ≤ pos_i).
Padding rows see only themselves (a fully masked row would give NaN in softmax).
The bidirectional baseline: every non-padding token sees every non-padding token of its example.
"""

from __future__ import annotations

import torch

from pipeline.batch import CLEAN, PAD


def two_stream_mask(position_ids: torch.Tensor, span_id: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, T] strictly causal two-stream mask (True = may attend)."""
    pos_i, pos_j = position_ids[:, :, None], position_ids[:, None, :]
    span_i, span_j = span_id[:, :, None], span_id[:, None, :]
    anchor_i = anchor[:, :, None]
    sees_clean = (span_j == CLEAN) & (pos_j <= anchor_i) & (span_i != PAD)
    sees_own_span = (span_j == span_i) & (span_i >= 0) & (pos_j <= pos_i)
    return _pad_rows_see_self(sees_clean | sees_own_span, span_id)[:, None]


def bidirectional_mask(span_id: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask of the bidirectional baseline: all real tokens see each other."""
    real = span_id != PAD
    return _pad_rows_see_self(real[:, :, None] & real[:, None, :], span_id)[:, None]


def annealed_bidirectional_mask(position_ids: torch.Tensor, span_id: torch.Tensor, ratio: float,
                                generator: torch.Generator | None = None) -> torch.Tensor:
    """DiffuLLaMA-style attention-mask annealing for the bidirectional baseline, boolean [B, 1, T, T].

    Every real token sees its past (pos_j ≤ pos_i) and each future real token independently with
    probability `ratio`: ratio = 0 is the AR causal mask, ratio = 1 the full bidirectional mask; the
    trainer raises it linearly from 0 to 1 over `train.anneal_steps`.
    """
    if ratio >= 1.0:
        return bidirectional_mask(span_id)
    real = span_id != PAD
    pos_i, pos_j = position_ids[:, :, None], position_ids[:, None, :]
    both = real[:, :, None] & real[:, None, :]
    draw = torch.rand(both.shape, generator=generator, device="cpu").to(both.device) < ratio
    mask = both & ((pos_j <= pos_i) | draw)
    return _pad_rows_see_self(mask, span_id)[:, None]


def to_additive(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean mask → additive float mask (0 where allowed, dtype's most negative value elsewhere).

    The most negative finite value rather than −inf keeps softmax NaN-free even if a row were empty.
    """
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, torch.finfo(dtype).min)


def _pad_rows_see_self(mask: torch.Tensor, span_id: torch.Tensor) -> torch.Tensor:
    t = span_id.shape[1]
    eye = torch.eye(t, dtype=torch.bool, device=span_id.device)[None]
    is_pad_row = (span_id == PAD)[:, :, None]
    return torch.where(is_pad_row, eye, mask & ~is_pad_row)
