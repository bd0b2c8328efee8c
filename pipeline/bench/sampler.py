"""The sampler benchmark (`fluid bench sampler`, `python -m jobs.bench_sampler`; docs/method.md §13).

In:  the options of `build_parser()` (a model folder or the tiny random model, prompts, policies,
     timing rounds, dtype, matmul layout, the goal's floor).
Out: per policy a row (tokens per forward, tokens/s, speed-ups vs HF greedy `generate` and our `ar`
     loop as medians of paired ratios (each prompt's runs in each round), agreement with AR and with the base model, mask tokens
     per token, base NLL), printed as a table with the goals; optionally JSON (`--json`); `run`
     returns the exit status (0 every goal met, 1 one not). Errors raise FluidError.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.decode.cost_model import LAYOUTS, check_layouts
from pipeline.decode.dtype import DTYPES, inference_dtype
from pipeline.decode.matmul import MATMUL_LAYOUTS, apply_matmul, set_matmul
from pipeline.decode.policies import DEFAULT_GAMMA, POLICIES
from pipeline.decode.sampler import GenerationRequest, Sampler
from pipeline.errors import FluidError
from pipeline.eval.ar_compare import (
    agreement,
    base_greedy,
    continuation_nll,
    corpus_prompts,
    hf_generate,
    paired_speedup,
)
from pipeline.export_format import FLUID_META_FILE, is_export, read_fluid_meta
from pipeline.model.tiny import build_tiny

STANDING_PROMPTS, STANDING_TOKENS = 32, 128  # the standing measurement of a model (issue: ≥ 32 × 128)
DEFAULT_PROMPTS = [
    "The history of the city begins",
    "Once upon a time, in a small village,",
    "To make a good cup of tea, you",
    "The main reasons for the war were",
]


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.bench_sampler", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="HF model folder or FLUID export (default: a tiny random model)")
    p.add_argument("--mask-token-id", type=int, help="mask token id (default: from fluid.json)")
    p.add_argument("--prompts", help="text file, one prompt per line (default with --model-dir: "
                   f"{STANDING_PROMPTS} held-out prompts of the default corpus; without: 4 built-in prompts)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"new tokens per prompt (default: {STANDING_TOKENS} with --model-dir, 64 on the tiny model)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (khead only with a head)")
    p.add_argument("--gamma", action="append", default=[], metavar="POLICY=VALUE",
                   help=f"gamma per policy, repeatable (defaults: {DEFAULT_GAMMA})")
    p.add_argument("--max-horizon", type=int, default=None, help="horizon cap (default k_max)")
    p.add_argument("--k-max", type=int, default=16, help="k_max when there is no fluid.json")
    p.add_argument("--batch", action="store_true", help="decode all prompts in one batched call")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--stop-on-eos", action="store_true", help="stop at EOS (default: fixed lengths)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: where the model loads)")
    p.add_argument("--verify-layouts", default=",".join(LAYOUTS),
                   help=f"step layouts greedy verify may choose among: {', '.join(LAYOUTS)} (docs/method.md §8)")
    p.add_argument("--each-layout", action=argparse.BooleanOptionalAction, default=None,
                   help="also time verify restricted to each layout alone (rows verify[chain], …; default: on "
                        "with --model-dir)")
    p.add_argument("--matmul", choices=("auto", *MATMUL_LAYOUTS), default="auto",
                   help="operand order of narrow products (pipeline/decode/matmul.py; auto: the faster here). "
                        "HF generate runs on the same modules; with a non-stock layout it is also timed "
                        "on the stock one (column x HF0: the speed-up a user of plain HF generate sees)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights and compute of the model under test; HF generate and our ar run the same "
                        "model (default: auto with --model-dir — bfloat16 where this hardware is fast in it, "
                        "pipeline/decode/dtype.py —, float32 on the tiny model)")
    p.add_argument("--tiny-hidden", type=int, default=64)
    p.add_argument("--tiny-layers", type=int, default=2)
    p.add_argument("--forward-cost", help="relative forward cost of widths 1,2,3,… for verify's horizon "
                   "(default: measured on this device at load)")
    p.add_argument("--min-speedup", type=float, default=0.95,
                   help="the goal's floor: entropy and verify at least this many times our ar loop's speed "
                        "(exit status 1 when not met)")
    p.add_argument("--json", help="write the results as JSON here")
    p.add_argument("--corpus-prompts", type=int, default=None,
                   help="use N held-out prompts cut from the default corpus (split --corpus-split)")
    p.add_argument("--corpus-split", default="test")
    p.add_argument("--base-model", help="model spec scoring the outputs' NLL (default: the export's base model)")
    return p


def resolve_defaults(args) -> None:
    """Fill the defaults that depend on whether a model is given (a real model gets the standing
    measurement: held-out prompts, 128 tokens, the dtype this hardware is fast in)."""
    real = args.model_dir is not None
    if args.max_tokens is None:
        args.max_tokens = STANDING_TOKENS if real else 64
    if args.corpus_prompts is None:
        args.corpus_prompts = STANDING_PROMPTS if real and not args.prompts else 0
    if args.each_layout is None:
        args.each_layout = real
    if args.dtype is None or args.dtype == "auto":
        args.dtype = "float32" if not real else str(inference_dtype("auto", args.device, args.model_dir)).split(".")[-1]


def load_sampler(args) -> Sampler:
    cost = [float(x) for x in args.forward_cost.split(",")] if args.forward_cost else None
    if args.model_dir is None:
        model, tok, mask_id = build_tiny(args.tiny_hidden, args.tiny_layers)
        model = model.to(getattr(torch, args.dtype))
        sampler = Sampler(model, tok, mask_token_id=mask_id, k_max=args.k_max, device=args.device, forward_cost=cost)
        apply_matmul(sampler.model, args.matmul, token_id=sampler.clean_probe_id, mask_token_id=mask_id)
        return sampler
    from pipeline.decode.load import load_sampler as load

    if not Path(args.model_dir).is_dir():
        raise FluidError(f"--model-dir {args.model_dir} is not a folder")
    if args.mask_token_id is None and not is_export(args.model_dir):
        raise FluidError(f"{args.model_dir} has no {FLUID_META_FILE}: give --mask-token-id")
    return load(args.model_dir, mask_token_id=args.mask_token_id, k_max=args.k_max, device=args.device,
                forward_cost=cost, dtype=getattr(torch, args.dtype), matmul=args.matmul)


def load_base_model(args, sampler: Sampler):
    """The base AR model that scores the continuations (NLL): --base-model, the export's base model
    (fluid.json), or else the sampled model itself."""
    spec = args.base_model
    if spec is None and args.model_dir and is_export(args.model_dir):
        meta = read_fluid_meta(args.model_dir)
        if meta.drafter:
            # a frozen-base drafter's AR path is its base model bit for bit (its adapter runs on [M] rows
            # only; tests/model/test_drafter.py): no second copy to load and decode
            return sampler.model
        spec = meta.base_spec
    if not spec:
        return sampler.model
    from pipeline.model.causal_lm import load_causal_lm
    from pipeline.sources.model_source import resolve_model

    return load_causal_lm(resolve_model(spec).path, dtype=sampler.model.dtype).eval().to(sampler.device)


@dataclass
class Bench:
    """One benchmark run's inputs: the sampler under test, its prompts and the policies it times."""

    args: argparse.Namespace
    sampler: Sampler
    prompts: list[str]
    prompt_ids: list[list[int]]
    policies: list[str]
    gammas: dict[str, str]
    layout: str  # the matmul layout the model runs on (HF generate is also timed on "stock" when it differs)
    tps: dict[str, list[float]] = field(default_factory=dict)  # tokens/s per round
    pairs: dict[str, list[float]] = field(default_factory=dict)  # tokens/s per prompt (per round with --batch)
    cpu_pairs: dict[str, list[float]] = field(default_factory=dict)  # the same per CPU-second: less sensitive to load
    last: dict[str, tuple] = field(default_factory=dict)  # (token ids, results) of the last round


def prepare(args) -> Bench:
    """Load the sampler (its forward cost measured before any timing), the prompts and the policies."""
    resolve_defaults(args)
    sampler = load_sampler(args)
    sampler.verify_layouts = check_layouts([x.strip() for x in args.verify_layouts.split(",") if x.strip()])
    _ = sampler.forward_cost  # measured before any timing
    prompts = DEFAULT_PROMPTS
    if args.corpus_prompts:
        prompts = corpus_prompts(args.corpus_prompts, args.corpus_split)
    if args.prompts:
        prompts = [ln.strip() for ln in Path(args.prompts).read_text().splitlines() if ln.strip()]
    gammas = dict(kv.split("=", 1) for kv in args.gamma)
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    unknown = [x for x in policies if x not in POLICIES]
    if unknown:
        raise FluidError(f"unknown policies {unknown}; choose from {POLICIES}")
    if "khead" in policies and sampler.horizon_head is None:
        print("note: no horizon head loaded, skipping khead")
        policies.remove("khead")
    if "ar" not in policies:
        policies.insert(0, "ar")
    if args.each_layout and "verify" in policies and len(sampler.verify_layouts) > 1:
        policies += [f"verify[{x}]" for x in sampler.verify_layouts]  # verify held to one layout each
    prompt_ids = [sampler.encode(x) for x in prompts]
    return Bench(args, sampler, prompts, prompt_ids, policies, gammas, sampler.matmul)


def requests(b: Bench, policy: str, prompt_ids: list[list[int]] | None = None) -> list[GenerationRequest]:
    g = float(b.gammas[policy]) if policy in b.gammas else None
    a = b.args
    return [GenerationRequest(prompt_ids=ids, policy=policy.split("[")[0], gamma=g, max_horizon=a.max_horizon,
                              max_tokens=a.max_tokens, stop_on_eos=a.stop_on_eos)
            for ids in (b.prompt_ids if prompt_ids is None else prompt_ids)]


def run_method(b: Bench, method: str, prompt_ids: list[list[int]] | None = None
               ) -> tuple[float, float, list[list[int]], list | None]:
    """Decode the prompts (default: all of them) once with `method` (hf, hf0 = HF on the stock layout, or a
    policy): tokens/s, tokens per CPU-second, the token ids and the sampler's results (None for HF)."""
    sampler, a = b.sampler, b.args
    ids = b.prompt_ids if prompt_ids is None else prompt_ids
    t0, c0 = time.perf_counter(), time.process_time()
    if method == "hf":
        toks, res = hf_generate(sampler, ids, a.max_tokens, a.stop_on_eos), None
    elif method == "hf0":  # HF generate on the stock layout
        set_matmul(sampler.model, "stock")
        try:
            toks, res = hf_generate(sampler, ids, a.max_tokens, a.stop_on_eos), None
        finally:
            set_matmul(sampler.model, b.layout)
    else:
        res = _generate(b, method, ids)
        toks = [r.token_ids for r in res]
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = sum(len(t) for t in toks)
    return n / dt, n / max(cpu, 1e-9), toks, res


def _generate(b: Bench, method: str, prompt_ids: list[list[int]]) -> list:
    """The sampler's results for the prompts with `method`: a policy, or verify[LAYOUT] (verify allowed
    that one step layout only)."""
    sampler, saved = b.sampler, b.sampler.verify_layouts
    if method.startswith("verify["):
        sampler.verify_layouts = (method[len("verify["):-1],)
    reqs = requests(b, method, prompt_ids)
    try:
        if b.args.batch:
            return sampler.generate(reqs)
        return [sampler.generate([q])[0] for q in reqs]
    finally:
        sampler.verify_layouts = saved


def time_rounds(b: Bench) -> None:
    """A warm-up, then --repeats rounds (fills tps, pairs, cpu_pairs, last). Each round decodes every prompt under every
    method, prompt by prompt, the order of the methods rotating from prompt to prompt (with --batch: every
    method once over all prompts, in rotating order): no method's time comes from a stretch of its own
    while the machine's speed drifts."""
    methods = ["hf", *(["hf0"] if b.layout != "stock" else []), *b.policies]
    run_method(b, "ar", b.prompt_ids[:1])  # warm-up
    b.tps = {m: [] for m in methods}
    b.pairs, b.cpu_pairs = {m: [] for m in methods}, {m: [] for m in methods}
    groups = [b.prompt_ids] if b.args.batch else [[ids] for ids in b.prompt_ids]
    for rnd in range(b.args.repeats):
        wall = {m: 0.0 for m in methods}
        toks, res = {m: [] for m in methods}, {m: [] for m in methods}
        for i, group in enumerate(groups):
            shift = (rnd + i) % len(methods)
            for m in methods[shift:] + methods[:shift]:
                rate, cpu_rate, t, r = run_method(b, m, group)
                n = sum(len(x) for x in t)
                wall[m] += n / rate
                b.pairs[m].append(rate)
                b.cpu_pairs[m].append(cpu_rate)
                toks[m] += t
                res[m] += r or []
        for m in methods:
            n = sum(len(x) for x in toks[m])
            b.tps[m].append(n / wall[m])
            b.last[m] = (toks[m], res[m] or None)


def policy_row(b: Bench, m: str, base, base_ref: list[list[int]]) -> dict:
    """One policy's row of the table (and of the JSON results)."""
    tps, pairs, cpu, ref = b.tps, b.pairs, b.cpu_pairs, b.last["ar"][0]
    toks, res = b.last[m]
    agree = [agreement(r, g) for r, g in zip(ref, toks, strict=True)]
    forwards = sum(r.stats.forwards for r in res)
    ntok = sum(r.stats.tokens for r in res)
    return {
        "policy": m, "tokens_per_forward": ntok / max(1, forwards), "tokens_per_s": statistics.median(tps[m]),
        "speedup_vs_hf": paired_speedup(pairs[m], pairs["hf"]),
        "speedup_vs_ar": paired_speedup(pairs[m], pairs["ar"]),
        "speedup_vs_hf_stock": paired_speedup(pairs[m], pairs.get("hf0", pairs["hf"])),
        "cpu_speedup_vs_ar": paired_speedup(cpu[m], cpu["ar"]),
        "prefix_agreement": statistics.mean(x for x, _ in agree),
        "match_rate": statistics.mean(y for _, y in agree),
        "masks_per_token": sum(r.stats.mask_tokens for r in res) / max(1, ntok),
        "base_nll": continuation_nll(base, b.prompt_ids, toks),
        "base_prefix_agreement": statistics.mean(agreement(r, g)[0] for r, g in zip(base_ref, toks, strict=True)),
    }


def build_rows(b: Bench) -> tuple[list[dict], int]:
    """The rows of every policy, and on how many prompts our `ar` equals HF greedy generate."""
    a, ref = b.args, b.last["ar"][0]
    base = load_base_model(a, b.sampler)
    base_ref = ref if base is b.sampler.model else base_greedy(base, b.sampler, b.prompt_ids, a.max_tokens,
                                                                a.stop_on_eos)
    hf_same = sum(x == y for x, y in zip(ref, b.last["hf"][0], strict=True))
    return [policy_row(b, m, base, base_ref) for m in b.policies], hf_same


def print_table(b: Bench, rows: list[dict], hf_same: int) -> None:
    a, tps, sampler = b.args, b.tps, b.sampler
    print(f"model: {a.model_dir or 'tiny random (untrained mask)'}  prompts: {len(b.prompts)}  "
          f"max_tokens: {a.max_tokens}  rounds: {a.repeats}  batch: {a.batch}  "
          f"dtype: {a.dtype}  torch threads: {torch.get_num_threads()}  TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')}")
    print(f"HF greedy generate: {statistics.median(tps['hf']):.1f} tok/s; ar == HF on {hf_same}/{len(b.prompt_ids)} prompts")
    if "hf0" in tps:
        print(f"HF greedy generate, stock matmul layout: {statistics.median(tps['hf0']):.1f} tok/s "
              f"(x HF0 below; x HF is on this run's layout, {b.layout})")
    print(f"verify plans with forward cost by width {sampler.forward_cost}, layouts {'+'.join(sampler.verify_layouts)}; "
          f"matmul layout {b.layout}")
    head = (f"{'policy':<10}{'tok/fwd':>8}{'tok/s':>9}{'x HF':>7}{'x HF0':>7}{'x ar':>7}{'x ar cpu':>9}{'prefix':>8}"
            f"{'match':>7}{'mask/tok':>9}{'base NLL':>9}{'=base':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['policy']:<10}{r['tokens_per_forward']:>8.2f}{r['tokens_per_s']:>9.1f}{r['speedup_vs_hf']:>7.2f}"
              f"{r['speedup_vs_hf_stock']:>7.2f}"
              f"{r['speedup_vs_ar']:>7.2f}{r['cpu_speedup_vs_ar']:>9.2f}{r['prefix_agreement']:>8.3f}{r['match_rate']:>7.3f}{r['masks_per_token']:>9.3f}"
              f"{r['base_nll']:>9.3f}{r['base_prefix_agreement']:>7.3f}")


def masked_step_ratio(b: Bench) -> dict[int, float]:
    """What drafting adds to a step of the model under test (cost_model.masked_step_ratios: a step of one
    clean token then w − 1 masks ÷ a step of w clean tokens; 1.0 = the drafter's masks cost nothing extra)."""
    from pipeline.decode.cost_model import masked_step_ratios

    s = b.sampler
    ratios = masked_step_ratios(s.model, mask_token_id=s.mask_token_id, token_id=s.clean_probe_id, repeats=3)
    print("masked step ÷ plain step of the same width: " + ", ".join(f"{w}: {r:.2f}" for w, r in ratios.items()))
    return ratios


def ar_noise_floor(b: Bench, batch: int = 8) -> dict:
    """Below float32, greedy decoding departs from itself at near-ties when a step's shape changes. The
    floor: the share of prompts whose greedy AR output at batch 1 differs from the same prompt's inside a
    batch of `batch` (same model, dtype and kernels); and the share whose `verify` output (the timed
    rounds') differs from AR at batch 1. `verify` may not depart more often than AR itself does."""
    single = b.last["ar"][0] if not b.args.batch else [
        b.sampler.generate([q])[0].token_ids for q in requests(b, "ar")]
    qs = requests(b, "ar")
    batched = [r.token_ids for i in range(0, len(qs), batch) for r in b.sampler.generate(qs[i:i + batch])]
    n = max(1, len(single))
    out = {"batch": batch, "prompts": len(single),
           "ar_batch_vs_single": sum(x != y for x, y in zip(single, batched, strict=True)) / n}
    if "verify" in b.last:
        out["verify_vs_ar"] = sum(x != y for x, y in zip(single, b.last["verify"][0], strict=True)) / n
    print(f"{b.args.dtype} noise floor: greedy AR at batch 1 vs inside a batch of {batch} differs on "
          f"{out['ar_batch_vs_single']:.3f} of {len(single)} prompts; verify vs AR: {out.get('verify_vs_ar', float('nan')):.3f}")
    return out


def sampler_goals(rows: list[dict], floor: float, dtype: str, noise: dict | None = None) -> list[dict]:
    """The benchmark's goals, printed and returned as [{"goal", "value", "met"}]: the elastic policies
    (`entropy`, `verify`) at least `floor` × our `ar` loop; in float32 `verify`'s output equal to AR
    greedy (prefix agreement 1); below float32 `verify` departing from AR on no larger a share of prompts
    than AR departs from itself between batch sizes (`ar_noise_floor`). The job exits with status 1 unless
    every goal is met."""
    goals = []
    elastic = [r["speedup_vs_ar"] for r in rows if r["policy"] in ("entropy", "verify")]
    if elastic:
        goals.append({"goal": f"elastic policies never slower than AR (≥ {floor:g}× our ar loop)",
                      "value": min(elastic), "met": min(elastic) >= floor})
    verify = [r["prefix_agreement"] for r in rows if r["policy"] == "verify"]
    if verify and dtype == "float32":
        goals.append({"goal": "verify is lossless (output = AR greedy, float32)", "value": verify[0],
                      "met": verify[0] == 1.0})
    if noise and "verify_vs_ar" in noise:
        goals.append({"goal": f"verify departs from AR ({dtype}) no more often than AR at batch 1 vs "
                              f"{noise['batch']} ({noise['ar_batch_vs_single']:.3f})",
                      "value": noise["verify_vs_ar"], "met": noise["verify_vs_ar"] <= noise["ar_batch_vs_single"]})
    for g in goals:
        print(f"goal {g['goal']}: {g['value']:.3f} — {'met' if g['met'] else 'NOT met'}")
    return goals


def run(args) -> int:
    """The whole benchmark: exit status 0 when every goal is met, 1 when one is not."""
    b = prepare(args)
    step_ratio = masked_step_ratio(b)
    time_rounds(b)
    rows, hf_same = build_rows(b)
    print_table(b, rows, hf_same)
    noise = ar_noise_floor(b) if args.dtype != "float32" else None
    goals = sampler_goals(rows, args.min_speedup, args.dtype, noise)
    if args.json:
        tps = b.tps
        Path(args.json).write_text(json.dumps({"hf_tokens_per_s": statistics.median(tps["hf"]),
                                               "hf_stock_tokens_per_s": statistics.median(tps.get("hf0", tps["hf"])),
                                               "matmul": b.layout, "ar_equals_hf": hf_same, "rows": rows,
                                               "dtype": args.dtype, "noise_floor": noise,
                                               "masked_step_ratio": step_ratio,
                                               "goals": goals}, indent=2))
    return 0 if all(g["met"] for g in goals) else 1
