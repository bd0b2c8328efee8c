"""Tiny models run fastest on one thread (and do not fight other processes for the cores); `make_tiny_export`."""

import json

import numpy as np
import pytest


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tiny_export(tmp_path):
    """A tiny random export (word-level tokenizer, k_max 4, no horizon head) with its base model, a corpus and
    a metrics.jsonl beside it → (export folder, model cache folder)."""
    from pipeline.sources.model_source import resolve_model
    from pipeline.train.export import export_hf
    from tests.conftest import WORDS, make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    base_dir = tmp_path / "base"
    make_tiny_llama(len(tok)).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    resolved = resolve_model(str(base_dir), tmp_path / "cache")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS, size=120)))
    from pipeline.model.causal_lm import add_mask_token

    model = add_mask_token(make_tiny_llama(len(tok), seed=1), resolved.mask_token_id)
    meta = {"mask_token": "[M]", "mask_token_id": resolved.mask_token_id, "k_max": 4,
            "policy_defaults": {"policy": "verify", "gamma": None, "max_horizon": 4},
            "base_model": {"spec": str(base_dir), "sha256": None},
            "data_config": {"data": {"corpus": [str(corpus)], "seq_len": 24, "val_fraction": 0.2,
                                     "test_fraction": 0.25, "split_seed": 0}}, "train_config": {}}
    from transformers import AutoTokenizer

    out = export_hf(model, AutoTokenizer.from_pretrained(resolved.path), tmp_path / "run" / "export", fluid_meta=meta)
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"event": "eval", "step": 0, "val_ar_ce": 4.0, "val_draft_ce": 5.0},
        {"step": 1, "loss": 9.0, "ar_ce": 4.0, "draft_ce": 5.0}, {"step": 2, "loss": 8.0, "ar_ce": 3.5, "draft_ce": 4.5},
        {"event": "eval", "step": 2, "val_ar_ce": 3.6, "val_draft_ce": 4.6}]))
    return out, tmp_path / "cache"
