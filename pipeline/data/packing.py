"""Packing: tokenized documents → fixed-length sequences with a stable global index (pure NumPy, no Ray).

In:  the documents of one *packing unit* — a run of consecutive documents of one source file, cut by
     :func:`chunk_documents` once its text reaches a character budget — as token-id lists (no EOS).
Out: :class:`PackedUnit` — the unit's token stream (every document followed by EOS) cut into rows of
     exactly ``seq_len`` tokens, plus the number of leftover tokens at the end of the unit (the only
     tokens ever dropped; they are counted, never silently lost).

Global sequence index. A unit is identified by ``unit_id(file_index, chunk)`` (file index in the
sorted source list, chunk number within the file) and each of its sequences by
``seq_index(unit, seq_no)`` — one non-negative int64 that depends only on the corpus and the config,
never on how Ray splits the work into blocks, tasks or actors. Noise seeds and shuffle order are
derived from it, so examples are the same in any worker layout and training can resume exactly.

Bit layout (63 bits): file index 23 bits | chunk 16 bits | sequence number 24 bits.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import FluidError

FILE_BITS, CHUNK_BITS, SEQ_BITS = 23, 16, 24
MAX_FILES, MAX_CHUNKS, MAX_SEQS = 1 << FILE_BITS, 1 << CHUNK_BITS, 1 << SEQ_BITS

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def unit_id(file_index: int, chunk: int) -> int:
    """Identifier of the packing unit `chunk` of file `file_index` (both 0-based)."""
    if not 0 <= file_index < MAX_FILES:
        raise FluidError(f"too many corpus files ({file_index + 1}); at most {MAX_FILES} per dataset")
    if not 0 <= chunk < MAX_CHUNKS:
        raise FluidError(f"corpus file #{file_index} has more than {MAX_CHUNKS} packing units; "
                         "split it into several files or raise the unit size")
    return (file_index << CHUNK_BITS) | chunk


def seq_index(unit: int, seq_no: int | np.ndarray) -> int | np.ndarray:
    """Global index of sequence `seq_no` of `unit` (vectorized over seq_no; int64 for arrays)."""
    top = np.max(seq_no) if isinstance(seq_no, np.ndarray) and seq_no.size else seq_no
    if isinstance(top, (int, np.integer)) and top >= MAX_SEQS:
        raise FluidError(f"packing unit {unit} holds more than {MAX_SEQS} sequences; lower the unit size")
    if isinstance(seq_no, np.ndarray):
        return (np.int64(unit) << np.int64(SEQ_BITS)) | seq_no.astype(np.int64)
    return (unit << SEQ_BITS) | int(seq_no)


def split_seq_index(index: int) -> tuple[int, int, int]:
    """(file_index, chunk, seq_no) of a global sequence index."""
    index = int(index)
    return index >> (CHUNK_BITS + SEQ_BITS), (index >> SEQ_BITS) & (MAX_CHUNKS - 1), index & (MAX_SEQS - 1)


def chunk_documents(texts: Iterable[str], unit_chars: int) -> Iterator[list[str]]:
    """Group consecutive documents into packing units: a unit closes once it holds ≥ unit_chars characters.

    Every document lands in exactly one unit, in order; the split depends only on the texts.
    """
    if unit_chars <= 0:
        raise ValueError(f"unit_chars must be > 0, got {unit_chars}")
    unit: list[str] = []
    size = 0
    for text in texts:
        unit.append(text)
        size += len(text)
        if size >= unit_chars:
            yield unit
            unit, size = [], 0
    if unit:
        yield unit


def concat_with_eos(docs: Sequence[Sequence[int] | np.ndarray], eos_id: int) -> np.ndarray:
    """One int32 stream: doc_0, EOS, doc_1, EOS, … (every document, even an empty one, gets its EOS)."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    out = np.full(int(lengths.sum()) + len(docs), eos_id, dtype=np.int32)
    start = 0
    for doc, n in zip(docs, lengths, strict=True):
        out[start:start + n] = doc
        start += int(n) + 1
    return out


@dataclass
class PackedUnit:
    sequences: np.ndarray  # (n, seq_len) int32
    seq_no: np.ndarray  # (n,) int64: 0 … n−1
    tokens: int  # tokens entering the packer (documents' tokens + one EOS per document)
    remainder: int  # tokens left at the end of the unit (< seq_len), dropped and counted
    documents: int

    @property
    def packed_tokens(self) -> int:
        return int(self.sequences.size)


def pack_stream(stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, int]:
    """Cut a token stream into (n, seq_len) rows in order; return (rows, leftover token count)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    stream = np.asarray(stream)
    n = stream.shape[0] // seq_len
    return stream[: n * seq_len].reshape(n, seq_len).astype(np.int32, copy=False), int(stream.shape[0] - n * seq_len)


def pack_documents(docs: Sequence[Sequence[int] | np.ndarray], *, seq_len: int, eos_id: int) -> PackedUnit:
    """Pack the documents of one unit: concatenate with EOS after each, cut into seq_len rows."""
    stream = concat_with_eos(docs, eos_id)
    rows, remainder = pack_stream(stream, seq_len)
    return PackedUnit(rows, np.arange(rows.shape[0], dtype=np.int64), int(stream.shape[0]), remainder, len(docs))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 that scatters neighbouring inputs."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x & _M64


def shuffle_keys(indices: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Seeded sort keys (int64) for global sequence indices: sorting by them shuffles the sequences.

    For fixed (seed, epoch) the map index → key is a bijection, so keys never tie and the shuffled
    order is a pure function of the set of indices — whatever the block layout that produced them.
    """
    salt = _mix64(np.array([(seed & 0xFFFFFFFF) << 32 | (epoch & 0xFFFFFFFF)], dtype=np.uint64))[0]
    keys = _mix64(np.asarray(indices, dtype=np.int64).astype(np.uint64) ^ salt)
    return keys.view(np.int64)
