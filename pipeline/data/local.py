"""The data pipeline's per-file and per-unit work, and its plain single-process form (no Ray import).

In:  a `DataConfig` + `NoiseConfig`, a resolved tokenizer folder (pipeline/sources/model_source.py: a fast
     tokenizer with `[M]`) and the `[M]` id; a split and an epoch.
Out: * `iter_examples_local` — examples in the batch format of docs/method.md §3 (pipeline/data/noise.py
       columns, fixed length T) plus `seq_index` (int64 global sequence index, pipeline/data/packing.py),
       one dict of 1-D arrays per example, in the dataset's order (seq_index order, or the seeded
       shuffle order when `data.shuffle`). pipeline/data/ray_pipeline.py runs the same functions as Ray stages,
       so both give identical rows; the local loop is the reference for tests and the benchmark.
     * `Counters` / `summarize` / `format_summary` — documents read / kept / skipped per reason
       (read = kept + skipped), tokens (= packed + dropped remainder), sequences, spans, targets.

Work per file: read it (fsspec, bad records skipped and counted by pipeline/sources/corpus.py), cut its
documents into packing units (`chunk_documents`). Per unit: tokenize (one batch-API call for many
units), pack with EOS after each document, noise each sequence with `rng_for(seed, epoch, seq_index)`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.batch import CLEAN, DTYPES, IGNORE, PAD, columns_for
from pipeline.config import DataConfig, NoiseConfig
from pipeline.data.noise import (
    make_bidirectional_example,
    make_two_stream_example,
    rng_for,
)
from pipeline.data.packing import chunk_documents, pack_stream, seq_index, shuffle_keys, unit_id
from pipeline.errors import FluidError
from pipeline.sources.corpus import SPLITS, RecordStats, SourceFile, iter_documents, list_sources

UNIT_CHARS = 1 << 20  # characters of text per packing unit (~250 k tokens): remainder loss ≪ 1 %
KEY = "_shuffle_key"  # temporary sort column of the seeded shuffle
PROCESS_LOCAL_PROTOCOLS = ("memory",)  # fsspec file systems that live inside one process


@dataclass(frozen=True)
class Params:
    """Everything the per-unit work needs (picklable: shipped to the Ray tasks)."""

    seq_len: int
    mode: str
    k_max: int
    draft_tokens: int
    spans: int | None
    rho: float
    span_distribution: str
    bidir_eps: float
    mask_id: int
    pad_id: int
    eos_id: int
    seed: int
    epoch: int
    shuffle: bool

    @property
    def length(self) -> int:
        """T, the fixed example length: L (bidirectional) or L + draft tokens."""
        return self.seq_len if self.mode == "bidirectional" else self.seq_len + self.draft_tokens

    @property
    def columns(self) -> tuple[str, ...]:
        return columns_for(self.mode)


def make_params(data_cfg: DataConfig, noise_cfg: NoiseConfig, *, tokenizer_path, mask_token_id: int,
                epoch: int = 0) -> Params:
    """Validated parameters; draft budget: spans·(k_max−1) if noise.spans is set, else draft_ratio·L."""
    if data_cfg.seq_len < 2:
        raise FluidError(f"data.seq_len must be ≥ 2, got {data_cfg.seq_len}")
    if epoch < 0 or data_cfg.seed < 0:
        raise FluidError(f"epoch and data.seed must be ≥ 0, got {epoch} and {data_cfg.seed}")
    if noise_cfg.draft_ratio < 0:
        raise FluidError(f"noise.draft_ratio must be ≥ 0, got {noise_cfg.draft_ratio}")
    if noise_cfg.k_max <= 1:
        draft = 0
    elif noise_cfg.spans is not None:
        draft = noise_cfg.spans * (noise_cfg.k_max - 1)
    else:
        draft = int(round(noise_cfg.draft_ratio * data_cfg.seq_len))
    eos_id, pad_id = special_ids(tokenizer_path)
    p = Params(seq_len=data_cfg.seq_len, mode=noise_cfg.mode, k_max=noise_cfg.k_max, draft_tokens=draft,
               spans=noise_cfg.spans, rho=noise_cfg.rho, span_distribution=noise_cfg.span_distribution,
               bidir_eps=noise_cfg.bidir_eps, mask_id=int(mask_token_id), pad_id=pad_id, eos_id=eos_id,
               seed=data_cfg.seed, epoch=epoch, shuffle=data_cfg.shuffle)
    try:  # bad noise settings fail here, in one line, not later inside a Ray task
        pack_and_noise(0, np.full(p.seq_len, eos_id, dtype=np.int32), 1, p)
    except ValueError as e:
        raise FluidError(f"invalid noise settings: {e}") from None
    return p


def load_fast_tokenizer(path):
    """The Rust tokenizer of a resolved folder (`tokenizer.json`, `[M]` included); no transformers import."""
    from tokenizers import Tokenizer

    file = Path(path) / "tokenizer.json"
    if not file.is_file():
        raise FluidError(f"tokenizer folder {path} has no tokenizer.json (a fast tokenizer is required)")
    return Tokenizer.from_file(str(file))


def special_ids(path) -> tuple[int, int]:
    """(eos_id, pad_id) from tokenizer_config.json; pad falls back to EOS."""
    tok = load_fast_tokenizer(path)
    try:
        conf = json.loads((Path(path) / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        conf = {}

    def token_id(name: str) -> int | None:
        value = conf.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        return tok.token_to_id(value) if isinstance(value, str) else None

    eos = token_id("eos_token")
    if eos is None:
        raise FluidError(f"tokenizer {path} defines no eos_token; packing needs one to separate documents")
    pad = token_id("pad_token")
    return int(eos), int(eos if pad is None else pad)


def tokenize_units(tokenizer, units: list[list[str]], eos_id: int) -> list[tuple[np.ndarray, int]]:
    """One batch-API call for all documents of all units → per unit (token stream with EOS after each
    document, number of documents)."""
    flat = [t for texts in units for t in texts]
    encoded = tokenizer.encode_batch_fast(flat, add_special_tokens=False) if flat else []
    out, i = [], 0
    for texts in units:
        ids = [e.ids for e in encoded[i:i + len(texts)]]
        i += len(texts)
        ends = np.cumsum([len(x) + 1 for x in ids]) - 1
        stream = np.full(int(ends[-1]) + 1 if len(ids) else 0, eos_id, dtype=np.int32)
        for doc, end in zip(ids, ends, strict=True):
            stream[end - len(doc):end] = doc
        out.append((stream, len(texts)))
    return out


def file_units(item: dict, *, split, data_cfg: DataConfig, unit_chars: int,
               stats: RecordStats) -> Iterator[tuple[int, list[str]]]:
    """(unit id, texts) of one planned file; bad records are counted in `stats`."""
    src = SourceFile(item["url"], item["fmt"], item["split"] or None)
    path = src.url.split("://", 1)[-1]
    shipped = item.get("payload") is not None
    if shipped:  # a process-local file (memory://) travels as bytes: recreate it in this process
        import fsspec

        fsspec.filesystem("memory").pipe(path, item["payload"])
    try:
        docs = iter_documents([src], split=split, text_field=data_cfg.text_field, text_column=data_cfg.text_column,
                              max_doc_chars=data_cfg.max_doc_chars, val_fraction=data_cfg.val_fraction,
                              test_fraction=data_cfg.test_fraction, split_seed=data_cfg.split_seed, stats=stats)
        for chunk, texts in enumerate(chunk_documents((d.text for d in docs), unit_chars)):
            yield unit_id(item["file_index"], chunk), texts
    finally:
        if shipped:
            import fsspec

            fsspec.filesystem("memory").rm(path)


def pack_and_noise(unit: int, stream: np.ndarray, documents: int, p: Params) -> tuple[dict, dict]:
    """Pack one unit's stream into seq_len rows and noise each → (column arrays (n, T), counters)."""
    rows, remainder = pack_stream(stream, p.seq_len)
    n = rows.shape[0]
    index = seq_index(unit, np.arange(n, dtype=np.int64))
    cols = {c: np.empty((n, p.length), dtype=DTYPES[c]) for c in p.columns}
    for r in range(n):
        rng = rng_for(p.seed, p.epoch, int(index[r]))
        if p.mode == "bidirectional":
            ex = make_bidirectional_example(rows[r], rng, mask_id=p.mask_id, pad_id=p.pad_id, eps=p.bidir_eps)
        else:
            ex = make_two_stream_example(rows[r], rng, mask_id=p.mask_id, pad_id=p.pad_id, eos_id=p.eos_id,
                                         k_max=p.k_max, draft_tokens=p.draft_tokens, spans=p.spans, rho=p.rho,
                                         span_distribution=p.span_distribution)
        for c in p.columns:
            cols[c][r] = ex[c]
    cols["seq_index"] = index
    if p.shuffle:
        cols[KEY] = shuffle_keys(index, p.seed, p.epoch)
    counts = {"units": 1, "documents": documents, "tokens": int(stream.shape[0]), "sequences": n,
              "packed_tokens": int(rows.size), "remainder_tokens": remainder, **example_counts(cols, p.seq_len)}
    return cols, counts


def example_counts(cols: dict, seq_len: int) -> dict:
    """Totals of `noise.stats` over a batch of examples (n, T), vectorized."""
    span, labels, k, inp = cols["span_id"], cols["labels"], cols["k"], cols["input_ids"]
    has, draft = labels != IGNORE, span >= 0
    clean_at = np.take_along_axis(inp[:, :seq_len], np.clip(cols["position_ids"], 0, seq_len - 1), axis=1)
    return {
        "example_tokens": int(span.size),
        "clean_targets": int((has & (span == CLEAN) & (k == 1)).sum()),
        "draft_targets": int((has & draft & (k >= 2)).sum()),
        "spans": int(np.clip(span.max(axis=1, initial=-1) + 1, 0, None).sum()),
        "restored": int((draft & (inp == clean_at)).sum()),
        "padding": int((span == PAD).sum()),
        "masked": int((has & (k == 0)).sum()),
    }


# --- counters and the summary -----------------------------------------------------------------------


class Counters:
    """Per-file read counters and per-unit pack/noise counters; re-reporting a key overwrites it
    (a retried Ray task never counts twice). Also the body of pipeline/data/ray_pipeline.py's counting actor."""

    def __init__(self) -> None:
        self.files: dict[int, dict] = {}
        self.units: dict[int, dict] = {}

    def report(self, kind: str, key: int, values: dict) -> None:
        getattr(self, kind)[int(key)] = values

    def snapshot(self) -> dict:
        return {"files": self.files, "units": self.units}


UNIT_KEYS = ("units", "documents", "tokens", "sequences", "packed_tokens", "remainder_tokens", "example_tokens",
             "clean_targets", "draft_targets", "spans", "restored", "padding", "masked")


def summarize(snapshots: list[dict], seconds: float | None = None) -> dict:
    """The run summary from counter snapshots (see `format_summary`)."""
    records, skipped, units = RecordStats(), Counter(), Counter()
    for snap in snapshots:
        for f in snap["files"].values():
            records.read, records.kept = records.read + f["read"], records.kept + f["kept"]
            skipped.update(f["skipped"])
            records.split_pieces += f["split_pieces"]
            records.unreadable_files += f["unreadable_files"]
        for u in snap["units"].values():
            units.update(u)
    out = {"files": sum(len(s["files"]) for s in snapshots),
           "documents": {"read": records.read, "kept": records.kept, "skipped": dict(sorted(skipped.items())),
                         "skipped_total": sum(skipped.values()), "split_pieces": records.split_pieces,
                         "unreadable_files": records.unreadable_files}}
    out.update({("packed_documents" if k == "documents" else k): int(units.get(k, 0)) for k in UNIT_KEYS})
    ex = max(out["example_tokens"], 1)
    out["draft_targets_per_token"] = out["draft_targets"] / ex
    out["supervised_targets_per_token"] = (out["clean_targets"] + out["draft_targets"] + out["masked"]) / ex
    out["restoration_rate"] = out["restored"] / max(out["draft_targets"], 1)
    if seconds is not None:
        out["seconds"] = round(seconds, 3)
        out["tokens_per_s"] = out["tokens"] / seconds if seconds > 0 else 0.0
    return out


def format_summary(s: dict) -> str:
    d = s["documents"]
    skipped = ", ".join(f"{k} {v}" for k, v in d["skipped"].items()) or "none"
    rows = [
        ("files", f"{s['files']}  (packing units {s['units']})"),
        ("documents", f"read {d['read']} = kept {d['kept']} + skipped {d['skipped_total']} ({skipped}); "
                      f"+{d['split_pieces']} pieces of long documents; {d['unreadable_files']} unreadable files"),
        ("tokens", f"{s['tokens']:,} (incl. {s['packed_documents']:,} EOS) = packed {s['packed_tokens']:,} + "
                   f"dropped remainder {s['remainder_tokens']:,}"),
        ("sequences", f"{s['sequences']:,} examples, {s['example_tokens']:,} example tokens"),
        ("targets", f"clean {s['clean_targets']:,}, draft {s['draft_targets']:,} in {s['spans']:,} spans, "
                    f"masked {s['masked']:,}; padding {s['padding']:,}"),
        ("per token", f"draft targets {s['draft_targets_per_token']:.3f}, supervised targets "
                      f"{s['supervised_targets_per_token']:.3f}; restoration rate {s['restoration_rate']:.3f}"),
    ]
    if "seconds" in s:
        rows.append(("throughput", f"{s['tokens_per_s']:,.0f} tokens/s ({s['seconds']:.1f} s)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# --- planning and the single-process loop -----------------------------------------------------------


def plan_sources(data_cfg: DataConfig, split: str | None, *, cache_dir=None, ship_local: bool = False) -> list[dict]:
    """The files to read (driver side) with their global file index; `.txt` files of other splits are
    left out. `ship_local`: carry the bytes of process-local (memory://) files to other processes."""
    if split is not None and split not in SPLITS:
        raise FluidError(f"unknown split {split!r} (use one of {', '.join(SPLITS)})")
    sources = list_sources(data_cfg.corpus, cache_dir=cache_dir, val_fraction=data_cfg.val_fraction,
                           test_fraction=data_cfg.test_fraction, split_seed=data_cfg.split_seed)
    items = []
    for i, src in enumerate(sources):
        if split is not None and src.split is not None and src.split != split:
            continue
        item = {"file_index": i, "url": src.url, "fmt": src.fmt, "split": src.split or "", "payload": None}
        if ship_local and src.url.split("://", 1)[0] in PROCESS_LOCAL_PROTOCOLS:
            import fsspec

            try:
                item["payload"] = fsspec.filesystem("memory").cat_file(src.url.split("://", 1)[-1])
            except OSError:
                pass  # the worker will not find it either: counted as unreadable
        items.append(item)
    if not items:
        raise FluidError(f"corpus {data_cfg.corpus} has no documents in the {split!r} split "
                         "(small corpora: use split 'train' or lower the held-out fractions)")
    return items


def iter_examples_local(data_cfg: DataConfig, noise_cfg: NoiseConfig, *, tokenizer_path, mask_token_id: int,
                        split: str | None = "train", epoch: int = 0, counters: Counters | None = None,
                        cache_dir=None, unit_chars: int = UNIT_CHARS,
                        tokenize_batch_chars: int = 4 * UNIT_CHARS) -> Iterator[dict[str, np.ndarray]]:
    """The rows of `pipeline.data.ray_pipeline.build_dataset`, in the same order, from one plain process. Units are
    tokenized in batches of ~`tokenize_batch_chars` characters (one batch-API call each)."""
    params = make_params(data_cfg, noise_cfg, tokenizer_path=tokenizer_path, mask_token_id=mask_token_id,
                         epoch=epoch)
    items = plan_sources(data_cfg, split, cache_dir=cache_dir)
    tokenizer = load_fast_tokenizer(tokenizer_path)
    counters = counters if counters is not None else Counters()

    def batches() -> Iterator[list[tuple[int, list[str]]]]:
        batch, size = [], 0
        for item in items:
            rs = RecordStats()
            for uid, texts in file_units(item, split=split, data_cfg=data_cfg, unit_chars=unit_chars, stats=rs):
                batch.append((uid, texts))
                size += sum(map(len, texts))
                if size >= tokenize_batch_chars:
                    yield batch
                    batch, size = [], 0
            counters.report("files", item["file_index"], rs.as_dict())
        if batch:
            yield batch

    def examples() -> Iterator[dict[str, np.ndarray]]:
        for batch in batches():
            streams = tokenize_units(tokenizer, [texts for _, texts in batch], params.eos_id)
            for (uid, _), (stream, docs) in zip(batch, streams, strict=True):
                cols, counts = pack_and_noise(uid, stream, docs, params)
                counters.report("units", uid, counts)
                for r in range(counts["sequences"]):
                    yield {c: v[r] for c, v in cols.items()}

    if not params.shuffle:
        yield from examples()
        return
    for row in sorted(examples(), key=lambda row: int(row[KEY])):  # the seeded shuffle: sort by key
        del row[KEY]
        yield row
