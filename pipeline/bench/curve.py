"""What training buys (`fluid bench curve`): the checkpoints of one run, measured as the sampler runs them.

In:  a run folder (`<storage_path>/<run_name>`: checkpoint_*/trainer_state.json, each with its step and
     training seconds), the training minutes to measure at (each point: the last checkpoint at or before
     that many minutes), held-out prompts, new tokens, dtypes and timing rounds.
Out: per point and dtype a row: greedy `verify`'s tokens per forward where every width costs one AR step
     (the horizon an accelerator plans: the drafter's quality, hardware aside), its tokens per forward
     and speed against our `ar` loop on this machine's kernels in that dtype (interleaved prompt by
     prompt, medians of per-prompt ratios), and the share of prompts whose `verify` output differs from
     AR's (below float32, beside the noise floor: the share whose greedy AR output at batch 1 differs
     from the same prompt's inside a batch of 8). Written as `<run>/curve.json` (CURVE_FILE: `fluid evaluate` of the run's export shows it) and
     a PNG; `run` returns the exit status (0; 2 on an error).

Every checkpoint is exported once into `<run>/curve/step_<N>` (reused when it exists). The standing
measurement of one model (32 prompts × 128 tokens, HF `generate`, each layout) is `fluid bench sampler`;
this curve is lighter by default (12 × 64, two rounds) so that four points fit beside a training run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pipeline.decode.cost_model import ForwardCost
from pipeline.decode.dtype import DTYPES
from pipeline.decode.sampler import GenerationRequest
from pipeline.errors import FluidError
from pipeline.eval.ar_compare import paired_speedup
from pipeline.export_format import is_export
from pipeline.train.outputs import CURVE_FILE

COLUMNS = ["minutes", "step", "dtype", "tokens/forward (flat cost)", "tokens/forward", "× ar", "verify ≠ ar",
           "ar batch 8 ≠ ar"]


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder with checkpoint_*/ (keep them: --train.keep_checkpoints)")
    p.add_argument("--minutes", default="15,30,60,120", help="training minutes of the points (comma-separated)")
    p.add_argument("--prompts", type=int, default=12, help="held-out prompts of the default corpus (test split)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated, of {', '.join(DTYPES)}")
    p.add_argument("--repeats", type=int, default=2, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--json", default=None, help=f"also write the results here (always: <run>/{CURVE_FILE})")
    return p


def checkpoints(run: Path) -> list[tuple[float, int, Path]]:
    """(training minutes, step, folder) of each checkpoint of the run, by step."""
    out = []
    for d in run.glob("checkpoint_*"):
        state = d / "trainer_state.json"
        if state.is_file():
            s = json.loads(state.read_text())
            out.append((float(s.get("elapsed_s", 0.0)) / 60.0, int(s["step"]), d))
    return sorted(out, key=lambda x: x[1])


def points(run: Path, minutes: list[float]) -> list[tuple[float, int, Path]]:
    """The last checkpoint at or before each of `minutes` (a point no checkpoint reaches is an error)."""
    ckpts = checkpoints(run)
    if not ckpts:
        raise FluidError(f"{run} has no checkpoint_*/trainer_state.json (is it a `fluid adapt` run folder?)")
    out = []
    for m in minutes:
        before = [c for c in ckpts if c[0] <= m + 1e-9]
        if not before:
            raise FluidError(f"no checkpoint of {run} is at or before {m:g} training minutes (the first: "
                             f"{ckpts[0][0]:.1f} min, step {ckpts[0][1]})")
        out.append(before[-1])
    return out


def export_point(run: Path, step: int, ckpt: Path) -> Path:
    from pipeline.train.export import export_checkpoint

    out = run / "curve" / f"step_{step}"
    if not is_export(out):
        export_checkpoint(str(ckpt), str(out))
    return out


def _decode(sampler, prompt_ids, policy: str, max_tokens: int) -> tuple[list, float]:
    t0 = time.perf_counter()
    res = [sampler.generate([GenerationRequest(prompt_ids=ids, policy=policy, max_tokens=max_tokens,
                                               stop_on_eos=False)])[0] for ids in prompt_ids]
    return res, time.perf_counter() - t0


def ar_vs_verify(sampler, prompt_ids: list[list[int]], max_tokens: int, repeats: int) -> dict:
    """Greedy `verify` against our `ar` loop, prompt by prompt in rotating order, `repeats` rounds."""
    _decode(sampler, prompt_ids[:1], "ar", max_tokens)  # warm-up
    ratios, v_rates, ar_rates, last = [], [], [], {}
    for rnd in range(max(1, repeats)):
        spent = {"ar": 0.0, "verify": 0.0}
        outs = {"ar": [], "verify": []}
        for i, ids in enumerate(prompt_ids):
            took = {}
            for pol in (("ar", "verify") if (rnd + i) % 2 == 0 else ("verify", "ar")):
                (res,), took[pol] = _decode(sampler, [ids], pol, max_tokens)
                spent[pol] += took[pol]
                outs[pol].append(res)
            v_rates.append(1 / took["verify"])  # the same tokens: rates are inverse times
            ar_rates.append(1 / took["ar"])
        ratios.append(spent["ar"] / spent["verify"])
        last = outs
    v, ar = last["verify"], last["ar"]
    out = {"tokens_per_forward": sum(r.stats.tokens for r in v) / sum(r.stats.forwards for r in v),
           "speedup_vs_ar": paired_speedup(v_rates, ar_rates), "rounds": ratios,
           "differs": sum(a.token_ids != b.token_ids for a, b in zip(v, ar, strict=True)) / len(v)}
    if sampler.model.dtype != torch.float32:  # the noise floor: greedy AR at batch 1 vs inside a batch of 8
        batched = [r.token_ids for i in range(0, len(prompt_ids), 8) for r in sampler.generate(
            [GenerationRequest(prompt_ids=ids, policy="ar", max_tokens=max_tokens, stop_on_eos=False)
             for ids in prompt_ids[i:i + 8]])]
        out["ar_floor"] = sum(a != b.token_ids for a, b in zip(batched, ar, strict=True)) / len(ar)
    return out


def flat_tokens_per_forward(sampler, prompt_ids: list[list[int]], max_tokens: int) -> float:
    """Greedy verify's tokens per forward when every width costs one AR step (a fresh acceptance memory)."""
    from pipeline.decode.cost_model import AcceptanceMemory

    saved, sampler._forward_cost, sampler.acceptance = sampler._forward_cost, ForwardCost.flat(), AcceptanceMemory()
    try:
        res, _ = _decode(sampler, prompt_ids, "verify", max_tokens)
    finally:
        sampler._forward_cost, sampler.acceptance = saved, AcceptanceMemory()
    return sum(r.stats.tokens for r in res) / sum(r.stats.forwards for r in res)


def measure_point(export: Path, prompts: list[str], args, dtypes: list[str]) -> list[dict]:
    from pipeline.decode.dtype import inference_dtype
    from pipeline.decode.load import load_sampler

    rows, flat = [], None
    for name in dtypes:
        sampler = load_sampler(export, dtype=inference_dtype(name))
        ids = [sampler.encode(p) for p in prompts]
        if flat is None:
            flat = flat_tokens_per_forward(sampler, ids, args.max_tokens)
        r = ar_vs_verify(sampler, ids, args.max_tokens, args.repeats)
        rows.append({"dtype": name, "flat_tokens_per_forward": flat, **r,
                     "forward_cost": sampler.forward_cost.table(8)})
        print(f"[fluid] curve: {export.name} {name}: flat {flat:.2f} tok/fwd, here {r['tokens_per_forward']:.2f} "
              f"tok/fwd, {r['speedup_vs_ar']:.2f}x ar (rounds {', '.join(f'{x:.2f}' for x in r['rounds'])}), "
              f"verify != ar on {r['differs']:.2f} of prompts" + (f" (ar at batch 8 != ar on {r['ar_floor']:.2f})"
                                                                  if "ar_floor" in r else ""), flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> str | None:
    """tokens per forward (flat cost) and × ar per dtype against training minutes."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for name in sorted({r["dtype"] for r in rows}):
        pts = [r for r in rows if r["dtype"] == name]
        xs = [r["minutes"] for r in pts]
        a.plot(xs, [r["tokens_per_forward"] for r in pts], "o-", label=f"{name}, this CPU")
        b.plot(xs, [r["speedup_vs_ar"] for r in pts], "o-", label=name)
    first = [r for r in rows if r["dtype"] == rows[0]["dtype"]]
    a.plot([r["minutes"] for r in first], [r["flat_tokens_per_forward"] for r in first], "s--", label="flat cost")
    b.axhline(1.0, color="grey", lw=0.8)
    a.set(xlabel="training minutes", ylabel="verify tokens per forward")
    b.set(xlabel="training minutes", ylabel="verify × our ar loop")
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def run(args) -> int:
    from pipeline.eval.ar_compare import corpus_prompts

    run_dir = Path(args.run)
    minutes = [float(x) for x in args.minutes.split(",") if x.strip()]
    dtypes = [x.strip() for x in args.dtypes.split(",") if x.strip()]
    bad = [d for d in dtypes if d not in DTYPES or d == "auto"]
    if bad or not minutes:
        raise FluidError(f"--dtypes must name some of {', '.join(d for d in DTYPES if d != 'auto')} and "
                         f"--minutes at least one number; got {args.dtypes!r}, {args.minutes!r}")
    prompts = corpus_prompts(args.prompts)
    rows = []
    for m, (mins, step, ckpt) in zip(minutes, points(run_dir, minutes), strict=True):
        print(f"[fluid] curve: {m:g} min → checkpoint at step {step} ({mins:.1f} training minutes)", flush=True)
        for r in measure_point(export_point(run_dir, step, ckpt), prompts, args, dtypes):
            rows.append({"minutes": round(mins, 1), "asked_minutes": m, "step": step, **r})
    out = {"run": str(run_dir), "prompts": len(prompts), "max_tokens": args.max_tokens, "repeats": args.repeats,
           "torch_threads": torch.get_num_threads()}
    out["rows"] = merged(run_dir / CURVE_FILE, out, rows)
    out["plot"] = plot(out["rows"], run_dir / "curve.png")
    (run_dir / CURVE_FILE).write_text(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(table(out))
    return 0


def merged(path: Path, settings: dict, rows: list[dict]) -> list[dict]:
    """`rows` with the points an earlier `fluid bench curve` of the run measured under the same settings
    (prompts, tokens, rounds, threads) and this one did not: points may be measured as training reaches them."""
    keys = ("prompts", "max_tokens", "repeats", "torch_threads")
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        old = {}
    same = old and all(old.get(k) == settings[k] for k in keys)
    if old and not same:
        print(f"[fluid] curve: {path} was measured with other settings; it is replaced", flush=True)
    new = {(r["step"], r["dtype"]) for r in rows}
    kept = [r for r in old.get("rows", []) if (r["step"], r["dtype"]) not in new] if same else []
    return sorted(kept + rows, key=lambda r: (r["step"], r["dtype"] != "float32", r["dtype"]))


def table(curve: dict) -> str:
    """The curve as a Markdown table (BENCHMARKS.md, the evaluation report)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    for r in curve["rows"]:
        floor = f"{r['ar_floor']:.2f}" if "ar_floor" in r else "— (fp32: exact)"
        lines.append(f"| {r['minutes']:g} | {r['step']} | {r['dtype']} | {r['flat_tokens_per_forward']:.2f} | "
                     f"{r['tokens_per_forward']:.2f} | {r['speedup_vs_ar']:.2f} | {r['differs']:.2f} | {floor} |")
    return "\n".join(lines)


def record_rows(curve: dict) -> list[dict]:
    """The curve's rows under the table's column names (a benchmark record, pipeline/records.py)."""
    keys = ["minutes", "step", "dtype", "flat_tokens_per_forward", "tokens_per_forward", "speedup_vs_ar", "differs",
            "ar_floor"]
    return [{c: r.get(k) for c, k in zip(COLUMNS, keys, strict=True)} for r in curve["rows"]]
