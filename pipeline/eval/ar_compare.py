"""Comparisons with plain AR decoding, shared by `fluid evaluate` and `fluid bench sampler`.

In: a Sampler (or a bare HF causal LM) and prompts as token ids. Out: HF greedy `generate`
continuations (the baseline every speed-up is quoted against), the base model's own greedy output, the
NLL of continuations under a model, the agreement of two token sequences, held-out prompts from the
default corpus, and the speed-up estimate both tables quote (`paired_speedup`).
"""

from __future__ import annotations

import copy
import statistics

import torch

from pipeline.decode.sampler import Sampler


def hf_generate(sampler: Sampler, prompt_ids: list[list[int]], max_tokens: int, stop_on_eos: bool) -> list[list[int]]:
    from transformers import GenerationConfig

    eos = sorted(sampler.eos_ids) if stop_on_eos and sampler.eos_ids else None
    pad = sampler.tokenizer.pad_token_id
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_tokens, eos_token_id=eos,
                           pad_token_id=pad if pad is not None else (eos or [0])[0],
                           suppress_tokens=sampler.banned_ids.tolist())
    out = []
    model = sampler.model
    saved = model.generation_config  # generate() fills unset fields (eos!) from the model's defaults
    model.generation_config = copy.deepcopy(saved)
    model.generation_config.eos_token_id = eos
    try:
        with torch.inference_mode():
            for ids in prompt_ids:
                x = torch.tensor([ids], device=sampler.device)
                y = model.generate(x, attention_mask=torch.ones_like(x), generation_config=cfg)
                toks = y[0, len(ids):].tolist()
                out.append(toks[: next((i for i, t in enumerate(toks) if eos and t in eos), len(toks))])
    finally:
        model.generation_config = saved
    return out


def corpus_prompts(n: int, split: str = "test", chars: int = 240) -> list[str]:
    """N prompts from held-out documents of the default corpus: `chars` characters ending at a line
    break, at evenly spaced positions (deterministic, so reruns and re-measurements use the same)."""
    from pipeline.sources.corpus import iter_documents, list_sources

    docs = [d.text for d in iter_documents(list_sources(["default"]), split=split)]
    text = "\n".join(docs)
    prompts = []
    for i in range(n):
        start = int(len(text) * (i + 0.5) / n)
        start = text.find("\n", start) + 1
        end = text.rfind("\n", start, start + chars)
        prompts.append(text[start:end if end > start else start + chars].strip())
    return prompts


def base_greedy(base, sampler: Sampler, prompt_ids: list[list[int]], max_tokens: int, stop_on_eos: bool):
    """The base model's own greedy continuations (column `=base`: prefix agreement with them)."""
    from types import SimpleNamespace

    view = SimpleNamespace(model=base, tokenizer=sampler.tokenizer, eos_ids=sampler.eos_ids, device=sampler.device,
                           banned_ids=torch.tensor([], dtype=torch.long))
    return hf_generate(view, prompt_ids, max_tokens, stop_on_eos)


@torch.inference_mode()
def continuation_nll(model, prompt_ids: list[list[int]], continuations: list[list[int]]) -> float:
    """Mean NLL (nats/token) of the continuations given their prompts under `model`."""
    total, count = 0.0, 0
    for ids, cont in zip(prompt_ids, continuations, strict=True):
        if not cont:
            continue
        x = torch.tensor([ids + cont], device=next(model.parameters()).device)
        logits = model(input_ids=x).logits[0, len(ids) - 1:-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, x[0, len(ids):], reduction="sum"))
        count += len(cont)
    return total / max(1, count)


def agreement(ref: list[int], got: list[int]) -> tuple[float, float]:
    if not ref:
        return 1.0, 1.0
    prefix = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got)))
    match = sum(a == b for a, b in zip(ref, got, strict=False))
    return prefix / len(ref), match / len(ref)


def paired_speedup(rates: list[float], reference: list[float]) -> float:
    """The median of rates[i] ÷ reference[i] over paired runs: the same prompts in the same round, run
    next to each other (the tables rotate the order of methods prompt by prompt). A burst of load on
    the machine during one run moves one pair of many, where it would move a whole round's total; on a
    shared CPU, single runs 20 % slower than their neighbours were seen."""
    if not rates or len(rates) != len(reference):
        raise ValueError(f"paired_speedup needs paired runs, got {len(rates)} and {len(reference)}")
    return statistics.median(a / b for a, b in zip(rates, reference, strict=True))
