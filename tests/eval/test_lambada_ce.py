"""AR CE over N LAMBADA tokens (pipeline/eval/metrics.py: lambada_ar_ce; `fluid evaluate --lambada-ce-only`)."""

import json

import numpy as np
import pytest
import torch

from pipeline.eval.metrics import lambada_ar_ce, lambada_token_ids
from pipeline.sources.eval_data import LambadaItem
from tests.conftest import WORDS, make_tiny_llama, make_tiny_tokenizer
from tests.eval.conftest import make_tiny_export
from tests.eval.test_evaluate import Unigram


def _items(n: int, seed: int = 0) -> list[LambadaItem]:
    rng = np.random.default_rng(seed)
    return [LambadaItem(" ".join(rng.choice(WORDS, size=int(rng.integers(5, 15)))), str(rng.choice(WORDS)))
            for _ in range(n)]


def test_lambada_ce_scores_whole_passages_until_n_tokens():
    tok = make_tiny_tokenizer()
    items = _items(40)
    p = np.full(len(tok), 1 / len(tok))
    p[:4] = [0.3, 0.2, 0.1, 0.05]
    p[4:] = (1 - p[:4].sum()) / (len(tok) - 4)
    seqs = lambada_token_ids(tok, items, 100)
    assert sum(len(s) - 1 for s in seqs[:-1]) < 100 <= sum(len(s) - 1 for s in seqs)  # whole passages, no more
    assert seqs[0] == tok(f"{items[0].context} {items[0].target}", add_special_tokens=False)["input_ids"]
    r = lambada_ar_ce(Unigram(p), tok, items, min_tokens=100, batch_size=3)
    want = np.mean([-np.log(p[t]) for s in seqs for t in s[1:]])
    assert r["tokens"] == sum(len(s) - 1 for s in seqs) and r["passages"] == len(seqs)
    assert r["ce"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="fewer than"):
        lambada_ar_ce(Unigram(p), tok, items[:2], min_tokens=10_000)


def test_lambada_ce_is_the_same_padded_or_one_passage_at_a_time():
    torch.set_num_threads(1)
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok))
    items = _items(12, seed=1)
    batched = lambada_ar_ce(model, tok, items, min_tokens=80, batch_size=8)
    single = lambada_ar_ce(model, tok, items, min_tokens=80, batch_size=1)
    assert batched["tokens"] == single["tokens"] and batched["ce"] == pytest.approx(single["ce"], rel=1e-5)


def test_evaluate_lambada_ce_only_writes_a_record_for_the_export_and_its_base(tmp_path, monkeypatch):
    import pipeline.sources.eval_data as eval_data
    from jobs.evaluate import main

    export, cache = make_tiny_export(tmp_path)
    items = _items(60, seed=2)
    monkeypatch.setattr(eval_data, "lambada_items", lambda n, cache_dir=None: items[:n] if n else items)
    out = tmp_path / "eval-out"
    assert main(["--model", str(export), "--lambada-ce-only", "--eval.lambada_ce_tokens=200",
                 f"--eval.output={out}", f"--model.cache_dir={cache}"]) == 0
    rec = json.loads((out / "lambada_ce.json").read_text())
    v = rec["values"]
    assert v["tokens"] >= 200 and v["model"] > 0 and v["base"] > 0 and v["model"] != v["base"]
    assert rec["models"]["base"].endswith("base") and "--lambada-ce-only" in rec["command"]
    assert rec["machine"]["cpu_model"] and rec["date"] and "200" in rec["figure"]
