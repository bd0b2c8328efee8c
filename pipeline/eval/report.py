"""The evaluation report: a JSON-able dict → Markdown tables and PNG plots (matplotlib, Agg backend).

In:  the report dict that pipeline/eval/evaluate.py builds (keys `ce`, `lambada`, `sampler`, `gamma_sweep`,
     `settings`, and `harness` with --tasks) and the rows of a run's `metrics.jsonl`.
Out: `markdown(report)` → str; `write_plots(report, metrics_rows, folder)` → the PNG paths written:
     ce_by_k.png (draft CE by k, base vs adapted), training.png (training curves),
     accepted_hist.png (tokens committed per forward, by policy), speed_vs_agreement.png (gamma sweep),
     horizon_widths.png (tokens committed by each forward, for the `horizon` samples); `horizon_html`
     → horizon.html: each sample's text coloured by the forward that committed it, its widths under it.
"""

from __future__ import annotations

from pathlib import Path


def markdown(r: dict) -> str:
    s = r["settings"]
    ce = r["ce"]
    lines = [f"# Evaluation of `{s['model']}`", "",
             f"Base model `{s['base_model']}`; held-out text: {s['ce_sequences']} test sequences of "
             f"{s['seq_len']} tokens; LAMBADA sample: first {s['lambada_items']} of 5 153 test items; sampler table: "
             f"{s['prompts']} held-out prompts × {s['max_tokens']} tokens, {s['repeats']} interleaved rounds. "
             f"Machine: {s['machine']}.", "",
             "## Held-out cross-entropy (nats)", "",
             "| model | AR CE | " + " | ".join(f"k={k}" for k in ce["ks"]) + " |",
             "|---|---:|" + "---:|" * len(ce["ks"])]
    for name in ("base", "adapted"):
        by_k = ce[f"{name}_by_k"]
        lines.append(f"| {name} | {ce[f'{name}_ar_ce']:.3f} | " + " | ".join(f"{by_k[k - 1]:.2f}" for k in ce["ks"]) + " |")
    lines += ["", f"AR CE over {ce['ar_tokens']} tokens (every next token of the {ce['sequences']} sequences); "
              f"the CE at each k over {ce['by_k_tokens']} tokens (one per sequence and prefix end). "
              f"AR CE of the adapted model vs the base: {ce['ar_ce_change']:+.1%}.", ""]
    if ce.get("lambada_ar_ce"):
        lc = ce["lambada_ar_ce"]
        lines += [f"LAMBADA AR CE over {lc['tokens']} tokens ({lc['passages']} whole passages): base "
                  f"{lc['base']:.3f}, adapted {lc['adapted']:.3f} nats.", ""]
    if r.get("lambada"):
        lines += ["## LAMBADA last-word accuracy (greedy)", "",
                  "| policy | accuracy | 95 % interval | correct | tokens/forward |", "|---|---:|---:|---:|---:|"]
        for row in r["lambada"]:
            lo, hi = row["interval"]
            lines.append(f"| {row['policy']} | {row['accuracy']:.3f} | {lo:.3f}–{hi:.3f} | {row['correct']}/{row['items']} | "
                         f"{row['tokens_per_forward']:.2f} |")
        lines.append("")
    if r.get("harness"):
        lines += harness_markdown(r["harness"])
    if r.get("sampler"):
        sm = r["sampler"]
        lines += ["## Sampler", "", f"HF greedy `generate`: {sm['hf_tokens_per_s']:.1f} tokens/s (same run); "
                  f"`ar` equals HF on {sm['ar_equals_hf']}/{sm['prompts']} prompts.", "",
                  "| policy | γ | tokens/forward | tokens/s | × HF | prefix agreement | match rate | base NLL |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for row in sm["rows"] + r.get("gamma_sweep", []):
            g = "—" if row.get("gamma") is None else f"{row['gamma']:g}"
            lines.append(f"| {row['policy']} | {g} | {row['tokens_per_forward']:.2f} | {row['tokens_per_s']:.1f} | "
                         f"{row['speedup_vs_hf']:.2f} | {row['prefix_agreement']:.3f} | {row['match_rate']:.3f} | "
                         f"{row['base_nll']:.3f} |")
        lines.append("")
    if r.get("curve"):
        lines += curve_markdown(r["curve"])
    if r.get("horizon"):
        lines += ["## The horizon, step by step", "", f"{len(r['horizon'])} held-out prompts decoded with "
                  f"`{r['horizon'][0]['policy']}`; `|` separates the text of successive forwards (coloured in "
                  "[horizon.html](horizon.html); their widths in horizon_widths.png).", ""]
        for h in r["horizon"]:
            lines += ["```", h["prompt"][-120:] + " ⟶ " + "|".join(t for _, t in h["chunks"]), "```", ""]
    if r.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in r["plots"]] + [""]
    return "\n".join(lines)


def curve_markdown(c: dict) -> list[str]:
    """The report's section on what training bought (`fluid bench curve`'s <run>/curve.json)."""
    lines = ["## What training bought (`fluid bench curve`)", "",
             f"The run's checkpoints by training minutes, each exported and decoded with `verify` on "
             f"{c['prompts']} held-out prompts × {c['max_tokens']} tokens ({c['repeats']} rounds against our "
             "`ar` loop, prompt by prompt; flat cost: every width priced as one AR step).", "",
             "| minutes | step | dtype | tokens/forward (flat cost) | tokens/forward | × ar | verify ≠ ar | ar batch 8 ≠ ar |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in c["rows"]:
        floor = f"{row['ar_floor']:.2f}" if "ar_floor" in row else "—"
        lines.append(f"| {row['minutes']:g} | {row['step']} | {row['dtype']} | {row['flat_tokens_per_forward']:.2f} | "
                     f"{row['tokens_per_forward']:.2f} | {row['speedup_vs_ar']:.2f} | {row['differs']:.2f} | {floor} |")
    lines += [""] + ([f"![curve]({c['plot']})", ""] if c.get("plot") else [])
    return lines


def harness_markdown(h: dict) -> list[str]:
    """The lm-evaluation-harness section: each task's metrics, the agreement of `lambada_openai` with our
    LAMBADA count, and the accuracy-against-tokens-per-forward table with its AUP."""
    lines = ["## lm-evaluation-harness", "", f"Model type `fluid` (loglikelihoods: the AR path); first "
             f"{h['limit'] or 'all'} docs of each task.", "", "| task | docs | metrics |", "|---|---:|---|"]
    for task, m in h["tasks"].items():
        lines.append(f"| {task} | {h['samples'].get(task, '')} | " + ", ".join(f"{k} {v:.4g}" for k, v in m.items()) + " |")
    lines.append("")
    for key, task, rule in (("lambada_agreement", "lambada_openai", "its rule: the target's tokens are the greedy "
                             "ones; ours: the first generated word is the target"),
                            ("lambada_gen_agreement", "lambada_openai_gen", "the same rule as ours")):
        if h.get(key):
            a = h[key]
            ex = "; ".join(f"{t!r} → {p!r}" for t, p in a["examples"])
            lines += [f"`{task}` on the LAMBADA table's {a['items']} items: {a['harness_correct']} correct; our `ar` "
                      f"count: {a['ours_correct']} ({rule}). Only the harness counts {a['only_harness']} items, only "
                      f"ours {a['only_ours']}" + (f" (target → our first word: {ex})" if ex else "") + ".", ""]
    if h.get("aup"):
        lines += [f"### Accuracy against tokens per forward (`{h['aup']['task']}`)", "",
                  "| policy | γ | accuracy | 95 % interval | correct | tokens/forward |", "|---|---:|---:|---:|---:|---:|"]
        for row in h["aup"]["rows"]:
            g = "—" if row["gamma"] is None else f"{row['gamma']:g}"
            lo, hi = row["interval"]
            lines.append(f"| {row['policy']} | {g} | {row['accuracy']:.3f} | {lo:.3f}–{hi:.3f} | "
                         f"{row['correct']}/{row['items']} | {row['tokens_per_forward']:.2f} |")
        lines += ["", f"AUP (area under accuracy against tokens per forward, accuracies weighted by "
                  f"min(1, exp(−3(1 − y/y_max))); pipeline/eval/metrics.py `aup`): {h['aup']['aup']:.3f}.", ""]
    return lines


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(r: dict, metrics_rows: list[dict], folder: str | Path) -> list[str]:
    plt = _plt()
    folder = Path(folder)
    out = []

    ce = r["ce"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style in (("base", "o--"), ("adapted", "o-")):
        ax.plot(ce["ks"], [ce[f"{name}_by_k"][k - 1] for k in ce["ks"]], style, label=name)
    ax.set(xlabel="k (tokens ahead of the last clean token)", ylabel="held-out CE (nats)",
           title="Draft CE by k, before and after adaptation")
    ax.legend()
    out.append(_save(fig, folder / "ce_by_k.png"))

    steps = [m for m in metrics_rows if "event" not in m and "loss" in m]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [m["step"] for m in steps]
        for key in ("ar_ce", "draft_ce", "masked_ce"):
            if any(key in m for m in steps):
                ax.plot(xs, [m.get(key) for m in steps], label=f"train {key}")
        evals = [m for m in metrics_rows if m.get("event") == "eval"]
        for key in ("val_ar_ce", "val_draft_ce"):
            pts = [(m["step"], m[key]) for m in evals if key in m]
            if pts:
                ax.plot(*zip(*pts, strict=True), "s", label=key)
        ax.set(xlabel="optimizer step", ylabel="CE (nats)", title="Training curves (metrics.jsonl)")
        ax.legend()
        out.append(_save(fig, folder / "training.png"))

    hists = {row["policy"]: row["accepted_hist"] for row in r.get("sampler", {}).get("rows", []) if row.get("accepted_hist")}
    if hists:
        out.append(_accepted_hist(plt, hists, folder / "accepted_hist.png"))

    if r.get("horizon"):
        out.append(_horizon_widths(plt, r["horizon"], folder / "horizon_widths.png"))

    sweep = r.get("gamma_sweep", [])
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p["prefix_agreement"] for p in sweep], [p["speedup_vs_hf"] for p in sweep], "o-", label="threshold")
        for p in sweep:
            ax.annotate(f"γ={p['gamma']:g}", (p["prefix_agreement"], p["speedup_vs_hf"]), fontsize=8)
        for row in r.get("sampler", {}).get("rows", []):
            if row["policy"] in ("ar", "verify", "entropy"):
                ax.plot(row["prefix_agreement"], row["speedup_vs_hf"], "x", label=row["policy"])
        ax.set(xlabel="agreement with AR greedy (prefix share)", ylabel="speed vs HF generate",
               title="Speed vs agreement across γ")
        ax.legend()
        out.append(_save(fig, folder / "speed_vs_agreement.png"))
    return out


def _accepted_hist(plt, hists: dict, path: Path) -> str:
    """Bars per policy: the share of forwards that committed 1, 2, … tokens."""
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / len(hists)
    for i, (pol, h) in enumerate(hists.items()):
        total = sum(h.values()) or 1
        ks = sorted(int(k) for k in h)
        ax.bar([k + i * width for k in ks], [h[k] / total if k in h else h[str(k)] / total for k in ks],
               width=width, label=pol)
    ax.set(xlabel="tokens committed by one forward", ylabel="share of forwards", title="Accepted length per forward")
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def _horizon_widths(plt, samples: list[dict], path: Path) -> str:
    fig, axes = plt.subplots(len(samples), 1, figsize=(7, 1.8 * len(samples) + 0.6), squeeze=False)
    for ax, h in zip(axes[:, 0], samples, strict=True):
        _widths(ax, h)
    return _save(fig, path)


def _widths(ax, h: dict) -> None:
    """Tokens committed by each forward of one sample, as bars."""
    ax.bar(range(len(h["widths"])), h["widths"], width=0.85, color=[COLOURS[i % len(COLOURS)] for i in
                                                                       range(len(h["widths"]))])
    ax.set(xlabel="forward", ylabel="tokens", title=f"{h['policy']}: {sum(h['widths'])} tokens in "
           f"{len(h['widths'])} forwards", ylim=(0, max(h["widths"] + [1]) + 0.5))


COLOURS = ("#cfe2ff", "#ffe1b0", "#c8f0c8", "#f3c9f0", "#c4eef2", "#f7c6c6")


def horizon_html(samples: list[dict], folder: str | Path) -> str:
    """horizon.html: per sample, the prompt (grey), then the text each forward committed, coloured by
    forward as its bar in the plot under it (inline SVG of the widths); hover: the forward and its width."""
    import html
    import io

    plt = _plt()
    parts = ["<!doctype html><meta charset='utf-8'><title>The horizon, step by step</title><style>"
             "body{font-family:sans-serif;max-width:60em;margin:auto}.t{font-family:monospace;white-space:pre-wrap;"
             "line-height:1.7}.p{color:#888}</style><h1>The horizon, step by step</h1>"
             "<p>Each colour is the text one forward of the model committed.</p>"]
    for i, h in enumerate(samples):
        spans = "".join(f"<span style='background:{COLOURS[s % len(COLOURS)]}' title='forward {s}: "
                        f"{h['widths'][s]} tokens'>{html.escape(t)}</span>" for s, t in h["chunks"])  # as its bar
        fig, ax = plt.subplots(figsize=(7, 1.8))
        _widths(ax, h)
        fig.tight_layout()
        svg = io.StringIO()
        fig.savefig(svg, format="svg")
        plt.close(fig)
        parts.append(f"<h2>Prompt {i + 1}</h2><div class='t'><span class='p'>{html.escape(h['prompt'])}</span>"
                     f"{spans}</div>{svg.getvalue()[svg.getvalue().find('<svg'):]}")
    path = Path(folder) / "horizon.html"
    path.write_text("\n".join(parts) + "\n")
    return str(path)
