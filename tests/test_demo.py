"""The main job (`make demo` = jobs/demo.py, pipeline/demo/) end to end on a tiny model and a tiny budget."""

import json

import numpy as np
import pytest

pytestmark = pytest.mark.ray


def test_main_job_runs_every_stage(ray_local, tmp_path, capsys):
    import jobs.demo as job
    import pipeline.demo.runner as demo
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
            "--sampler.max_tokens=4", "--demo.budget_s=30", f"--demo.output={out}", "--serve.port=18441",
            "--distill.count=8"]
    assert job.main(argv) == 0
    text = capsys.readouterr().out
    for n, stage in enumerate(demo.STAGES, 1):
        assert f"[fluid] demo {n}/6 {stage} …" in text
    assert "FLUID demo — summary" in text and "streamed completion:" in text
    summary = text[text.index("FLUID demo — summary"):]
    assert "held-out AR CE (" in summary and "tokens): base" in summary and "verify" in summary
    export = out / "adapt" / "export"
    assert (export / "fluid.json").is_file() and (export / "horizon_head.safetensors").is_file()
    assert (out / "adapt" / "eval" / "report.md").is_file() and (out / "adapt" / "eval" / "ce_by_k.png").is_file()
    state = json.loads((out / "demo_state.json").read_text())
    assert set(state) == {"data", "drafts", "adapt", "horizon", "evaluate"}  # serving is never cached
    assert state["adapt"]["result"]["steps"] == 3
    # the default recipe, frozen_base: distilled continuations, a drafter, the base weights unchanged
    assert len(list((out / "distilled").glob("shard-*.parquet"))) >= 1
    assert (export / "drafter.safetensors").is_file()
    assert (export / "model.safetensors").read_bytes() == (tmp_path / "model" / "model.safetensors").read_bytes()
    # re-running reuses finished stages: test_finished_stages_are_reused_until_their_settings_change


def test_finished_stages_are_reused_until_their_settings_change(tmp_path, capsys):
    """The stage cache of `make demo` without running the stages: a re-run reuses each finished stage;
    a changed setting re-runs its stage and every later one; the budget alone changes nothing."""
    import pipeline.demo.runner as demo
    from pipeline.config import load_config

    calls: list[str] = []

    def run(argv):
        d = demo.Demo(load_config(None, [f"--demo.output={tmp_path}", *argv]))
        d.out.mkdir(parents=True, exist_ok=True)
        for name in demo.STAGES[:-1]:
            d.stage(name, lambda name=name: calls.append(name) or {"stage": name})
        return d

    run([])
    assert calls == list(demo.STAGES[:-1])
    calls.clear()
    again = run(["--demo.budget_s=300"])
    assert calls == [] and all(again.times[s] == (0.0, "reused") for s in demo.STAGES[:-1])
    assert again.state["adapt"]["result"] == {"stage": "adapt"}
    assert "[fluid] demo 3/6 adapt: done before" in capsys.readouterr().out
    run(["--train.lr=0.001"])
    assert calls == ["adapt", "horizon", "evaluate"]
    calls.clear()
    run(["--train.lr=0.001", "--demo.drafts=self_distill"])
    assert calls == ["drafts", "adapt", "horizon", "evaluate"]
    calls.clear()
    run(["--train.lr=0.001", "--demo.drafts=self_distill", "--data.seq_len=64"])
    assert calls == list(demo.STAGES[:-1])
    calls.clear()
    assert demo.Demo(load_config(None, [f"--demo.output={tmp_path}"]), fresh=True).state == {}


def test_summary_gives_token_counts_and_intervals():
    """The summary's CE lines state their token counts; each LAMBADA accuracy its 95 % Wilson interval."""
    from types import SimpleNamespace

    from pipeline.demo.runner import summary
    from pipeline.eval.metrics import wilson_interval

    demo = SimpleNamespace(times={"evaluate": (12.0, "ran")}, elapsed=lambda: 12.0, export="runs/demo/adapt/export")
    row = {"policy": "ar", "tokens_per_forward": 1.0, "speedup_vs_ar": 1.0, "speedup_vs_hf": 1.0, "prefix_agreement": 1.0}
    report = {"ce": {"base_ar_ce": 4.0, "adapted_ar_ce": 4.0, "ar_ce_change": 0.0, "base_by_k": [4.0, 5.0],
                     "adapted_by_k": [4.0, 4.5], "ar_tokens": 8128, "by_k_tokens": 128},
              "sampler": {"rows": [row]}, "paths": {"markdown": "report.md"},
              "lambada": [{"policy": p, "items": 100, "accuracy": c / 100, "interval": wilson_interval(c, 100)}
                          for p, c in (("ar", 30), ("threshold", 25))]}
    text = summary(demo, report, {"events": 3, "text": "abc", "seconds": 1.0})
    assert "held-out AR CE (8128 tokens)" in text and "draft CE k=2 (128 tokens)" in text
    assert "LAMBADA accuracy on 100 items (95 % interval): ar 0.30 (0.22–0.40), threshold 0.25 (0.18–0.34)" in text
    assert "the 60-minute drafter recipe (make drafter MINUTES=60)" in text


def test_summary_quotes_the_60_minute_recipe_from_its_records(tmp_path):
    from pipeline.demo.runner import recipe_lines

    assert recipe_lines(tmp_path) == ["the 60-minute drafter recipe (make drafter MINUTES=60): not measured on "
                                      "this checkout; run it to see what training buys"]

    def record(cpu, dtype, x, threads=1):
        return json.dumps({"rows": [{"policy": "ar", "× ar": 1.0, "tokens/forward": 1.0},
                                    {"policy": "verify", "× ar": x, "tokens/forward": 1.9}],
                           "settings": {"dtype": dtype}, "date": "2026-12-06 18:00 UTC",
                           "machine": {"cpu_model": cpu, "torch_threads": threads}})

    (tmp_path / "drafter_60min_fp32.json").write_text(record("Some CPU", "float32", 1.234))
    (tmp_path / "drafter_60min_bf16.json").write_text("{not json")  # a broken record is skipped
    (tmp_path / "drafter_60min_layouts_flat.json").write_text(record("Some CPU", "bfloat16", 9.0))  # not one
    assert recipe_lines(tmp_path, this_cpu="Some CPU") == [
        "the 60-minute drafter recipe (make drafter MINUTES=60) reached verify 1.23x AR at 1.90 tokens/forward "
        "in float32 (Some CPU, 1 torch thread, 2026-12-06 18:00 UTC, this CPU)"]
    (tmp_path / "drafter_60min_bf16_other.json").write_text(record("Other CPU", "bfloat16", 1.5, threads=2))
    (tmp_path / "drafter_60min_fp32_other.json").write_text(record("Other CPU", "float32", 1.0, threads=2))
    lines = recipe_lines(tmp_path, this_cpu="Other CPU")  # every machine's line, this CPU's first
    assert lines == ["the 60-minute drafter recipe (make drafter MINUTES=60) reached verify 1.50x AR at 1.90 "
                     "tokens/forward in bfloat16, 1.00x AR at 1.90 tokens/forward in float32 (Other CPU, 2 torch "
                     "threads, 2026-12-06 18:00 UTC, this CPU)",
                     "the 60-minute drafter recipe (make drafter MINUTES=60) reached verify 1.23x AR at 1.90 "
                     "tokens/forward in float32 (Some CPU, 1 torch thread, 2026-12-06 18:00 UTC)"]
