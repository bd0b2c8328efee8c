"""Metrics of `fluid evaluate` (docs/method.md §13), on any model and sampler — no Ray, no files.

In:  causal LMs (Hugging Face interface: `model(input_ids=…).logits`), held-out token chunks, a
     `Sampler` (pipeline/decode/sampler.py), LAMBADA items (pipeline/sources/eval_data.py).
Out: plain numbers and dicts:
* `ar_ce`            mean next-token CE (nats) over every position of the chunks;
* `draft_ce_by_k`    CE of x_{c+k} given x≤c, k = 1…K (pipeline/eval/horizon_ce.py), several cursors;
* `lambada`          last-word accuracy of one policy (greedy), plus its decoding statistics;
* `lambada_ar_ce`    mean next-token CE (nats) over whole LAMBADA passages, at least N tokens
                     (out-of-domain "no forgetting" check: the passages are not the training corpus);
* `wilson_interval`  the 95 % interval of an accuracy; `aup`: accuracy under parallelism (AUP-style).
The sampler table (speed vs HF `generate`, agreement with AR, NLL under the base model) is built by
pipeline/eval/evaluate.py from the helpers it shares with the sampler benchmark (pipeline/eval/ar_compare.py).
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
    ends = cursor_ends(length, cursors)
    per = [horizon_ce(model, chunks[:, :e], mask_id=mask_id, horizon=k_max) for e in ends]
    return np.mean(per, axis=0).tolist()


def cursor_ends(length: int, cursors: int = 2) -> list[int]:
    """The prefix ends of `draft_ce_by_k` in chunks of `length` tokens: each chunk gives one target per k
    per end, so the CE of each k is over (chunks × len(ends)) tokens."""
    return sorted({int(e) for e in np.linspace(length // 2, length, cursors + 1)[1:]})


def lambada_token_ids(tokenizer, items, min_tokens: int) -> list[list[int]]:
    """Whole passages (context + " " + target) in file order, tokenized, until their scored tokens
    (each passage's length − 1: every token after its first) reach `min_tokens`."""
    out, scored = [], 0
    for it in items:
        if scored >= min_tokens:
            break
        ids = tokenizer(f"{it.context} {it.target}", add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) > 1:
            out.append(ids)
            scored += len(ids) - 1
    return out


@torch.no_grad()
def lambada_ar_ce(model, tokenizer, items, *, min_tokens: int, batch_size: int = 8) -> dict:
    """AR CE on LAMBADA passages: `model` (HF causal LM) scores every next token of whole passages
    (one sequence each, right-padded in batches of similar lengths) until at least `min_tokens` tokens
    are scored.
    Returns {"ce": nats per token, "tokens": tokens scored, "passages": passages used}; raises
    ValueError when the items hold fewer than `min_tokens` tokens."""
    seqs = lambada_token_ids(tokenizer, items, min_tokens)
    scored = sum(len(s) - 1 for s in seqs)
    if scored < min_tokens:
        raise ValueError(f"the LAMBADA items hold {scored} tokens, fewer than {min_tokens}")
    device = next(model.parameters()).device
    total, by_length = 0.0, sorted(seqs, key=len)  # batches of similar lengths: little padding
    for start in range(0, len(by_length), batch_size):
        chunk = by_length[start:start + batch_size]
        width = max(map(len, chunk))
        x = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, s in enumerate(chunk):
            x[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        x, mask = x.to(device), mask.to(device)
        logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        total += float((nll * mask[:, 1:]).sum())
    return {"ce": total / scored, "tokens": scored, "passages": len(seqs)}


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


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion p̂ = correct / n (95 % for z = 1.96):

        centre = (p̂ + z²/2n) / (1 + z²/n),   half width = z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²),

    (centre − half, centre + half), always inside [0, 1]; (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"{correct} correct out of {n}")
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


def aup(points: list[tuple[float, float]], alpha: float = 3.0) -> float:
    """Accuracy under parallelism (AUP-style): the trapezoid area under accuracy y against tokens per
    forward ρ, the points (ρ, y) sorted by ρ, each y weighted by W(y) = min(1, exp(−α(1 − y / y_max)))
    (y_max: the best accuracy among the points), so parallelism bought with lost accuracy counts less:

        AUP = Σ_i (ρ_i − ρ_{i−1}) · (y_i W(y_i) + y_{i−1} W(y_{i−1})) / 2.

    One point (AR alone: ρ = 1) has no area: 0."""
    pts = sorted(points)
    y_max = max((y for _, y in pts), default=0.0)

    def weighted(y: float) -> float:
        return y * (min(1.0, float(np.exp(-alpha * (1 - y / y_max)))) if y_max > 0 else 0.0)

    return float(sum((r1 - r0) * (weighted(y1) + weighted(y0)) / 2
                     for (r0, y0), (r1, y1) in zip(pts, pts[1:], strict=False)))
