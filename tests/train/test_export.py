"""pipeline.train.export (read back by decode.load.load_export): round trip, fluid.json, atomic writes, LoRA merge."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import pipeline
from pipeline.decode.load import load_export
from pipeline.errors import FluidError
from pipeline.export_format import FLUID_META_FILE, FORMAT_VERSION, read_fluid_meta
from pipeline.model.causal_lm import add_mask_token, forward_batch
from pipeline.model.parallelize import apply_lora
from pipeline.train.export import export_hf
from tests.model.test_model import MASK_ID, VOCAB, make_batch, rand_tokens, tiny_llama

MASK_TOKEN = "<|mask|>"


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "<eos>": VOCAB - 1}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")
    tok.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]})
    assert tok.convert_tokens_to_ids(MASK_TOKEN) == MASK_ID
    return tok


def meta(**over):
    m = {
        "mask_token": MASK_TOKEN, "mask_token_id": MASK_ID, "k_max": 16,
        "policy_defaults": {"policy": "entropy", "gamma": 1.5, "max_horizon": 16},
        "base_model": {"spec": "tiny-llama", "sha256": "ab" * 32},
        "data_config": {"corpus": "memory://x", "rho": 0.1}, "train_config": {"lr": 1e-3, "lam": 1.0},
    }
    return m | over


def _batch():
    return make_batch([(rand_tokens(12, 30), [(2, 4), (6, 5)]), (rand_tokens(9, 31), [])], T=24)


def _trained_model(tied=True):
    m = add_mask_token(tiny_llama(tied=tied, seed=5), MASK_ID)
    with torch.no_grad():  # make [M] and some weights differ from any fresh init
        m.get_input_embeddings().weight[MASK_ID] += 0.3
    return m


@pytest.mark.parametrize("tied", [True, False])
def test_export_roundtrip_identical_logits(tmp_path, tied):
    m = _trained_model(tied)
    out = export_hf(m, tiny_tokenizer(), tmp_path / "exp", fluid_meta=meta())
    assert out == tmp_path / "exp"
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", FLUID_META_FILE, "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]  # no temporary folder left behind
    loaded, tok, got = load_export(out)
    batch = _batch()
    with torch.no_grad():
        a, b = forward_batch(m.eval(), batch), forward_batch(loaded, batch)
    assert torch.equal(a, b)  # same weights, same ops: bit-identical
    assert tok.convert_tokens_to_ids(MASK_TOKEN) == MASK_ID
    assert tok("w1 w2 w3").input_ids == [1, 2, 3]
    assert loaded.config.tie_word_embeddings == tied


def test_fluid_json_contents(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class TrainCfg:
        lr: float = 1e-3
        steps: int = 10

    export_hf(_trained_model(), None, tmp_path / "e", fluid_meta=meta(train_config=TrainCfg(), extra={"a": 1}))
    raw = json.loads((tmp_path / "e" / FLUID_META_FILE).read_text())
    assert raw["format_version"] == FORMAT_VERSION == 1
    assert raw["mask_token"] == MASK_TOKEN and raw["mask_token_id"] == MASK_ID and raw["k_max"] == 16
    assert raw["policy_defaults"] == {"policy": "entropy", "gamma": 1.5, "max_horizon": 16}
    assert raw["base_model"] == {"spec": "tiny-llama", "sha256": "ab" * 32}
    assert raw["data_config"] == {"corpus": "memory://x", "rho": 0.1}
    assert raw["train_config"] == {"lr": 1e-3, "steps": 10}  # dataclass → dict
    assert raw["code_version"].startswith(pipeline.__version__)
    assert raw["extra"] == {"a": 1}
    assert read_fluid_meta(tmp_path / "e").to_dict() == raw


def test_export_refuses_incomplete_meta(tmp_path):
    bad = meta()
    del bad["k_max"]
    with pytest.raises(FluidError, match="k_max"):
        export_hf(_trained_model(), None, tmp_path / "e", fluid_meta=bad)
    with pytest.raises(FluidError, match="outside"):
        export_hf(_trained_model(), None, tmp_path / "e", fluid_meta=meta(mask_token_id=VOCAB + 5))
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "corrupt"),
        ('{"mask_token_id": 100}', "missing format_version"),
        ('{"format_version": 99}', "unknown format_version"),
        ('{"format_version": 1, "mask_token_id": 100}', "missing keys"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_corrupt_fluid_json_is_fluid_error(tmp_path, content, match):
    export_hf(_trained_model(), None, tmp_path / "e", fluid_meta=meta())
    (tmp_path / "e" / FLUID_META_FILE).write_text(content)
    with pytest.raises(FluidError, match=match):
        load_export(tmp_path / "e")


def test_missing_fluid_json_is_fluid_error(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(FluidError, match="not a FLUID export"):
        load_export(tmp_path)


def test_failed_export_leaves_old_export_intact(tmp_path):
    m = _trained_model()
    export_hf(m, None, tmp_path / "e", fluid_meta=meta(k_max=8))

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        export_hf(m, BrokenTokenizer(), tmp_path / "e", fluid_meta=meta(k_max=12))
    assert read_fluid_meta(tmp_path / "e").k_max == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    export_hf(m, None, tmp_path / "e", fluid_meta=meta(k_max=12))  # overwriting works
    assert read_fluid_meta(tmp_path / "e").k_max == 12


def test_lora_export_merges_adapters(tmp_path):
    m = _trained_model(tied=False)
    lm = apply_lora(m, 4, 8, ["q_proj", "v_proj"])
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("trainable_tokens" in n for n in trainable)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n or "trainable_tokens_delta" in n:
                p.normal_(0, 0.05)  # as if trained: the merged export must differ from the base
    batch = _batch()
    with torch.no_grad():
        want = forward_batch(lm.eval(), batch)
        base_logits = forward_batch(_trained_model(tied=False).eval(), batch)
    assert not torch.allclose(want, base_logits, atol=1e-4)
    export_hf(lm, None, tmp_path / "e", fluid_meta=meta())
    assert hasattr(lm, "peft_config") and any("lora_A" in n for n, _ in lm.named_parameters())  # not merged in place
    loaded, _, _ = load_export(tmp_path / "e")
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(forward_batch(loaded, batch), want, atol=1e-5, rtol=0)


def test_apply_lora_without_peft_is_fluid_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(FluidError, match="peft"):
        apply_lora(tiny_llama(), 4, 8, ["q_proj"])
