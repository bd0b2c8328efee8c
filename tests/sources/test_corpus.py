import gzip
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import FluidError
from pipeline.sources.corpus import (
    RecordStats,
    assign_ranked_splits,
    iter_documents,
    list_sources,
    split_long,
    split_of,
    strip_gutenberg,
)


def _read(specs, **kw):
    stats = RecordStats()
    docs = list(iter_documents(list_sources(specs, val_fraction=0, test_fraction=0), stats=stats, **kw))
    assert stats.read == stats.kept + sum(stats.skipped.values())
    return docs, stats


def test_txt_files_with_bad_records(tmp_path):
    (tmp_path / "good.txt").write_text("To be, or not to be.\n")
    (tmp_path / "empty.txt").write_text("   \n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(b"\x89PNG\x00\x00\x01")
    (tmp_path / "gut.txt").write_text("licence\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\nBody text.\n"
                                      "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nmore licence")
    docs, stats = _read([str(tmp_path / "*.txt")])
    assert sorted(d.text.strip() for d in docs) == ["Body text.", "To be, or not to be."]
    assert stats.read == 5 and stats.kept == 2
    assert dict(stats.skipped) == {"empty": 1, "invalid_utf8": 1, "binary": 1}


def test_jsonl_with_bad_records_and_custom_field(tmp_path):
    lines = [json.dumps({"body": "first"}), "", "{not json", json.dumps({"other": 1}), json.dumps({"body": 3}),
             json.dumps({"body": "  "}), json.dumps(["list"]), json.dumps({"body": "second"})]
    raw = ("\n".join(lines) + "\n").encode() + b'{"body": "bad \xff byte"}\n'
    (tmp_path / "d.jsonl").write_bytes(raw)
    docs, stats = _read([str(tmp_path / "d.jsonl")], text_field="body")
    assert [d.text for d in docs] == ["first", "second"]
    assert dict(stats.skipped) == {"bad_json": 1, "missing_field": 3, "empty": 1, "invalid_utf8": 1}
    assert stats.read == 8  # the blank line is not a record


def test_gzip_jsonl_and_parquet(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"text": "zipped"}) + "\n")
    pq.write_table(pa.table({"content": ["row one", None, "", "row two"]}), tmp_path / "b.parquet")
    docs, stats = _read([str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.parquet")], text_column="content")
    assert [d.text for d in docs] == ["zipped", "row one", "row two"]
    assert stats.read == 5 and dict(stats.skipped) == {"empty": 2}


def test_parquet_without_the_column_is_counted_unreadable(tmp_path):
    pq.write_table(pa.table({"x": ["a"]}), tmp_path / "b.parquet")
    docs, stats = _read([str(tmp_path / "b.parquet")])
    assert docs == [] and stats.unreadable_files == 1 and stats.skipped["unreadable"] == 1


def test_memory_url_and_directory(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe(f"/corp-{tmp_path.name}/x.txt", b"in memory")
    fs.pipe(f"/corp-{tmp_path.name}/sub/y.jsonl", b'{"text": "nested"}\n')
    fs.pipe(f"/corp-{tmp_path.name}/ignored.bin", b"\x00")
    docs, _ = _read([f"memory://corp-{tmp_path.name}"])
    assert sorted(d.text for d in docs) == ["in memory", "nested"]
    assert all(d.doc_id.startswith("memory://") for d in docs)


def test_enormous_line_is_split_and_counted(tmp_path):
    (tmp_path / "big.txt").write_text(" ".join(["word"] * 5000))  # one 25 k-character line
    docs, stats = _read([str(tmp_path / "big.txt")], max_doc_chars=1000)
    assert len(docs) == stats.split_pieces + 1 >= 25
    assert all(len(d.text) <= 1000 for d in docs)
    assert "".join(d.text for d in docs) == " ".join(["word"] * 5000)  # nothing lost


def test_split_long_prefers_newlines():
    text = "a" * 60 + "\n" + "b" * 60
    assert split_long(text, 100) == ["a" * 60 + "\n", "b" * 60]
    assert split_long("short", 100) == ["short"]


def test_errors_for_missing_and_empty_sources(tmp_path):
    with pytest.raises(FluidError, match="corpus path not found"):
        list_sources([str(tmp_path / "nope.txt")])
    with pytest.raises(FluidError, match="matched no files"):
        list_sources([str(tmp_path / "*.jsonl")])
    with pytest.raises(FluidError, match="no corpus given"):
        list_sources([])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(FluidError, match="unsupported extension"):
        list_sources([str(tmp_path / "x.csv")])
    with pytest.raises(FluidError, match="must be in"):
        list_sources([str(tmp_path / "x.csv")], val_fraction=0.6, test_fraction=0.5)


def test_splits_are_deterministic_and_disjoint(tmp_path):
    for i in range(20):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}")
    a = list_sources([str(tmp_path)], val_fraction=0.1, test_fraction=0.1)
    b = list_sources([str(tmp_path)], val_fraction=0.1, test_fraction=0.1)
    assert a == b
    counts = {s: sum(f.split == s for f in a) for s in ("train", "validation", "test")}
    assert counts == {"train": 16, "validation": 2, "test": 2}
    per_split = {s: {d.doc_id for d in iter_documents(a, split=s)} for s in ("train", "validation", "test")}
    assert sum(len(v) for v in per_split.values()) == 20
    assert not (per_split["train"] & per_split["test"]) and not (per_split["validation"] & per_split["test"])
    # a different seed moves documents between splits
    assert assign_ranked_splits([f.url for f in a], 0.1, 0.1, seed=1) != {f.url: f.split for f in a}


def test_record_split_fractions():
    splits = [split_of(f"rec{i}", 0.1, 0.2) for i in range(5000)]
    assert abs(splits.count("test") / 5000 - 0.2) < 0.03 and abs(splits.count("validation") / 5000 - 0.1) < 0.03


def test_strip_gutenberg_leaves_plain_text_alone():
    assert strip_gutenberg("plain text") == "plain text"


@pytest.mark.integration
def test_default_corpus_has_three_splits():
    sources = list_sources(["default"])
    assert len(sources) == 49
    by_split = {s: [f for f in sources if f.split == s] for s in ("train", "validation", "test")}
    assert len(by_split["validation"]) >= 1 and len(by_split["test"]) >= 1
    doc = next(iter_documents(by_split["test"][:1]))
    assert "Gutenberg" not in doc.text[:2000] and len(doc.text) > 10_000


def test_a_listed_file_missing_where_it_is_read_is_an_error_not_a_skip(tmp_path):
    (tmp_path / "a.txt").write_text("To be, or not to be.\n")
    (tmp_path / "b.txt").write_text("That is the question.\n")
    sources = list_sources([str(tmp_path)], val_fraction=0, test_fraction=0)
    (tmp_path / "b.txt").unlink()  # as on a worker node that cannot see the driver's files
    with pytest.raises(FluidError, match=r"b\.txt was listed but is missing on node .*visible from every node"):
        list(iter_documents(sources, stats=RecordStats()))
