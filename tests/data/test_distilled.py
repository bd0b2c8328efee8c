"""Distilled examples (spans only inside the continuation, targets = the continuation) and the mix."""

import numpy as np
import pytest

from pipeline.batch import CLEAN, IGNORE, PAD
from pipeline.data.distill import greedy_continue, windows
from pipeline.data.distilled import distilled_examples, is_distilled, make_distilled_example, mix

KW = dict(seq_len=12, mask_id=99, pad_id=0, eos_id=1, k_max=4, draft_tokens=12, rho=0.3)


def test_distilled_example_drafts_only_inside_the_continuation():
    prompt, cont = np.arange(10, 15), np.arange(50, 57)  # P = 5, 7 continuation tokens
    for seed in range(20):
        ex = make_distilled_example(prompt, cont, np.random.default_rng(seed), **KW)
        assert all(len(v) == 24 for v in ex.values())
        clean = ex["span_id"] == CLEAN
        assert ex["input_ids"][clean].tolist() == [*range(10, 15), *range(50, 57)]
        draft = ex["span_id"] >= 0
        assert draft.sum() > 0
        assert (ex["anchor"][draft] >= 4).all()  # cursor c ≥ P − 1: the prefix contains the whole prompt
        assert set(ex["labels"][draft].tolist()) <= set(range(50, 57))  # targets: the model's own tokens
        # label of the draft at position p is the token at p + 1 of the clean stream
        stream = np.r_[prompt, cont]
        assert (ex["labels"][draft] == stream[ex["position_ids"][draft] + 1]).all()


def test_short_continuation_is_padded_to_the_natural_length():
    ex = make_distilled_example(np.arange(10, 15), np.array([50, 51, 1]), np.random.default_rng(0), **KW)
    assert len(ex["input_ids"]) == 24
    assert (ex["span_id"][8:12] == PAD).all() and (ex["labels"][8:12] == IGNORE).all()
    assert ex["labels"][6] == 1  # the clean stream keeps its EOS as an AR target


def test_mix_share_is_exact_and_deterministic():
    assert sum(is_distilled(i, 0.25) for i in range(400)) == 100
    nat = ({"n": i} for i in range(1000))
    dist = ({"d": j} for j in range(1000))
    rows = list(mix(nat, dist, 0.5, 10))
    assert rows == [{"n": 0}, {"d": 0}, {"n": 1}, {"d": 1}, {"n": 2}, {"d": 2}, {"n": 3}, {"d": 3},
                    {"n": 4}, {"d": 4}]
    with pytest.raises(ValueError, match="distill_mix"):
        list(mix(iter([]), iter([]), 1.5, 1))


def test_distilled_stream_cycles_and_renoises():
    from types import SimpleNamespace

    p = SimpleNamespace(seed=0, seq_len=12, mask_id=99, pad_id=0, eos_id=1, k_max=4, draft_tokens=12, spans=None,
                        rho=0.3, span_distribution="uniform")
    prompts = [np.arange(10, 15), np.arange(20, 25)]
    conts = [np.arange(50, 57), np.arange(60, 67)]
    it = distilled_examples(prompts, conts, p)
    first = [next(it) for _ in range(4)]
    clean = [tuple(e["input_ids"][:2]) for e in first]
    assert sorted(clean[:2]) == [(10, 11), (20, 21)] and sorted(clean[2:]) == [(10, 11), (20, 21)]
    again = list(zip(range(4), distilled_examples(prompts, conts, p), strict=False))
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, (_, b) in zip(first, again, strict=True))


def test_windows_skip_eos():
    w = windows(np.array([5, 6, 7, 1, 8, 9, 10, 11, 12]), 2, eos_id=1)
    assert w.tolist() == [[5, 6], [8, 9], [10, 11]]


def test_batched_greedy_continuation_equals_hf_generate_per_prompt():
    import torch

    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(40, seed=3)
    prompts = np.array([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    got = greedy_continue(model, prompts, 10, eos_ids={1}, pad_id=1)
    for p, g in zip(prompts, got, strict=True):
        ids = torch.tensor([p])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                             eos_token_id=1, pad_token_id=1)[0, 4:].tolist()
        ref = ref[: ref.index(1) + 1] if 1 in ref else ref
        assert g == ref


def test_distill_job_locally_is_tracked(tmp_path, monkeypatch, capsys, tracking_on):
    """`fluid distill --local` on a tiny model: the shards and summary, and (mlflow installed) an MLflow run
    with the settings and the summary in `<distill.output>/mlflow.db`."""
    import json

    from jobs.distill import main
    from tests.conftest import WORDS, make_tiny_llama, make_tiny_tokenizer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tok = make_tiny_tokenizer()
    make_tiny_llama(len(tok)).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "corpus").mkdir()
    for i in range(6):
        (tmp_path / "corpus" / f"d{i}.txt").write_text(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(80)))
    out = tmp_path / "distilled"
    assert main(["--local", f"--model.spec={tmp_path / 'model'}", f"--model.cache_dir={tmp_path / 'cache'}",
                 f"--data.corpus={tmp_path / 'corpus'}", f"--distill.output={out}", "--distill.count=4",
                 "--distill.shard_size=2", "--distill.prompt_len=8", "--distill.new_tokens=4",
                 "--distill.cpus_per_actor=1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["prompts"] == 4 and summary["shards_written"] == 2
    import mlflow
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "distill" and run.info.status == "FINISHED"
    assert run.data.params["distill.count"] == "4" and run.data.metrics["tokens"] == summary["tokens"]
