"""Tests of the two-stream attention masks (pipeline/model/attention.py), including the contract test:
a two-stream forward of a real Hugging Face model equals the plain causal forwards it stands for."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.noise import make_bidirectional_example, make_two_stream_example, rng_for
from pipeline.model.attention import bidirectional_mask, to_additive, two_stream_mask

EOS, MASK, PAD = 61, 62, 63  # vocabulary of 64 for the tiny model; text tokens < 60
IDS = dict(mask_id=MASK, pad_id=PAD, eos_id=EOS)


def packed(rng: np.random.Generator, length: int, n_docs: int) -> np.ndarray:
    tokens = rng.integers(0, 60, size=length)
    tokens[rng.choice(np.arange(1, length), size=n_docs - 1, replace=False)] = EOS
    return tokens


def batch(examples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.stack([ex[name] for ex in examples])) for name in examples[0]}


def noised_batch(seed: int, **kwargs) -> dict[str, torch.Tensor]:
    examples = []
    for index in range(3):
        rng = rng_for(seed, 0, index)
        examples.append(make_two_stream_example(packed(rng, 24, n_docs=3), rng, **IDS, **kwargs))
    return batch(examples)


def brute_force_two_stream(pos, span, anchor) -> np.ndarray:
    """docs/method.md §2, literally: i sees j ⇔ (span_j = −1 ∧ pos_j ≤ anchor_i) ∨ (span_j = span_i ≥ 0 ∧
    pos_j ≤ pos_i); padding rows see only themselves."""
    t = len(pos)
    out = np.zeros((t, t), dtype=bool)
    for i in range(t):
        for j in range(t):
            if span[i] == -2:
                out[i, j] = i == j
            else:
                out[i, j] = (span[j] == -1 and pos[j] <= anchor[i]) or (
                    span[j] == span[i] >= 0 and pos[j] <= pos[i]
                )
    return out


BATCHES = {
    "budget": dict(k_max=6),
    "spans_with_padding": dict(k_max=8, spans=4),  # spans truncated at doc ends leave padding
    "restoration": dict(k_max=4, rho=0.5),
}


@pytest.mark.parametrize("name", list(BATCHES))
def test_two_stream_mask_equals_brute_force(name):
    b = noised_batch(1, **BATCHES[name])
    mask = two_stream_mask(b["position_ids"], b["span_id"], b["anchor"])
    bsz, t = b["span_id"].shape
    assert mask.shape == (bsz, 1, t, t) and mask.dtype == torch.bool
    for r in range(bsz):
        want = brute_force_two_stream(*(b[c][r].tolist() for c in ("position_ids", "span_id", "anchor")))
        np.testing.assert_array_equal(mask[r, 0].numpy(), want)


def test_mask_structure():
    b = noised_batch(2, k_max=8, spans=4)
    span = b["span_id"]
    assert (span == -2).any() and (span >= 0).any(), "the batch should exercise padding and drafts"
    m = two_stream_mask(b["position_ids"], span, b["anchor"])[:, 0]
    t = span.shape[1]
    eye = torch.eye(t, dtype=torch.bool)
    assert m.any(dim=-1).all(), "no row may be empty"
    assert m[:, eye].all(), "every token sees itself"
    for r in range(span.shape[0]):
        pad, clean, draft = span[r] == -2, span[r] == -1, span[r] >= 0
        # padding rows see only themselves; nobody else sees padding
        assert torch.equal(m[r][pad], eye[pad])
        assert not m[r][~pad][:, pad].any()
        # clean rows never see drafts; clean part is the ordinary causal (lower-triangular) mask
        assert not m[r][clean][:, draft].any()
        n = int(clean.sum())
        assert torch.equal(m[r][:n, :n], torch.tril(torch.ones(n, n, dtype=torch.bool)))
        # a draft row never sees another span
        s_i, s_j = span[r][:, None], span[r][None, :]
        assert not (m[r] & (s_i >= 0) & (s_j >= 0) & (s_i != s_j)).any()


def test_hand_built_example():
    # clean 0..3, span 0 at cursor 1 (positions 2, 3), one padding token
    pos = torch.tensor([[0, 1, 2, 3, 2, 3, 0]])
    span = torch.tensor([[-1, -1, -1, -1, 0, 0, -2]])
    anchor = torch.tensor([[0, 1, 2, 3, 1, 1, -1]])
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],  # first mask: x_0, x_1 and itself
            [1, 1, 0, 0, 1, 1, 0],  # second mask: x_0, x_1 and masks c+1, c+2
            [0, 0, 0, 0, 0, 0, 1],  # padding: itself only
        ],
        dtype=torch.bool,
    )
    assert torch.equal(two_stream_mask(pos, span, anchor)[0, 0], want)


def test_bidirectional_mask():
    rng = np.random.default_rng(3)
    lengths = (10, 7)
    b = batch(
        [
            make_bidirectional_example(packed(rng, n, 2), rng, mask_id=MASK, pad_id=PAD, length=12)
            for n in lengths
        ]
    )
    m = bidirectional_mask(b["span_id"])
    assert m.shape == (2, 1, 12, 12) and m.dtype == torch.bool
    for r, n in enumerate(lengths):
        want = np.zeros((12, 12), dtype=bool)
        want[:n, :n] = True
        want[np.arange(n, 12), np.arange(n, 12)] = True
        np.testing.assert_array_equal(m[r, 0].numpy(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_to_additive(dtype):
    b = noised_batch(4, k_max=8, spans=4)
    mask = two_stream_mask(b["position_ids"], b["span_id"], b["anchor"])
    add = to_additive(mask, dtype)
    assert add.dtype == dtype and add.shape == mask.shape
    assert (add[mask] == 0).all()
    assert (add[~mask] == torch.finfo(dtype).min).all()
    # softmax over additive scores: finite, and zero weight where the boolean mask forbids
    probs = torch.softmax(torch.zeros(mask.shape, dtype=torch.float32) + add.float(), dim=-1)
    assert torch.isfinite(probs).all()
    assert (probs[~mask] == 0).all()
    # an empty row (never produced by the masks) stays NaN-free
    assert torch.isfinite(torch.softmax(to_additive(torch.zeros(1, 4, dtype=torch.bool)), dim=-1)).all()


# ---------------------------------------------------------------------------------- the contract


def tiny_llama(attn_implementation: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        attn_implementation=attn_implementation,
    )
    return LlamaForCausalLM(config).float().eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_two_stream_forward_equals_plain_causal_forwards(attn_implementation):
    """Each draft's logits = a plain causal forward of [x_0..x_c, the span's inputs]; each clean
    position's logits = the plain forward of the clean stream. SDPA gets the boolean mask, eager
    the additive one (docs/method.md §2)."""
    model = tiny_llama(attn_implementation)
    rng = rng_for(5, 0, 0)
    length = 40
    tokens = packed(rng, length, n_docs=3)
    ex = make_two_stream_example(tokens, rng, **IDS, k_max=6, spans=6, rho=0.3)
    b = batch([ex])
    # the layout compared below: the L clean tokens, then exactly 6 spans of at most k_max − 1 = 5
    # tokens each (draft tokens first, padding after, 6 · 5 slots in all), with both [M] and
    # restored (true-token) inputs among the drafts, so the comparison covers both
    span, inputs = b["span_id"][0], b["input_ids"][0]
    draft = span >= 0
    n_draft = int(draft.sum())
    assert span.shape == (length + 6 * 5,) and bool((span[:length] == -1).all())
    assert torch.unique(span[draft]).tolist() == list(range(6))
    assert bool(draft[length : length + n_draft].all()) and bool((span[length + n_draft :] == -2).all())
    assert all(1 <= int((span == s).sum()) <= 5 for s in range(6))
    restored = inputs[draft] != MASK
    assert bool(restored.any()) and not bool(restored.all())
    restored_pos = b["position_ids"][0][draft][restored].long()
    assert torch.equal(inputs[draft][restored].long(), torch.from_numpy(tokens)[restored_pos].long())
    mask = two_stream_mask(b["position_ids"], b["span_id"], b["anchor"])
    if attn_implementation == "eager":
        mask = to_additive(mask)
    with torch.no_grad():
        logits = model(
            input_ids=b["input_ids"].long(),
            attention_mask=mask,
            position_ids=b["position_ids"].long(),
            use_cache=False,
        ).logits[0]
        plain = model(input_ids=torch.from_numpy(tokens)[None].long(), use_cache=False).logits[0]
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits[:length], plain, atol=1e-4, rtol=0)

        n_spans = int(span.max()) + 1
        assert n_spans == 6
        for s in range(n_spans):
            idx = torch.nonzero(span == s).flatten()
            c = int(b["anchor"][0, idx[0]])
            ref_input = torch.cat([torch.from_numpy(tokens[: c + 1]), b["input_ids"][0, idx]]).long()[None]
            ref = model(input_ids=ref_input, use_cache=False).logits[0, c + 1 :]
            torch.testing.assert_close(logits[idx], ref, atol=1e-4, rtol=0)


def test_annealed_bidirectional_mask_interpolates_causal_and_full():
    from pipeline.model.attention import annealed_bidirectional_mask, bidirectional_mask

    pos = torch.arange(12)[None].repeat(2, 1)
    span = torch.full((2, 12), -1)
    span[1, 9:] = -2  # padding
    causal = annealed_bidirectional_mask(pos, span, 0.0)[:, 0]
    real = span != -2
    expected = (pos[:, None, :] <= pos[:, :, None]) & real[:, :, None] & real[:, None, :]
    expected[1, 9:, :] = False
    expected[1, torch.arange(9, 12), torch.arange(9, 12)] = True
    assert torch.equal(causal, expected)
    assert torch.equal(annealed_bidirectional_mask(pos, span, 1.0), bidirectional_mask(span))
    half = annealed_bidirectional_mask(pos, span, 0.5, torch.Generator().manual_seed(0))[0, 0]
    future = torch.triu(torch.ones(12, 12, dtype=torch.bool), diagonal=1)
    share = half[future].float().mean().item()
    assert 0.3 < share < 0.7 and bool(half[~future].all())  # the past stays fully visible
