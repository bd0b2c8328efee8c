"""Property tests of the two-stream examples of pipeline/data/noise.py (docs/method.md §2–§5,
the batch format of pipeline/batch.py), on sequences, horizons, budgets, ρ and seeds drawn by hypothesis.

A packed sequence here is documents of text tokens (< 90) joined by EOS, the last one closed or not;
empty documents give EOS first, last and twice in a row."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.batch import CLEAN, COLUMNS, DTYPES, IGNORE, PAD
from pipeline.data.noise import doc_ends_for, make_two_stream_example, max_draft_tokens, rng_for

EOS, MASK, PAD_ID = 97, 98, 99
IDS = dict(mask_id=MASK, pad_id=PAD_ID, eos_id=EOS)
PROPERTY = settings(max_examples=100, deadline=None)


@st.composite
def document_lists(draw, max_docs: int = 8, max_doc_len: int = 30) -> np.ndarray:
    """Short sequences built document by document (hypothesis shrinks these well)."""
    docs = draw(st.lists(st.lists(st.integers(0, 89), max_size=max_doc_len), min_size=1, max_size=max_docs))
    closed = draw(st.booleans())
    tokens = []
    for i, doc in enumerate(docs):
        tokens += doc
        if i < len(docs) - 1 or closed:
            tokens.append(EOS)
    return np.array(tokens or [EOS], dtype=np.int64)


@st.composite
def long_packed(draw) -> np.ndarray:
    """Longer sequences: L tokens, EOS at `n_eos` random positions (the first and last included)."""
    length = draw(st.integers(2, 400))
    n_eos = draw(st.integers(0, min(12, length)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tokens = rng.integers(0, 90, size=length)
    tokens[rng.choice(length, size=n_eos, replace=False)] = EOS
    return tokens


packed_sequences = document_lists() | long_packed()


@st.composite
def examples(draw):
    """(tokens, make_two_stream_example's keyword arguments, draft budget) for every budget mode."""
    tokens = draw(packed_sequences)
    n = tokens.shape[0]
    kw = dict(
        k_max=draw(st.integers(1, 20)),
        rho=draw(st.floats(0.0, 1.0)),
        span_distribution=draw(st.sampled_from(["uniform", "fixed", "geometric"])),
    )
    if kw["span_distribution"] == "geometric":
        kw["k_mean"] = draw(st.none() | st.floats(2.0, 24.0))
    mode = draw(st.sampled_from(["default", "draft_ratio", "spans", "both"]))
    if mode in ("draft_ratio", "both"):
        kw["draft_tokens"] = round(draw(st.floats(0.0, 2.0)) * n)
    if mode in ("spans", "both"):
        kw["spans"] = draw(st.integers(0, 12))
    if "draft_tokens" in kw:
        budget = kw["draft_tokens"]
    elif "spans" in kw:
        budget = kw["spans"] * (kw["k_max"] - 1)
    else:
        budget = n if kw["k_max"] > 1 else 0
    return tokens, kw, budget


def make(tokens, kw, seed):
    return make_two_stream_example(tokens, np.random.default_rng(seed), **IDS, **kw)


def spans_of(ex) -> list[np.ndarray]:
    """Indices of each draft span, in span-id order."""
    span = ex["span_id"]
    return [np.flatnonzero(span == s) for s in range(int(span.max(initial=-1)) + 1)]


seeds = st.integers(0, 2**32 - 1)


@PROPERTY
@given(examples(), seeds)
def test_layout_clean_stream_then_drafts_then_padding(case, seed):
    """T = L + budget; the clean stream is x_0 … x_{L−1} at positions 0 … L−1; then the spans (ids
    0, 1, 2, … in order, each contiguous), then padding; the limits of the budget mode hold."""
    tokens, kw, budget = case
    n = tokens.shape[0]
    ex = make(tokens, kw, seed)
    assert tuple(ex) == COLUMNS
    for name in COLUMNS:
        assert ex[name].shape == (n + budget,) and ex[name].dtype == DTYPES[name], name
    span = ex["span_id"]
    np.testing.assert_array_equal(ex["input_ids"][:n], tokens)
    np.testing.assert_array_equal(ex["position_ids"][:n], np.arange(n))
    np.testing.assert_array_equal(span[:n], CLEAN)
    np.testing.assert_array_equal(ex["anchor"][:n], np.arange(n))

    n_draft = int((span >= 0).sum())
    assert (span[n : n + n_draft] >= 0).all() and (span[n + n_draft :] == PAD).all()
    ids = span[n : n + n_draft]
    n_spans = int(ids.max(initial=-1)) + 1
    # contiguous, in order: each id starts where the previous one ends
    np.testing.assert_array_equal(ids, np.repeat(np.arange(n_spans), [s.size for s in spans_of(ex)]))
    pad = span == PAD
    for name, value in (("input_ids", PAD_ID), ("position_ids", 0), ("anchor", -1), ("labels", IGNORE), ("k", 0)):
        np.testing.assert_array_equal(ex[name][pad], value, err_msg=name)

    has_cursor = bool((max_draft_tokens(tokens, EOS) >= 1).any()) and kw["k_max"] >= 2
    spans = kw.get("spans")
    if not has_cursor or budget == 0 or spans == 0:
        assert n_draft == 0
    elif spans is None:  # a draft budget only: filled to the last token
        assert n_draft == budget
    elif kw.get("draft_tokens") is None:  # spans only: exactly that many, each ≤ k_max − 1 tokens
        assert n_spans == spans
    else:  # both: whichever limit comes first
        assert n_draft <= budget and n_spans <= spans and (n_draft == budget or n_spans == spans)


@PROPERTY
@given(examples(), seeds)
def test_spans_are_anchored_at_a_clean_cursor(case, seed):
    """Every draft token of span s has anchor c (the span's cursor), positions c+1, c+2, …
    consecutively, at most k_max − 1 of them, and c is a clean position of the sequence (not an EOS)."""
    tokens, kw, _ = case
    n = tokens.shape[0]
    ex = make(tokens, kw, seed)
    for idx in spans_of(ex):
        c = int(ex["anchor"][idx[0]])
        np.testing.assert_array_equal(ex["anchor"][idx], c)
        np.testing.assert_array_equal(ex["position_ids"][idx], c + 1 + np.arange(idx.size))
        assert 1 <= idx.size <= kw["k_max"] - 1
        assert 0 <= c < n and tokens[c] != EOS
        assert ex["span_id"][c] == CLEAN and ex["position_ids"][c] == c  # c is a position of the clean stream


@PROPERTY
@given(examples(), seeds)
def test_targets_are_aligned(case, seed):
    """Clean p: label x_{p+1}, k = 1 (−100 and k = 0 at L−1). Draft at c+j: label x_{c+j+1}, k = j+1,
    input [M] or, where restored, the true token x_{c+j}."""
    tokens, kw, _ = case
    n = tokens.shape[0]
    ex = make(tokens, kw, seed)
    np.testing.assert_array_equal(ex["labels"][: n - 1], tokens[1:])
    np.testing.assert_array_equal(ex["k"][: n - 1], 1)
    assert (ex["labels"][n - 1], ex["k"][n - 1]) == (IGNORE, 0)
    for idx in spans_of(ex):
        c = int(ex["anchor"][idx[0]])
        j = np.arange(1, idx.size + 1)
        np.testing.assert_array_equal(ex["labels"][idx], tokens[c + j + 1])
        np.testing.assert_array_equal(ex["k"][idx], j + 1)
        inputs = ex["input_ids"][idx]
        restored = inputs != MASK  # text tokens are < 90: a true token is never the mask id
        np.testing.assert_array_equal(inputs[restored], tokens[c + j][restored])
        if kw["rho"] == 0.0:
            assert not restored.any()
        if kw["rho"] == 1.0:
            assert restored.all()


@PROPERTY
@given(examples(), seeds)
def test_no_target_past_the_end_or_the_document(case, seed):
    """No draft sits at or past L−1 or on its document's closing EOS; every target x_{p+1} exists and
    lies in the cursor's document (a span may end with the EOS as its last target, never cross it);
    with K = k_max (fixed), every span but the budget-cut last one is exactly min(k_max − 1, m(c))."""
    tokens, kw, _ = case
    n = tokens.shape[0]
    ex = make(tokens, kw, seed)
    ends = doc_ends_for(tokens, EOS)
    m = max_draft_tokens(tokens, EOS)
    labelled = ex["labels"] != IGNORE
    # every label is the token after its position: nothing past x_{L−1}
    assert (ex["position_ids"][labelled] + 1 <= n - 1).all()
    assert ((ex["k"] > 0) == labelled).all()
    spans = spans_of(ex)
    for i, idx in enumerate(spans):
        c = int(ex["anchor"][idx[0]])
        last = int(ex["position_ids"][idx[-1]])
        assert last + 1 <= ends[c]  # last target: at most the document's closing EOS
        assert not (tokens[c + 1 : last + 1] == EOS).any()  # no draft input position is an EOS
        assert idx.size <= m[c]
        if kw["span_distribution"] == "fixed" and i < len(spans) - 1:
            assert idx.size == min(kw["k_max"] - 1, m[c])


RATE_TOKENS = np.random.default_rng(20260).integers(0, 90, size=2500)
RATE_TOKENS[np.random.default_rng(20261).choice(np.arange(1, 2500), size=24, replace=False)] = EOS


@PROPERTY
@given(st.sampled_from([0.0, 1.0]) | st.floats(0.01, 0.99))
def test_restoration_rate_is_rho(rho):
    """At a fixed seed, the share of restored draft inputs over ≥ 2 000 draft positions is within 3σ of ρ
    (binomial σ = sqrt(n ρ (1 − ρ)); exact at ρ = 0 and 1). Horizons and cursors are drawn before the
    restoration draws and do not depend on ρ, so every ρ reads the same n = 2 500 uniforms: their largest
    deviation over ρ ∈ [0.01, 0.99] is 1.94σ (checked when this test was written), so no ρ that hypothesis
    draws fails by chance, while a ρ applied per span or scaled by 0.9 fails."""
    ex = make_two_stream_example(RATE_TOKENS, rng_for(0, 0, 0), **IDS, rho=rho)
    draft = ex["span_id"] >= 0
    n = int(draft.sum())
    assert n >= 2000
    restored = int((ex["input_ids"][draft] != MASK).sum())
    sigma = math.sqrt(n * rho * (1 - rho))
    assert abs(restored - n * rho) <= 3 * sigma + 1e-9, (restored, n, rho, sigma)


@PROPERTY
@given(st.integers(2, 600), st.integers(2, 300), seeds)
def test_k_is_the_prediction_distance_for_long_horizons(length, k_max, seed):
    """One long unclosed document and K = k_max: spans of up to k_max − 1 tokens, each with k = j + 1;
    a k_max whose k would not fit the int8 column (> 127) is refused, not wrapped around to k ≤ 0."""
    tokens = np.arange(length) % 90
    kw = dict(**IDS, k_max=k_max, spans=4, span_distribution="fixed")
    if k_max > 127:
        with pytest.raises(ValueError, match=rf"k_max must be ≤ 127 \(the k column is int8\), got {k_max}"):
            make_two_stream_example(tokens, np.random.default_rng(seed), **kw)
        return
    ex = make_two_stream_example(tokens, np.random.default_rng(seed), **kw)
    for idx in spans_of(ex):
        j = ex["position_ids"][idx] - ex["anchor"][idx]
        np.testing.assert_array_equal(ex["k"][idx], j + 1)
