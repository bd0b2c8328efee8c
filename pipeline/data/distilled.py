"""Distilled training examples and their mixing with natural text (pure NumPy, no Ray, no torch).

In:  a distilled pair (prompt ids, the base model's greedy continuation ids; pipeline/data/distill.py),
     the noise settings (`pipeline.data.local.Params`), a global index.
Out: * `make_distilled_example` — one example in the batch format of `pipeline.batch`, of the same
       length T as a natural example: the clean stream is prompt + continuation (cut or padded to
       seq_len), and draft spans are anchored only inside the continuation (cursor c ≥ P − 1), so
       every draft target is the model's own greedy token given the prefix the draft sees.
     * `distilled_examples` — the j-th distilled example for j = 0, 1, …: the corpus in a seeded order,
       re-noised on each pass (epoch = pass), so one corpus serves many steps and many runs.
     * `mix` — the training stream: global row i is distilled iff ⌊(i+1)·share⌋ > ⌊i·share⌋ (an exact
       share, deterministic by global index, so resume and any worker layout see the same rows); the
       other rows are the natural examples, in their order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from pipeline.data.noise import _concat, clean_stream, draft_spans, padding, rng_for
from pipeline.data.packing import shuffle_keys

EPOCH_OFFSET = 1 << 20  # distilled noise seeds use epochs ≥ this: never the natural examples' seeds


def make_distilled_example(prompt: np.ndarray, continuation: np.ndarray, rng: np.random.Generator, *,
                           seq_len: int, mask_id: int, pad_id: int, eos_id: int, k_max: int, draft_tokens: int,
                           spans: int | None = None, rho: float = 0.1,
                           span_distribution: str = "uniform") -> dict[str, np.ndarray]:
    """One distilled example (module docstring); T = seq_len + draft_tokens."""
    prompt, continuation = np.asarray(prompt), np.asarray(continuation)
    tokens = np.concatenate([prompt, continuation])[:seq_len].astype(np.int64)
    drafts = draft_spans(tokens, rng, mask_id=mask_id, eos_id=eos_id, k_max=k_max, budget=draft_tokens,
                         max_spans=spans, rho=rho, span_distribution=span_distribution,
                         min_cursor=max(len(prompt) - 1, 0))
    return _concat(clean_stream(tokens), padding(seq_len - len(tokens), pad_id), drafts,
                   padding(draft_tokens - drafts["input_ids"].shape[0], pad_id))


def distilled_examples(prompts: list[np.ndarray], continuations: list[np.ndarray], params,
                       ) -> Iterator[dict[str, np.ndarray]]:
    """Endless distilled examples (module docstring); `params` is a `pipeline.data.local.Params`."""
    n = len(prompts)
    if n == 0:
        raise ValueError("the distilled corpus is empty")
    p = params
    j = 0
    while True:
        cycle, r = divmod(j, n)
        if r == 0:
            order = np.argsort(shuffle_keys(np.arange(n, dtype=np.int64), p.seed, EPOCH_OFFSET + cycle))
        row = int(order[r])
        yield make_distilled_example(prompts[row], continuations[row], rng_for(p.seed, EPOCH_OFFSET + cycle, row),
                                     seq_len=p.seq_len, mask_id=p.mask_id, pad_id=p.pad_id, eos_id=p.eos_id,
                                     k_max=p.k_max, draft_tokens=p.draft_tokens, spans=p.spans, rho=p.rho,
                                     span_distribution=p.span_distribution)
        j += 1


def is_distilled(index: int, share: float) -> bool:
    """Whether global training row `index` is a distilled one (exactly `share` of every prefix, ±1)."""
    return int((index + 1) * share) > int(index * share)


def mix(natural: Iterable[dict], distilled: Iterator[dict], share: float, total: int) -> Iterator[dict]:
    """`total` training rows: distilled where `is_distilled(i, share)`, else the next natural row."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"data.distill_mix must be in [0, 1], got {share}")
    nat = iter(natural)
    for i in range(total):
        if is_distilled(i, share):
            yield next(distilled)
        else:
            row = next(nat, None)
            if row is None:
                return
            yield row
