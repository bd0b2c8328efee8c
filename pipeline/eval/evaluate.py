"""The `fluid evaluate` run (jobs/evaluate.py is its entrypoint): what adaptation bought and what it cost.

* `evaluate`           the whole report of an export and its base model: held-out AR CE and draft CE by k
                       (`heldout_chunks`, `heldout_ce`), LAMBADA accuracy per policy (`lambada_table`), the
                       sampler table and `threshold` sweep (`sampler_table`), the LAMBADA AR CE
                       (`lambada_ce`), the horizon of a few prompts (`horizon_samples`) → report.json,
                       report.md, horizon.html and PNG plots (pipeline/eval/report.py);
* `lambada_ce_record`  `--lambada-ce-only`: the LAMBADA AR CE of any model as a record (lambada_ce.json).

Not in the core's "never imports Ray" contract (pyproject.toml): `lambada_table` spreads the LAMBADA
items over Ray tasks (`_lambada_task`) when `eval.tasks` > 1; every other function is Ray-free.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from pipeline.errors import FluidError


def evaluate(cfg, export: str, *, base_spec: str | None = None, metrics_path: str | None = None,
             log=lambda m: print(m, flush=True)) -> dict:
    """The evaluation report of `export` against its base model (`base_spec` or fluid.json's), written as
    report.json, report.md and plots to `eval.output` (default: `eval` next to the export); progress to `log`."""
    import torch

    from pipeline.decode.load import load_sampler
    from pipeline.train.outputs import METRICS

    e = cfg.eval
    meta, base_spec = _export_meta(e, export, base_spec)
    out = Path(e.output or Path(export).resolve().parent / "eval")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # the user's sampler settings: a pinned forward cost makes verify's horizon, and so its tokens per
    # forward, independent of this machine's timing (it was measured here whatever sampler.forward_cost said)
    sampler = load_sampler(export, forward_cost=cfg.sampler.forward_cost or None, matmul=cfg.sampler.matmul)
    base = load_sampler(base_spec, cache_dir=cfg.model.cache_dir, k_max=sampler.k_max)
    policies = [p for p in e.policies if p != "khead" or sampler.horizon_head is not None]
    if "ar" not in policies:
        policies.insert(0, "ar")
    data = meta.get("data_config", {}).get("data", {})
    chunks = heldout_chunks(cfg, data, sampler, e.ce_sequences)
    log(f"[fluid] evaluate: held-out CE on {len(chunks)} test sequences of {chunks.shape[1]} tokens …")
    ce = heldout_ce(base, sampler, chunks)
    log(f"[fluid] evaluate: AR CE {ce['base_ar_ce']:.3f} (base) → {ce['adapted_ar_ce']:.3f} (adapted), "
        f"k=2 CE {ce['base_by_k'][1]:.2f} → {ce['adapted_by_k'][1]:.2f}")

    if e.lambada_ce_tokens > 0:
        log(f"[fluid] evaluate: AR CE on {e.lambada_ce_tokens} LAMBADA tokens …")
        ce["lambada_ar_ce"] = lambada_ce({"base": base, "adapted": sampler}, e.lambada_ce_tokens, cfg.model.cache_dir)
    lam = []
    if e.lambada_items > 0:
        lam_policies = [p for p in policies if p in e.lambada_policies or p == "ar"] if e.lambada_policies else policies
        log(f"[fluid] evaluate: LAMBADA, {e.lambada_items} items × {len(lam_policies)} policies, {e.tasks} task(s) …")
        lam = lambada_table(export, lam_policies, e.lambada_items, e.tasks, cfg.model.cache_dir, sampler=sampler)
    harness = harness_section(cfg, sampler, lam, log) if e.harness_tasks else None
    log(f"[fluid] evaluate: sampler table, {e.prompts} prompts × {e.max_tokens} tokens, {e.repeats} round(s) …")
    prompt_ids = [c[: max(8, chunks.shape[1] // 2)].tolist() for c in chunks[: e.prompts]]
    table, sweep = sampler_table(sampler, base.model, prompt_ids, policies, e.max_tokens, e.repeats, e.gammas)
    del base
    report = {
        "settings": {"model": str(export), "base_model": base_spec, "ce_sequences": int(len(chunks)),
                     "seq_len": int(chunks.shape[1]), "lambada_items": e.lambada_items, "prompts": len(prompt_ids),
                     "max_tokens": e.max_tokens, "repeats": e.repeats, "policies": policies,
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
                     "date": time.strftime("%Y-%m-%d %H:%M")},
        "ce": ce, "lambada": lam, "sampler": table, "gamma_sweep": sweep, **({"harness": harness} if harness else {}),
        "horizon": horizon_samples(sampler, prompt_ids[:3], policies, e.max_tokens),
    }
    curve = training_curve(Path(export).resolve().parent, out)
    if curve:
        report["curve"] = curve
    write_report(report, out, Path(metrics_path) if metrics_path else Path(export).resolve().parent / METRICS)
    report["seconds"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=1))
    track_report(cfg, export, report)
    return report


def harness_section(cfg, sampler, lam: list[dict], log) -> dict:
    """`eval.harness_tasks` through lm-evaluation-harness (pipeline/eval/harness.py) on the first
    `eval.harness_limit` docs (AR path for loglikelihoods), with `lambada_openai`'s count beside our LAMBADA
    table's `ar` count when both scored the same items; then the accuracy-against-tokens-per-forward table:
    `lambada_openai_gen` under each of `eval.aup_policies` on `eval.aup_items` docs, with its AUP."""
    from pipeline.eval.metrics import aup, wilson_interval

    e = cfg.eval
    try:
        from pipeline.eval.harness import FluidLM, run_tasks
    except ImportError as err:
        raise FluidError(f"fluid evaluate --tasks needs lm-evaluation-harness ({err}): "
                         "pip install 'fluid-on-ray[harness]'") from None
    limit = e.lambada_items if e.harness_limit is None else (e.harness_limit or None)
    log(f"[fluid] evaluate: lm-evaluation-harness {e.harness_tasks}, {limit or 'all'} docs each …")
    out = run_tasks(FluidLM(sampler=sampler, policy="ar"), e.harness_tasks, limit=limit, cache_dir=cfg.model.cache_dir,
                    per_doc=True)
    out["limit"] = limit
    ar = next((r for r in lam if r["policy"] == "ar"), None)
    per_doc = out.pop("per_doc")
    if ar and ar["items"] == out["samples"].get("lambada_openai"):
        out["lambada_agreement"] = lambada_agreement(ar, per_doc["lambada_openai"]["acc"], cfg.model.cache_dir)
    if ar and ar["items"] == out["samples"].get("lambada_openai_gen"):
        out["lambada_gen_agreement"] = lambada_agreement(ar, per_doc["lambada_openai_gen"]["exact_match"],
                                                         cfg.model.cache_dir)
    rows = []
    for spec in e.aup_policies:
        policy, _, gamma = spec.partition(":")
        if policy == "khead" and sampler.horizon_head is None:
            continue
        log(f"[fluid] evaluate: accuracy against tokens per forward, {spec} on {e.aup_items} LAMBADA docs …")
        r = run_tasks(FluidLM(sampler=sampler, policy=policy, gamma=float(gamma) if gamma else None),
                      ["lambada_openai_gen"], limit=e.aup_items, cache_dir=cfg.model.cache_dir)
        n, acc = r["samples"]["lambada_openai_gen"], r["tasks"]["lambada_openai_gen"]["exact_match"]
        rows.append({"policy": policy, "gamma": float(gamma) if gamma else None, "items": n, "correct": round(acc * n),
                     "accuracy": acc, "interval": wilson_interval(round(acc * n), n), **r["parallelism"]})
    if rows:
        out["aup"] = {"task": "lambada_openai_gen", "rows": rows,
                      "aup": aup([(r["tokens_per_forward"], r["accuracy"]) for r in rows])}
    return out


def lambada_agreement(ar: dict, harness: list[float], cache_dir) -> dict:
    """Our `ar` LAMBADA row against the harness's per-item scores on the same items: both counts, the items
    only one of them counts right, and a few of them as (target, our first word). lambada_openai's rule
    (the target's tokens are the greedy ones) and ours (the first generated word is the target) differ where
    greedy decoding goes on with the word (target "door", greedy "doors") or spells it with other tokens."""
    from pipeline.sources.eval_data import lambada_items

    items = lambada_items(ar["items"], cache_dir)
    ours = [p == it.target for p, it in zip(ar["predictions"], items, strict=True)]
    theirs = [bool(h) for h in harness]
    only_h = [i for i, (o, h) in enumerate(zip(ours, theirs, strict=True)) if h and not o]
    only_o = [i for i, (o, h) in enumerate(zip(ours, theirs, strict=True)) if o and not h]
    return {"items": ar["items"], "ours_correct": sum(ours), "harness_correct": sum(theirs),
            "only_harness": len(only_h), "only_ours": len(only_o),
            "examples": [[items[i].target, ar["predictions"][i]] for i in (only_h + only_o)[:6]]}


def training_curve(run_dir: Path, out: Path) -> dict | None:
    """What training bought, when `fluid bench curve` measured the run (`<run>/curve.json`, its plot copied
    next to the report); None otherwise."""
    import shutil

    from pipeline.train.outputs import CURVE_FILE

    path = run_dir / CURVE_FILE
    if not path.is_file():
        return None
    try:
        curve = json.loads(path.read_text())
    except ValueError:
        return None
    png = run_dir / "curve.png"
    if png.is_file() and png.resolve() != (out / png.name).resolve():
        shutil.copyfile(png, out / png.name)
    curve["plot"] = png.name if png.is_file() else None
    return curve


def write_report(report: dict, out: Path, metrics_path: Path) -> None:
    """Plots (with the run's training curves from `metrics_path`), horizon.html and report.md into `out`;
    their paths into `report`."""
    from pipeline.eval.report import horizon_html, markdown, write_plots

    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] if metrics_path.is_file() else []
    report["plots"] = write_plots(report, rows, out)
    report["paths"] = {"json": str(out / "report.json"), "markdown": str(out / "report.md"), "folder": str(out)}
    if report.get("horizon"):
        report["paths"]["horizon_html"] = horizon_html(report["horizon"], out)
    (out / "report.md").write_text(markdown(report))


def horizon_samples(sampler, prompt_ids: list[list[int]], policies: list[str], max_tokens: int) -> list[dict]:
    """A few held-out prompts decoded with `verify` (else the first policy that drafts): the text each
    forward committed (`chunks`: [step, text]) and how many tokens each forward committed (`widths`)."""
    from pipeline.decode.sampler import GenerationRequest
    from pipeline.decode.show import step_chunks

    policy = "verify" if "verify" in policies else next((p for p in policies if p != "ar"), "ar")
    out = []
    for ids in prompt_ids:
        [r] = sampler.generate([GenerationRequest(prompt_ids=ids, policy=policy, max_tokens=min(max_tokens, 64),
                                                  stop_on_eos=False)])
        widths = [0] * r.stats.forwards
        for s in r.stats.step_of_token:
            widths[s] += 1
        chunks = step_chunks(sampler.decode, r.token_ids, r.stats.step_of_token, r.text)
        out.append({"policy": policy, "prompt": sampler.decode(ids)[-300:], "widths": widths,
                    "chunks": [[s, t] for s, t in chunks]})
    return out


def track_report(cfg, export: str, report: dict) -> None:
    """The report as an MLflow run (pipeline/train/tracking.py) in the store of the export's folder (the
    adapt run's, nested under its run): settings as params, headline numbers as metrics, report.json,
    report.md, horizon.html and the plots as artifacts."""
    from pipeline.train.tracking import tracked

    with tracked(cfg.train.tracking, Path(export).resolve().parent, "evaluate", report["settings"]) as tracker:
        if tracker is None:
            return
        ce = report["ce"]
        tracker.log_metrics({"base_ar_ce": ce["base_ar_ce"], "adapted_ar_ce": ce["adapted_ar_ce"],
                             "ar_ce_change": ce["ar_ce_change"],
                             **{f"lambada_accuracy_{r['policy']}": r["accuracy"] for r in report["lambada"]},
                             **{f"tokens_per_forward_{r['policy']}": r["tokens_per_forward"]
                                for r in report["sampler"]["rows"]},
                             **{f"harness_{t}_{k}": v for t, m in report.get("harness", {}).get("tasks", {}).items()
                                for k, v in m.items()},
                             **({"aup": report["harness"]["aup"]["aup"]} if "aup" in report.get("harness", {}) else {})})
        paths = report["paths"]
        tracker.log_artifacts([paths["json"], paths["markdown"], paths.get("horizon_html"), *report["plots"]],
                              "evaluate")


def _export_meta(e, export: str, base_spec: str | None) -> tuple[dict, str]:
    """The export's fluid.json as a dict and the base model spec (`base_spec` or fluid.json's); expected
    errors for a folder that is no export, an unknown policy in `eval.policies` and no base model."""
    from pipeline.decode.load import is_export
    from pipeline.export_format import FLUID_META_FILE, read_fluid_meta

    if not is_export(export):
        raise FluidError(f"{export} is not a FLUID export (no {FLUID_META_FILE}); run fluid adapt first")
    unknown = [p for p in e.policies + e.lambada_policies + [a.partition(":")[0] for a in e.aup_policies]
               if p not in ("ar", "fixed", "threshold", "entropy", "khead", "verify")]
    if unknown:
        raise FluidError(f"eval.policies / lambada_policies / aup_policies: unknown policies {unknown}")
    meta = read_fluid_meta(export).to_dict()
    base_spec = base_spec or meta.get("base_model", {}).get("spec")
    if not base_spec:
        raise FluidError(f"{export}/{FLUID_META_FILE} names no base model: pass --base SPEC")
    return meta, base_spec

def heldout_ce(base, sampler, chunks) -> dict:
    """AR CE and draft CE by k of the base and the adapted model on the same held-out sequences, with the
    tokens each CE averages over (`ar_tokens`; `by_k_tokens` for each k)."""
    from pipeline.eval.metrics import ar_ce, cursor_ends, draft_ce_by_k

    n, length = chunks.shape
    k_max = min(sampler.k_max, length - 2)
    ce = {"ks": list(range(1, k_max + 1)), "sequences": int(n), "ar_tokens": int(n * (length - 1)),
          "by_k_tokens": int(n * len(cursor_ends(length)))}  # scored tokens: every next token; per k
    for name, s in (("base", base), ("adapted", sampler)):
        ce[f"{name}_ar_ce"] = ar_ce(s.model, chunks)
        ce[f"{name}_by_k"] = draft_ce_by_k(s.model, chunks, mask_id=s.mask_token_id, k_max=k_max)
    ce["ar_ce_change"] = ce["adapted_ar_ce"] / ce["base_ar_ce"] - 1
    return ce


def lambada_ce(samplers: dict, tokens: int, cache_dir) -> dict:
    """{name: AR CE} of each sampler's model over the same ≥ `tokens` LAMBADA tokens, plus "tokens" and
    "passages" (pipeline/eval/metrics.py: lambada_ar_ce)."""
    from pipeline.eval.metrics import lambada_ar_ce
    from pipeline.sources.eval_data import lambada_items

    items = lambada_items(None, cache_dir)
    out = {}
    for name, s in samplers.items():
        try:
            r = lambada_ar_ce(s.model, s.tokenizer, items, min_tokens=tokens)
        except ValueError as e:
            raise FluidError(f"eval.lambada_ce_tokens: {e}") from None
        out.update({name: r["ce"], "tokens": r["tokens"], "passages": r["passages"]})
    return out


def lambada_ce_record(cfg, model_spec: str, *, base_spec: str | None, argv) -> dict:
    """`--lambada-ce-only`: the LAMBADA AR CE of `model_spec` (and of an export's base model) as a
    record — figure, values, command, commit, machine, date — written to <eval.output>/lambada_ce.json."""
    import shlex

    from pipeline.decode.load import is_export, load_sampler
    from pipeline.export_format import read_fluid_meta
    from pipeline.records import git_commit, machine

    commit, t0 = git_commit(), time.perf_counter()
    tokens = cfg.eval.lambada_ce_tokens or 50_000
    if is_export(model_spec):
        base_spec = base_spec or read_fluid_meta(model_spec).base_spec
    specs = {"model": model_spec, **({"base": base_spec} if base_spec else {})}
    samplers = {name: load_sampler(spec, cache_dir=cfg.model.cache_dir, forward_cost=[1.0], matmul="stock")
                for name, spec in specs.items()}
    values = lambada_ce(samplers, tokens, cfg.model.cache_dir)
    out = Path(cfg.eval.output or "runs/eval")
    out.mkdir(parents=True, exist_ok=True)
    rec = {"figure": f"AR CE (nats/token) over ≥ {tokens} LAMBADA test tokens (whole passages, file order)",
           "models": specs, "values": values, "seconds": time.perf_counter() - t0,
           "command": shlex.join(["fluid", "evaluate", *(sys.argv[1:] if argv is None else argv)]),
           "commit": commit, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
           "path": str(out / "lambada_ce.json")}
    Path(rec["path"]).write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def heldout_chunks(cfg, data: dict, sampler, n: int):
    """`n` test-split sequences of the export's corpus (its data settings), as token ids [n, seq_len]."""
    import numpy as np

    from pipeline.eval.horizon_ce import eval_chunks
    from pipeline.sources.corpus import iter_documents, list_sources

    corpus = data.get("corpus") or cfg.data.corpus
    split = {k: data.get(k, getattr(cfg.data, k)) for k in ("val_fraction", "test_fraction", "split_seed")}
    seq_len = int(data.get("seq_len", cfg.data.seq_len))
    sources = list_sources(corpus, cache_dir=cfg.model.cache_dir, **split)
    docs = [d.text for d in iter_documents(sources, split="test", **split)]
    if not docs:
        raise FluidError(f"the corpus {corpus} has no test documents to evaluate on")
    eos = next(iter(sampler.eos_ids), None)
    ids = []
    for text in docs:
        ids += sampler.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        ids += [eos] if eos is not None else []
    return eval_chunks(np.asarray(ids, dtype=np.int64), n, seq_len)


def lambada_table(export: str, policies: list[str], n_items: int, tasks: int, cache_dir, *, sampler=None) -> list[dict]:
    """Accuracy (and its 95 % Wilson interval) per policy on the first `n_items` LAMBADA items; Ray tasks
    when `tasks` > 1."""
    from pipeline.eval.metrics import lambada, wilson_interval
    from pipeline.sources.eval_data import lambada_items

    items = lambada_items(n_items, cache_dir)
    if tasks <= 1 or len(items) < 2:
        parts, order = [[lambada(sampler, items, policy=p) for p in policies]], [list(range(len(items)))]
    else:
        import ray

        from pipeline.data.ray_pipeline import init_ray

        init_ray(include_dashboard=False)
        threads = max(1, (os.cpu_count() or 1) // tasks)
        order = [list(range(i, len(items), tasks)) for i in range(min(tasks, len(items)))]  # item indices per task
        task = ray.remote(num_cpus=1)(_lambada_task)
        parts = ray.get([task.remote(export, [items[j] for j in idx], policies, threads) for idx in order])
    rows = []
    for i, p in enumerate(policies):
        got = [part[i] for part in parts]
        correct, forwards, tokens = (sum(g[k] for g in got) for k in ("correct", "forwards", "tokens"))
        preds = [""] * len(items)
        for idx, g in zip(order, got, strict=True):
            for j, word in zip(idx, g["predictions"], strict=True):
                preds[j] = word
        hist = {}
        for g in got:
            for k, v in g["accepted_hist"].items():
                hist[int(k)] = hist.get(int(k), 0) + v
        rows.append({"policy": p, "items": len(items), "correct": correct, "accuracy": correct / len(items),
                     "interval": wilson_interval(correct, len(items)),
                     "tokens_per_forward": tokens / max(1, forwards), "accepted_hist": hist, "predictions": preds})
    return rows


def _lambada_task(export: str, items, policies: list[str], threads: int) -> list[dict]:
    import torch

    from pipeline.decode.load import load_sampler
    from pipeline.eval.metrics import lambada

    torch.set_num_threads(threads)
    s = load_sampler(export)
    return [lambada(s, items, policy=p) for p in policies]


def sampler_table(sampler, base_model, prompt_ids: list[list[int]], policies: list[str], max_tokens: int,
                  repeats: int, gammas: list[float]) -> tuple[dict, list[dict]]:
    """Policies (and `threshold` at each gamma) vs HF greedy generate, interleaved prompt by prompt in
    `repeats` rounds: each prompt runs under every method in an order that rotates from prompt to
    prompt, so a method's time never comes from a stretch of its own while the machine's speed drifts
    (whole methods one after the other: a drift of a few per cent reads as a slowdown of the later ones).
    Speed-ups are medians over those pairs (ar_compare.paired_speedup), tokens/s medians over rounds."""
    from pipeline.decode.sampler import GenerationRequest
    from pipeline.eval.ar_compare import agreement, continuation_nll, hf_generate, paired_speedup

    methods = [("hf", None)] + [(p, None) for p in policies] + [("threshold", float(g)) for g in gammas]

    def run(method, ids, tokens=max_tokens):
        pol, gamma = method
        t0 = time.perf_counter()
        if pol == "hf":
            return hf_generate(sampler, [ids], tokens, False)[0], None, time.perf_counter() - t0
        res = sampler.generate([GenerationRequest(prompt_ids=ids, policy=pol, gamma=gamma, max_tokens=tokens,
                                                  stop_on_eos=False)])[0]
        return res.token_ids, res, time.perf_counter() - t0

    for m in methods[1:]:  # warm-up: each method's first shapes allocate, and verify starts to learn its
        run(m, prompt_ids[0], min(8, max_tokens))  # drafter (as a serving replica has after its first request)
    tps, pair, last = {m: [] for m in methods}, {m: [] for m in methods}, {}
    for rnd in range(max(1, repeats)):
        spent, outs = {m: 0.0 for m in methods}, {m: [] for m in methods}
        for i, ids in enumerate(prompt_ids):
            shift = (rnd + i) % len(methods)
            for m in methods[shift:] + methods[:shift]:
                toks, res, dt = run(m, ids)
                spent[m] += dt
                pair[m].append(len(toks) / dt)
                outs[m].append((toks, res))
        for m in methods:
            tps[m].append(sum(len(t) for t, _ in outs[m]) / spent[m])
            last[m] = ([t for t, _ in outs[m]], [r for _, r in outs[m]])
    ref = last[("ar", None)][0]
    rows = []
    for m in methods[1:]:
        toks, res = last[m]
        agree = [agreement(r, g) for r, g in zip(ref, toks, strict=True)]
        forwards, ntok = sum(r.stats.forwards for r in res), sum(r.stats.tokens for r in res)
        hist = {}
        for r in res:
            for k, v in r.stats.accepted_hist.items():
                hist[int(k)] = hist.get(int(k), 0) + v
        rows.append({"policy": m[0], "gamma": m[1], "tokens_per_forward": ntok / max(1, forwards),
                     "tokens_per_s": statistics.median(tps[m]),
                     "speedup_vs_hf": paired_speedup(pair[m], pair[("hf", None)]),
                     "speedup_vs_ar": paired_speedup(pair[m], pair[("ar", None)]),
                     "prefix_agreement": statistics.mean(a for a, _ in agree),
                     "match_rate": statistics.mean(b for _, b in agree),
                     "base_nll": continuation_nll(base_model, prompt_ids, toks), "accepted_hist": hist})
    hf_same = sum(a == b for a, b in zip(ref, last[("hf", None)][0], strict=True))
    table = {"hf_tokens_per_s": statistics.median(tps[("hf", None)]), "ar_equals_hf": hf_same,
             "matmul": sampler.matmul, "forward_cost": sampler.forward_cost.table(8),
             "prompts": len(prompt_ids), "rows": [r for r in rows if r["gamma"] is None]}
    return table, [r for r in rows if r["gamma"] is not None]
