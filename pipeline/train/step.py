"""One optimizer step and one held-out evaluation, on any iterator of batches — no Ray here.

In:  the model (plain, LoRA-wrapped or FSDP2-sharded), batches in the format of `pipeline.batch`
     (this rank's slice, on the device), the `FluidConfig`.
Out: `train_step` → per-step metrics (loss, AR CE, draft CE per k, tokens, data wait) after one
     optimizer update over `train.grad_accum` micro-batches; `evaluate` → held-out CE by k.

Ranks agree through `torch.distributed` when it is initialized (sums and counts all-reduced), so
the numbers are exact over all workers; without it everything runs in one process. The Stage I loss
of a step divides once, by the target counts of all its micro-batches on all ranks, so
`grad_accum = 2` gives the gradient of one batch of twice the size (not a mean of per-batch means).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

from pipeline.batch import PAD, columns_for
from pipeline.config import FluidConfig
from pipeline.errors import FluidError


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree(*flags: bool, device) -> tuple[bool, ...]:
    """All ranks take rank 0's decisions (clock-based choices must not diverge across workers); one
    broadcast for all flags."""
    if not (dist.is_available() and dist.is_initialized()):
        return flags
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.broadcast(t, src=0)
    return tuple(bool(v) for v in t.tolist())


def rank_slice(batch: dict, *, rank: int, world_size: int, mode: str, device) -> dict[str, torch.Tensor]:
    """This rank's rows [r·b, (r+1)·b) of a global micro-batch, as long tensors on `device`."""
    per_rank = next(iter(batch.values())).shape[0] // world_size
    return {k: (v if k == "weight" else v.long())[rank * per_rank:(rank + 1) * per_rank].to(device)
            for k, v in batch.items() if k in columns_for(mode)}


def local_batches(rows, *, micro_global: int, rank: int, world: int, device,
                  mode: str = "causal") -> Iterator[dict[str, torch.Tensor]]:
    """Yield this rank's slice of each global micro-batch of held-out `Rows` (pipeline/data/rows.py)."""
    for batch in rows.iter_torch_batches(batch_size=micro_global, drop_last=True):
        yield rank_slice(batch, rank=rank, world_size=world, mode=mode, device=device)


def _next_micro_batches(batches: Iterator[dict], accum: int, *, step: int) -> tuple[list[dict], float]:
    """The next `accum` micro-batches of `batches` and the seconds spent waiting for them; FluidError
    when the data runs out."""
    micro, wait = [], 0.0
    for _ in range(accum):
        tw = time.time()
        batch = next(batches, None)
        wait += time.time() - tw
        if batch is None:
            raise FluidError(f"training data ran out at step {step}: add data or lower train.max_steps")
        micro.append(batch)
    return micro, wait


def _micro_loss(model, batch: dict, cfg: FluidConfig, *, step: int, device, gcount, world_size: int,
                split_drafter: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward one micro-batch; returns (its share of the step's loss, to backward; CE sums by k;
    target counts by k). The bidirectional baseline's sums and counts go to slot 1."""
    from pipeline.model.causal_lm import drafter_forward_batch, forward_batch
    from pipeline.model.losses import bidirectional_loss, stage1_loss
    from pipeline.model.parallelize import compute_precision

    k_max = cfg.noise.k_max
    anneal, gen = 1.0, None
    if cfg.noise.mode == "bidirectional" and cfg.train.anneal_steps > 0:
        anneal = min(1.0, step / cfg.train.anneal_steps)
        gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)  # same on resume
    with compute_precision(device, cfg.model.dtype):
        if split_drafter:  # frozen base: no autograd through the clean stream (same loss and gradient)
            logits = drafter_forward_batch(model, batch)
        else:
            logits = forward_batch(model, batch, mode=cfg.noise.mode, anneal=anneal, generator=gen)
    logits = logits.float()  # the loss in fp32 also under bf16 autocast
    if cfg.noise.mode == "bidirectional":
        loss, m = bidirectional_loss(logits, batch["labels"], batch["weight"])
        sums, counts = torch.zeros(k_max + 1, device=device), torch.zeros(k_max + 1, device=device)
        sums[1], counts[1] = m["masked_ce"] * m["n_masked"], m["n_masked"]
        return loss / cfg.train.grad_accum, sums, counts
    # Σ over micro-batches of local sums / global counts: one division, no mean of means
    loss, m = stage1_loss(logits, batch["labels"], batch["k"], lam=cfg.train.lam, k_max=k_max,
                          global_count_by_k=gcount, world_size=world_size)
    return loss, m["ce_sum_by_k"], m["count_by_k"]


def train_step(model, batches: Iterator[dict], optimizer, scheduler, trainable: list, cfg: FluidConfig,
               *, step: int, device) -> dict:
    """One optimizer update over `cfg.train.grad_accum` micro-batches; returns the step's metrics.

    `step` is the number of updates done before this one (it drives the bidirectional baseline's
    mask annealing). An FSDP2 model reduces gradients across ranks once per step, in the backward of
    the last micro-batch (the earlier ones accumulate locally): the same gradient as reducing each."""
    from pipeline.model.losses import count_targets, metrics_from_sums
    from pipeline.model.parallelize import set_gradient_sync

    _, world_size = world()
    k_max, accum = cfg.noise.k_max, cfg.train.grad_accum
    t0 = time.time()
    micro, wait = _next_micro_batches(batches, accum, step=step)
    sums = torch.zeros(k_max + 1, device=device)
    counts = torch.zeros(k_max + 1, device=device)
    n_tokens = 0
    # HF turns the KV cache off under activation checkpointing, which the split forward needs
    split_drafter = (cfg.train.drafter == "adapter" and cfg.noise.mode == "causal"
                     and not cfg.train.activation_checkpointing)
    gcount = None
    if cfg.noise.mode != "bidirectional":  # exact global means: targets of every micro-batch on every rank
        gcount = sum(count_targets(b["labels"], b["k"], k_max=k_max) for b in micro)
        if world_size > 1:
            dist.all_reduce(gcount)
    for i, batch in enumerate(micro):
        n_tokens += int((batch["span_id"] != PAD).sum())
        loss, s, c = _micro_loss(model, batch, cfg, step=step, device=device, gcount=gcount,
                                 world_size=world_size, split_drafter=split_drafter)
        sums += s
        counts += c
        set_gradient_sync(model, i == accum - 1)
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if world_size > 1:
        stats = torch.stack([sums, counts]).to(device)
        dist.all_reduce(stats)
        sums, counts = stats[0], stats[1]
        tok = torch.tensor([n_tokens, wait], device=device, dtype=torch.float64)
        dist.all_reduce(tok)
        n_tokens, wait = int(tok[0]), float(tok[1]) / world_size
    dt = time.time() - t0
    metrics = _named(metrics_from_sums(sums, counts, lam=cfg.train.lam), cfg.noise.mode)
    metrics.update(step=step + 1, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                   tokens_per_s=n_tokens / dt, data_wait_share=wait / dt, step_time_s=dt)
    return metrics


def evaluate(model, batches: Iterator[dict], cfg: FluidConfig, device, *, max_batches: int) -> dict:
    """Held-out AR CE and draft CE per k, exact over all ranks (sums and counts all-reduced)."""
    from pipeline.model.causal_lm import forward_batch
    from pipeline.model.losses import bidirectional_loss, metrics_from_sums, target_sums

    _, world_size = world()
    k_max = cfg.noise.k_max
    sums = torch.zeros(k_max + 1, dtype=torch.float64, device=device)
    counts = torch.zeros(k_max + 1, dtype=torch.float64, device=device)
    model.eval()
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            logits = forward_batch(model, batch, mode=cfg.noise.mode)
            if cfg.noise.mode == "bidirectional":  # masked-token CE (unshifted targets, k = 0) → slot 1
                _, m = bidirectional_loss(logits, batch["labels"], batch["weight"])
                sums[1] += m["masked_ce"] * m["n_masked"]
                counts[1] += m["n_masked"]
                continue
            s, c = target_sums(logits, batch["labels"], batch["k"], k_max=k_max)
            sums += s.double()
            counts += c.double()
    model.train()
    if world_size > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    return _named(metrics_from_sums(sums, counts, lam=cfg.train.lam), cfg.noise.mode)


def _named(metrics: dict, mode: str) -> dict:
    """The bidirectional baseline's slot-1 sums are its masked-token CE (unshifted targets), not an
    AR CE: report them as `masked_ce` / `n_masked` (the train loss stays `loss`)."""
    if mode != "bidirectional":
        return metrics
    return {"loss": metrics["loss"], "masked_ce": metrics["ar_ce"], "n_masked": metrics["n_ar"]}
