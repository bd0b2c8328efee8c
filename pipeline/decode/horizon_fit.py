"""Stage II: fit the horizon head (K-head) on a frozen adapted backbone (docs/method.md §9).

In:  a frozen model, two-stream batches whose draft spans all have the full length K_max − 1
     (`span_distribution="fixed"`, ρ = 0; see pipeline/data/noise.py), τ, σ.
Out: (hidden state, K*) pairs, and a trained `HorizonHead`.

Oracle:   for a cursor c with draft cross-entropies ce_k (k = 2…K_max, targets x_{c+k}),
          K*(c) = max{K : mean(ce_2 … ce_K′) ≤ τ for every K′ = 2…K}, and K* = 1 when ce_2 > τ.
          Drafts are committed left to right, so the horizon ends at the first K′ whose running
          mean exceeds τ, even if a later mean would fall back under it.
Target:   Q(k) ∝ exp(−(k − K*)² / 2σ²) on k ∈ {1…K_max} (a discretised Gaussian).
Loss:     KL(Q ‖ P) = Σ_k Q(k) (log Q(k) − log P(k)), P = softmax(head(h)).
Feature:  the sampler decides the horizon before its forward, from the final hidden state the
          previous forward produced at the last committed token it fed (pipeline/decode/sampler.py). When
          one token was committed per step — the common case whenever drafts are rejected — that
          token is x_{c}'s predecessor x_{c−1}, so the head is trained on h_{c−1} ↦ K*(c).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.decode.horizon_head import HorizonHead


def oracle_horizon(ce_by_k: torch.Tensor, tau: float) -> torch.Tensor:
    """K* per row from ce_by_k [N, K_max − 1] (column j holds k = j + 2): the largest K such that the
    running mean CE over k = 2…K′ stays ≤ τ for every K′ ≤ K; 1 when already ce_2 > τ."""
    n, width = ce_by_k.shape
    if width == 0:
        return torch.ones(n, dtype=torch.long, device=ce_by_k.device)
    running_mean = ce_by_k.cumsum(dim=1) / torch.arange(1, width + 1, device=ce_by_k.device)
    ok = running_mean <= tau  # ok[:, j] ⇔ the running mean up to k = j + 2 is within τ
    return 1 + ok.long().cumprod(dim=1).sum(dim=1)  # leading run of qualifying K′, plus k = 1


def soft_target(k_star: torch.Tensor, k_max: int, sigma: float = 1.0) -> torch.Tensor:
    """Q [N, K_max]: discretised Gaussian around K* over k = 1…K_max (rows sum to 1)."""
    ks = torch.arange(1, k_max + 1, device=k_star.device, dtype=torch.float32)
    logits = -((ks[None, :] - k_star[:, None].float()) ** 2) / (2 * sigma**2)
    return torch.softmax(logits, dim=-1)


def kl_loss(head_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(Q ‖ P) with P = softmax(head_logits)."""
    return F.kl_div(F.log_softmax(head_logits, dim=-1), target, reduction="batchmean")


@torch.no_grad()
def collect_pairs(model, batch: dict[str, torch.Tensor], *, k_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states h_{c−1} [N, H], per-k draft CE [N, K_max − 1]) for every full-length span of a batch."""
    from pipeline.model.causal_lm import forward_outputs

    out = forward_outputs(model, batch, output_hidden_states=True)  # the mask form the attention wants
    logits, hidden = out.logits.float(), out.hidden_states[-1]
    ce = F.cross_entropy(logits.transpose(1, 2), batch["labels"].clamp_min(0), reduction="none")
    feats, rows = [], []
    span_id, anchor, k = batch["span_id"], batch["anchor"], batch["k"]
    for b in range(span_id.shape[0]):
        spans = span_id[b][span_id[b] >= 0].unique()
        for s in spans.tolist():
            idx = (span_id[b] == s).nonzero().squeeze(1)
            valid = batch["labels"][b, idx] >= 0
            cursor = int(anchor[b, idx[0]])
            if len(idx) != k_max - 1 or not bool(valid.all()) or cursor < 1:
                continue  # truncated at a document end, or no predecessor state: K* would be biased
            order = k[b, idx].argsort()
            rows.append(ce[b, idx[order]])
            feats.append(hidden[b, cursor - 1])  # the clean stream's state at position c − 1
    if not rows:
        return torch.zeros(0, hidden.shape[-1]), torch.zeros(0, k_max - 1)
    return torch.stack(feats).float().cpu(), torch.stack(rows).cpu()


def fit_head(features: torch.Tensor, k_star: torch.Tensor, *, k_max: int, sigma: float = 1.0, epochs: int = 200,
             lr: float = 3e-3, seed: int = 0, batch_size: int = 256,
             holdout: float = 0.2) -> tuple[HorizonHead, dict]:
    """Train a HorizonHead on (features, K*) with KL to the soft target; deterministic for a seed.

    A seeded `holdout` share of the pairs is kept out of training: it picks the epoch with the lowest
    held-out KL (early stopping: a 2-layer MLP memorises a few hundred pairs), and metrics are
    reported on both (`heldout_*` tell how the head generalises; compare `heldout_exact_constant`)."""
    if features.shape[0] == 0:
        raise ValueError("no (hidden state, K*) pairs to fit the horizon head on")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(features.shape[0], generator=gen)
    n_held = int(features.shape[0] * holdout) if features.shape[0] >= 10 else 0
    held, train = order[:n_held], order[n_held:]
    head = HorizonHead(features.shape[1], k_max)
    mean, std = features[train].mean(0), features[train].std(0).clamp_min(1e-4)
    target = soft_target(k_star, k_max, sigma)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-2)
    x = ((features - mean) / std)[train]
    target_train = target[train]
    x_held, target_held = ((features - mean) / std)[held], target[held]
    best = (float("inf"), None)
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=gen)
        for i in range(0, x.shape[0], batch_size):
            sel = perm[i:i + batch_size]
            loss = kl_loss(head(x[sel]), target_train[sel])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if n_held:  # early stopping: keep the epoch with the lowest held-out KL
            with torch.no_grad():
                held_kl = float(kl_loss(head(x_held), target_held))
            if held_kl < best[0]:
                best = (held_kl, {k: v.clone() for k, v in head.state_dict().items()})
    if best[1] is not None:
        head.load_state_dict(best[1])
    fold_normalisation(head, mean, std)
    metrics = {"pairs": int(features.shape[0]), "mean_k_star": float(k_star.float().mean())}
    with torch.no_grad():
        for name, sel in (("train", train), ("heldout", held)):
            if len(sel) == 0:
                continue
            pred = head.predict(features[sel])
            metrics.update({f"{name}_kl": float(kl_loss(head(features[sel]), target[sel])),
                            f"{name}_exact": float((pred == k_star[sel]).float().mean()),
                            f"{name}_within_1": float(((pred - k_star[sel]).abs() <= 1).float().mean()),
                            f"{name}_mean_pred": float(pred.float().mean())})
        # the trivial baseline a useful head must beat: always predict the most common K*
        mode = k_star[train].mode().values
        metrics["heldout_exact_constant"] = float((k_star[held] == mode).float().mean()) if len(held) else 0.0
    return head, metrics


@torch.no_grad()
def fold_normalisation(head: HorizonHead, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Fold x ↦ (x − mean)/std into fc1 so the saved head reads raw hidden states."""
    w = head.fc1.weight / std[None, :]
    head.fc1.bias -= (w * mean[None, :]).sum(dim=1)
    head.fc1.weight.copy_(w)
