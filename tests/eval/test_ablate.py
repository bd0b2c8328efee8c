"""The ablation's metric and its three arms on a tiny model (seconds, no Ray)."""

import json

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.noise import clean_stream
from pipeline.eval.horizon_ce import eval_chunks, horizon_ce, tokens_to_reach
from tests.conftest import WORDS, make_tiny_llama, make_tiny_tokenizer


def test_causal_metric_equals_the_two_stream_forward_of_one_span():
    """Prefix + masks under the plain causal mask = a two-stream example with one span at c (rho = 0)."""
    from pipeline.model.causal_lm import add_mask_token, forward_batch

    tok = make_tiny_tokenizer()
    mask_id = len(tok)
    model = add_mask_token(make_tiny_llama(len(tok)), mask_id)
    rng = np.random.default_rng(0)
    chunk = rng.integers(2, len(tok), size=(1, 12))
    p, h = 8, 4
    got = horizon_ce(model, chunk, mask_id=mask_id, horizon=h, mode="causal")

    x = chunk[0]
    clean = clean_stream(x[:p + 1])  # clean output at c = p − 1 predicts x_p (k = 1)
    span = {"input_ids": np.full(h - 1, mask_id), "position_ids": np.arange(p, p + h - 1),
            "span_id": np.zeros(h - 1), "anchor": np.full(h - 1, p - 1), "labels": x[p + 1:p + h],
            "k": np.arange(2, h + 1)}
    batch = {c: torch.tensor(np.concatenate([clean[c], span[c]]))[None].long() for c in span}
    with torch.no_grad():
        logits = forward_batch(model, batch)
    rows = [p - 1] + list(range(p + 1, p + h))  # clean stream holds p + 1 tokens; then the span
    want = torch.nn.functional.cross_entropy(logits[0, rows], torch.tensor(x[p:p + h]), reduction="none")
    assert np.allclose(got, want.tolist(), atol=1e-4)


def test_bidirectional_metric_lets_the_prefix_see_the_masks():
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok) + 1)
    chunk = np.random.default_rng(1).integers(2, len(tok), size=(2, 10))
    causal = horizon_ce(model, chunk, mask_id=len(tok), horizon=3, mode="causal")
    bidir = horizon_ce(model, chunk, mask_id=len(tok), horizon=3, mode="bidirectional")
    assert len(causal) == len(bidir) == 3 and not np.allclose(causal, bidir)
    with pytest.raises(Exception, match="unknown layout"):
        horizon_ce(model, chunk, mask_id=len(tok), horizon=3, mode="sideways")


def test_tokens_to_reach_interpolates_and_reports_never():
    assert tokens_to_reach([0, 100, 200], [5.0, 3.0, 1.0], 2.0) == 150.0
    assert tokens_to_reach([0, 100], [1.0, 0.5], 2.0) == 0.0
    assert tokens_to_reach([0, 100], [5.0, 4.0], 2.0) is None
    chunks = eval_chunks(np.arange(100), 3, 10)
    assert chunks.shape == (3, 10) and chunks[0, 0] == 0 and chunks[-1, 0] == 90


def test_three_arms_train_and_write_table_and_plot(tmp_path):
    from pipeline.eval.ablate import run_ablation
    from pipeline.sources.model_source import resolve_model

    tok = make_tiny_tokenizer()
    (tmp_path / "model").mkdir()
    make_tiny_llama(len(tok), seed=5).save_pretrained(tmp_path / "model")  # ≠ the scratch arm's seeded init
    tok.save_pretrained(tmp_path / "model")
    resolved = resolve_model(str(tmp_path / "model"), tmp_path / "cache")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS, size=80)))
    out = tmp_path / "ablate"
    cfg = load_config(None, [f"--data.corpus={corpus}", "--data.val_fraction=0.25", "--data.test_fraction=0.1",
                             "--ablate.tokens=256", "--ablate.seq_len=16", "--ablate.batch_size=4",
                             "--ablate.evals=2", "--ablate.eval_items=4", "--ablate.prefix_len=6",
                             "--ablate.horizon=3", "--ablate.lr=0.01", "--noise.k_max=4", f"--ablate.output={out}"])
    logs = []
    result = run_ablation(cfg, resolved, log=logs.append)
    assert set(result["arms"]) == {"causal", "bidirectional", "scratch"}
    for cv in result["arms"].values():
        assert cv["tokens"] == [0, 128, 256] and len(cv["ce_by_k"]) == 3 and len(cv["ce_by_k"][0]) == 3
    causal, bidir = result["arms"]["causal"], result["arms"]["bidirectional"]
    assert causal["ce_by_k"][0] != bidir["ce_by_k"][0]  # each arm is scored under its own layout
    assert result["arms"]["scratch"]["ce_by_k"][0] != causal["ce_by_k"][0]  # random init ≠ pretrained
    reach = result["tokens_to_reach_bidirectional"]
    final_b = bidir["ce_by_k"][-1]
    assert reach["bidirectional"][2] is not None and reach["bidirectional"][2] <= 256
    for k in (2, 3):
        hit = reach["causal"][k]
        assert (hit is None) == (min(ce[k - 1] for ce in causal["ce_by_k"]) > final_b[k - 1])
    assert (out / "ablate.png").stat().st_size > 1000 and "| causal |" in (out / "ablate.md").read_text()
    # a re-run reuses the finished arms
    logs.clear()
    again = run_ablation(cfg, resolved, log=logs.append)
    assert sum("reusing" in m for m in logs) == 3 and again["arms"]["causal"] == json.loads(
        (out / "arm_causal.json").read_text())
