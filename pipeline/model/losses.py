"""Training losses: FLUID Stage I (causal AR + draft) and the bidirectional MDLM-style baseline.

In:  logits [B, T, V] (any float dtype; CE is computed in float32), and the batch's `labels` [B, T]
     (already shifted: logits[i] is scored against labels[i]; −100 = no target), `k` [B, T]
     (1 = clean AR target, j+1 = draft at cursor+j, 0 = none) and optionally `weight` [B, T].
Out: (loss tensor with autograd, metrics dict).

Stage I: L = L_AR + λ·L_draft, L_AR = mean CE over targets with k = 1, L_draft = mean CE over
targets with k ≥ 2 (0 when there are none). Everything is built from two float32 vectors of length
k_max + 1: `ce_sum_by_k[j]` (summed CE of targets with k = j, differentiable) and `count_by_k[j]`
(their number; with `weight`, summed weights). Because CE sums and counts add up across ranks, the
trainer gets exact global means in data-parallel training: all-reduce `count_targets(...)` (it needs
only labels and k, so it can run before the forward) and pass it as `global_count_by_k` with
`world_size`; each rank's loss is then local_sum / global_count · world_size, and the gradient
averaging of FSDP/DDP yields exactly the gradient of the global-mean loss, whatever the per-rank
counts. For logging, all-reduce the detached `metrics["ce_sum_by_k"]` / `metrics["count_by_k"]`
and call `metrics_from_sums`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.batch import IGNORE
from pipeline.config import NoiseConfig
from pipeline.errors import FluidError


def _valid_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-target float32 CE over positions with a label, and the boolean selection [B*T]."""
    flat_labels = labels.reshape(-1).long()
    valid = flat_labels != IGNORE
    sel = logits.reshape(-1, logits.shape[-1])[valid]
    ce = F.cross_entropy(sel.float(), flat_labels[valid], reduction="none")
    return ce, valid


def _k_index(k: torch.Tensor, valid: torch.Tensor, k_max: int) -> torch.Tensor:
    kv = k.reshape(-1)[valid].long()
    if kv.numel() and (int(kv.min()) < 1 or int(kv.max()) > k_max):
        raise FluidError(
            f"target prediction distances must lie in 1..k_max={k_max}; got {int(kv.min())}..{int(kv.max())}"
        )
    return kv


def count_targets(labels: torch.Tensor, k: torch.Tensor, *, k_max: int = NoiseConfig.k_max, weight=None) -> torch.Tensor:
    """float32 [k_max + 1]: number of targets (or summed weight) per prediction distance k."""
    valid = labels.reshape(-1) != IGNORE
    kv = _k_index(k, valid, k_max)
    w = torch.ones_like(kv, dtype=torch.float32) if weight is None else weight.reshape(-1)[valid].float()
    return torch.zeros(k_max + 1, dtype=torch.float32, device=labels.device).index_add_(0, kv, w)


def target_sums(
    logits: torch.Tensor, labels: torch.Tensor, k: torch.Tensor, *, k_max: int = NoiseConfig.k_max, weight=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ce_sum_by_k, count_by_k), float32 [k_max + 1] each; ce_sum_by_k carries autograd."""
    ce, valid = _valid_ce(logits, labels)
    kv = _k_index(k, valid, k_max)
    w = torch.ones_like(ce) if weight is None else weight.reshape(-1)[valid].float()
    ce_sum = torch.zeros(k_max + 1, dtype=torch.float32, device=ce.device).index_add(0, kv, ce * w)
    count = torch.zeros(k_max + 1, dtype=torch.float32, device=ce.device).index_add_(0, kv, w.detach())
    return ce_sum, count


def combine(
    ce_sum_by_k: torch.Tensor, count_by_k: torch.Tensor, *, lam: float = 1.0, scale: float = 1.0
) -> torch.Tensor:
    """L_AR + λ·L_draft from per-k sums and the counts to divide by (local or global)."""
    ar = ce_sum_by_k[1] / count_by_k[1].clamp_min(1e-12)
    draft = ce_sum_by_k[2:].sum() / count_by_k[2:].sum().clamp_min(1e-12)
    return (ar + lam * draft) * scale


def metrics_from_sums(ce_sum_by_k: torch.Tensor, count_by_k: torch.Tensor, *, lam: float = 1.0) -> dict:
    """Python-number metrics (loss, ar_ce, draft_ce, ce_k{j}, n_ar, n_draft) from per-k sums."""
    s = ce_sum_by_k.detach().double().cpu()
    c = count_by_k.detach().double().cpu()
    n_ar, n_draft = float(c[1]), float(c[2:].sum())
    ar = float(s[1]) / n_ar if n_ar > 0 else 0.0
    draft = float(s[2:].sum()) / n_draft if n_draft > 0 else 0.0
    out = {"loss": ar + lam * draft, "ar_ce": ar, "draft_ce": draft}
    for j in range(1, len(c)):
        if c[j] > 0:
            out[f"ce_k{j}"] = float(s[j] / c[j])
    out["n_ar"] = int(round(n_ar))
    out["n_draft"] = int(round(n_draft))
    return out


def stage1_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    k: torch.Tensor,
    *,
    lam: float = 1.0,
    k_max: int = NoiseConfig.k_max,
    weight: torch.Tensor | None = None,
    global_count_by_k: torch.Tensor | None = None,
    world_size: int = 1,
) -> tuple[torch.Tensor, dict]:
    """FLUID Stage I loss L = L_AR + λ·L_draft and its metrics.

    `weight` (optional, [B, T]) scales each target's CE; means then divide by summed weights.
    Metrics are local to this call: python numbers (loss, ar_ce, draft_ce, ce_k{j} for each k that
    has targets, n_ar, n_draft) plus the detached float32 tensors `ce_sum_by_k` and `count_by_k`
    for all-reducing (pop them before JSON logging). With `global_count_by_k` (all-reduced
    `count_targets`), the returned loss is scaled for exact global means under gradient averaging
    over `world_size` ranks; metrics["loss"] stays the local value.
    """
    ce_sum, count = target_sums(logits, labels, k, k_max=k_max, weight=weight)
    if global_count_by_k is None:
        loss = combine(ce_sum, count, lam=lam)
    else:
        loss = combine(ce_sum, global_count_by_k.to(ce_sum.device), lam=lam, scale=float(world_size))
    metrics = metrics_from_sums(ce_sum, count, lam=lam)
    metrics["ce_sum_by_k"] = ce_sum.detach()
    metrics["count_by_k"] = count
    return loss, metrics


def bidirectional_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    *,
    num_tokens: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """MDLM-style loss of the bidirectional baseline: Σ_masked weight·CE / num_tokens.

    Targets are the positions with labels ≠ −100 (the masked tokens; no shift: the output at a
    masked position predicts its own original token, the batch's labels say which). `weight` is
    1/t of the example's masking rate. Normalisation: divided by the number of tokens, not of
    masked tokens — the MDLM/LLaDA estimator of the NELBO per token, (1/(B·L)) Σ_masked CE/t.
    `num_tokens` defaults to labels.numel() (= B·T; for padded rows pass the non-padding count;
    in data-parallel training pass the global count and multiply by the world size, as in
    stage1_loss). Metrics: loss, masked_ce (unweighted mean CE of the masked tokens), n_masked.
    """
    ce, valid = _valid_ce(logits, labels)
    w = weight.reshape(-1)[valid].float()
    denom = float(labels.numel()) if num_tokens is None else num_tokens
    loss = (ce * w).sum() / torch.as_tensor(denom, dtype=torch.float32, device=ce.device).clamp_min(1.0)
    n = int(valid.sum())
    metrics = {
        "loss": float(loss.detach()),
        "masked_ce": float(ce.detach().sum()) / n if n else 0.0,
        "n_masked": n,
    }
    return loss, metrics
