"""Tests of the noising core (pipeline/data/noise.py) against the batch-format contract of docs/method.md §3."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.noise import (
    BIDIRECTIONAL_COLUMNS,
    COLUMNS,
    doc_ids_for,
    example_seed,
    make_bidirectional_example,
    make_two_stream_example,
    max_draft_tokens,
    rng_for,
    sample_horizons,
    stats,
)

EOS, MASK, PAD = 97, 98, 99
IDS = dict(mask_id=MASK, pad_id=PAD, eos_id=EOS)


def packed(rng: np.random.Generator, length: int, n_docs: int) -> np.ndarray:
    """A packed sequence of about n_docs documents: random text tokens (< 90), EOS between docs."""
    tokens = rng.integers(0, 90, size=length)
    cuts = rng.choice(np.arange(1, length), size=n_docs - 1, replace=False)
    tokens[cuts] = EOS
    return tokens


def edge_sequences() -> list[np.ndarray]:
    """EOS first, EOS last, two EOS in a row, one-token documents, no EOS at all."""
    return [
        np.array([EOS, 1, 2, 3, EOS, EOS, 4, 5, 6, 7, 8, EOS, 9, EOS, 10, 11, 12, 13, 14, EOS]),
        np.array([1, 2, EOS, 3, EOS, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
        np.arange(30) % 90,
    ]


def spans_of(ex: dict[str, np.ndarray]) -> list[np.ndarray]:
    span = ex["span_id"]
    return [np.flatnonzero(span == s) for s in range(int(span.max()) + 1)] if (span >= 0).any() else []


def check_two_stream(ex: dict[str, np.ndarray], tokens: np.ndarray, t_expected: int) -> None:
    """Every invariant of the two-stream layout, checked position by position."""
    n = tokens.shape[0]
    assert tuple(ex) == COLUMNS
    for name in COLUMNS:
        assert ex[name].shape == (t_expected,), name
        assert ex[name].dtype == (np.int8 if name == "k" else np.int32), name
    inp, pos, span, anchor, labels, k = (ex[c] for c in COLUMNS)
    doc = doc_ids_for(tokens, EOS)

    # clean stream: positions 0..L-1, next-token labels across EOS too, k = 1 where a label exists
    np.testing.assert_array_equal(inp[:n], tokens)
    np.testing.assert_array_equal(pos[:n], np.arange(n))
    np.testing.assert_array_equal(span[:n], -1)
    np.testing.assert_array_equal(anchor[:n], np.arange(n))
    np.testing.assert_array_equal(labels[: n - 1], tokens[1:])
    assert labels[n - 1] == -100
    np.testing.assert_array_equal(k[: n - 1], 1)
    assert k[n - 1] == 0

    # after the clean stream: drafts first, then padding only
    rest = span[n:]
    assert (rest != -1).all()
    n_draft = int((rest >= 0).sum())
    assert (rest[:n_draft] >= 0).all() and (rest[n_draft:] == -2).all()
    # span ids are 0, 1, 2, ... in order, each span contiguous
    if n_draft:
        ids = rest[:n_draft]
        assert ids[0] == 0 and set(np.diff(ids).tolist()) <= {0, 1}

    for s_idx in spans_of(ex):
        c = int(anchor[s_idx[0]])
        assert (anchor[s_idx] == c).all()
        assert 0 <= c < n and tokens[c] != EOS, "cursor must not be an EOS"
        # positions c+1, c+2, ... and k = j + 1 = pos - anchor + 1 (distance from cursor to target)
        np.testing.assert_array_equal(pos[s_idx], c + 1 + np.arange(s_idx.size))
        np.testing.assert_array_equal(k[s_idx], pos[s_idx] - anchor[s_idx] + 1)
        for i in s_idx:
            p = int(pos[i])
            assert p + 1 <= n - 1, "draft target past L-1"
            assert labels[i] == tokens[p + 1], "draft label must be x_{pos+1}"
            assert doc[p + 1] == doc[c], "draft target crosses into the next document"
            assert inp[i] in (MASK, tokens[p]), "draft input is [M] or the restored true token"
        # the clean stream's AR target at c (x_{c+1}) is in c's document too
        assert doc[c + 1] == doc[c]

    # padding conventions
    pad = span == -2
    np.testing.assert_array_equal(inp[pad], PAD)
    np.testing.assert_array_equal(pos[pad], 0)
    np.testing.assert_array_equal(anchor[pad], -1)
    np.testing.assert_array_equal(labels[pad], -100)
    np.testing.assert_array_equal(k[pad], 0)


# ---------------------------------------------------------------------------------- helpers


def test_doc_ids_eos_belongs_to_the_doc_it_closes():
    tokens = np.array([5, EOS, 6, 7, EOS, EOS, 8])
    np.testing.assert_array_equal(doc_ids_for(tokens, EOS), [0, 0, 1, 1, 1, 2, 3])
    np.testing.assert_array_equal(doc_ids_for(np.array([EOS, 1]), EOS), [0, 1])
    np.testing.assert_array_equal(doc_ids_for(np.array([1, 2, 3]), EOS), [0, 0, 0])


def test_max_draft_tokens():
    # doc 0 = [5, EOS] (0..1), doc 1 = [6, 7, 8, EOS] (2..5), doc 2 = [9, 10] (6..7, unclosed)
    tokens = np.array([5, EOS, 6, 7, 8, EOS, 9, 10])
    # m(c) = e(c) - c - 1: a span at c=2 may hold 2 tokens (targets x_4, x_5 = EOS)
    np.testing.assert_array_equal(max_draft_tokens(tokens, EOS), [0, -1, 2, 1, 0, -1, 0, -1])


def test_sample_horizons_distributions():
    rng = np.random.default_rng(0)
    u = sample_horizons(rng, 20000, 16, "uniform")
    assert u.min() == 2 and u.max() == 16 and set(np.unique(u).tolist()) == set(range(2, 17))
    assert abs(u.mean() - 9.0) < 0.1
    np.testing.assert_array_equal(sample_horizons(rng, 50, 7, "fixed"), 7)
    g = sample_horizons(rng, 20000, 64, "geometric", k_mean=4.0)
    assert g.min() >= 2 and g.max() <= 64 and abs(g.mean() - 4.0) < 0.1
    g = sample_horizons(rng, 5000, 5, "geometric", k_mean=30.0)
    assert g.min() >= 2 and g.max() == 5
    with pytest.raises(ValueError, match="span_distribution"):
        sample_horizons(rng, 1, 16, "zipf")


# ---------------------------------------------------------------------------------- two-stream layout


@pytest.mark.parametrize("distribution", ["uniform", "fixed", "geometric"])
def test_layout_invariants_random_packed(distribution):
    for index in range(12):
        rng = rng_for(1, 0, index)
        length = int(rng.integers(20, 120))
        tokens = packed(rng, length, n_docs=int(rng.integers(1, 8)))
        k_max = int(rng.integers(2, 12))
        ex = make_two_stream_example(tokens, rng, **IDS, k_max=k_max, rho=0.3, span_distribution=distribution)
        check_two_stream(ex, tokens, 2 * length)
        # the draft budget (L tokens by default) is filled whenever a valid cursor exists
        if (max_draft_tokens(tokens, EOS) >= 1).any():
            assert stats(ex)["padding"] == 0


def test_layout_invariants_edge_sequences():
    for seq_i, tokens in enumerate(edge_sequences()):
        for index in range(10):
            rng = rng_for(2, seq_i, index)
            ex = make_two_stream_example(tokens, rng, **IDS, k_max=6, rho=0.5)
            check_two_stream(ex, tokens, 2 * tokens.shape[0])


def test_fixed_spans_truncate_exactly_at_document_end():
    """With K = k_max, each span holds min(k_max-1, m(c)) tokens; only the budget cuts the last one."""
    tokens = edge_sequences()[0]
    m = max_draft_tokens(tokens, EOS)
    ends_at_eos = 0
    for index in range(30):
        ex = make_two_stream_example(tokens, rng_for(3, 0, index), **IDS, k_max=5, span_distribution="fixed")
        spans = spans_of(ex)
        for s_idx in spans[:-1]:
            c = ex["anchor"][s_idx[0]]
            assert s_idx.size == min(4, m[c])
            ends_at_eos += int(ex["labels"][s_idx[-1]] == EOS)
        assert spans[-1].size <= min(4, m[ex["anchor"][spans[-1][0]]])
    assert ends_at_eos > 0, "a span may end with the EOS that closes its document"


def test_spans_mode_fixed_length():
    rng = np.random.default_rng(4)
    for _ in range(10):
        tokens = packed(rng, 64, n_docs=4)
        ex = make_two_stream_example(tokens, rng, **IDS, k_max=8, spans=5)
        check_two_stream(ex, tokens, 64 + 5 * 7)
        st = stats(ex)
        assert st["spans"] == 5
        assert st["padding"] == 5 * 7 - st["draft_targets"]


def test_spans_and_draft_budget_together():
    rng = np.random.default_rng(5)
    tokens = np.arange(40)
    ex = make_two_stream_example(tokens, rng, **IDS, k_max=8, spans=3, draft_tokens=10)
    check_two_stream(ex, tokens, 50)
    st = stats(ex)
    # spans stop at whichever limit comes first (every cursor of 0 … 39 is valid: no EOS)
    assert st["spans"] <= 3 and st["draft_targets"] <= 10
    assert st["spans"] == 3 or st["draft_targets"] == 10, st


def test_determinism_and_layout_independence():
    tokens = packed(np.random.default_rng(6), 96, n_docs=5)

    def example(seed, epoch, index):
        return make_two_stream_example(tokens, rng_for(seed, epoch, index), **IDS)

    a, b = example(7, 1, 42), example(7, 1, 42)
    for name in COLUMNS:
        np.testing.assert_array_equal(a[name], b[name])
    for other in (example(8, 1, 42), example(7, 2, 42), example(7, 1, 43)):
        assert any(not np.array_equal(a[c], other[c]) for c in COLUMNS)
    # seeds depend only on (seed, epoch, index): two "workers" taking odd/even indices see the
    # same seeds as one worker taking them all in order
    one = [example_seed(7, 1, i) for i in range(8)]
    two = {i: example_seed(7, 1, i) for i in list(range(1, 8, 2)) + list(range(0, 8, 2))}
    assert one == [two[i] for i in range(8)]
    assert len(set(one)) == 8 and all(isinstance(s, int) and s >= 0 for s in one)
    with pytest.raises(ValueError):
        example_seed(-1, 0, 0)


@pytest.mark.parametrize("rho", [0.1, 0.3])
def test_restoration_rate_matches_rho(rho):
    restored = drafts = 0
    for index in range(30):
        rng = rng_for(9, 0, index)
        tokens = packed(rng, 256, n_docs=6)
        ex = make_two_stream_example(tokens, rng, **IDS, rho=rho)
        st = stats(ex)
        restored += st["restored"]
        drafts += st["draft_targets"]
        # restored inputs are exactly the draft inputs that are not [M]
        draft = ex["span_id"] >= 0
        assert st["restored"] == int((ex["input_ids"][draft] != MASK).sum())
    assert drafts > 7000
    assert abs(restored / drafts - rho) < 0.015  # ~5 standard deviations


def test_rho_zero_and_one():
    rng = np.random.default_rng(10)
    tokens = packed(rng, 128, n_docs=3)
    ex = make_two_stream_example(tokens, rng, **IDS, rho=0.0)
    draft = ex["span_id"] >= 0
    assert draft.any() and (ex["input_ids"][draft] == MASK).all() and stats(ex)["restored"] == 0
    ex = make_two_stream_example(tokens, rng, **IDS, rho=1.0)
    draft = ex["span_id"] >= 0
    np.testing.assert_array_equal(ex["input_ids"][draft], tokens[ex["position_ids"][draft]])


def test_default_draft_targets_per_token():
    for index in range(5):
        rng = rng_for(11, 0, index)
        tokens = packed(rng, 256, n_docs=4)
        ex = make_two_stream_example(tokens, rng, **IDS)
        st = stats(ex)
        assert st["tokens"] == 512
        assert st["clean_targets"] == 255
        assert st["draft_targets"] == 256  # the draft budget of L tokens is filled: T = 2L, half of it targets
        assert st["spans"] >= 256 // 15  # each span holds at most k_max - 1 = 15 tokens


def test_k_max_one_is_pure_ar():
    rng = np.random.default_rng(12)
    tokens = packed(rng, 50, n_docs=3)
    ex = make_two_stream_example(tokens, rng, **IDS, k_max=1)
    check_two_stream(ex, tokens, 50)
    st = stats(ex)
    assert st["draft_targets"] == 0 and st["spans"] == 0 and st["padding"] == 0
    # an explicit budget keeps T fixed: all padding
    ex = make_two_stream_example(tokens, rng, **IDS, k_max=1, draft_tokens=10)
    check_two_stream(ex, tokens, 60)
    assert stats(ex)["padding"] == 10
    ex = make_two_stream_example(tokens, rng, **IDS, k_max=1, spans=4)
    check_two_stream(ex, tokens, 50)


def test_no_valid_cursor_gives_padding_only():
    rng = np.random.default_rng(13)
    for tokens in (
        np.array([EOS, EOS, EOS, EOS]),
        np.array([1, 2]),
        np.array([3]),
        np.array([1, EOS, 2, EOS]),
    ):
        ex = make_two_stream_example(tokens, rng, **IDS, k_max=4)
        check_two_stream(ex, tokens, 2 * tokens.shape[0])
        assert stats(ex)["draft_targets"] == 0 and stats(ex)["padding"] == tokens.shape[0]


def test_shortest_valid_span():
    # only cursor 0 is valid, with exactly one draft token (position 1, target x_2 = EOS)
    tokens = np.array([4, 5, EOS])
    ex = make_two_stream_example(tokens, np.random.default_rng(0), **IDS, k_max=16, draft_tokens=3, rho=0)
    np.testing.assert_array_equal(ex["span_id"], [-1, -1, -1, 0, 1, 2])
    np.testing.assert_array_equal(ex["position_ids"], [0, 1, 2, 1, 1, 1])
    np.testing.assert_array_equal(ex["labels"], [5, EOS, -100, EOS, EOS, EOS])
    np.testing.assert_array_equal(ex["k"], [1, 1, 0, 2, 2, 2])
    np.testing.assert_array_equal(ex["input_ids"], [4, 5, EOS, MASK, MASK, MASK])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k_max=0), "k_max"),
        (dict(rho=-0.1), "rho"),
        (dict(rho=1.5), "rho"),
        (dict(span_distribution="zipf"), "span_distribution"),
        (dict(k_mean=4.0), "k_mean"),
        (dict(span_distribution="geometric", k_mean=1.5), "k_mean"),
        (dict(draft_tokens=-1), "draft_tokens"),
        (dict(spans=-2), "spans"),
    ],
)
def test_two_stream_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_two_stream_example(np.arange(10), np.random.default_rng(0), **IDS, **kwargs)


def test_token_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="empty"):
        make_two_stream_example(np.array([], dtype=np.int64), rng, **IDS)
    with pytest.raises(ValueError, match="1-D"):
        make_two_stream_example(np.zeros((2, 3), dtype=np.int64), rng, **IDS)
    with pytest.raises(ValueError, match="empty"):
        make_bidirectional_example(np.array([], dtype=np.int64), rng, mask_id=MASK, pad_id=PAD)


# ---------------------------------------------------------------------------------- bidirectional layout


def test_bidirectional_layout():
    rng = np.random.default_rng(14)
    tokens = packed(rng, 4000, n_docs=5)
    for _ in range(3):
        ex = make_bidirectional_example(tokens, rng, mask_id=MASK, pad_id=PAD, length=4010)
        assert tuple(ex) == BIDIRECTIONAL_COLUMNS
        assert all(v.shape == (4010,) for v in ex.values())
        assert (
            ex["weight"].dtype == np.float32 and ex["k"].dtype == np.int8 and ex["labels"].dtype == np.int32
        )
        n = 4000
        masked = ex["input_ids"][:n] == MASK
        np.testing.assert_array_equal(ex["input_ids"][:n][~masked], tokens[~masked])
        np.testing.assert_array_equal(ex["labels"][:n], np.where(masked, tokens, -100))  # unshifted
        np.testing.assert_array_equal(ex["position_ids"][:n], np.arange(n))
        np.testing.assert_array_equal(ex["anchor"][:n], np.arange(n))
        np.testing.assert_array_equal(ex["span_id"][:n], -1)
        np.testing.assert_array_equal(ex["k"], 0)
        w = ex["weight"][:n]
        assert (w[~masked] == 0).all() and np.unique(w[masked]).size == 1
        t = 1.0 / w[masked][0]
        assert 1e-3 <= t < 1.0
        assert abs(masked.mean() - t) < 0.04  # masking rate ≈ t (4000 tokens: sd ≤ 0.008)
        # padding
        np.testing.assert_array_equal(ex["span_id"][n:], -2)
        np.testing.assert_array_equal(ex["input_ids"][n:], PAD)
        np.testing.assert_array_equal(ex["labels"][n:], -100)
        np.testing.assert_array_equal(ex["anchor"][n:], -1)
        np.testing.assert_array_equal(ex["weight"][n:], 0)
        st = stats(ex)
        assert st["masked"] == int(masked.sum()) and st["clean_targets"] == 0 and st["padding"] == 10


def test_bidirectional_at_least_one_mask_and_errors():
    for index in range(200):
        ex = make_bidirectional_example(
            np.array([7]), rng_for(15, 0, index), mask_id=MASK, pad_id=PAD, eps=1e-6
        )
        assert ex["input_ids"][0] == MASK and ex["labels"][0] == 7 and ex["weight"][0] >= 1.0
    ex = make_bidirectional_example(np.arange(5), np.random.default_rng(0), mask_id=MASK, pad_id=PAD)
    assert ex["input_ids"].shape == (5,)
    with pytest.raises(ValueError, match="eps"):
        make_bidirectional_example(np.arange(5), np.random.default_rng(0), mask_id=MASK, pad_id=PAD, eps=0.0)
    with pytest.raises(ValueError, match="length"):
        make_bidirectional_example(np.arange(5), np.random.default_rng(0), mask_id=MASK, pad_id=PAD, length=4)


def test_stats_counts_by_hand():
    tokens = np.array([4, 5, 6, 7, EOS, 8])
    ex = make_two_stream_example(tokens, np.random.default_rng(0), **IDS, k_max=3, spans=2, rho=0.0)
    st = stats(ex)
    assert st["tokens"] == 6 + 2 * 2
    assert st["clean_targets"] == 5 and st["spans"] == 2 and st["restored"] == 0 and st["masked"] == 0
    assert st["draft_targets"] + st["padding"] == 4
    assert st["draft_targets"] == int((ex["k"] >= 2).sum())
