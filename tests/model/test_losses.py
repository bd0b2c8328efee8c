"""pipeline.model.losses: Stage I loss against the HF loss and hand computations; the MDLM baseline loss."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import FluidError
from pipeline.model.causal_lm import add_mask_token, forward_batch
from pipeline.model.losses import (
    bidirectional_loss,
    combine,
    count_targets,
    metrics_from_sums,
    stage1_loss,
    target_sums,
)
from tests.model.test_model import MASK_ID, VOCAB, make_batch, rand_tokens, tiny_llama


def _ce(logit_row: torch.Tensor, target: int) -> float:
    return float(-torch.log_softmax(logit_row.double(), -1)[target])


def test_ar_loss_equals_hf_loss_without_drafts():
    m = tiny_llama(seed=3)  # untouched: no [M] row added
    x = [rand_tokens(16, 10), rand_tokens(16, 11)]
    batch = make_batch([(x[0], []), (x[1], [])], T=16)
    ids = torch.tensor(x)
    with torch.no_grad():
        hf = m(ids, labels=ids).loss
        loss, met = stage1_loss(forward_batch(m, batch), batch["labels"], batch["k"])
    assert abs(loss.item() - hf.item()) < 1e-5
    assert abs(met["ar_ce"] - hf.item()) < 1e-5
    assert met["draft_ce"] == 0.0 and met["n_draft"] == 0 and met["n_ar"] == 30
    assert set(k for k in met if k.startswith("ce_k")) == {"ce_k1"}
    assert not math.isnan(met["loss"])


def test_no_draft_targets_gives_zero_draft_loss_and_finite_grad():
    logits = torch.randn(1, 5, 7, requires_grad=True)
    labels = torch.tensor([[1, 2, 3, -100, -100]])
    k = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.int8)
    loss, met = stage1_loss(logits, labels, k, lam=2.0)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    expected = sum(_ce(logits[0, i].detach(), t) for i, t in enumerate([1, 2, 3])) / 3
    assert abs(loss.item() - expected) < 1e-5 and met["draft_ce"] == 0.0


def test_stage1_loss_matches_hand_computation():
    torch.manual_seed(0)
    V = 11
    logits = torch.randn(2, 6, V, requires_grad=True)
    labels = torch.tensor([[3, 4, 5, 6, 7, -100], [1, 2, 9, 8, -100, -100]])
    k = torch.tensor([[1, 1, 2, 3, 2, 0], [1, 1, 1, 4, 0, 0]], dtype=torch.int8)
    lam = 0.5
    loss, met = stage1_loss(logits, labels, k, lam=lam, k_max=4)
    by_k: dict[int, list[float]] = {}
    for b in range(2):
        for i in range(6):
            if labels[b, i] != -100:
                by_k.setdefault(int(k[b, i]), []).append(_ce(logits[b, i].detach(), int(labels[b, i])))
    ar = sum(by_k[1]) / len(by_k[1])
    draft_all = [c for j, v in by_k.items() if j >= 2 for c in v]
    draft = sum(draft_all) / len(draft_all)
    assert abs(loss.item() - (ar + lam * draft)) < 1e-5
    assert abs(met["ar_ce"] - ar) < 1e-5 and abs(met["draft_ce"] - draft) < 1e-5
    assert abs(met["loss"] - loss.item()) < 1e-5
    for j in (1, 2, 3, 4):
        assert abs(met[f"ce_k{j}"] - sum(by_k[j]) / len(by_k[j])) < 1e-5
    assert met["n_ar"] == 5 and met["n_draft"] == 4
    assert met["count_by_k"].tolist() == [0, 5, 2, 1, 1]
    loss.backward()
    assert logits.grad[0, 5].abs().sum() == 0  # no target, no gradient


def test_global_counts_give_exact_global_mean():
    """Two 'ranks' with unequal target counts: scaled local losses average to the global loss."""
    torch.manual_seed(1)
    logits = torch.randn(4, 5, 9)
    labels = torch.randint(0, 9, (4, 5))
    labels[0, 2:] = -100  # rank 0 has fewer targets
    k = torch.tensor([[1, 2, 3, 0, 0]] * 4, dtype=torch.int8)
    k[labels == -100] = 0
    labels[k == 0] = -100
    full, _ = stage1_loss(logits, labels, k, k_max=4)
    g = count_targets(labels[:2], k[:2], k_max=4) + count_targets(labels[2:], k[2:], k_max=4)
    parts = [stage1_loss(logits[s], labels[s], k[s], k_max=4, global_count_by_k=g, world_size=2)[0]
             for s in (slice(0, 2), slice(2, 4))]
    assert abs((parts[0] + parts[1]).item() / 2 - full.item()) < 1e-6
    naive = [stage1_loss(logits[s], labels[s], k[s], k_max=4)[0] for s in (slice(0, 2), slice(2, 4))]
    assert abs((naive[0] + naive[1]).item() / 2 - full.item()) > 1e-3  # why the counts matter
    # metrics from summed sums equal the single-process metrics
    s0, c0 = target_sums(logits[:2], labels[:2], k[:2], k_max=4)
    s1, c1 = target_sums(logits[2:], labels[2:], k[2:], k_max=4)
    assert abs(metrics_from_sums(s0 + s1, c0 + c1)["loss"] - full.item()) < 1e-5
    assert abs(combine(s0 + s1, c0 + c1).item() - full.item()) < 1e-5


def test_k_out_of_range_is_fluid_error():
    with pytest.raises(FluidError, match="k_max"):
        stage1_loss(torch.randn(1, 2, 5), torch.tensor([[1, 2]]), torch.tensor([[1, 9]]), k_max=4)


def test_per_k_metrics_on_a_model_batch():
    m = add_mask_token(tiny_llama(seed=4), MASK_ID)
    batch = make_batch([(rand_tokens(14, 5), [(2, 5), (8, 3)])], T=24)
    with torch.no_grad():
        loss, met = stage1_loss(forward_batch(m, batch), batch["labels"], batch["k"])
    assert met["n_ar"] == 13 and met["n_draft"] == 6
    assert {key for key in met if key.startswith("ce_k")} == {"ce_k1", "ce_k2", "ce_k3", "ce_k4", "ce_k5"}
    # random model: every CE is close to log V
    assert all(abs(met[f"ce_k{j}"] - math.log(VOCAB + 1)) < 1.0 for j in range(1, 6))
    assert abs(met["loss"] - (met["ar_ce"] + met["draft_ce"])) < 1e-6


def test_bidirectional_loss_normalisation():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[-100, 3, -100, 1], [2, -100, -100, -100]])
    weight = torch.tensor([[2.0] * 4, [4.0] * 4])
    loss, met = bidirectional_loss(logits, labels, weight)
    hand = (2 * _ce(logits[0, 1], 3) + 2 * _ce(logits[0, 3], 1) + 4 * _ce(logits[1, 0], 2)) / 8
    assert abs(loss.item() - hand) < 1e-5
    assert met["n_masked"] == 3
    loss2, _ = bidirectional_loss(logits, labels, weight, num_tokens=6)
    assert abs(loss2.item() - hand * 8 / 6) < 1e-5
    empty, _ = bidirectional_loss(logits, torch.full((2, 4), -100), weight)
    assert empty.item() == 0.0
