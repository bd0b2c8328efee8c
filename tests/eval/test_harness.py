"""lm-evaluation-harness on a tiny export (pipeline/eval/harness.py): the local LAMBADA tasks end to end,
offline, agree with our own LAMBADA loop item for item; loglikelihoods equal a direct forward; the
interval and AUP helpers; `fluid evaluate --tasks` writes the harness section and the AUP table."""

import math

import pytest
import torch

from pipeline.errors import FluidError
from pipeline.eval.metrics import aup, first_word, lambada, wilson_interval
from pipeline.sources.eval_data import LambadaItem
from tests.conftest import WORDS
from tests.eval.conftest import make_tiny_export

lm_eval = pytest.importorskip("lm_eval")


def test_wilson_interval_known_values():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(5, 10)  # p̂ = 0.5, z = 1.96: 0.5 ± 0.2634
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = wilson_interval(0, 10)  # never below 0, and not empty (unlike the normal interval)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(150, 500)
    assert lo < 0.3 < hi and hi - lo == pytest.approx(0.0803, abs=1e-3)  # ± 4 points at 500 items
    assert wilson_interval(3, 10) == pytest.approx(tuple(1 - x for x in reversed(wilson_interval(7, 10))))
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_aup_is_the_weighted_area_under_accuracy_against_tokens_per_forward():
    assert aup([(1.0, 0.5)]) == 0.0
    assert aup([(2.0, 0.5), (1.0, 0.5)]) == pytest.approx(0.5)  # sorted by tokens per forward
    # the lower accuracy counts with weight exp(−3 · (1 − 0.25 / 0.5))
    assert aup([(1.0, 0.5), (3.0, 0.25)]) == pytest.approx(2 * (0.5 + 0.25 * math.exp(-1.5)) / 2)


def _items(sampler, n: int = 6) -> tuple[list[LambadaItem], int]:
    """Contexts of tiny-vocabulary words; the even ones get the model's own greedy word as their target
    (right), the odd ones another word (wrong). Only contexts whose greedy continuation starts with a word
    token (not punctuation) are kept, where both scorings must agree. → (items, how many are right)."""
    g = torch.Generator().manual_seed(0)
    words = [w for w in WORDS if w.isalpha()]
    items = []
    while len(items) < n:
        ctx = " ".join(words[i] for i in torch.randint(len(words), (6,), generator=g).tolist())
        [r] = sampler.generate([_req(sampler, ctx)])
        first = sampler.decode(r.token_ids[:1]).strip()
        if first.isalpha():
            target = first if len(items) % 2 == 0 else next(w for w in words if w != first)
            items.append(LambadaItem(ctx, target))
    return items, (n + 1) // 2


def _req(sampler, ctx: str):
    from pipeline.decode.sampler import GenerationRequest

    return GenerationRequest(prompt_ids=sampler.encode(ctx), max_tokens=3, policy="ar", stop_on_eos=True)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    import pipeline.sources.eval_data as eval_data
    from pipeline.eval.harness import FluidLM

    export, cache = make_tiny_export(tmp_path)
    lm = FluidLM(str(export), batch_size=4)
    items, right = _items(lm.sampler)
    monkeypatch.setattr(eval_data, "lambada_items", lambda n=None, cache_dir=None: items[:n] if n else items)
    return export, cache, lm, items, right


def test_local_lambada_through_the_harness_agrees_with_our_loop_offline(tiny, monkeypatch):
    from pipeline.eval.harness import FluidLM, run_tasks

    export, _, lm, items, right = tiny
    ours = lambada(lm.sampler, items, policy="ar")
    assert ours["correct"] == right  # the items are built so
    offline = {}

    def no_hub(*a, **k):  # the local tasks never load from the hub
        raise AssertionError("datasets.load_dataset was called")

    monkeypatch.setattr("datasets.load_dataset", no_hub)
    real = lm.sampler.generate

    def generate(reqs):  # and run with the hub switched off
        import datasets

        offline["datasets"] = datasets.config.HF_DATASETS_OFFLINE
        return real(reqs)

    monkeypatch.setattr(lm.sampler, "generate", generate)
    r = run_tasks(lm, ["lambada_openai", "lambada_openai_gen"], limit=len(items))
    assert offline == {"datasets": True}
    assert r["samples"] == {"lambada_openai": len(items), "lambada_openai_gen": len(items)}
    assert r["tasks"]["lambada_openai"]["acc"] * len(items) == pytest.approx(ours["correct"])
    assert r["tasks"]["lambada_openai_gen"]["exact_match"] * len(items) == pytest.approx(ours["correct"])
    assert r["tasks"]["lambada_openai"]["perplexity"] > 1
    p = r["parallelism"]
    assert p["requests"] == len(items) and p["tokens_per_forward"] == 1.0 and p["forwards"] == p["tokens"] > 0
    # another policy: verify (fp32) decodes exactly the AR text, in fewer or as many forwards
    v = run_tasks(FluidLM(sampler=lm.sampler, policy="verify", batch_size=2), ["lambada_openai_gen"], limit=len(items))
    assert v["tasks"]["lambada_openai_gen"]["exact_match"] == r["tasks"]["lambada_openai_gen"]["exact_match"]
    assert v["parallelism"]["requests"] == len(items) and v["parallelism"]["tokens_per_forward"] >= 1.0


@torch.no_grad()
def _direct_logprobs(sampler, ids: list[int]) -> torch.Tensor:
    """log p of each next token of `ids`, one unpadded forward, the sampler's banned ids excluded."""
    logits = sampler.model(input_ids=torch.tensor([ids])).logits[0].float()
    logits[:, sampler.banned_ids] = float("-inf")
    return torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def test_loglikelihoods_equal_a_direct_forward(tiny):
    from lm_eval.api.instance import Instance

    _, _, lm, items, _ = tiny
    pairs = [(it.context, " " + it.target) for it in items[:5]] + [("the", " quick brown fox")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        c, whole = lm.sampler.encode(ctx), lm.sampler.encode(ctx + cont)
        direct = _direct_logprobs(lm.sampler, whole)[len(c) - 1:]
        assert ll == pytest.approx(float(direct.sum()), rel=1e-5, abs=1e-5)
        with torch.no_grad():
            logits = lm.sampler.model(input_ids=torch.tensor([whole])).logits[0, len(c) - 1:-1]
        assert greedy == bool((logits.argmax(-1) == torch.tensor(whole[len(c):])).all())
    text = "to be or not to be that is the question"
    [rolling] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [lm.eot_token_id] + lm.sampler.encode(text)
    assert rolling == pytest.approx(float(_direct_logprobs(lm.sampler, ids).sum()), rel=1e-5)


def test_generate_until_honours_stop_strings_and_max_gen_toks(tiny):
    from lm_eval.api.instance import Instance

    _, _, lm, items, _ = tiny
    ctx = items[0].context
    [free] = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": [], "max_gen_toks": 6}), 0)])
    assert lm.generations[-1]["tokens"] <= 6 and free
    stop = first_word(free)
    [cut] = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": [stop], "max_gen_toks": 6}), 0)])
    assert cut == free[:free.index(stop)]


def test_a_task_that_needs_the_hub_fails_clearly_when_offline(monkeypatch):
    from pipeline.eval.harness import LOCAL_TASKS, hub_offline

    assert set(LOCAL_TASKS) == {"lambada_openai", "lambada_openai_gen"}
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FluidError, match="need the dataset hub and HF_DATASETS_OFFLINE is set"), hub_offline(["hellaswag"]):
        pass
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import os

    with hub_offline(["lambada_openai"]):
        assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
    assert "HF_DATASETS_OFFLINE" not in os.environ and "HF_HUB_OFFLINE" not in os.environ


def test_fluid_evaluate_tasks_reports_the_agreement_and_the_aup_table(tiny):
    import json

    from jobs.evaluate import main

    export, cache, _, items, right = tiny
    assert main(["--model", str(export), "--tasks", "lambada_openai,lambada_openai_gen", f"--model.cache_dir={cache}",
                 f"--eval.lambada_items={len(items)}", "--eval.ce_sequences=2", "--eval.prompts=1",
                 "--eval.max_tokens=4", "--eval.repeats=1", "--eval.gammas=[]", "--eval.tasks=1",
                 "--eval.policies=[ar]", "--eval.aup_policies=[ar,verify,threshold:0.5]", "--eval.aup_items=4",
                 "--sampler.forward_cost=[1.0,1.25]", "--sampler.matmul=stock"]) == 0
    out = export.parent / "eval"
    h = json.loads((out / "report.json").read_text())["harness"]
    for key in ("lambada_agreement", "lambada_gen_agreement"):  # item for item
        assert h[key] == {"items": len(items), "ours_correct": right, "harness_correct": right, "only_harness": 0,
                          "only_ours": 0, "examples": []}
    rows = h["aup"]["rows"]
    assert [(r["policy"], r["gamma"]) for r in rows] == [("ar", None), ("verify", None), ("threshold", 0.5)]
    assert all(r["items"] == 4 and r["requests"] == 4 and r["tokens_per_forward"] >= 1 for r in rows)
    assert rows[0]["tokens_per_forward"] == 1.0 and rows[1]["correct"] == rows[0]["correct"]
    want = aup([(r["tokens_per_forward"], r["accuracy"]) for r in rows])
    assert h["aup"]["aup"] == pytest.approx(want)
    md = (out / "report.md").read_text()
    assert "## lm-evaluation-harness" in md and "### Accuracy against tokens per forward" in md
    assert f"our `ar` count: {right}" in md and "95 % interval" in md


def test_the_fluid_model_type_is_registered_and_reads_model_args(tiny):
    from lm_eval.api.registry import get_model

    from pipeline.eval.harness import FluidLM

    export = tiny[0]
    assert get_model("fluid") is FluidLM
    lm = FluidLM.create_from_arg_string(f"export={export},policy=verify,threshold=0.9,dtype=float32",
                                        {"batch_size": 4, "device": "cpu"})
    assert (lm.policy, lm.gamma, lm.batch_size) == ("verify", 0.9, 4)
    assert next(lm.sampler.model.parameters()).dtype == torch.float32
    with pytest.raises(FluidError, match=r"unknown model_args \['polcy'\]"):
        FluidLM.create_from_arg_string(f"export={export},polcy=verify")


def test_lambada_agreement_names_the_items_only_one_side_counts(monkeypatch):
    import pipeline.sources.eval_data as eval_data
    from pipeline.eval.evaluate import lambada_agreement

    items = [LambadaItem("he opened the", "door"), LambadaItem("a", "cat"), LambadaItem("b", "dog"), LambadaItem("c", "y")]
    monkeypatch.setattr(eval_data, "lambada_items", lambda n=None, cache_dir=None: items[:n])
    ar = {"items": 4, "predictions": ["doors", "cat", "dog", "x"]}
    a = lambada_agreement(ar, [1.0, 1.0, 0.0, 0.0], None)
    assert a == {"items": 4, "ours_correct": 2, "harness_correct": 2, "only_harness": 1, "only_ours": 1,
                 "examples": [["door", "doors"], ["dog", "dog"]]}
