"""The main job (`make demo` = jobs/demo.py) end to end on a tiny model and a tiny budget."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.ray


def test_main_job_runs_every_stage_then_reuses_them(ray_local, tmp_path, capsys):
    import jobs.demo as demo
    from tests.conftest import WORDS, make_tiny_llama, make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS, size=150)))
    out = tmp_path / "demo"
    argv = [f"--model.spec={tmp_path / 'model'}", f"--model.cache_dir={tmp_path / 'cache'}",
            f"--data.corpus={corpus}", "--data.seq_len=16", "--data.val_fraction=0.25", "--data.test_fraction=0.25",
            "--noise.k_max=4", "--train.max_steps=3", "--train.cpus_per_worker=1", "--train.lr=0.01",
            "--train.eval_batches=1", "--horizon.examples=8", "--horizon.epochs=3", "--eval.lambada_items=0",
            "--eval.tasks=1", "--eval.prompts=1", "--eval.max_tokens=4", "--eval.ce_sequences=2", "--eval.gammas=[]",
            "--sampler.max_tokens=4", "--demo.budget_s=30", f"--demo.output={out}", "--serve.port=18441"]
    assert demo.main(argv) == 0
    text = capsys.readouterr().out
    for n, stage in enumerate(demo.STAGES, 1):
        assert f"[fluid] demo {n}/6 {stage} …" in text
    assert "FLUID demo — summary" in text and "streamed completion:" in text
    summary = text[text.index("FLUID demo — summary"):]
    assert "held-out AR CE: base" in summary and "verify" in summary
    export = out / "adapt" / "export"
    assert (export / "fluid.json").is_file() and (export / "horizon_head.safetensors").is_file()
    assert (out / "adapt" / "eval" / "report.md").is_file() and (out / "adapt" / "eval" / "ce_by_k.png").is_file()
    state = json.loads((out / "demo_state.json").read_text())
    assert set(state) == {"data", "drafts", "adapt", "horizon", "evaluate"}  # serving is never cached
    assert state["adapt"]["result"]["steps"] == 3

    assert demo.main(argv) == 0  # a second run reuses every finished stage and serves again
    again = capsys.readouterr().out
    for n, stage in enumerate(demo.STAGES[:-1], 1):
        assert f"[fluid] demo {n}/6 {stage}: done before" in again
    assert "[fluid] demo 6/6 serve …" in again and "FLUID demo — summary" in again

    # the frozen-base recipe: data reused; distillation, drafter training and the rest run again
    assert demo.main([*argv, "--demo.drafts=frozen_base", "--distill.count=8"]) == 0
    third = capsys.readouterr().out
    assert "[fluid] demo 1/6 data: done before" in third and "[fluid] demo 2/6 drafts …" in third
    assert len(list((out / "distilled").glob("shard-*.parquet"))) >= 1
    assert (export / "drafter.safetensors").is_file()
    assert (export / "model.safetensors").read_bytes() == (tmp_path / "model" / "model.safetensors").read_bytes()
    assert "FLUID demo — summary" in third
