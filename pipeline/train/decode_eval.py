"""The number that matters, at every evaluation: `verify` tokens per forward on held-out prompts.

In:  the model being trained (plain, LoRA-wrapped or FSDP2-sharded), its tokenizer and mask id, the
     first rows of the validation split (two-stream batches, `pipeline.batch`), the `FluidConfig`
     (`train.eval_decode_prompts`, `train.eval_decode_tokens`, `train.eval_decode_prompt_len`).
Out: {"verify_tpf", "verify_tokens", "verify_forwards"} exact over all ranks, logged next to CE by k.

Prompts are the first `eval_decode_prompt_len` clean tokens of the first `eval_decode_prompts`
validation rows (the same rows whatever the number of workers); rank r decodes rows r, r + W, ….
Each rank decodes its rows with the sampler's greedy `verify` (lossless: the output is the model's AR
output) for exactly `eval_decode_tokens` tokens, horizon cap `noise.k_max`.

The horizon is planned with a flat forward cost (every width costs one AR step, as on a GPU): the
figure then measures the drafts, not this machine's timing, and is the same on every machine.

FSDP: every rank takes part in every forward (a sharded forward all-gathers each layer, a collective),
so ranks step in lockstep: after each step they agree whether anyone still decodes, and a rank that has
finished runs a one-token forward to keep the collectives matched. This works for any model the loop
trains (no gathered copy on rank 0, no second model in memory).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.batch import CLEAN
from pipeline.config import FluidConfig
from pipeline.errors import FluidError


def clean_prompts(batch: dict, n: int, prompt_len: int) -> list[list[int]]:
    """The first `prompt_len` clean tokens of each of the first `n` rows of a two-stream batch."""
    ids, span = batch["input_ids"], batch["span_id"]
    out = []
    for b in range(min(n, ids.shape[0])):
        clean = ids[b][span[b] == CLEAN][:prompt_len]
        if len(clean):
            out.append([int(t) for t in clean])
    return out


def verify_metrics(model, tokenizer, prompts: list[list[int]], *, mask_token_id: int, k_max: int,
                   max_tokens: int) -> dict:
    """Decode this rank's `prompts` with greedy `verify` in lockstep with the other ranks; returns
    tokens per forward (generated tokens ÷ forwards, summed over rows and ranks), tokens and forwards."""
    from pipeline.decode.cost_model import ForwardCost
    from pipeline.decode.sampler import GenerationRequest, Sampler

    was_training = model.training
    sampler = Sampler(model, tokenizer, mask_token_id=mask_token_id, k_max=k_max, forward_cost=ForwardCost.flat())
    device = sampler.device
    try:
        reqs = [GenerationRequest(prompt_ids=p, policy="verify", max_tokens=max_tokens, max_horizon=k_max,
                                  stop_on_eos=False) for p in prompts]
        dec = sampler.decoder(reqs) if reqs else None
        while True:
            busy = dec is not None and not dec.done
            if not _anyone(busy, device):
                break
            if busy:
                dec.step()
            else:
                _idle_forward(model, device)
        rows = [sampler.result(row) for row in dec.rows] if dec is not None else []
    finally:
        model.train(was_training)
    totals = torch.tensor([sum(r.stats.tokens for r in rows), sum(r.stats.forwards for r in rows)],
                          dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    tokens, forwards = int(totals[0]), int(totals[1])
    return {"verify_tpf": tokens / max(1, forwards), "verify_tokens": tokens, "verify_forwards": forwards}


def held_out_verify(model, val_rows, cfg: FluidConfig, loop_config: dict, *, rank: int, world_size: int) -> dict:
    """`verify_metrics` on this rank's share of the first held-out `Rows`; {} when disabled or in the bidirectional baseline (no causal drafts to verify)."""
    t = cfg.train
    n = t.eval_decode_prompts
    if n < 0 or t.eval_decode_tokens < 0 or t.eval_decode_prompt_len < 1:
        raise FluidError("train.eval_decode_prompts and train.eval_decode_tokens must be ≥ 0 and "
                         "train.eval_decode_prompt_len ≥ 1")
    if n == 0 or t.eval_decode_tokens == 0 or val_rows is None or cfg.noise.mode != "causal":
        return {}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(loop_config["model_path"])
    first = next(iter(val_rows.iter_torch_batches(batch_size=n, drop_last=False)), None)
    prompts = clean_prompts(first, n, t.eval_decode_prompt_len) if first is not None else []
    return verify_metrics(model, tokenizer, prompts[rank::world_size], mask_token_id=int(loop_config["mask_token_id"]),
                          k_max=cfg.noise.k_max, max_tokens=t.eval_decode_tokens)


def _anyone(flag: bool, device) -> bool:
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


@torch.inference_mode()
def _idle_forward(model, device) -> None:
    model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False, logits_to_keep=1)
