"""pipeline.model.causal_lm: loading, the [M] token, two-stream and bidirectional forwards (tiny random models).

The helpers `tiny_llama` and `make_batch` are shared with the other test files of this group.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pipeline.errors import FluidError
from pipeline.model.causal_lm import add_mask_token, build_attention_mask, forward_batch, load_causal_lm

VOCAB = 100
MASK_ID = VOCAB  # one new row
PAD_ID = 0


def tiny_llama(*, tied: bool = True, attn: str = "sdpa", seed: int = 0, hidden: int = 32, vocab: int = VOCAB):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128, tie_word_embeddings=tied,
    )
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def make_batch(rows, T: int, *, mask_id: int = MASK_ID, pad_id: int = PAD_ID, reveal=()):
    """Build a two-stream batch by hand, following the docs/method.md §3 table.

    rows: list of (clean_tokens, [(cursor c, K), ...]). Each span puts K−1 masks at positions
    c+1..c+K−1 (anchor c), predicting x_{c+2}..x_{c+K} with k = 2..K. `reveal`: (row, span, j)
    triples whose draft input is the true token instead of [M] (restoration noise).
    """
    cols = {n: torch.full((len(rows), T), v, dtype=torch.int32) for n, v in
            (("input_ids", pad_id), ("position_ids", 0), ("span_id", -2), ("anchor", -1), ("labels", -100))}
    cols["k"] = torch.zeros((len(rows), T), dtype=torch.int8)
    for b, (x, spans) in enumerate(rows):
        L = len(x)
        entries = [(x[p], p, -1, p, x[p + 1] if p + 1 < L else -100, 1 if p + 1 < L else 0) for p in range(L)]
        for s, (c, K) in enumerate(spans):
            assert c + K <= L - 1
            for j in range(1, K):
                tok = x[c + j] if (b, s, j) in reveal else mask_id
                entries.append((tok, c + j, s, c, x[c + j + 1], j + 1))
        assert len(entries) <= T
        for i, (tok, pos, span, anc, lab, k) in enumerate(entries):
            for name, v in zip(("input_ids", "position_ids", "span_id", "anchor", "labels", "k"),
                               (tok, pos, span, anc, lab, k), strict=True):
                cols[name][b, i] = v
    return cols


def rand_tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (n,), generator=g).tolist()


# ---------------------------------------------------------------- loading


def test_load_causal_lm_roundtrip(tmp_path):
    m = tiny_llama()
    m.save_pretrained(tmp_path)
    loaded = load_causal_lm(tmp_path, attn_implementation="eager")
    assert loaded.config._attn_implementation == "eager"
    ids = torch.tensor([rand_tokens(8, 1)])
    torch.testing.assert_close(loaded(ids).logits, m(ids).logits, atol=1e-5, rtol=0)


def test_load_non_causal_model_is_fluid_error(tmp_path):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    image_size=32, patch_size=16)
    ViTModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(FluidError, match="not a causal language model") as e:
        load_causal_lm(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(FluidError, match="cannot load"):
        load_causal_lm(tmp_path / "missing")


# ---------------------------------------------------------------- [M]


@pytest.mark.parametrize("tied", [True, False])
def test_add_mask_token(tied):
    m = tiny_llama(tied=tied)
    emb_before = m.get_input_embeddings().weight.detach().clone()
    head_before = m.get_output_embeddings().weight.detach().clone()
    add_mask_token(m, MASK_ID)
    emb = m.get_input_embeddings().weight.detach()
    head = m.get_output_embeddings().weight.detach()
    assert emb.shape[0] == VOCAB + 1 and head.shape[0] == VOCAB + 1
    assert torch.equal(emb[:VOCAB], emb_before)
    assert torch.equal(head[:VOCAB], head_before)
    torch.testing.assert_close(emb[MASK_ID], emb_before.mean(0), atol=1e-7, rtol=0)
    if tied:
        assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
        assert torch.equal(head[MASK_ID], emb[MASK_ID])
    else:
        assert m.get_output_embeddings().weight is not m.get_input_embeddings().weight
        torch.testing.assert_close(head[MASK_ID], head_before.mean(0), atol=1e-7, rtol=0)
    assert m.config.vocab_size == VOCAB + 1
    # idempotent: a second call changes nothing
    state = {k: v.clone() for k, v in m.state_dict().items()}
    add_mask_token(m, MASK_ID)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())
    assert m.get_input_embeddings().weight.shape[0] == VOCAB + 1
    with pytest.raises(FluidError):
        add_mask_token(m, MASK_ID + 3)


def test_add_mask_token_inside_existing_rows_and_survives_reload(tmp_path):
    m = tiny_llama(vocab=VOCAB + 4)  # e.g. a vocabulary padded past the tokenizer
    before = m.get_input_embeddings().weight.detach().clone()
    add_mask_token(m, VOCAB)
    w = m.get_input_embeddings().weight.detach()
    assert w.shape[0] == VOCAB + 4
    others = torch.cat([before[:VOCAB], before[VOCAB + 1:]])
    torch.testing.assert_close(w[VOCAB], others.mean(0), atol=1e-7, rtol=0)
    with torch.no_grad():
        w[VOCAB] += 1.0  # "trained"
    m.save_pretrained(tmp_path)
    loaded = load_causal_lm(tmp_path)
    add_mask_token(loaded, VOCAB)  # must not re-initialise the trained row
    assert torch.equal(loaded.get_input_embeddings().weight[VOCAB], w[VOCAB])


# ---------------------------------------------------------------- forwards


def _two_stream_case():
    x0, x1 = rand_tokens(12, 2), rand_tokens(9, 3)
    rows = [(x0, [(3, 4), (7, 3), (0, 2)]), (x1, [(2, 5)])]
    return rows, make_batch(rows, T=24)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_two_stream_matches_plain_prefix_plus_masks(attn):
    m = add_mask_token(tiny_llama(attn=attn, seed=1), MASK_ID)
    rows, batch = _two_stream_case()
    with torch.no_grad():
        logits = forward_batch(m, batch)
        for b, (x, spans) in enumerate(rows):
            plain = m(torch.tensor([x])).logits[0]
            torch.testing.assert_close(logits[b, : len(x)], plain, atol=1e-4, rtol=0)
            for s, (c, K) in enumerate(spans):
                seq = torch.tensor([x[: c + 1] + [MASK_ID] * (K - 1)])
                ref = m(seq).logits[0, c + 1:]
                rows_s = (batch["span_id"][b] == s).nonzero().flatten()
                torch.testing.assert_close(logits[b, rows_s], ref, atol=1e-4, rtol=0)
                # the cursor's clean output is the k=1 (AR) prediction of the same draft
                torch.testing.assert_close(logits[b, c], m(seq).logits[0, c], atol=1e-4, rtol=0)
    assert torch.isfinite(logits).all()  # padding rows are finite too


def test_eager_and_sdpa_agree_and_get_the_right_mask_type():
    m_sdpa = add_mask_token(tiny_llama(attn="sdpa", seed=1), MASK_ID)
    m_eager = add_mask_token(tiny_llama(attn="eager", seed=1), MASK_ID)
    _, batch = _two_stream_case()
    assert build_attention_mask(m_sdpa, batch).dtype == torch.bool
    add = build_attention_mask(m_eager, batch)
    assert add.dtype == torch.float32 and add.shape == (2, 1, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(forward_batch(m_eager, batch), forward_batch(m_sdpa, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bidirectional_mask_really_is_bidirectional(attn):
    m = tiny_llama(attn=attn, seed=2)
    x = rand_tokens(10, 4)
    y = list(x)
    y[-1] = (x[-1] % (VOCAB - 1)) + 1
    assert y[-1] != x[-1]
    with torch.no_grad():
        for mode, should_change in (("bidirectional", True), ("causal", False)):
            a = forward_batch(m, make_batch([(x, [])], T=10), mode=mode)[0, 0]
            b = forward_batch(m, make_batch([(y, [])], T=10), mode=mode)[0, 0]
            diff = (a - b).abs().max().item()
            assert (diff > 1e-4) if should_change else (diff == 0.0), (mode, diff)


def test_gpt2_two_stream_forward():
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)).eval()
    add_mask_token(m, MASK_ID)
    rows, batch = _two_stream_case()
    with torch.no_grad():
        logits = forward_batch(m, batch)
        x, spans = rows[1]
        c, K = spans[0]
        ref = m(torch.tensor([x[: c + 1] + [MASK_ID] * (K - 1)])).logits[0, c + 1:]
        rows_s = (batch["span_id"][1] == 0).nonzero().flatten()
        torch.testing.assert_close(logits[1, rows_s], ref, atol=1e-4, rtol=0)


def test_unknown_mode_is_fluid_error():
    m = tiny_llama()
    with pytest.raises(FluidError):
        forward_batch(m, make_batch([(rand_tokens(4, 0), [])], T=4), mode="sideways")
