"""pipeline.export_format: the format-1 fixture, the reader/writer round trip, newer versions, copying,
and that `fluid.json` and the k_max default each have one home in pipeline/ and jobs/."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.errors import FluidError
from pipeline.export_format import (
    FLUID_META_FILE,
    FORMAT_VERSION,
    FluidMeta,
    copy_folder,
    is_export,
    localize_export,
    read_fluid_meta,
    write_fluid_meta,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_V1 = Path(__file__).parent / "fixtures" / "export_v1"  # fluid.json as the code of commit 5d2063a wrote it


def test_format_1_fixture_reads_into_the_schema():
    meta = read_fluid_meta(FIXTURE_V1)
    assert isinstance(meta, FluidMeta) and meta.format_version == 1 == FORMAT_VERSION
    assert (meta.mask_token, meta.mask_token_id, meta.k_max) == ("[M]", 100, 16)
    assert meta.base_model == {"spec": "tiny-llama", "sha256": "ab" * 32} and meta.base_spec == "tiny-llama"
    assert meta.policy_defaults == {"policy": "verify", "gamma": 0.9, "max_horizon": 8}
    assert set(meta.data_fingerprint) == {"data", "noise"} and meta.data_fingerprint["noise"]["k_max"] == 16
    assert meta.train_config["steps_done"] == 3 and meta.dtype is None  # format 1 records no dtype
    assert meta.drafter is None and meta.horizon_head is None and meta.extra == {}
    assert meta.code_version == "0.1.0"
    assert meta.to_dict() == json.loads((FIXTURE_V1 / FLUID_META_FILE).read_text())


def test_write_then_read_round_trip_keeps_parts_and_unknown_keys(tmp_path):
    meta = dataclasses.replace(read_fluid_meta(FIXTURE_V1), drafter={"kind": "gated", "mask_token_id": 100},
                               horizon_head={"file": "horizon_head.safetensors", "tau": 1.0},
                               extra={"future_note": [1, 2]})
    path = write_fluid_meta(tmp_path, meta)
    assert path == tmp_path / FLUID_META_FILE and is_export(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [FLUID_META_FILE]  # no temporary file left
    assert read_fluid_meta(tmp_path) == meta
    raw = json.loads(path.read_text())
    assert next(iter(raw)) == "format_version" and raw["future_note"] == [1, 2]


def test_writer_refuses_incomplete_metadata(tmp_path):
    raw = json.loads((FIXTURE_V1 / FLUID_META_FILE).read_text())
    del raw["mask_token_id"]
    with pytest.raises(FluidError, match="missing keys"):
        write_fluid_meta(tmp_path, raw)
    assert not is_export(tmp_path)


def test_newer_format_version_is_one_clear_line(tmp_path):
    raw = json.loads((FIXTURE_V1 / FLUID_META_FILE).read_text()) | {"format_version": FORMAT_VERSION + 1}
    (tmp_path / FLUID_META_FILE).write_text(json.dumps(raw))
    with pytest.raises(FluidError) as err:
        read_fluid_meta(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / FLUID_META_FILE) in msg
    assert f"format_version {FORMAT_VERSION + 1}" in msg and f"newer than {FORMAT_VERSION}" in msg


def test_localize_export_copies_a_url_without_pickles(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/fluid-export-format-{tmp_path.name}"
    fs.pipe(f"{root}/{FLUID_META_FILE}", (FIXTURE_V1 / FLUID_META_FILE).read_bytes())
    fs.pipe(f"{root}/sub/model.safetensors", b"weights")
    fs.pipe(f"{root}/evil.bin", b"pickle")
    local = localize_export(f"memory://{root}")
    assert read_fluid_meta(local).k_max == 16 and (local / "sub" / "model.safetensors").read_bytes() == b"weights"
    assert not (local / "evil.bin").exists()
    assert localize_export(str(FIXTURE_V1)) == FIXTURE_V1  # a local export is used in place
    with pytest.raises(FluidError, match="empty or missing"):
        copy_folder(f"memory://{root}-missing", tmp_path / "x")
    with pytest.raises(FluidError, match=f"no {FLUID_META_FILE}"):
        localize_export(str(tmp_path))


def _sources(*dirs: str):
    for d in dirs:
        for path in sorted((ROOT / d).rglob("*.py")):
            yield path, ast.parse(path.read_text(), str(path))


def _prose(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings or argparse help/description texts (other help texts,
    e.g. jobs/cli.py's one-line descriptions, are sentences: the test skips strings with whitespace)."""
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            ids.add(id(body[0].value))
        if isinstance(node, ast.keyword) and node.arg in ("help", "description", "epilog"):
            ids |= {id(n) for n in ast.walk(node.value)}
    return ids


def test_fluid_json_literal_lives_only_in_the_export_module():
    found = []
    for path, tree in _sources("pipeline", "jobs"):
        prose = _prose(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and "fluid.json" in node.value
                    and id(node) not in prose and not any(c.isspace() for c in node.value)):  # prose: a sentence
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found and all(f.startswith("pipeline/export_format.py:") for f in found), found


def test_no_signature_carries_a_literal_k_max_default():
    found = []
    for path, tree in _sources("pipeline", "jobs"):
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                args = fn.args
                pairs = list(zip(args.args[len(args.args) - len(args.defaults):], args.defaults, strict=True))
                pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
                found += [f"{path.relative_to(ROOT)}:{fn.lineno}" for a, d in pairs
                          if a.arg == "k_max" and isinstance(d, ast.Constant)]
    assert found == []


def test_load_sampler_still_loads_a_plain_hf_folder(tmp_path):
    """No fluid.json: a plain Hugging Face folder plus an explicit mask id (untrained drafts), as before."""
    from pipeline.config import NoiseConfig
    from pipeline.decode.load import load_sampler
    from tests.conftest import make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    tok.add_special_tokens({"mask_token": "[M]"})
    make_tiny_llama(len(tok) - 1).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert not is_export(tmp_path)
    sampler = load_sampler(tmp_path, mask_token_id=tok.mask_token_id, forward_cost=[1.0] * 4, matmul="stock")
    assert sampler.mask_token_id == tok.mask_token_id and sampler.k_max == NoiseConfig.k_max
    assert sampler.model.get_input_embeddings().num_embeddings == len(tok)
