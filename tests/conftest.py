"""Shared fixtures: tiny random models and tokenizers (seconds), and the real default model (cached)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub in tests: offline errors come at once
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MLflow (a dev dependency) would give every adapt/evaluate test a SQLite store and its migrations (~5 s
# each); the tracking tests turn it back on themselves (fixture `tracking_on`).
os.environ.setdefault("FLUID_TRACKING", "off")
# Tiny models train in milliseconds per step and the tests checkpoint every step: each checkpoint report
# waits for the Ray Train controller's next poll (2 s by default), and so does the end of every run.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

WORDS = ("the quick brown fox jumps over lazy dog and a cat sat on mat it was bright cold day in "
         "april clocks were striking thirteen to be or not that is question . , ! ?").split()


def make_tiny_tokenizer():
    """A word-level fast tokenizer over WORDS (+ specials), built in-process."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def make_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=True, eos_token_id=1, pad_token_id=1, bos_token_id=None)
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture
def tiny_model_dir(tmp_path: Path) -> Path:
    """A saved tiny Llama + word-level tokenizer (a normal Hugging Face folder, no mask token)."""
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok))
    out = tmp_path / "tiny-llama"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def default_model():
    """The built-in SmolLM2-135M, resolved once per machine (download + conversion on first use)."""
    from pipeline.sources.model_source import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (each start costs ~5–10 s on 2 cores).

    More logical CPUs than cores, so Train workers, Data actors and Serve replicas all fit.

    No dashboard, so no State API of its own. Ray Train's placement-group cleaner asks the State API
    whether the run's controller is alive; with no address it resolves the cluster started *last* on this
    machine, and when that is another live cluster (a second test session, a job run beside the tests)
    the controller is not found there, counts as dead, and the cleaner removes the live run's placement
    group: its workers die mid-run. Pointing the State API at a closed port makes every such query
    fail, which the cleaner treats as "unknown, keep monitoring".
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=6, include_dashboard=False, object_store_memory=400 * 1024**2, log_to_driver=False,
                 configure_logging=False,
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:9"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def tracking_on(monkeypatch):
    """train.tracking=auto tracks again in this test (the suite switches it off, see above)."""
    monkeypatch.delenv("FLUID_TRACKING", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
