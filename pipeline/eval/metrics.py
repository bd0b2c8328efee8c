"""Metrics of `fluid evaluate` (docs/method.md §13), on any model and sampler — no Ray, no files.

In:  causal LMs (Hugging Face interface: `model(input_ids=…).logits`), held-out token chunks, a
     `Sampler` (pipeline/decode/sampler.py), LAMBADA items (pipeline/sources/eval_data.py).
Out: plain numbers and dicts:
* `ar_ce`            mean next-token CE (nats) over every position of the chunks;
* `draft_ce_by_k`    CE of x_{c+k} given x≤c, k = 1…K (pipeline/eval/horizon_ce.py), several cursors;
* `lambada`          last-word accuracy of one policy (greedy), plus its decoding statistics.
The sampler table (speed vs HF `generate`, agreement with AR, NLL under the base model) is built by
jobs/evaluate.py from the benchmark's own helpers (jobs/bench_sampler.py).
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.eval.horizon_ce import horizon_ce

_WORD = re.compile(r"[\w'’-]+")


@torch.no_grad()
def ar_ce(model, chunks: np.ndarray, *, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over all positions of `chunks` [N, L] under a plain causal forward."""
    x = torch.as_tensor(np.asarray(chunks), dtype=torch.long)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device)
        logits = model(input_ids=xb, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb[:, 1:].reshape(-1), reduction="sum"))
        count += xb[:, 1:].numel()
    return total / max(1, count)


def draft_ce_by_k(model, chunks: np.ndarray, *, mask_id: int, k_max: int, cursors: int = 2) -> list[float]:
    """CE by k = 1…k_max, averaged over `cursors` evenly spaced prefixes per chunk [N, L]."""
    chunks = np.asarray(chunks)
    length = chunks.shape[1]
    if length <= k_max:
        raise ValueError(f"chunks of {length} tokens are too short for k_max = {k_max}")
    ends = sorted({int(e) for e in np.linspace(length // 2, length, cursors + 1)[1:]})
    per = [horizon_ce(model, chunks[:, :e], mask_id=mask_id, horizon=k_max) for e in ends]
    return np.mean(per, axis=0).tolist()


def first_word(text: str) -> str:
    m = _WORD.search(text)
    return m.group(0) if m else ""


def lambada(sampler, items, *, policy: str, gamma: float | None = None) -> dict:
    """Greedy last-word accuracy of `policy` on LAMBADA items, plus tokens per forward and the
    accepted-length histogram. Each passage is continued by (target tokens + 2) tokens; the item is
    right iff the first generated word equals the target word."""
    from pipeline.decode.sampler import GenerationRequest

    correct, forwards, tokens, hist, preds = 0, 0, 0, {}, []
    for it in items:
        n = len(sampler.encode(" " + it.target)) + 2
        req = GenerationRequest(prompt_ids=sampler.encode(it.context), max_tokens=n, policy=policy,
                                gamma=gamma, stop_on_eos=True)
        res = sampler.generate([req])[0]
        word = first_word(res.text)
        preds.append(word)
        correct += word == it.target
        forwards += res.stats.forwards
        tokens += res.stats.tokens
        for k, v in res.stats.accepted_hist.items():
            hist[int(k)] = hist.get(int(k), 0) + v
    return {"policy": policy, "items": len(items), "correct": correct, "forwards": forwards,
            "tokens": tokens, "accepted_hist": hist, "predictions": preds}
