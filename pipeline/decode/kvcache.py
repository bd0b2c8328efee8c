"""The one place that edits a Hugging Face KV cache (docs/method.md §10).

`DynamicCache.crop` changed meaning across transformers releases; in 5.24 `crop(-n)` removes the
last n entries, `crop(0)` is a no-op and a positive argument raises. Everything else in the project
calls these helpers instead, so a future API change is fixed here (and caught by tests/test_kvcache.py).

Batched decoding keeps one cache for all rows. Rows that commit different counts leave *holes*
(entries that no later query may see); the caller tracks them in a boolean `valid` tensor [B, S]
and masks them. `compact_rows` removes the holes by moving each row's valid entries to the right
end (left padding), which only copies tensors: keys/values of committed tokens never change.
"""

from __future__ import annotations

import torch

from pipeline.errors import FluidError


def cache_len(cache) -> int:
    """Number of entries (sequence positions) stored in the cache, holes included."""
    return 0 if cache is None else int(cache.get_seq_length())


def check_supported(cache) -> None:
    """Refuse caches whose layers we cannot crop or re-index exactly (sliding windows, linear attention)."""
    for i, layer in enumerate(getattr(cache, "layers", [])):
        if getattr(layer, "is_sliding", False) or not getattr(layer, "is_croppable", True):
            raise FluidError(
                f"cache layer {i} ({type(layer).__name__}) cannot be cropped exactly; the sampler supports "
                "models with full-attention DynamicCache layers only"
            )


def drop_last(cache, n: int) -> None:
    """Remove the last `n` entries of every layer (n = 0: nothing)."""
    if n < 0:
        raise ValueError(f"drop_last: n must be >= 0, got {n}")
    if n == 0:
        return
    have = cache_len(cache)
    if n > have:
        raise ValueError(f"drop_last: cannot remove {n} entries from a cache of {have}")
    cache.crop(-n)


def crop_cache(cache, keep_len: int) -> None:
    """Keep the first `keep_len` entries of every layer."""
    have = cache_len(cache)
    if not 0 <= keep_len <= have:
        raise ValueError(f"crop_cache: keep_len must be in [0, {have}], got {keep_len}")
    drop_last(cache, have - keep_len)


def select_rows(cache, rows: torch.Tensor) -> None:
    """Keep only the batch rows `rows` (a 1-D index tensor), e.g. when requests finish."""
    cache.batch_select_indices(rows)


def compact_rows(cache, valid: torch.Tensor) -> torch.Tensor:
    """Remove holes: move each row's valid entries (in order) to the right end of a shorter cache.

    `valid` is a bool tensor [B, S] (S = cache length). Returns the new `valid` [B, S'] with
    S' = the largest per-row valid count; rows with fewer valid entries get masked left padding
    (filled with a copy of a real entry, so no NaN can appear).
    """
    check_supported(cache)
    b, s = valid.shape
    if s != cache_len(cache):
        raise ValueError(f"compact_rows: valid has {s} columns, the cache {cache_len(cache)} entries")
    counts = valid.sum(dim=1)
    new_s = int(counts.max()) if b else 0
    # Stable sort puts invalid (False) before valid (True) and keeps the order within each group.
    order = torch.sort(valid.to(torch.int8), dim=1, stable=True).indices[:, s - new_s :]
    new_valid = torch.arange(new_s, device=valid.device)[None, :] >= (new_s - counts)[:, None]
    if new_s:
        # Padding slots point at the row's first valid entry, so they hold finite values.
        first_valid = order.gather(1, (new_s - counts).clamp(max=new_s - 1)[:, None])
        order = torch.where(new_valid, order, first_valid)
    _gather_entries(cache, order, 0)
    return new_valid


def keep_step_entries(cache, index: torch.Tensor, width: int) -> None:
    """Of the last `width` entries (one step's), keep per row those at `index` [B, n] (offsets within
    the step, in order) and drop the rest: the cache becomes width − n entries shorter. A candidate
    tree's accepted path thus lands right after the row's prefix, as AR would have written it."""
    check_supported(cache)
    have = cache_len(cache)
    if not 0 <= width <= have:
        raise ValueError(f"keep_step_entries: width must be in [0, {have}], got {width}")
    _gather_entries(cache, index, have - width)


def _gather_entries(cache, index: torch.Tensor, start: int) -> None:
    """Replace every layer's entries from `start` on by those at `start + index` [B, n], per row."""
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", True) or layer.keys is None or layer.keys.numel() == 0:
            continue
        idx = index.to(layer.keys.device)[:, None, :, None]
        for name in ("keys", "values"):
            t = getattr(layer, name)
            tail = t[:, :, start:].gather(2, idx.expand(-1, t.shape[1], -1, t.shape[3]))
            setattr(layer, name, torch.cat([t[:, :, :start], tail], dim=2) if start else tail)


def join_rows(cache, valid, other, other_valid) -> torch.Tensor:
    """Append the rows of cache `other` to `cache` (continuous batching: rows prefilled apart join the
    running batch). The shorter side gets masked left padding (zeros: finite, never attended to).
    Returns the joined `valid` [B + B', max(S, S')]."""
    check_supported(cache)
    s, s2 = cache_len(cache), cache_len(other)
    if valid.shape[1] != s or other_valid.shape[1] != s2:
        raise ValueError(f"join_rows: valid masks ({valid.shape[1]}, {other_valid.shape[1]} columns) do not "
                         f"match the caches ({s}, {s2} entries)")
    n = max(s, s2)

    def pad(t: torch.Tensor, by: int) -> torch.Tensor:
        return t if by == 0 else torch.cat([t.new_zeros((*t.shape[:2], by, t.shape[3])), t], dim=2)

    for layer, extra in zip(cache.layers, other.layers, strict=True):
        layer.keys = torch.cat([pad(layer.keys, n - s), pad(extra.keys, n - s2)], dim=0)
        layer.values = torch.cat([pad(layer.values, n - s), pad(extra.values, n - s2)], dim=0)
    return torch.cat([pad_mask(valid, n - s), pad_mask(other_valid, n - s2)], dim=0)


def pad_mask(valid: torch.Tensor, by: int) -> torch.Tensor:
    """`valid` [B, S] with `by` invalid columns in front."""
    return torch.cat([valid.new_zeros((valid.shape[0], by)), valid], dim=1) if by else valid
