"""Tests of pipeline/data/packing.py: lossless packing, stable global indices, seeded shuffle keys (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.packing import (
    MAX_SEQS,
    chunk_documents,
    concat_with_eos,
    pack_documents,
    pack_stream,
    seq_index,
    shuffle_keys,
    split_seq_index,
    unit_id,
)
from pipeline.errors import FluidError

EOS = 0


def random_docs(rng: np.random.Generator, n: int, max_len: int = 40) -> list[list[int]]:
    return [rng.integers(1, 50, size=int(rng.integers(0, max_len))).tolist() for _ in range(n)]


@pytest.mark.parametrize("seq_len", [1, 7, 16, 64])
def test_packing_loses_no_token(seq_len):
    rng = np.random.default_rng(seq_len)
    for _ in range(20):
        docs = random_docs(rng, int(rng.integers(1, 12)))
        unit = pack_documents(docs, seq_len=seq_len, eos_id=EOS)
        n_in = sum(len(d) for d in docs) + len(docs)  # every document is followed by EOS
        assert unit.tokens == n_in == unit.packed_tokens + unit.remainder
        assert 0 <= unit.remainder < seq_len
        assert unit.sequences.shape == (n_in // seq_len, seq_len) and unit.sequences.dtype == np.int32
        np.testing.assert_array_equal(unit.seq_no, np.arange(unit.sequences.shape[0]))
        # the rows, read in order, are exactly the documents with their EOS (minus the remainder)
        stream = np.concatenate([np.append(np.asarray(d, dtype=np.int64), EOS) for d in docs])
        np.testing.assert_array_equal(unit.sequences.ravel(), stream[: unit.packed_tokens])
        assert unit.documents == len(docs)


def test_concat_with_eos_and_edge_cases():
    np.testing.assert_array_equal(concat_with_eos([[5, 6], [], [7]], 9), [5, 6, 9, 9, 7, 9])
    assert concat_with_eos([], 9).shape == (0,)
    rows, rest = pack_stream(np.arange(5), 8)  # shorter than one sequence: all of it is remainder
    assert rows.shape == (0, 8) and rest == 5
    rows, rest = pack_stream(np.arange(16), 8)
    assert rows.shape == (2, 8) and rest == 0
    with pytest.raises(ValueError):
        pack_stream(np.arange(4), 0)


def test_chunk_documents_keeps_every_document_in_order():
    texts = [f"d{i}" * (i % 5 + 1) for i in range(30)]
    units = list(chunk_documents(texts, unit_chars=10))
    assert [t for u in units for t in u] == texts
    assert all(sum(map(len, u)) >= 10 for u in units[:-1])
    assert all(sum(map(len, u[:-1])) < 10 for u in units)  # a unit closes as soon as it is full
    assert list(chunk_documents(["x" * 100], 10)) == [["x" * 100]]
    assert list(chunk_documents([], 10)) == []


def test_global_index_round_trip_and_order():
    cases = [(0, 0, 0), (3, 1, 5), (2**23 - 1, 2**16 - 1, MAX_SEQS - 1)]
    for f, c, s in cases:
        idx = seq_index(unit_id(f, c), s)
        assert 0 <= idx < 2**63 and split_seq_index(idx) == (f, c, s)
    # file order, then chunk order, then sequence order
    a = [seq_index(unit_id(f, c), s) for f in range(3) for c in range(3) for s in range(3)]
    assert a == sorted(a) and len(set(a)) == len(a)
    vec = seq_index(unit_id(4, 2), np.arange(10, dtype=np.int64))
    assert vec.dtype == np.int64 and vec.tolist() == [seq_index(unit_id(4, 2), i) for i in range(10)]
    with pytest.raises(FluidError):
        unit_id(2**23, 0)
    with pytest.raises(FluidError):
        unit_id(0, 2**16)
    with pytest.raises(FluidError):
        seq_index(0, np.array([MAX_SEQS]))


def test_shuffle_keys_are_a_seeded_bijection():
    idx = np.array([seq_index(unit_id(f, 0), s) for f in range(20) for s in range(50)], dtype=np.int64)
    keys = shuffle_keys(idx, seed=3, epoch=1)
    assert keys.dtype == np.int64 and np.unique(keys).size == idx.size
    np.testing.assert_array_equal(keys, shuffle_keys(idx, seed=3, epoch=1))
    # order does not depend on how the indices are grouped: keys are per index
    np.testing.assert_array_equal(np.concatenate([shuffle_keys(idx[:300], 3, 1), shuffle_keys(idx[300:], 3, 1)]), keys)
    order = np.argsort(keys)
    assert not np.array_equal(order, np.arange(idx.size))  # it does shuffle
    assert not np.array_equal(np.argsort(shuffle_keys(idx, 3, 2)), order)  # per epoch
    assert not np.array_equal(np.argsort(shuffle_keys(idx, 4, 1)), order)  # per seed
    # well mixed: the first tenth of the shuffled order draws from most files
    files = idx[order[:100]] >> np.int64(40)
    assert np.unique(files).size >= 15
