"""Streaming training input: worker-count independence, multi-epoch order, exact resume, bounded reads."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.streaming import ShardReader, list_blocks
from pipeline.errors import FluidError

N, T = 150, 6  # rows, example length; 3 files of 50 rows in row groups of 10 → 15 blocks


@pytest.fixture
def shards(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    for f in range(3):
        idx = np.arange(f * 50, (f + 1) * 50, dtype=np.int64)
        ids = (idx[:, None] * 10 + np.arange(T)).astype(np.int32)
        table = pa.table({"seq_index": idx, "input_ids": pa.FixedSizeListArray.from_arrays(ids.reshape(-1), T)})
        pq.write_table(table, root / f"part-{f}.parquet", row_group_size=10)
    return list_blocks(str(root))


def _readers(blocks, world, **kw):
    kw.setdefault("span", 10)
    return [ShardReader(blocks, micro_global=12, rank=r, world=world, seed=3, window=40, **kw) for r in range(world)]


def _global(readers, i):
    parts = [r.micro_batch(i) for r in readers]
    return np.concatenate([p["seq_index"] for p in parts]), parts


def test_two_workers_read_the_same_global_batches_as_one(shards):
    assert len(shards) == 15 and sum(b.rows for b in shards) == N
    one, two = _readers(shards, 1), _readers(shards, 2)
    for i in range(30):  # 360 rows: 2.4 epochs
        a, _ = _global(one, i)
        b, parts = _global(two, i)
        assert sorted(a) == sorted(b) and len(set(b)) == 12
        assert all(p["seq_index"].shape == (6,) for p in parts)
        x = parts[0]["input_ids"]
        assert x.shape == (6, T) and np.array_equal(x[:, 0], parts[0]["seq_index"] * 10)  # rows intact


def test_every_epoch_is_a_seeded_permutation_of_all_rows(shards):
    (reader,) = _readers(shards, 1)
    stream = np.concatenate([reader.micro_batch(i)["seq_index"] for i in range(25)])  # 300 rows = 2 epochs
    e0, e1 = stream[:N], stream[N:]
    assert sorted(e0) == sorted(e1) == list(range(N))
    assert not np.array_equal(e0, e1)  # a new order each epoch
    assert not np.array_equal(e0, np.arange(N))  # shuffled
    (again,) = _readers(shards, 1)
    assert np.array_equal(np.concatenate([again.micro_batch(i)["seq_index"] for i in range(25)]), stream)
    (other_seed,) = [ShardReader(shards, micro_global=12, rank=0, world=1, seed=4, window=40, span=10)]
    assert not np.array_equal(other_seed.micro_batch(0)["seq_index"], reader.micro_batch(0)["seq_index"])
    # the shuffle is bounded: a row moves within its window of 40 positions of the epoch's span order
    unshuffled = ShardReader(shards, micro_global=12, rank=0, world=1, shuffle=False)
    assert np.array_equal(np.concatenate([unshuffled.micro_batch(i)["seq_index"] for i in range(12)]),
                          np.arange(144))


def test_resume_across_an_epoch_boundary_skips_without_reading(shards):
    straight = _readers(shards, 2)
    want = [_global(straight, i)[0] for i in range(8, 20)]  # epoch 0 ends inside micro-batch 12
    resumed = _readers(shards, 2)
    got = [_global(resumed, i)[0] for i in range(8, 20)]
    assert all(np.array_equal(a, b) for a, b in zip(want, got, strict=True))
    it = resumed[0].batches(start=12)
    assert np.array_equal(next(it)["seq_index"], straight[0].micro_batch(12)["seq_index"])
    fresh = _readers(shards, 2)[0]
    next(fresh.batches(start=13))
    assert fresh.blocks_read <= 6  # only the blocks of micro-batch 13's rows, nothing consumed before


def test_each_worker_reads_about_its_share_with_bounded_memory(shards):
    readers = _readers(shards, 2)
    for i in range(N // 12):  # one epoch
        _global(readers, i)
    reads = [r.blocks_read for r in readers]
    assert all(n < len(shards) for n in reads), reads  # neither worker reads every block
    assert sum(reads) <= len(shards) + 2 * 4, reads  # ≈ one read per block, plus window-boundary blocks
    assert all(r.max_cached_rows <= 40 + 10 + 2 * 10 for r in readers)  # a window + a span + two row groups


def test_too_few_rows_for_a_micro_batch_is_an_error(shards):
    with pytest.raises(FluidError, match="fewer than one global micro-batch"):
        ShardReader(shards[:1], micro_global=12, rank=0, world=1)


def test_the_order_depends_on_the_rows_not_on_how_they_were_cut_into_files(shards, tmp_path):
    """Ray Data's block sizes vary with timing and tokenizer actors: the same rows, cut differently
    (one file, row groups of 7), must give every worker the same batches."""
    rows = pa.concat_tables([pq.read_table(f) for f in sorted({b.file for b in shards})])
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(rows.slice(0, 101), other / "part-0.parquet", row_group_size=7)
    pq.write_table(rows.slice(101), other / "part-1.parquet", row_group_size=13)
    recut = list_blocks(str(other))
    assert [b.rows for b in recut] != [b.rows for b in shards]
    for span in (10, 32, 256):
        a, b = _readers(shards, 1, span=span), _readers(recut, 2, span=span)
        for i in range(20):  # 1.6 epochs
            assert np.array_equal(np.sort(_global(a, i)[0]), np.sort(_global(b, i)[0])), (span, i)
    # the span is part of the order: another span is another (equally valid) order
    assert not np.array_equal(_global(_readers(shards, 1, span=10), 0)[0], _global(_readers(shards, 1, span=32), 0)[0])
