"""The one metric every ablation arm is judged by: CE of x_{c+k} given x≤c, k = 1…K (docs/method.md §1).

In:  a model, held-out chunks [N, P + K] of token ids (prefix x_0…x_{P−1}, so c = P − 1, then the
     K targets), the `[M]` id and the arm's layout ("causal" or "bidirectional").
Out: mean CE (nats) per k, as a list of K floats.

Each model is scored under its own attention and mask layout:
* causal (FLUID): input = prefix + K−1 masks under the ordinary causal mask. The output at c is the
  AR prediction of x_{c+1} (k = 1); the mask at c+j predicts x_{c+j+1}. A single span after a prefix
  needs no two-stream mask: the plain causal mask is exactly the rule.
* bidirectional (DiffuLLaMA / MDLM): input = prefix + K masks, every token sees every token; the
  output at c+k predicts x_{c+k} (unshifted).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import FluidError


def eval_chunks(token_stream: np.ndarray, n: int, length: int) -> np.ndarray:
    """`n` non-overlapping chunks of `length` tokens, evenly spaced over the stream (deterministic)."""
    available = len(token_stream) // length
    if available < 1:
        raise FluidError(f"held-out text has {len(token_stream)} tokens, fewer than one chunk of {length}")
    picks = np.linspace(0, available - 1, num=min(n, available)).round().astype(int)
    return np.stack([token_stream[i * length:(i + 1) * length] for i in np.unique(picks)])


@torch.no_grad()
def horizon_ce(model, chunks: np.ndarray | torch.Tensor, *, mask_id: int, horizon: int, mode: str = "causal",
               batch_size: int = 16) -> list[float]:
    """Mean CE per k = 1…horizon of predicting the last `horizon` tokens of each chunk from the rest."""
    x = torch.as_tensor(np.asarray(chunks), dtype=torch.long)
    n, length = x.shape
    p = length - horizon
    if p < 1:
        raise FluidError(f"chunks of {length} tokens leave no prefix for a horizon of {horizon}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(horizon, dtype=torch.float64)
    keep = {"logits_to_keep": horizon} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    for start in range(0, n, batch_size):
        xb = x[start:start + batch_size].to(device)
        b = xb.shape[0]
        targets = xb[:, p:]
        if mode == "causal":
            inp = torch.cat([xb[:, :p], torch.full((b, horizon - 1), mask_id, device=device)], dim=1)
            # positions p−1 … p+horizon−2 are the last `horizon`: the LM head only there (a sixth of a small
            # model's forward over 128 tokens is its head)
            logits = model(input_ids=inp, use_cache=False, **keep).logits[:, -horizon:]
        elif mode == "bidirectional":
            inp = torch.cat([xb[:, :p], torch.full((b, horizon), mask_id, device=device)], dim=1)
            t = inp.shape[1]
            mask = _full_mask(model, b, t, device)
            pos = torch.arange(t, device=device).expand(b, t)
            logits = model(input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, p:]
        else:
            raise FluidError(f"unknown layout {mode!r} (expected 'causal' or 'bidirectional')")
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        sums += ce.view(b, horizon).sum(0).double().cpu()
    model.train(was_training)
    return (sums / n).tolist()


def _full_mask(model, b: int, t: int, device) -> torch.Tensor:
    from pipeline.batch import CLEAN
    from pipeline.model.causal_lm import build_attention_mask

    span = torch.full((b, t), CLEAN, device=device)
    return build_attention_mask(model, {"span_id": span}, "bidirectional")


def tokens_to_reach(tokens: list[int], values: list[float], target: float) -> float | None:
    """First point where a curve (values at tokens seen) falls to `target`, linearly interpolated
    between evaluations; None if it never does."""
    for i, (t, v) in enumerate(zip(tokens, values, strict=True)):
        if v <= target:
            if i == 0:
                return float(t)
            t0, v0 = tokens[i - 1], values[i - 1]
            return float(t0 + (t - t0) * (v0 - target) / (v0 - v))
    return None
