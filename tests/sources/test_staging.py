"""Staging what the driver prepared under the storage, and each node's checksummed fetch (no Ray)."""

import uuid

import fsspec
import pytest

from pipeline.errors import FluidError
from pipeline.sources import staging


@pytest.fixture
def root():
    return f"memory://fluid-staging-{uuid.uuid4().hex}"


def _folder(path, text="weights"):
    path.mkdir()
    (path / "config.json").write_text('{"a": 1}')
    (path / "model.safetensors").write_text(text)
    (path / "sub").mkdir()
    (path / "sub" / "tokenizer.json").write_text("{}")
    return path


def test_stage_once_content_addressed_then_fetch_per_node(tmp_path, root):
    src = _folder(tmp_path / "model")
    url = staging.stage_folder(src, root)
    assert url.startswith(f"{root}/.fluid/models/") and len(url.rsplit("/", 1)[1]) == 64
    assert staging.stage_folder(_folder(tmp_path / "copy"), root) == url  # same content, same place
    assert staging.stage_folder(_folder(tmp_path / "other", "changed"), root) != url
    staging._KNOWN.clear()  # a node that did not stage it
    local = staging.local_folder(url, tmp_path / "node-cache")
    assert local.parent == tmp_path / "node-cache" / "staged"
    assert (local / "sub" / "tokenizer.json").read_text() == "{}" and (local / "model.safetensors").read_text() == "weights"
    assert staging.local_folder(url, tmp_path / "node-cache") == local  # fetched once
    assert staging.local_folder(str(src)) == src  # a local path stays as it is


def test_a_corrupt_or_unfinished_staged_copy_is_refused(tmp_path, root):
    url = staging.stage_folder(_folder(tmp_path / "model"), root)
    staging._KNOWN.clear()
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{path}/model.safetensors", b"tampered")
    with pytest.raises(FluidError, match="does not match its checksum"):
        staging.local_folder(url, tmp_path / "cache")
    assert not (tmp_path / "cache" / "staged" / url.rsplit("/", 1)[1]).exists()  # nothing half-written
    fs.rm_file(f"{path}/manifest.json")
    with pytest.raises(FluidError, match="no manifest.json"):
        staging.local_folder(url, tmp_path / "cache")


def test_corpus_files_keep_their_names_and_the_tokenizer_travels_without_weights(tmp_path, root):
    (tmp_path / "c").mkdir()
    for name in ("a.txt", "b.jsonl"):
        (tmp_path / "c" / name).write_text(name)
    items = [{"url": str(tmp_path / "c" / "a.txt"), "split": "train"}, {"url": "s3://bucket/x.txt", "split": ""},
             {"url": str(tmp_path / "c" / "b.jsonl"), "split": ""}]
    staged, tok = staging.stage_items(items, _folder(tmp_path / "model"), root)
    assert staged[0]["url"].startswith(f"{root}/.fluid/corpora/") and staged[0]["url"].endswith("/a.txt")
    assert staged[1] == items[1] and staged[2]["url"].endswith("/b.jsonl") and staged[0]["split"] == "train"
    assert fsspec.open(staged[2]["url"], "r").open().read() == "b.jsonl"
    staging._KNOWN.clear()
    fetched = staging.local_folder(tok, tmp_path / "cache")
    assert (fetched / "config.json").is_file() and not (fetched / "model.safetensors").exists()
