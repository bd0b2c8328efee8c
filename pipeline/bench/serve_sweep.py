"""`fluid bench serve --policies ar,verify`: one server, the same prompts at several loads, policy by policy.

In:  the base URL of a server on this machine (a local one: load_test.start_local_server), the prompts
     (held-out corpus prompts cut as `fluid bench sampler` cuts them — eval.ar_compare.corpus_prompts —,
     a --prompts file, or with --tiny bench/sampler's built-in prompts), the client counts (--levels),
     --rounds, --max-tokens; for the agreement check the export (serve.model), which `reference` decodes
     one request at a time with the sampler itself in float32 (what `fluid generate` gives).
Out: a run per (round, clients, policy) — rounds interleaved, ar then verify at each level — through
     `load_test.run_load` (streaming, greedy, ignore_eos: every request makes max_tokens); a table per
     (policy, clients): tokens/s, TTFT p50, per-token latency p50 and tokens per forward (medians of the
     rounds), per-token latency p99 (the rounds' highest), and verify ÷ ar tokens/s per level (median of per-round ratios); the goals:
     every greedy output identical across levels, policies and rounds and to the single-request
     reference, verify ≥ --min-ratio × ar at every level, ≥ --min-speedup × ar at 1 and 4 clients.
     `run_sweep` returns the exit status (0 every goal met, 1 one not); `--out` gets the table's rows.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from pipeline.bench.load_test import run_load
from pipeline.errors import FluidError

COLUMNS = ("policy", "clients", "requests", "errors", "tok/s", "ttft_p50_ms", "tok_p50_ms", "tok_p99_ms", "tok/fwd",
           "verify/ar")
DEFAULT_LEVELS, SPEEDUP_LEVELS = "1,4,16,64", (1, 4)


def sweep_prompts(args, tiny: bool) -> list[str]:
    """--prompts FILE, else --corpus-prompts held-out prompts of the default corpus, else (--tiny) the
    sampler bench's built-in prompts."""
    if args.prompts:
        prompts = [ln.strip() for ln in Path(args.prompts).read_text().splitlines() if ln.strip()]
    elif tiny:
        from pipeline.bench.sampler import DEFAULT_PROMPTS

        prompts = list(DEFAULT_PROMPTS)
    else:
        from pipeline.eval.ar_compare import corpus_prompts

        prompts = corpus_prompts(args.corpus_prompts)
    if not prompts:
        raise FluidError("no prompts to send")
    return prompts


def reference(model_dir: str, prompts: list[str], max_tokens: int) -> list[str]:
    """Each prompt's greedy text from the sampler itself, one request at a time, in float32 on this
    machine's CPU (as `fluid generate` decodes it), with ignore_eos as the load's requests."""
    import torch

    from pipeline.decode.load import load_sampler
    from pipeline.decode.policies import GenerationRequest

    sampler = load_sampler(model_dir, device="cpu", dtype=torch.float32)
    return [sampler.generate(GenerationRequest(prompt_ids=sampler.encode(p), policy="ar", max_tokens=max_tokens,
                                               temperature=0.0, stop_on_eos=False))[0].text for p in prompts]


def measure_sweep(args, url: str, model: str, headers: dict, prompts: list[str],
                  policies: list[str], levels: list[int]) -> tuple[list[dict], dict]:
    """Runs per (round, clients, policy), in that order; returns (rows, outputs by (policy, clients,
    round): {prompt index: [texts]})."""
    bodies = {p: [{"model": model, "prompt": x, "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
                   "policy": p, "stream": True, "stream_options": {"include_usage": True}} for x in prompts]
              for p in policies}
    run_load(url, 2, 4, bodies[policies[0]], headers, timeout=args.timeout, deadline_s=args.max_seconds)  # warm-up
    rows, outputs = [], {}
    for rnd in range(1, max(1, args.rounds) + 1):
        for clients in levels:
            for policy in policies:
                out = outputs[policy, clients, rnd] = {}
                r = run_load(url, clients, max(len(prompts), clients), bodies[policy], headers, timeout=args.timeout,
                             deadline_s=args.max_seconds, outputs=out)
                rows.append({"round": rnd, "policy": policy, **r})
    return rows, outputs


def agreement(outputs: dict, ref: list[str] | None, n: int) -> list[str]:
    """What disagrees: a prompt whose greedy texts differ across runs, or from the reference (empty: none)."""
    problems = []
    for i in range(n):
        seen = {key: texts for key, out in outputs.items() for texts in [out.get(i, [])] if texts}
        want = ref[i] if ref is not None else next((t for ts in seen.values() for t in ts), None)  # the first run's
        bad = sorted(f"{p}@{c} round {r}" for (p, c, r), ts in seen.items() if any(t != want for t in ts))
        if bad:
            what = "the single-request reference" if ref is not None else "the other runs"
            problems.append(f"prompt {i}: differs from {what} in {', '.join(bad[:6])}{' …' if len(bad) > 6 else ''}")
    return problems


def summarize(rows: list[dict], policies: list[str], levels: list[int]) -> list[dict]:
    """A row per (policy, clients): medians of the rounds' tok/s and tok/fwd, latencies of all rounds."""
    out = []
    for policy in policies:
        for clients in levels:
            runs = [r for r in rows if r["policy"] == policy and r["clients"] == clients]
            row = {"policy": policy, "clients": clients, "requests": sum(r["requests"] for r in runs),
                   "errors": sum(r["errors"] + r["unfinished"] for r in runs),
                   "tok/s": statistics.median(r["tok/s"] for r in runs),
                   "ttft_p50_ms": statistics.median(r["ttft_p50_ms"] for r in runs),
                   "tok_p50_ms": statistics.median(r["tok_p50_ms"] for r in runs),
                   "tok_p99_ms": max(r["tok_p99_ms"] for r in runs),
                   "tok/fwd": statistics.median(r["tok/fwd"] for r in runs), "verify/ar": None}
            if policy != "ar" and "ar" in policies:
                ratios = [v["tok/s"] / a["tok/s"] if a["tok/s"] else 0.0 for v in runs
                          for a in rows if a["policy"] == "ar" and a["clients"] == clients and a["round"] == v["round"]]
                row["verify/ar" if policy == "verify" else f"{policy}/ar"] = statistics.median(ratios)
            out.append(row)
    return out


def format_sweep(summary: list[dict]) -> str:
    lines = ["  ".join(f"{c:>11}" for c in COLUMNS)]
    for r in summary:
        cells = []
        for c in COLUMNS:
            v = r.get(c)
            cells.append(f"{'-':>11}" if v is None else f"{v:>11}" if isinstance(v, str) else
                         f"{v:>11d}" if isinstance(v, int) else f"{v:>11.2f}")
        lines.append("  ".join(cells))
    return "\n".join(lines)


def goals(summary: list[dict], problems: list[str], *, min_ratio: float, min_speedup: float,
          checked_reference: bool) -> list[tuple[str, bool, str]]:
    """(goal, met, value): agreement, zero errors, and verify vs ar per level."""
    what = "levels, policies, rounds and the single-request sampler" if checked_reference else "levels, policies, rounds"
    out = [(f"greedy outputs identical across {what}", not problems, f"{len(problems)} prompts differ"),
           ("0 errors", sum(r["errors"] for r in summary) == 0, str(sum(r["errors"] for r in summary)))]
    for r in summary:
        if r["policy"] == "verify" and r.get("verify/ar") is not None:
            x, c = r["verify/ar"], r["clients"]
            out.append((f"verify tok/s >= {min_ratio:g}x ar at {c} clients", x >= min_ratio, f"{x:.2f}x"))
            if c in SPEEDUP_LEVELS:
                out.append((f"verify tok/s >= {min_speedup:g}x ar at {c} clients", x >= min_speedup, f"{x:.2f}x"))
    return out


def run_sweep(args, cfg, base: str, headers: dict, model: str, tiny: bool) -> int:
    """The sweep against the server at `base` (`model`: its name), the reference, the report."""
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    levels = [int(x) for x in (args.levels or DEFAULT_LEVELS).split(",")]
    if not policies or min(levels) < 1:
        raise FluidError("--policies needs at least one policy and --levels client counts >= 1")
    prompts = sweep_prompts(args, tiny)
    ref, t0 = None, time.perf_counter()
    if cfg.serve.model and "://" not in cfg.serve.model:  # first: a broken reference fails before the load
        ref = reference(cfg.serve.model, prompts, args.max_tokens)
    t_ref = time.perf_counter() - t0
    rows, outputs = measure_sweep(args, f"{base}/v1/completions", model, headers, prompts, policies, levels)
    problems = agreement(outputs, ref, len(prompts))
    summary = summarize(rows, policies, levels)
    print(f"model {model} at {base}: {len(prompts)} prompts, max_tokens {args.max_tokens}, streaming, greedy; "
          f"rounds {args.rounds} ({' then '.join(policies)} at each level)")
    print(format_sweep(summary))
    print("reference: " + (f"the sampler, one request at a time, float32 ({t_ref:.1f} s)"
                           if ref is not None else "none (no local serve.model): outputs compared across runs only"))
    for p in problems:
        print(f"  MISMATCH {p}")
    checks = goals(summary, problems, min_ratio=args.min_ratio, min_speedup=args.min_speedup,
                   checked_reference=ref is not None)
    for name, ok, value in checks:
        print(f"  goal {name}: {value} — {'met' if ok else 'NOT met'}")
    if args.out:
        with open(args.out, "a") as f:
            for r in summary:
                f.write(json.dumps({"time": time.time(), "model": model, "max_tokens": args.max_tokens, **r}) + "\n")
    return 0 if all(ok for _, ok, _ in checks) else 1
