import json
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest

from pipeline.errors import FluidError
from pipeline.sources.model_source import SOURCE_META_FILE, read_source_meta, resolve_model

ROOT = Path(__file__).resolve().parents[2]


def _no_temp_leftovers(cache: Path) -> bool:
    return not [p for p in (cache / "models").glob(".*.tmp-*")] if (cache / "models").exists() else True


def test_local_dir_gets_mask_token_without_touching_the_original(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    before = sorted(p.name for p in tiny_model_dir.iterdir())
    n_vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))
    r = resolve_model(str(tiny_model_dir), tmp_path / "cache")
    assert r.path != tiny_model_dir and r.path.is_dir()
    assert r.mask_token_id == n_vocab  # appended after the existing vocabulary
    tok = AutoTokenizer.from_pretrained(r.path)
    assert tok.mask_token == "[M]" and tok.convert_tokens_to_ids("[M]") == r.mask_token_id
    assert read_source_meta(r.path)["mask_token_id"] == r.mask_token_id
    assert (r.path / "model.safetensors").is_symlink()  # weights are linked, not copied
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == before  # original untouched
    # second call: a cache hit that returns the same folder and does not rebuild it
    created = read_source_meta(r.path)["created"]
    r2 = resolve_model(str(tiny_model_dir), tmp_path / "cache")
    assert r2.path == r.path and read_source_meta(r2.path)["created"] == created


def test_resolved_folder_loads_as_hf_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    r = resolve_model(str(tiny_model_dir), tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(r.path)
    assert model.config.vocab_size == r.mask_token_id  # the embedding is resized only at training time


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_url_is_copied_to_the_cache(tiny_model_dir, tmp_path, scheme):
    if scheme == "memory":
        fs = fsspec.filesystem("memory")
        for f in tiny_model_dir.iterdir():
            fs.pipe(f"/models/tiny-{tmp_path.name}/{f.name}", f.read_bytes())
        url = f"memory://models/tiny-{tmp_path.name}"
    else:
        url = f"file://{tiny_model_dir}"
    cache = tmp_path / "cache"
    r = resolve_model(url, cache)
    assert (r.path / "model.safetensors").is_file() and not (r.path / "model.safetensors").is_symlink()
    assert read_source_meta(r.path)["kind"] == "fsspec"
    assert resolve_model(url, cache).path == r.path
    assert _no_temp_leftovers(cache)


def test_missing_url_and_unknown_specs(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(FluidError, match="not a folder"):
        resolve_model("memory://does/not/exist", cache)
    with pytest.raises(FluidError, match="unknown model spec 'no-such-model'"):
        resolve_model("no-such-model", cache)
    with pytest.raises(FluidError, match="unknown model spec"):
        resolve_model(str(tmp_path / "missing" / "dir"), cache)
    with pytest.raises(FluidError, match="model spec is empty"):
        resolve_model("  ", cache)
    with pytest.raises(FluidError, match="cannot fetch 'someorg/somemodel' from the model hub"):
        resolve_model("someorg/somemodel", cache)
    assert _no_temp_leftovers(cache)


def test_folder_without_config_or_safetensors(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FluidError, match="has no config.json"):
        resolve_model(str(empty), tmp_path / "cache")
    (tiny_model_dir / "model.safetensors").unlink()
    with pytest.raises(FluidError, match="no .safetensors weights"):
        resolve_model(str(tiny_model_dir), tmp_path / "cache")
    assert _no_temp_leftovers(tmp_path / "cache")


def test_corrupt_gguf_is_a_clear_error_and_leaves_nothing(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)  # a truncated header
    cache = tmp_path / "cache"
    with pytest.raises(FluidError, match="corrupt or truncated"):
        resolve_model(str(bad), cache)
    assert _no_temp_leftovers(cache)
    assert not [p for p in (cache / "models").iterdir() if p.is_dir()]


def test_gguf_checksum_mismatch(tmp_path):
    from pipeline.sources.model_source import _build_from_gguf

    f = tmp_path / "x.gguf"
    f.write_bytes(b"not the real file")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FluidError, match="corrupt or not the expected file"):
        _build_from_gguf(f, out, "[M]", spec="x", sha256="0" * 64)


def test_unwritable_cache_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(FluidError, match="is not writable"):
        resolve_model("smollm2-135m", blocker / "cache")


def test_cli_prints_one_line_error_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jobs.info", "--model.spec=no-such-model",
                           f"--model.cache_dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown model spec 'no-such-model'")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, "-m", "jobs.info", "--train.lr=fast"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2 and "'train.lr' must be a number" in proc.stderr


PASSAGE = ("The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks were "
           "striking thirteen. The capital of France is Paris, and the capital of Germany is Berlin.")


@pytest.mark.integration
def test_default_model_converts_and_predicts_english(default_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta = json.loads((default_model.path / SOURCE_META_FILE).read_text())
    assert meta["sha256"].startswith("b179c952") and meta["kind"] == "gguf"
    tok = AutoTokenizer.from_pretrained(default_model.path)
    model = AutoModelForCausalLM.from_pretrained(default_model.path).eval()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert "quantization_config" not in model.config.to_dict()
    assert tok.convert_tokens_to_ids("[M]") == default_model.mask_token_id == 49152
    ids = tok(PASSAGE, return_tensors="pt").input_ids
    with torch.no_grad():
        nll = model(ids, labels=ids).loss.item()
    # the converted model gives ~3.0 nats; a random or mis-converted model gives ~10.8
    assert nll < 4.0, nll
