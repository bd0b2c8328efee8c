"""The ablation behind the method's central claim (docs/method.md §1): from the same base model and the
same text, which conversion learns to predict k tokens ahead with the fewest tokens?

Arms (each trained in this process, no Ray; the same packed training sequences, in the same order):
* `causal`        FLUID strictly causal alignment (two-stream layout) from the pretrained weights;
* `bidirectional` DiffuLLaMA-style conversion: masked diffusion with attention-mask annealing;
* `scratch`       causal alignment from a random init of the same architecture.

In:  a `FluidConfig` (section `ablate`, plus model / data / noise settings), the resolved model.
Out: `<ablate.output>/arm_<name>.json` per finished arm (re-runs reuse them), `ablate.json`,
     `ablate.md` (table) and `ablate.png` (plot). The metric (pipeline/eval/horizon_ce.py) is
     evaluated before training and `ablate.evals` times along it; "tokens seen" counts corpus
     (clean) tokens, the same for every arm.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import FluidConfig
from pipeline.errors import FluidError
from pipeline.eval.horizon_ce import eval_chunks, horizon_ce, tokens_to_reach

ARMS = {"causal": ("causal", False), "bidirectional": ("bidirectional", False), "scratch": ("causal", True)}


def arm_config(cfg: FluidConfig, arm: str) -> FluidConfig:
    a = cfg.ablate
    mode, scratch = ARMS[arm]
    c = copy.deepcopy(cfg)
    c.noise.mode, c.train.from_scratch = mode, scratch
    c.data.seq_len, c.data.shuffle = a.seq_len, True
    c.train.global_batch_size, c.train.grad_accum, c.train.lr = a.batch_size, 1, a.lr
    c.train.warmup_steps, c.train.max_steps = a.warmup_steps, steps_for(a)
    c.train.anneal_steps = int(round(a.anneal_share * c.train.max_steps)) if mode == "bidirectional" else 0
    return c


def steps_for(a) -> int:
    return max(1, math.ceil(a.tokens / (a.batch_size * a.seq_len)))


def heldout_chunks(cfg: FluidConfig, tokenizer_path, n: int, length: int) -> np.ndarray:
    """Validation documents, tokenized and joined with EOS, cut into `n` evenly spaced chunks."""
    from pipeline.data.local import load_fast_tokenizer, special_ids
    from pipeline.sources.corpus import iter_documents, list_sources

    d = cfg.data
    sources = list_sources(d.corpus, cache_dir=cfg.model.cache_dir, val_fraction=d.val_fraction,
                           test_fraction=d.test_fraction, split_seed=d.split_seed)
    docs = [doc.text for doc in iter_documents(sources, split="validation", val_fraction=d.val_fraction,
                                               test_fraction=d.test_fraction, split_seed=d.split_seed)]
    tok = load_fast_tokenizer(tokenizer_path)
    eos, _ = special_ids(tokenizer_path)
    stream = [t for e in tok.encode_batch_fast(docs, add_special_tokens=False) for t in [*e.ids, eos]]
    return eval_chunks(np.asarray(stream, dtype=np.int64), n, length)


def _batches(cfg: FluidConfig, resolved):
    from pipeline.batch import columns_for
    from pipeline.data.local import iter_examples_local

    cols = columns_for(cfg.noise.mode)
    rows = iter_examples_local(cfg.data, cfg.noise, tokenizer_path=resolved.path,
                               mask_token_id=resolved.mask_token_id, split="train", cache_dir=cfg.model.cache_dir)
    b = cfg.train.global_batch_size
    while True:
        chunk = [r for _, r in zip(range(b), rows, strict=False)]
        if len(chunk) < b:
            raise FluidError("the training split ran out: lower ablate.tokens")
        yield {c: torch.from_numpy(np.stack([r[c] for r in chunk])).to(torch.float32 if c == "weight" else torch.long)
               for c in cols}


def run_arm(cfg: FluidConfig, arm: str, resolved, chunks: np.ndarray, log=print, partial: Path | None = None) -> dict:
    """Train one arm and evaluate it along the way; returns its curve (also written to `partial`
    after every evaluation, so a long run shows where it stands)."""
    from pipeline.model.causal_lm import build_model
    from pipeline.train.optim import build_optimizer
    from pipeline.train.step import train_step

    c = arm_config(cfg, arm)
    a = cfg.ablate
    torch.manual_seed(c.train.seed)
    model = build_model(c, str(resolved.path), resolved.mask_token_id, torch.device("cpu"))
    optimizer, scheduler, trainable = build_optimizer(model, c)
    steps = c.train.max_steps
    eval_at = sorted({int(round(s)) for s in np.linspace(0, steps, a.evals + 1)})
    per_step = c.train.global_batch_size * c.data.seq_len
    curve = {"arm": arm, "layout": c.noise.mode, "from_scratch": c.train.from_scratch, "steps": steps,
             "tokens": [], "ce_by_k": [], "train_seconds": 0.0}
    batches = _batches(c, resolved)
    t_train, step = 0.0, 0
    model.train()
    for target in eval_at:
        while step < target:
            t0 = time.time()
            train_step(model, batches, optimizer, scheduler, trainable, c, step=step, device=torch.device("cpu"))
            t_train += time.time() - t0
            step += 1
        ce = horizon_ce(model, chunks, mask_id=resolved.mask_token_id, horizon=a.horizon, mode=c.noise.mode)
        curve["tokens"].append(step * per_step)
        curve["ce_by_k"].append(ce)
        curve["train_seconds"] = t_train
        if partial is not None:
            partial.write_text(json.dumps(curve))
        log(f"[fluid] ablate {arm}: step {step}/{steps} ({step * per_step} tokens, {t_train:.0f} s training)  "
            + "  ".join(f"k{k} {ce[k - 1]:.2f}" for k in (1, 2, 4, a.horizon) if k <= a.horizon))
    curve["train_seconds"] = t_train
    return curve


def run_ablation(cfg: FluidConfig, resolved, log=print) -> dict:
    a = cfg.ablate
    unknown = [x for x in a.arms if x not in ARMS]
    if unknown or not a.arms:
        raise FluidError(f"ablate.arms must name some of {list(ARMS)}, got {a.arms}")
    if a.horizon < 2 or a.prefix_len < 1:
        raise FluidError("ablate.horizon must be ≥ 2 and ablate.prefix_len ≥ 1")
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    chunks = heldout_chunks(cfg, resolved.path, a.eval_items, a.prefix_len + a.horizon)
    fingerprint = {k: getattr(a, k) for k in ("tokens", "seq_len", "batch_size", "lr", "warmup_steps",
                                               "anneal_share", "evals", "eval_items", "prefix_len", "horizon")}
    fingerprint["model"] = cfg.model.spec
    curves = {}
    for arm in a.arms:
        path = out / f"arm_{arm}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("settings") == fingerprint:
                log(f"[fluid] ablate {arm}: reusing {path}")
                curves[arm] = saved
                continue
        curve = run_arm(cfg, arm, resolved, chunks, log=log, partial=out / f"arm_{arm}.partial.json")
        curve["settings"] = fingerprint
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(curve, indent=1))
        tmp.replace(path)
        curves[arm] = curve
    result = {"settings": fingerprint, "eval_items": int(len(chunks)), "arms": curves,
              "tokens_to_reach_bidirectional": reach_table(curves, a.horizon)}
    (out / "ablate.json").write_text(json.dumps(result, indent=1))
    (out / "ablate.md").write_text(markdown(result))
    plot(result, out / "ablate.png")
    return result


def reach_table(curves: dict, horizon: int) -> dict:
    """Per arm and k = 2…horizon: corpus tokens it needed to reach the bidirectional arm's final CE."""
    if "bidirectional" not in curves:
        return {}
    final = curves["bidirectional"]["ce_by_k"][-1]
    table = {}
    for arm, cv in curves.items():
        table[arm] = {k: tokens_to_reach(cv["tokens"], [ce[k - 1] for ce in cv["ce_by_k"]], final[k - 1])
                      for k in range(2, horizon + 1)}
    return table


def markdown(result: dict) -> str:
    s = result["settings"]
    arms = result["arms"]
    ks = list(range(1, s["horizon"] + 1))
    lines = [f"Model {s['model']}, {s['tokens']} corpus tokens per arm (seq_len {s['seq_len']}, batch "
             f"{s['batch_size']}, lr {s['lr']}), metric on {result['eval_items']} held-out items "
             f"(prefix {s['prefix_len']} tokens).", "",
             "Final held-out CE (nats) of x_{c+k} given x≤c:", "",
             "| arm | " + " | ".join(f"k={k}" for k in ks) + " | train s |",
             "|---|" + "---:|" * (len(ks) + 1)]
    for arm, cv in arms.items():
        lines.append(f"| {arm} | " + " | ".join(f"{v:.2f}" for v in cv["ce_by_k"][-1])
                     + f" | {cv['train_seconds']:.0f} |")
    reach = result["tokens_to_reach_bidirectional"]
    if reach:
        kk = list(range(2, s["horizon"] + 1))
        lines += ["", "Corpus tokens each arm needed to reach the bidirectional arm's final CE (— = not reached):",
                  "", "| arm | " + " | ".join(f"k={k}" for k in kk) + " |", "|---|" + "---:|" * len(kk)]
        for arm, row in reach.items():
            lines.append(f"| {arm} | " + " | ".join("—" if row[k] is None else f"{row[k]:,.0f}" for k in kk) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = result["settings"]["horizon"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {k: ls for k, ls in ((2, "-"), (4, "--"), (h, ":")) if k <= h}
    for i, (arm, cv) in enumerate(result["arms"].items()):
        color = f"C{i}"
        for k, ls in styles.items():
            left.plot(cv["tokens"], [ce[k - 1] for ce in cv["ce_by_k"]], ls, color=color, label=f"{arm} k={k}")
        right.plot(range(1, h + 1), cv["ce_by_k"][-1], "o-", color=color, label=arm)
    left.set(xlabel="corpus tokens seen", ylabel="held-out CE (nats)", title="CE of x_{c+k} given x≤c")
    left.legend(fontsize=7, ncol=2)
    right.set(xlabel="k (tokens ahead)", ylabel="final held-out CE (nats)", title="after the budget")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
