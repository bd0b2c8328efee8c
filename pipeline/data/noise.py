"""Noising core: packed token sequences → fixed-length training examples (docs/method.md §2–§5).

Pure NumPy, no Ray and no torch: the Ray Data stage calls these per packed sequence, the trainer
builds the dense attention mask on the device from three of the columns (`pipeline/model/attention.py`).

In:  one packed sequence ``tokens`` = x_0 … x_{L−1} (1-D int array, documents separated by EOS)
     and a ``numpy.random.Generator`` (use :func:`rng_for` so that an example depends only on
     (global seed, epoch, sequence index), never on the worker layout).
Out: a ``dict[str, np.ndarray]`` with one 1-D array of the fixed length T per column, in the batch
     format of :mod:`pipeline.batch` (the columns, their dtypes and the ``IGNORE``/``CLEAN``/``PAD`` values).

Two layouts:

* :func:`make_two_stream_example` — FLUID's strictly causal layout: the clean stream followed by
  draft spans (T = L + draft budget).
* :func:`make_bidirectional_example` — the MDLM / DiffuLLaMA baseline (T = L, or ``length``).
"""

from __future__ import annotations

import numpy as np

from pipeline.batch import BIDIRECTIONAL_COLUMNS, CLEAN, COLUMNS, DTYPES, IGNORE, PAD  # noqa: F401 (the contract)
from pipeline.config import NoiseConfig

SPAN_DISTRIBUTIONS = ("uniform", "fixed", "geometric")


# ----------------------------------------------------------------------------------------------
# small pure helpers


def doc_ids_for(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Document index of every position of a packed sequence.

    doc[p] = #{q < p : x_q = EOS}: an EOS belongs to the document it closes, the token after it
    starts the next document. Non-decreasing, starts at 0, int64.
    """
    is_eos = np.asarray(tokens) == eos_id
    doc = np.zeros(is_eos.shape[0], dtype=np.int64)
    np.cumsum(is_eos[:-1], out=doc[1:])
    return doc


def doc_ends_for(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """e(p): index of the last position of p's document (its closing EOS, or L−1 if unclosed)."""
    doc = doc_ids_for(tokens, eos_id)
    return np.searchsorted(doc, doc, side="right") - 1


def max_draft_tokens(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Most draft tokens a span at cursor c may hold: m(c) = e(c) − c − 1 (−1 at an EOS).

    A span of K−1 tokens at cursor c has targets x_{c+2} … x_{c+K}; they (and x_{c+1}, the clean
    stream's AR target at c) must stay in c's document, so c + K ≤ e(c) — a span may end on the EOS
    that closes the document, never go past it, and never past L−1. Cursor c is valid iff m(c) ≥ 1;
    a cursor on an EOS (e(c) = c) never is: the next token belongs to another document.
    """
    ends = doc_ends_for(tokens, eos_id)
    return ends - np.arange(ends.shape[0]) - 1


def sample_horizons(
    rng: np.random.Generator, n: int, k_max: int, distribution: str = "uniform", k_mean: float | None = None
) -> np.ndarray:
    """Draw n span horizons K ∈ [2, k_max] (a span of horizon K holds K − 1 draft tokens).

    * ``uniform``:   K ~ U{2, …, k_max}.  K = 1 is left out on purpose: a horizon-1 "span" has no
      mask token — its only target x_{c+1} is already the clean stream's AR target at c.
    * ``fixed``:     K = k_max.
    * ``geometric``: K = min(1 + G, k_max), G ~ Geometric(p) on {1, 2, …}, p = 1 / (k_mean − 1), so
      E[K] = k_mean before the clip at k_max (default k_mean = (2 + k_max) / 2, the uniform mean).
    """
    if distribution == "uniform":
        return rng.integers(2, k_max + 1, size=n)
    if distribution == "fixed":
        return np.full(n, k_max, dtype=np.int64)
    if distribution == "geometric":
        mean = (2 + k_max) / 2 if k_mean is None else float(k_mean)
        return np.minimum(1 + rng.geometric(1.0 / (mean - 1.0), size=n), k_max)
    raise ValueError(f"unknown span_distribution {distribution!r}; expected one of {SPAN_DISTRIBUTIONS}")


def clean_stream(tokens: np.ndarray) -> dict[str, np.ndarray]:
    """The clean stream of a packed sequence x_0 … x_{L−1} (length L).

    input x_p, position p, span −1, anchor p, label x_{p+1} (ordinary next-token, across EOS too, so
    with no spans the AR loss is the model's usual LM loss), label −100 at L−1; k = 1 where a label
    exists, else 0.
    """
    n = tokens.shape[0]
    labels = np.full(n, IGNORE, dtype=np.int32)
    labels[:-1] = tokens[1:]
    return {
        "input_ids": tokens.astype(np.int32),
        "position_ids": np.arange(n, dtype=np.int32),
        "span_id": np.full(n, CLEAN, dtype=np.int32),
        "anchor": np.arange(n, dtype=np.int32),
        "labels": labels,
        "k": (labels != IGNORE).astype(np.int8),
    }


def padding(n: int, pad_id: int, *, with_weight: bool = False) -> dict[str, np.ndarray]:
    """n padding tokens: input pad_id, position 0, span −2, anchor −1, label −100, k 0 (weight 0)."""
    out = {
        "input_ids": np.full(n, pad_id, dtype=np.int32),
        "position_ids": np.zeros(n, dtype=np.int32),
        "span_id": np.full(n, PAD, dtype=np.int32),
        "anchor": np.full(n, -1, dtype=np.int32),
        "labels": np.full(n, IGNORE, dtype=np.int32),
        "k": np.zeros(n, dtype=np.int8),
    }
    if with_weight:
        out["weight"] = np.zeros(n, dtype=np.float32)
    return out


def _concat(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        name: np.concatenate([p[name] for p in parts]).astype(DTYPES[name], copy=False) for name in parts[0]
    }


def _check_tokens(tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D packed sequence, got shape {tokens.shape}")
    if tokens.shape[0] == 0:
        raise ValueError("tokens is empty: a packed sequence needs at least one token")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype}")
    return tokens


# ----------------------------------------------------------------------------------------------
# FLUID two-stream layout


def draft_spans(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    eos_id: int,
    k_max: int,
    budget: int,
    max_spans: int | None,
    rho: float,
    span_distribution: str,
    k_mean: float | None = None,
    min_cursor: int = 0,
) -> dict[str, np.ndarray]:
    """Draft spans appended after the clean stream (total length ≤ budget).

    Span s: horizon K_s (:func:`sample_horizons`), cursor c_s uniform over valid cursors (m(c) ≥ 1,
    :func:`max_draft_tokens`); it holds n_s = min(K_s − 1, m(c_s)) tokens, the last span cut to the
    remaining budget. Token j = 1 … n_s of the span: position c+j, input [M] (or, with probability
    rho, the true token x_{c+j}: restoration noise, its target still counts), span s, anchor c,
    label x_{c+j+1}, k = j+1. Spans are added until the budget is full or max_spans were made;
    no valid cursor → no spans. Cursors below `min_cursor` are not used (distilled examples anchor
    spans inside the continuation only).
    """
    if k_max > np.iinfo(DTYPES["k"]).max:  # k = j + 1 reaches k_max: it would wrap around in its int8 column
        raise ValueError(f"k_max must be ≤ {np.iinfo(DTYPES['k']).max} (the k column is int8), got {k_max!r}")
    m = max_draft_tokens(tokens, eos_id)
    cursors = np.flatnonzero(m >= 1)
    cursors = cursors[cursors >= min_cursor]
    n_max = budget if max_spans is None else min(budget, max_spans)  # every span has ≥ 1 token
    if k_max < 2 or n_max <= 0 or cursors.size == 0:
        return {name: np.zeros(0, dtype=DTYPES[name]) for name in COLUMNS}

    horizons = sample_horizons(rng, n_max, k_max, span_distribution, k_mean)
    c = cursors[rng.integers(0, cursors.size, size=n_max)]
    n = np.minimum(horizons - 1, m[c])  # ≥ 1 for every valid cursor
    ends = np.cumsum(n)
    used = min(int(np.searchsorted(ends, budget, side="left")) + 1, n_max)  # spans until budget is full
    c, n = c[:used], n[:used]
    n[-1] -= max(0, int(ends[used - 1]) - budget)  # cut the last span to fit

    total = int(n.sum())
    span = np.repeat(np.arange(used, dtype=np.int64), n)
    anchor = np.repeat(c, n)
    j = np.arange(total) - np.repeat(np.cumsum(n) - n, n) + 1  # 1 … n_s within each span
    pos = anchor + j
    restored = rng.random(total) < rho
    return {
        "input_ids": np.where(restored, tokens[pos], mask_id),
        "position_ids": pos,
        "span_id": span,
        "anchor": anchor,
        "labels": tokens[pos + 1],
        "k": j + 1,
    }


def make_two_stream_example(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    pad_id: int,
    eos_id: int,
    k_max: int = NoiseConfig.k_max,
    draft_tokens: int | None = None,
    spans: int | None = None,
    rho: float = 0.1,
    span_distribution: str = "uniform",
    k_mean: float | None = None,
) -> dict[str, np.ndarray]:
    """One FLUID training example: clean stream x_0 … x_{L−1}, then draft spans, then padding.

    Length T (fixed, so examples stack):
      * ``draft_tokens`` given → T = L + draft_tokens (the draft budget; with ``spans`` also given,
        spans stop at whichever limit comes first);
      * else ``spans`` given → T = L + spans · (k_max − 1), exactly ``spans`` spans (fewer only when
        the sequence has no valid cursor), the rest padded;
      * else → T = 2L (draft budget L: ≈ 0.5 draft targets per processed token), or T = L when
        k_max = 1 (pure AR, no spans, no padding).
    See :func:`clean_stream`, :func:`draft_spans`, :func:`padding` for the per-token values.
    ``k_mean`` is the mean horizon of ``span_distribution="geometric"`` (must be ≥ 2).
    """
    tokens = _check_tokens(tokens)
    _check_noise(k_max=k_max, rho=rho, span_distribution=span_distribution, k_mean=k_mean,
                 draft_tokens=draft_tokens, spans=spans)
    n = tokens.shape[0]
    if draft_tokens is not None:
        budget = int(draft_tokens)
    elif spans is not None:
        budget = int(spans) * (k_max - 1)
    else:
        budget = n if k_max > 1 else 0
    clean = clean_stream(tokens)
    drafts = draft_spans(
        tokens,
        rng,
        mask_id=mask_id,
        eos_id=eos_id,
        k_max=k_max,
        budget=budget,
        max_spans=spans,
        rho=rho,
        span_distribution=span_distribution,
        k_mean=k_mean,
    )
    pad = padding(budget - drafts["input_ids"].shape[0], pad_id)
    return _concat(clean, drafts, pad)


# ----------------------------------------------------------------------------------------------
# bidirectional baseline (MDLM / DiffuLLaMA)


def make_bidirectional_example(
    tokens: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    pad_id: int,
    eps: float = 1e-3,
    length: int | None = None,
) -> dict[str, np.ndarray]:
    """One example of the bidirectional masked-diffusion baseline (MDLM / DiffuLLaMA layout).

    t ~ U(eps, 1); each token is masked independently with probability t (at least one is: if the
    draw masks none, one uniformly chosen position is masked). input [M] where masked, else x_p;
    label = the ORIGINAL token x_p at masked positions (unshifted), −100 elsewhere; weight = 1/t at
    masked positions, 0 elsewhere (the MDLM ELBO weight of the linear schedule). position p, span −1,
    anchor p. k = 0 everywhere: k is the causal prediction distance, and an unshifted bidirectional
    target has none — the loss must select targets by labels ≠ −100, and per-k metrics ignore it.
    Padded to ``length`` (≥ L) if given, with weight 0.
    """
    tokens = _check_tokens(tokens)
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps!r}")
    n = tokens.shape[0]
    if length is not None and length < n:
        raise ValueError(f"length {length} is shorter than the sequence ({n} tokens)")

    t = rng.uniform(eps, 1.0)
    masked = rng.random(n) < t
    if not masked.any():
        masked[rng.integers(0, n)] = True
    ex = {
        "input_ids": np.where(masked, mask_id, tokens),
        "position_ids": np.arange(n),
        "span_id": np.full(n, CLEAN),
        "anchor": np.arange(n),
        "labels": np.where(masked, tokens, IGNORE),
        "k": np.zeros(n),
        "weight": np.where(masked, 1.0 / t, 0.0),
    }
    return _concat(ex, padding((length or n) - n, pad_id, with_weight=True))


# ----------------------------------------------------------------------------------------------
# determinism and bookkeeping


def example_seed(global_seed: int, epoch: int, index: int) -> int:
    """Seed of one example, a pure function of (global seed, epoch, global sequence index).

    seed = first 64-bit word of ``SeedSequence([global_seed, epoch, index])``: the same triple gives
    the same example in any worker layout, on resume, and on any machine.
    """
    if min(global_seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be ≥ 0, got {(global_seed, epoch, index)}")
    return int(np.random.SeedSequence([global_seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])


def rng_for(global_seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one example: ``default_rng(example_seed(global_seed, epoch, index))``."""
    return np.random.default_rng(example_seed(global_seed, epoch, index))


def stats(example: dict[str, np.ndarray]) -> dict[str, int]:
    """Counts of one (unbatched) example, either layout.

    tokens (T), clean_targets (clean AR targets, k = 1), draft_targets (k ≥ 2), spans, restored
    (draft positions whose input is the true token: input equals the clean stream's input at that
    position), padding (span −2), masked (bidirectional targets: labels ≠ −100 with k = 0).
    """
    span, labels, k = example["span_id"], example["labels"], example["k"]
    has_label = labels != IGNORE
    draft = span >= 0
    clean_inputs = example["input_ids"][span == CLEAN]  # the clean stream is first, index = position
    draft_pos = example["position_ids"][draft]
    restored = 0
    if draft_pos.size:
        restored = int((example["input_ids"][draft] == clean_inputs[draft_pos]).sum())
    return {
        "tokens": int(span.shape[0]),
        "clean_targets": int((has_label & (span == CLEAN) & (k == 1)).sum()),
        "draft_targets": int((has_label & draft & (k >= 2)).sum()),
        "spans": int(np.unique(span[draft]).size),
        "restored": restored,
        "padding": int((span == PAD).sum()),
        "masked": int((has_label & (k == 0)).sum()),
    }


def _check_noise(*, k_max, rho, span_distribution, k_mean, draft_tokens, spans) -> None:
    """ValueError for settings `make_two_stream_example` cannot use (one message per setting)."""
    if not isinstance(k_max, (int, np.integer)) or k_max < 1:
        raise ValueError(f"k_max must be an integer ≥ 1, got {k_max!r}")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho (restoration probability) must be in [0, 1], got {rho!r}")
    if span_distribution not in SPAN_DISTRIBUTIONS:
        raise ValueError(
            f"unknown span_distribution {span_distribution!r}; expected one of {SPAN_DISTRIBUTIONS}"
        )
    if k_mean is not None:
        if span_distribution != "geometric":
            raise ValueError("k_mean only applies to span_distribution='geometric'")
        if not k_mean >= 2:
            raise ValueError(f"k_mean must be ≥ 2 (a span has horizon K ≥ 2), got {k_mean!r}")
    if draft_tokens is not None and draft_tokens < 0:
        raise ValueError(f"draft_tokens must be ≥ 0, got {draft_tokens!r}")
    if spans is not None and spans < 0:
        raise ValueError(f"spans must be ≥ 0, got {spans!r}")
