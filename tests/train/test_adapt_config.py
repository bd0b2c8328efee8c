"""Configuration errors of the adapt job surface before any Ray worker starts."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import FluidError
from pipeline.train.optim import lr_lambda
from pipeline.train.preflight import check_model, check_storage, validate

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--noise.k_max=0"], "noise.k_max must be in 1..127"),
        (["--noise.k_max=128"], r"noise.k_max must be in 1..127 \(the batch.s k column is int8\), got 128"),
        (["--train.global_batch_size=6", "--train.workers=4"], "must be divisible by train.grad_accum × train.workers"),
        (["--train.global_batch_size=8", "--train.grad_accum=3"], "must be divisible"),
        (["--train.max_steps=0"], "train.max_steps must be ≥ 1"),
        (["--noise.rho=1.5"], r"noise.rho must be in \[0, 1\]"),
        (["--model.dtype=float16"], "float16 is not supported for training"),
        (["--model.dtype=float16", "--train.use_gpu=true"], "float16 is not supported for training"),
        (["--data.seq_len=1"], "data.seq_len must be ≥ 2"),
        (["--train.lora_layers=[-1]"], r"train.lora_layers limits the frozen-base drafter \(train.drafter=adapter\)"),
    ],
)
def test_bad_configs_are_named(overrides, message):
    with pytest.raises(FluidError, match=message):
        validate(load_config(None, overrides))


def test_seq_len_over_context_and_non_causal_model(tiny_model_dir, tmp_path):
    with pytest.raises(FluidError, match="data.seq_len 1000 exceeds the model's context of 256"):
        check_model(tiny_model_dir, 1000)
    check_model(tiny_model_dir, 128)
    from transformers import ViTConfig

    bert = tmp_path / "bert"
    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
               intermediate_size=8).save_pretrained(bert)
    with pytest.raises(FluidError, match="has no causal-LM head"):
        check_model(bert, 8)


def test_unwritable_storage_fails_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(FluidError, match="is not writable"):
        check_storage(str(blocker / "runs"))
    assert check_storage(str(tmp_path / "runs")) == str((tmp_path / "runs").resolve())
    assert check_storage("memory://fluid-runs") == "memory://fluid-runs"


def test_lr_schedule_warmup_then_cosine():
    assert lr_lambda(0, warmup=10, total=100) == pytest.approx(0.1)
    assert lr_lambda(9, warmup=10, total=100) == pytest.approx(1.0)
    assert lr_lambda(10, warmup=10, total=100) == pytest.approx(1.0)
    assert lr_lambda(55, warmup=10, total=100) == pytest.approx(0.55)
    assert lr_lambda(100, warmup=10, total=100) == pytest.approx(0.1)


def test_cli_config_error_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "jobs.adapt", "--noise.k_max=0"], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: noise.k_max must be in 1..127 (the batch's k column is int8), got 0"
