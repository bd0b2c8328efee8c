"""Streaming training input: Parquet shards → this worker's share of each global micro-batch (no Ray).

In:  the shards written by `fluid preprocess` (or by `fluid adapt` itself; any fsspec URL), listed once
     on the driver as row-group *blocks* (`list_blocks`); the seed, the shuffle flag and the shuffle
     window (`data.shuffle_buffer` rows); the global micro-batch size, this worker's rank and the
     world size; how many micro-batches were consumed already.
Out: `ShardReader.batches(start)` → dicts of torch tensors, this worker's rows of global micro-batch
     start, start + 1, … (endless: epoch after epoch).

The global order is a pure function of (N rows in storage order, seed): global row g lies in epoch
e = g // N at position p = g % N. The storage rows are cut into *spans* of SPAN_ROWS consecutive rows;
each epoch takes the spans in a seeded order, and permutes rows within windows of `shuffle_buffer`
consecutive positions (a bounded shuffle: a row moves at most one window). So the order depends
neither on the number of workers nor on how far a run got, nor on how the writer happened to cut the
rows into files and row groups (Ray Data's block sizes vary with timing and with the number of
tokenizer actors; spans do not), and resuming at micro-batch i just computes rows from g = i·M on —
nothing consumed is read again. The physical row groups are only the unit of reading.

Global micro-batch i is the rows g ∈ [i·M, (i+1)·M). Its rows are sorted by storage position and
worker r takes the r-th contiguous slice: the *set* of rows of each step (and so the gradient, up to
floating-point reduction order) is the same for any worker count, and within a window worker r only
touches about 1/W of the blocks — it opens and reads only those. Memory: the blocks of the current
window that this worker needs (at most `shuffle_buffer` rows plus one block), then they are dropped.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.errors import FluidError

ROW_GROUP_ROWS = 256  # rows per Parquet row group written for training: the unit each worker reads
SPAN_ROWS = 256  # rows per span, the unit of the seeded per-epoch order (independent of the row groups)


@dataclass(frozen=True)
class Block:
    file: str  # fsspec URL or local path
    row_group: int
    rows: int


def _fs(url: str):
    from pipeline.sources.staging import _fs as fs_of

    return fs_of(url)


def natural_order(name: str) -> list:
    """Sort key that puts shard names in write order: Ray Data names them …_000001-10 after …-9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def list_blocks(path: str) -> list[Block]:
    """The row groups of every Parquet shard under `path`, in write order (natural sort of file names)."""
    import pyarrow.parquet as pq

    fs, root = _fs(path)
    if not fs.isdir(root):
        raise FluidError(f"no Parquet shards under {path}")
    files = sorted((f for f in fs.find(root) if f.endswith(".parquet")), key=natural_order)
    if not files:
        raise FluidError(f"no Parquet shards under {path}; run `fluid preprocess --output {path}` first")
    scheme = path.split("://", 1)[0] + "://" if "://" in path else ""
    blocks = []
    for f in files:
        with fs.open(f, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
        blocks += [Block(scheme + f, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)
                   if meta.row_group(i).num_rows > 0]
    return blocks


def rows_digest(path: str) -> dict:
    """{"sha256": one hash over every row of the shards under `path` in storage order (each column's
    values, columns by name), "row_groups": the row-group sizes in order, "rows": their sum}. Equal
    digests mean the training reader sees the same rows in the same places; reordering rows changes it."""
    import hashlib

    import pyarrow.parquet as pq

    h = hashlib.sha256()
    sizes = []
    for blk in list_blocks(path):
        fs, file = _fs(blk.file)
        with fs.open(file, "rb") as fh:
            table = pq.ParquetFile(fh).read_row_group(blk.row_group)
        for c in sorted(table.column_names):
            values = np.ascontiguousarray(_to_numpy(table.column(c)))
            h.update(c.encode() + str(values.dtype).encode() + values.tobytes())
        sizes.append(blk.rows)
    return {"sha256": h.hexdigest(), "row_groups": sizes, "rows": int(sum(sizes))}


class GlobalOrder:
    """Global row index g → (epoch, storage row): seeded span order per epoch, then a window shuffle."""

    def __init__(self, n_rows: int, *, seed: int, shuffle: bool, window: int, span: int = SPAN_ROWS):
        if window < 1:
            raise FluidError(f"data.shuffle_buffer must be ≥ 1, got {window}")
        if span < 1:
            raise FluidError(f"span must be ≥ 1, got {span}")
        self.n = int(n_rows)
        self.span_sizes = np.array([span] * (self.n // span) + ([self.n % span] if self.n % span else []),
                                   dtype=np.int64)
        self.span_starts = np.arange(len(self.span_sizes), dtype=np.int64) * span  # first storage row of each
        self.seed, self.shuffle, self.window = seed, shuffle, window
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None
        self._windows: dict[tuple[int, int], np.ndarray] = {}

    def _spans_of(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(span order, first epoch position of each span in that order) of one epoch."""
        if self._epoch is None or self._epoch[0] != epoch:
            order = (np.random.default_rng([self.seed, epoch, 0xB10C]).permutation(len(self.span_sizes))
                     if self.shuffle else np.arange(len(self.span_sizes)))
            starts = np.concatenate([[0], np.cumsum(self.span_sizes[order])])
            self._epoch, self._windows = (epoch, order, starts), {}
        return self._epoch[1], self._epoch[2]

    def _perm(self, epoch: int, w: int) -> np.ndarray:
        if (epoch, w) not in self._windows:
            size = min(self.window, self.n - w * self.window)
            self._windows[(epoch, w)] = (np.random.default_rng([self.seed, epoch, w]).permutation(size)
                                         if self.shuffle else np.arange(size))
        return self._windows[(epoch, w)]

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(epoch, storage row) of global rows `g`."""
        g = np.asarray(g, dtype=np.int64)
        epoch, p = g // self.n, g % self.n
        row = np.empty_like(p)
        for e in np.unique(epoch):
            order, starts = self._spans_of(int(e))
            sel = epoch == e
            w = p[sel] // self.window
            q = np.array([w_ * self.window + self._perm(int(e), int(w_))[pp - w_ * self.window]
                          for w_, pp in zip(w, p[sel], strict=True)], dtype=np.int64)  # position after the shuffle
            slot = np.searchsorted(starts, q, side="right") - 1  # which span of the epoch's order
            row[sel] = self.span_starts[order[slot]] + (q - starts[slot])
        return epoch, row


def _to_numpy(column) -> np.ndarray:
    """A column of fixed-length rows (Ray Data's tensor extension type or a list type) → (n, T); scalars → (n,)."""
    import pyarrow as pa

    arr = column.combine_chunks()
    if isinstance(arr.type, pa.ExtensionType):
        arr = arr.storage
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), -1)
    return arr.to_numpy(zero_copy_only=False)


class ShardReader:
    """This worker's rows of each global micro-batch, read block by block (see module docstring)."""

    def __init__(self, blocks: list[Block], *, micro_global: int, rank: int, world: int, seed: int = 0,
                 shuffle: bool = True, window: int = 4096, columns: list[str] | None = None,
                 span: int = SPAN_ROWS):
        if micro_global % world:
            raise FluidError(f"global micro-batch {micro_global} is not divisible by {world} workers")
        self.blocks, self.columns = blocks, columns
        self.order = GlobalOrder(sum(b.rows for b in blocks), seed=seed, shuffle=shuffle, window=window, span=span)
        self.block_starts = np.concatenate([[0], np.cumsum([b.rows for b in blocks])])  # first storage row of each
        if self.order.n < micro_global:
            raise FluidError(f"the training shards hold {self.order.n} rows, fewer than one global micro-batch "
                             f"({micro_global}): add data or lower train.global_batch_size")
        self.m, self.rank, self.world = micro_global, rank, world
        self.per_rank = micro_global // world
        self.cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        # a window's rows lie in at most window/span + 1 spans, each straddling at most two row groups
        self.cache_limit = window + span + 2 * max(b.rows for b in blocks)
        self.blocks_read = 0  # instrumentation for tests and the benchmark
        self.max_cached_rows = 0

    def rows_of(self, i: int) -> list[tuple[int, int]]:
        """(row group, row in it) of this worker's rows of global micro-batch i, in storage order."""
        g = np.arange(i * self.m, (i + 1) * self.m, dtype=np.int64)
        epoch, row = self.order.locate(g)
        order = np.lexsort((row, epoch))
        take = row[order[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]]
        block = np.searchsorted(self.block_starts, take, side="right") - 1
        return [(int(b), int(r - self.block_starts[b])) for b, r in zip(block, take, strict=True)]

    def _block(self, b: int) -> dict[str, np.ndarray]:
        if b in self.cache:
            self.cache.move_to_end(b)
            return self.cache[b]
        import pyarrow.parquet as pq

        blk = self.blocks[b]
        fs, path = _fs(blk.file)
        with fs.open(path, "rb") as fh:
            table = pq.ParquetFile(fh).read_row_group(blk.row_group, columns=self.columns)
        cols = {c: _to_numpy(table.column(c)) for c in table.column_names}
        self.blocks_read += 1
        self.cache[b] = cols
        while sum(len(next(iter(v.values()))) for v in self.cache.values()) > self.cache_limit:
            self.cache.popitem(last=False)
        self.max_cached_rows = max(self.max_cached_rows, sum(len(next(iter(v.values()))) for v in self.cache.values()))
        return cols

    def micro_batch(self, i: int) -> dict[str, np.ndarray]:
        """This worker's rows of global micro-batch i as NumPy arrays (one row per example)."""
        parts: dict[str, list[np.ndarray]] = {}
        for b, off in self.rows_of(i):
            cols = self._block(b)
            for c, v in cols.items():
                parts.setdefault(c, []).append(v[off])
        return {c: np.stack(v) for c, v in parts.items()}

    def batches(self, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        i = start
        while True:
            yield self.micro_batch(i)
            i += 1


def worker_batches(blocks: list[dict], *, micro_global: int, rank: int, world: int, start: int, seed: int,
                   shuffle: bool, window: int, columns: list[str], device) -> Iterator[dict]:
    """`ShardReader(...).batches(start)` as torch tensors on `device` (ids as int64, `weight` as is)."""
    import torch

    reader = ShardReader([Block(**b) for b in blocks], micro_global=micro_global, rank=rank, world=world, seed=seed,
                         shuffle=shuffle, window=window, columns=list(columns))
    for mb in reader.batches(start):
        yield {c: torch.from_numpy(mb[c] if c == "weight" else mb[c].astype(np.int64)).to(device) for c in columns}
