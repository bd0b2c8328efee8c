"""Tests of the Ray Data pipeline (pipeline/data/ray_pipeline.py) and `fluid preprocess` on tiny corpora.

One Ray instance per session (`ray_local`), a tiny word-level tokenizer, corpora of .txt / .jsonl /
.parquet files in tmp_path plus a memory:// file. Checked: no token lost in packing, the batch-format
layout on the pipeline's output, the same examples for any block/actor layout and for the local loop,
seeded shuffle, restoration rate, bad records counted per reason, Parquet round trip, exact resume
by skipping batches, and the preprocess CLI with its one-line errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.batch import COLUMNS
from pipeline.config import DataConfig, NoiseConfig
from pipeline.data import ray_pipeline as data
from pipeline.data.packing import split_seq_index
from pipeline.errors import FluidError
from pipeline.sources.corpus import iter_documents, list_sources
from tests.conftest import WORDS, make_tiny_llama, make_tiny_tokenizer

L = 24  # seq_len of these tests
COLS = COLUMNS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(resolved folder, mask id, eos id) of a tiny word-level model prepared by resolve_model."""
    from pipeline.sources.model_source import resolve_model

    root = tmp_path_factory.mktemp("tiny")
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(root / "model", safe_serialization=True)
    tok.save_pretrained(root / "model")
    resolved = resolve_model(str(root / "model"), cache_dir=root / "cache")
    return resolved.path, resolved.mask_token_id, tok.eos_token_id


@pytest.fixture(scope="module")
def ray_quiet(ray_local):
    ctx = ray_local.data.DataContext.get_current()
    old, ctx.enable_progress_bars = ctx.enable_progress_bars, False
    yield ray_local
    ctx.enable_progress_bars = old


def words(rng, n) -> str:
    return " ".join(rng.choice(WORDS, size=n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """6 .txt documents, a .jsonl of 20 records, a .parquet of 10 rows and a memory:// .jsonl."""
    import fsspec

    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (root / f"doc{i}.txt").write_text(words(rng, int(rng.integers(150, 400))))
    (root / "records.jsonl").write_text("\n".join(json.dumps({"text": words(rng, 60)}) for _ in range(20)))
    pq.write_table(pa.table({"text": [words(rng, 80) for _ in range(10)]}), root / "rows.parquet")
    mem = f"memory://fluid-test-{uuid.uuid4().hex}/mem.jsonl"
    with fsspec.open(mem, "w") as fh:
        fh.write("\n".join(json.dumps({"text": words(rng, 50)}) for _ in range(8)))
    yield [str(root), mem]
    fsspec.filesystem("memory").rm(mem.split("://")[1].split("/")[0], recursive=True)


def cfg(corpus, **kw) -> DataConfig:
    base = dict(corpus=list(corpus), seq_len=L, shuffle=False, val_fraction=0.0, test_fraction=0.0)
    return DataConfig(**{**base, **kw})


def collect(batches) -> dict[str, np.ndarray]:
    parts = list(batches)
    return {c: np.concatenate([np.asarray(p[c]) for p in parts]) for c in parts[0]}


def run_ray(tiny, dc, nc=None, **kw):
    stats = data.PipelineStats()
    ds = data.build_dataset(dc, nc or NoiseConfig(k_max=6), tokenizer_path=tiny[0], mask_token_id=tiny[1],
                            stats=stats, **kw)
    return collect(ds.iter_batches(batch_size=64, batch_format="numpy")), stats.summary()


def run_local(tiny, dc, nc=None, **kw):
    stats = data.PipelineStats()
    rows = list(data.iter_examples_local(dc, nc or NoiseConfig(k_max=6), tokenizer_path=tiny[0],
                                         mask_token_id=tiny[1], stats=stats, **kw))
    return {c: np.stack([r[c] for r in rows]) for c in rows[0]}, stats.summary()


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for c in a:
        np.testing.assert_array_equal(a[c], b[c], err_msg=c)


def check_layout(out: dict, mask_id: int, eos_id: int, length: int) -> None:
    """Batch-format invariants (docs/method.md §3) of every example: clean next-token labels, draft labels
    = the clean token after the draft's position, k = distance from the cursor, no draft past its document."""
    assert out["input_ids"].shape[1] == length and out["seq_index"].dtype == np.int64
    for c in COLS:
        assert out[c].dtype == (np.int8 if c == "k" else np.int32)
    for r in range(out["input_ids"].shape[0]):
        inp, pos, span, anchor, lab, k = (out[c][r] for c in COLS)
        clean = inp[:L]
        np.testing.assert_array_equal(span[:L], -1)
        np.testing.assert_array_equal(pos[:L], np.arange(L))
        np.testing.assert_array_equal(anchor[:L], np.arange(L))
        np.testing.assert_array_equal(lab[: L - 1], clean[1:])
        assert lab[L - 1] == -100 and k[L - 1] == 0 and (k[: L - 1] == 1).all()
        d = np.flatnonzero(span >= 0)
        np.testing.assert_array_equal(lab[d], clean[pos[d] + 1])
        np.testing.assert_array_equal(k[d], pos[d] - anchor[d] + 1)
        assert np.isin(inp[d], [mask_id]).sum() + (inp[d] == clean[pos[d]]).sum() == d.size
        doc = np.concatenate([[0], np.cumsum(clean[:-1] == eos_id)])
        assert (doc[pos[d] + 1] == doc[anchor[d]]).all(), "a draft target crosses a document end"
        assert (span[L:][span[L:] < 0] == -2).all() and (lab[span == -2] == -100).all()


@pytest.mark.ray
def test_pipeline_output_layout_lossless_and_equal_to_local(ray_quiet, tiny, corpus):
    dc = cfg(corpus)
    out, summary = run_ray(tiny, dc, override_num_blocks=1)
    local, local_summary = run_local(tiny, dc)
    assert_same(out, local)
    assert summary == local_summary
    assert (np.diff(out["seq_index"]) > 0).all(), "unshuffled rows come in seq_index order"
    check_layout(out, tiny[1], tiny[2], 2 * L)

    # packing lost no token: documents' tokens + EOS = packed + counted remainder, and the clean
    # streams are the HF tokenizer's ids of each file's documents (independent tokenization)
    assert summary["tokens"] == summary["packed_tokens"] + summary["remainder_tokens"]
    assert summary["packed_tokens"] == out["input_ids"].shape[0] * L == summary["sequences"] * L
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny[0]))
    file_of = np.array([split_seq_index(i)[0] for i in out["seq_index"]])
    total = 0
    for f, src in enumerate(list_sources(dc.corpus, val_fraction=0, test_fraction=0)):
        docs = [d.text for d in iter_documents([src], split="train", val_fraction=0, test_fraction=0)]
        stream = [t for text in docs for t in tok(text, add_special_tokens=False).input_ids + [tiny[2]]]
        rows = out["input_ids"][file_of == f, :L]
        assert rows.shape[0] == len(stream) // L
        np.testing.assert_array_equal(rows.ravel(), stream[: rows.size])
        total += len(stream)
    assert total == summary["tokens"] and summary["files"] == 9
    d = summary["documents"]
    assert d["read"] == d["kept"] == 6 + 20 + 10 + 8 and d["skipped_total"] == 0

    # restoration noise: ~rho of the draft inputs hold the true token
    assert summary["draft_targets"] > 2500 and summary["draft_targets_per_token"] > 0.45
    assert abs(summary["restoration_rate"] - 0.1) < 0.03
    draft = out["span_id"] >= 0
    assert summary["restored"] == int((out["input_ids"][draft] != tiny[1]).sum())


@pytest.mark.ray
def test_same_examples_for_any_layout_and_seeded_shuffle(ray_quiet, tiny, corpus):
    plain, _ = run_ray(tiny, cfg(corpus), override_num_blocks=4)
    a, sa = run_ray(tiny, cfg(corpus, shuffle=True, seed=5, tokenizer_actors=2), override_num_blocks=4)
    b, sb = run_ray(tiny, cfg(corpus, shuffle=True, seed=5, tokenizer_actors=1), override_num_blocks=1)
    assert_same(a, b)  # same order and examples with 4 blocks / 2 actors and 1 block / 1 actor
    assert sa == sb
    assert not (np.diff(a["seq_index"]) > 0).all(), "shuffled"
    order = np.argsort(a["seq_index"])
    np.testing.assert_array_equal(a["seq_index"][order], plain["seq_index"])
    np.testing.assert_array_equal(a["input_ids"][order][:, :L], plain["input_ids"][:, :L])  # same packing
    local, _ = run_local(tiny, cfg(corpus, shuffle=True, seed=5))
    assert_same(a, local)
    # the noise depends on (seed, epoch, seq_index) only
    e1, _ = run_local(tiny, cfg(corpus, shuffle=True, seed=5), epoch=1)
    assert not np.array_equal(e1["seq_index"], a["seq_index"])
    j = np.argsort(e1["seq_index"])
    np.testing.assert_array_equal(e1["input_ids"][j][:, :L], a["input_ids"][order][:, :L])
    assert not np.array_equal(e1["input_ids"][j], a["input_ids"][order])


@pytest.mark.ray
def test_bad_records_are_counted_per_reason(ray_quiet, tiny, tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "good1.txt").write_text(words(rng, 100))
    (tmp_path / "good2.txt").write_text(words(rng, 100))
    (tmp_path / "bad_utf8.txt").write_bytes(b"the quick \xff\xfe brown")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    (tmp_path / "binary.txt").write_bytes(b"the\x00quick\x01")
    (tmp_path / "huge.txt").write_text(words(rng, 2000))  # one enormous line → split into pieces
    (tmp_path / "garbage.parquet").write_bytes(b"not a parquet file")
    lines = [json.dumps({"text": words(rng, 30)}) for _ in range(3)]
    lines += ["", "   ", "{bad json", json.dumps({"other": "x"}), json.dumps({"text": ""}), json.dumps({"text": 5})]
    (tmp_path / "records.jsonl").write_bytes("\n".join(lines).encode() + b"\n\xff\xfe{}\n")
    pq.write_table(pa.table({"text": [words(rng, 20), None, ""]}), tmp_path / "rows.parquet")

    dc = cfg([str(tmp_path)], max_doc_chars=2000)
    stats = data.PipelineStats()
    ds = data.build_dataset(dc, NoiseConfig(k_max=6), tokenizer_path=tiny[0], mask_token_id=tiny[1], stats=stats)
    n = sum(len(b["seq_index"]) for b in ds.iter_batches(batch_format="numpy"))
    s = stats.summary()
    d = s["documents"]
    assert d["skipped"] == {"bad_json": 1, "binary": 1, "empty": 5, "invalid_utf8": 2, "missing_field": 2,
                            "unreadable": 1}
    assert d["kept"] == 2 + 1 + 3 + 1 and d["read"] == d["kept"] + d["skipped_total"] == 19
    assert d["unreadable_files"] == 1 and d["split_pieces"] >= 4
    assert s["packed_documents"] == d["kept"] + d["split_pieces"]
    assert s["tokens"] == s["packed_tokens"] + s["remainder_tokens"] and n == s["sequences"] > 0


@pytest.mark.ray
def test_parquet_round_trip_and_exact_resume(ray_quiet, tiny, corpus, tmp_path):
    dc = cfg(corpus, shuffle=True)
    ds = data.build_dataset(dc, NoiseConfig(k_max=6), tokenizer_path=tiny[0], mask_token_id=tiny[1]).materialize()
    want = collect(ds.iter_batches(batch_size=64, batch_format="numpy"))
    mem = f"memory://fluid-test-{uuid.uuid4().hex}/shards"
    for path in (str(tmp_path / "shards"), mem):
        data.write_parquet(ds, path)
        assert data.parquet_files(path)
        back = data.read_preprocessed(path)
        assert_same(collect(back.iter_batches(batch_size=64, batch_format="numpy")), want)
    full = list(data.iter_train_batches(back, 16))
    assert len(full) == want["seq_index"].shape[0] // 16  # drop_last
    assert all(b["input_ids"].shape == (16, 2 * L) for b in full)
    resumed = list(data.iter_train_batches(data.read_preprocessed(str(tmp_path / "shards")), 16, skip_batches=3))
    assert len(resumed) == len(full) - 3
    for x, y in zip(resumed, full[3:], strict=True):
        for c in x:
            assert (x[c] == y[c]).all()
    with pytest.raises(FluidError, match="no Parquet shards"):
        data.read_preprocessed(str(tmp_path / "nothing"))


@pytest.mark.ray
def test_training_shards_are_the_same_for_any_parallelism(ray_quiet, tiny, corpus, tmp_path):
    """Two (three) preprocessings through the write path of `fluid adapt` — 1 CPU for Ray Data and one
    tokenizer actor, then no CPU limit and 3 actors, then the first setting again — store the same rows in
    the same order and row groups, and the streaming reader hands each rank the same batches."""
    from types import SimpleNamespace

    from pipeline.config import load_config
    from pipeline.data.streaming import ShardReader, list_blocks, rows_digest
    from pipeline.train.shards import prepare_train_shards

    resolved = SimpleNamespace(path=tiny[0], mask_token_id=tiny[1], meta={"sha256": "tiny"})
    ctx = ray_quiet.data.DataContext.get_current()
    old_limits = ctx.execution_options.resource_limits
    digests, batches = [], []
    for name, actors, cpus in (("one-cpu", 1, 1), ("three-actors", 3, None), ("again", 1, 1)):
        cfg = load_config(None, [f"--data.corpus={corpus}", f"--data.seq_len={L}", "--noise.k_max=6",
                                 "--data.val_fraction=0", "--data.test_fraction=0",
                                 f"--data.tokenizer_actors={actors}"])
        ctx.execution_options.resource_limits = ray_quiet.data.ExecutionResources(cpu=cpus)
        try:
            path = prepare_train_shards(cfg, resolved, str(tmp_path / name))
        finally:
            ctx.execution_options.resource_limits = old_limits
        digests.append(rows_digest(path))
        blocks = list_blocks(path)
        batches.append([ShardReader(blocks, micro_global=4, rank=r, world=2, seed=3, window=16).micro_batch(i)
                        for r in (0, 1) for i in range(5)])
    assert digests[0]["rows"] > 64 and len(digests[0]["row_groups"]) >= 3  # several shards: a real test of order
    assert digests[1] == digests[0] and digests[2] == digests[0]
    for other in batches[1:]:
        for x, y in zip(other, batches[0], strict=True):
            assert_same(x, y)


@pytest.mark.ray
def test_write_shards_lays_out_the_same_from_tasks_and_from_the_driver(ray_quiet, tiny, corpus, tmp_path):
    """A local folder is written by the pipeline's tasks, memory:// (which they cannot see) unit by unit from
    this process: the same files, row groups and rows."""
    import fsspec

    from pipeline.data.streaming import rows_digest

    mem = f"memory://fluid-test-{uuid.uuid4().hex}/units"
    kw = dict(row_group_rows=16, tokenizer_path=tiny[0], mask_token_id=tiny[1])
    n_local = data.write_shards(cfg(corpus), NoiseConfig(k_max=6), str(tmp_path / "units"), **kw)
    n_mem = data.write_shards(cfg(corpus), NoiseConfig(k_max=6), mem, **kw)
    try:
        names = sorted(p.name for p in (tmp_path / "units").glob("*.parquet"))
        assert n_local == n_mem > 16 and len(names) > 1 and names[0].startswith("unit-")
        assert sorted(f.rsplit("/", 1)[-1] for f in fsspec.filesystem("memory").find(mem.split("://")[1])) == names
        assert rows_digest(mem) == rows_digest(str(tmp_path / "units"))
    finally:
        fsspec.filesystem("memory").rm(mem.split("://")[1], recursive=True)


def test_rows_digest_sees_order(tmp_path):
    from pipeline.data.streaming import rows_digest

    rows = {"input_ids": np.arange(12, dtype=np.int32).reshape(4, 3), "seq_index": np.arange(4, dtype=np.int64)}
    for name, order in (("a", [0, 1, 2, 3]), ("b", [1, 0, 2, 3])):
        (tmp_path / name).mkdir()
        pq.write_table(data.arrow_table({c: v[order] for c, v in rows.items()}), tmp_path / name / "x.parquet")
    a, b = rows_digest(str(tmp_path / "a")), rows_digest(str(tmp_path / "b"))
    assert a["rows"] == b["rows"] == 4 and a["row_groups"] == b["row_groups"] == [4]
    assert a["sha256"] != b["sha256"]


@pytest.mark.ray
def test_bidirectional_mode(ray_quiet, tiny, corpus):
    dc, nc = cfg(corpus[:1]), NoiseConfig(mode="bidirectional")
    out, summary = run_ray(tiny, dc, nc)
    local, _ = run_local(tiny, dc, nc)
    assert_same(out, local)
    assert out["weight"].shape == out["input_ids"].shape == (summary["sequences"], L)
    masked = out["input_ids"] == tiny[1]
    assert (out["weight"][masked] >= 1).all() and (out["weight"][~masked] == 0).all()
    assert summary["masked"] == int(masked.sum()) and summary["draft_targets"] == 0


def test_noise_settings_and_example_length(tiny, corpus):
    dc = cfg(corpus[:1])
    rows, summary = run_local(tiny, dc, NoiseConfig(k_max=5, spans=3))
    assert rows["input_ids"].shape[1] == L + 3 * 4 and summary["spans"] <= 3 * summary["sequences"]
    rows, _ = run_local(tiny, dc, NoiseConfig(k_max=1))
    assert rows["input_ids"].shape[1] == L and (rows["span_id"] == -1).all()  # pure AR: no drafts, no padding
    for bad, match in [(NoiseConfig(rho=1.5), "rho"), (NoiseConfig(span_distribution="zipf"), "span_distribution"),
                       (NoiseConfig(k_max=0), "k_max")]:
        with pytest.raises(FluidError, match=match):
            data.build_dataset(dc, bad, tokenizer_path=tiny[0], mask_token_id=tiny[1])
    with pytest.raises(FluidError, match="split"):
        data.build_dataset(dc, NoiseConfig(), tokenizer_path=tiny[0], mask_token_id=tiny[1], split="dev")


def preprocess(argv, capsys):
    from jobs.cli import main

    rc = main(["preprocess", *argv])
    return rc, capsys.readouterr()


@pytest.mark.ray
def test_preprocess_cli_end_to_end_and_errors(ray_quiet, tiny, corpus, tmp_path, capsys):
    common = [f"--model.spec={tiny[0]}", f"--data.seq_len={L}", "--data.val_fraction=0", "--data.test_fraction=0",
              "--noise.k_max=6"]
    out = tmp_path / "pre"
    rc, io = preprocess(["--output", str(out), f"--data.corpus={corpus[0]}", *common], capsys)
    assert rc == 0, io.err
    summary = json.loads((out / data.SUMMARY_FILE).read_text())
    assert "documents" in io.out and "tokens/s" in io.out and summary["sequences"] > 0
    rows = collect(data.read_preprocessed(str(out)).iter_batches(batch_format="numpy"))
    assert rows["seq_index"].shape[0] == summary["sequences"] and rows["input_ids"].shape[1] == 2 * L

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    cases = [([f"--data.corpus={corpus[0]}", *common], "no output given"),
             (["--output", str(out), f"--data.corpus={corpus[0]}", *common], "already holds"),
             (["--output", str(tmp_path / "o2"), f"--data.corpus={tmp_path / 'missing'}", *common], "not found"),
             (["--output", str(tmp_path / "o3"), f"--data.corpus={empty}", *common], "no usable")]
    for argv, match in cases:
        rc, io = preprocess(argv, capsys)
        err = [line for line in io.err.splitlines() if line.startswith("error:")]
        assert rc == 2 and len(err) == 1 and match in err[0], io.err
        assert "Traceback" not in io.err
    rc, io = preprocess(["--output", str(out), "--overwrite", f"--data.corpus={corpus[0]}", *common], capsys)
    assert rc == 0 and len(data.parquet_files(str(out))) >= 1


def test_preprocess_help():
    res = subprocess.run([sys.executable, "-m", "jobs.preprocess", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert res.returncode == 0 and "--output" in res.stdout and "Parquet" in res.stdout


def test_tokenize_stage_restores_plan_order_of_a_bundle(tiny):
    """Ray Data may bundle read blocks in the order they finished; the tokenizer stage puts the units
    back in plan order, so the rows (and the training batches built from them) never depend on timing."""
    stage = data._TokenizeStage(str(tiny[0]), eos_id=1, parallelism=False)
    texts = {3 << 40: "the cat", 1 << 40: "a dog runs", 2 << 40: "the quick brown fox"}
    shuffled = pa.table({"unit_id": pa.array(list(texts), pa.int64()), "texts": pa.array([[t] for t in texts.values()])})
    out = stage(shuffled)
    ids = sorted(texts)
    assert out.column("unit_id").to_pylist() == ids
    one_by_one = [stage(pa.table({"unit_id": pa.array([u], pa.int64()), "texts": pa.array([[texts[u]]])}))
                  for u in ids]
    assert out.column("tokens").to_pylist() == [t.column("tokens").to_pylist()[0] for t in one_by_one]
