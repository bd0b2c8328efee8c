"""Stage I causal-alignment training loop, run by every Ray Train worker (`train_loop_per_worker`).

In:  the `FluidConfig` (as a dict), the resolved model folder and mask id, and Ray Datasets
     `train` (and optionally `validation`) of two-stream rows (see pipeline/noise.py) that every
     worker reads whole, in the same deterministic order (`seq_order` column).
Out: per-step metrics (loss, AR CE, draft CE per k, tokens/s, learning rate, data-wait share) to
     `ray.train.report` and to `<run_dir>/metrics.jsonl`; sharded DCP checkpoints every
     `train.checkpoint_every` steps; a Hugging Face export at the end.

Determinism and exact resume: each optimizer step consumes the same global batch whatever the
number of workers (worker r takes rows [r·b, (r+1)·b) of each global micro-batch), and resume
skips the micro-batches already consumed. So an interrupted run that resumes from its last
checkpoint ends with the same weights as an uninterrupted run (up to floating-point reduction
order). The price: every worker reads every row; the compute of the model dominates anyway.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import FluidConfig, from_dict
from pipeline.errors import FluidError

BATCH_COLUMNS = ("input_ids", "position_ids", "span_id", "anchor", "labels", "k")


def lr_lambda(step: int, *, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to `floor` at `total`:
    f(s) = s/warmup for s < warmup; floor + (1 − floor)·½(1 + cos(π·(s − warmup)/(total − warmup)))."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_device(cfg: FluidConfig) -> tuple[torch.device, bool]:
    """(device, use bf16 mixed precision). Parameters always load in fp32; FSDP2 casts on CUDA."""
    cuda = cfg.train.use_gpu and torch.cuda.is_available()
    if cfg.train.use_gpu and not cuda:
        raise FluidError("train.use_gpu is true but this worker has no CUDA device")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mixed = cuda and cfg.model.dtype in ("auto", "bfloat16")
    return device, mixed


def build_model(cfg: FluidConfig, model_path: str, mask_token_id: int, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipeline.model import add_mask_token, load_causal_lm

    if cfg.train.from_scratch:
        mcfg = AutoConfig.from_pretrained(model_path)
        mcfg._attn_implementation = cfg.model.attn_implementation
        model = AutoModelForCausalLM.from_config(mcfg, dtype=torch.float32)
    else:
        model = load_causal_lm(model_path, attn_implementation=cfg.model.attn_implementation,
                               trust_remote_code=cfg.model.trust_remote_code)
    add_mask_token(model, mask_token_id)  # training forwards pass use_cache=False themselves
    return model.to(device)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_batches(dataset_iter, *, micro_global: int, rank: int, world: int, skip: int, device):
    """Yield this rank's slice of each global micro-batch, after skipping `skip` micro-batches."""
    per_rank = micro_global // world
    for i, batch in enumerate(dataset_iter.iter_torch_batches(batch_size=micro_global, drop_last=True)):
        if i < skip:
            continue
        yield {k: (v if k == "weight" else v.long())[rank * per_rank:(rank + 1) * per_rank].to(device)
               for k, v in batch.items() if k in BATCH_COLUMNS or k == "weight"}


def evaluate(model, dataset_iter, cfg: FluidConfig, device, *, max_batches: int, micro_global: int) -> dict:
    """Held-out AR CE and draft CE per k, exact over all ranks (sums and counts all-reduced)."""
    from pipeline.losses import bidirectional_loss, metrics_from_sums, target_sums
    from pipeline.model import forward_batch

    rank, world = _world()
    k_max = cfg.noise.k_max
    sums = torch.zeros(k_max + 1, dtype=torch.float64, device=device)
    counts = torch.zeros(k_max + 1, dtype=torch.float64, device=device)
    model.eval()
    with torch.no_grad():
        for i, batch in enumerate(local_batches(dataset_iter, micro_global=micro_global, rank=rank, world=world,
                                                skip=0, device=device)):
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
    if world > 1:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    return metrics_from_sums(sums, counts, lam=cfg.train.lam)


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entrypoint (also callable without Ray for a single process: see `run_local`)."""
    import ray.train

    cfg = from_dict(loop_config["fluid"])
    rank, world = _world()
    torch.manual_seed(cfg.train.seed)
    if loop_config.get("threads"):
        torch.set_num_threads(int(loop_config["threads"]))
    device, mixed = resolve_device(cfg)
    model = build_model(cfg, loop_config["model_path"], loop_config["mask_token_id"], device)
    from pipeline.parallelize import apply_activation_checkpointing, apply_fsdp2, apply_lora

    if cfg.train.lora_rank > 0:
        model = apply_lora(model, rank=cfg.train.lora_rank)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if dist.is_available() and dist.is_initialized():
        apply_fsdp2(model, mixed_precision=mixed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    total = cfg.train.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=cfg.train.warmup_steps, total=total))

    start_step, state = 0, {}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        from pipeline.checkpoint import load_checkpoint

        with ckpt.as_directory() as d:
            state = load_checkpoint(d, model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        if rank == 0:
            print(f"[fluid] resumed from checkpoint at step {start_step}", flush=True)

    run_dir = Path(loop_config["run_dir"])
    metrics_path = run_dir / "metrics.jsonl"
    micro_global = cfg.train.global_batch_size // cfg.train.grad_accum
    train_ds = ray.train.get_dataset_shard("train")
    val_ds = ray.train.get_dataset_shard("validation") if loop_config.get("has_validation") else None
    eval_batches = int(loop_config.get("eval_batches", 8))

    if val_ds is not None and start_step == 0:
        before = evaluate(model, val_ds, cfg, device, max_batches=eval_batches, micro_global=micro_global)
        _log(rank, metrics_path, {"event": "eval", "step": 0, **{f"val_{k}": v for k, v in before.items()}})

    batches = local_batches(train_ds, micro_global=micro_global, rank=rank, world=world,
                            skip=start_step * cfg.train.grad_accum, device=device)
    t_start = time.time() - float(state.get("elapsed_s", 0.0))
    fail_at = cfg.train.fail_at_step
    step = start_step
    from pipeline.losses import bidirectional_loss, count_targets, metrics_from_sums, stage1_loss
    from pipeline.model import forward_batch

    model.train()
    while step < total:
        t0 = time.time()
        wait = 0.0
        sums = torch.zeros(cfg.noise.k_max + 1, device=device)
        counts = torch.zeros(cfg.noise.k_max + 1, device=device)
        n_tokens = 0
        for _ in range(cfg.train.grad_accum):
            tw = time.time()
            batch = next(batches, None)
            wait += time.time() - tw
            if batch is None:
                raise FluidError(f"training data ran out at step {step}: add data or lower train.max_steps")
            n_tokens += int((batch["span_id"] != -2).sum())
            anneal, gen = 1.0, None
            if cfg.noise.mode == "bidirectional" and cfg.train.anneal_steps > 0:
                anneal = min(1.0, step / cfg.train.anneal_steps)
                gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step)  # same on resume
            logits = forward_batch(model, batch, mode=cfg.noise.mode, anneal=anneal, generator=gen)
            if cfg.noise.mode == "bidirectional":
                loss, m = bidirectional_loss(logits, batch["labels"], batch["weight"])
                loss = loss / cfg.train.grad_accum
                sums[1] += m["masked_ce"] * m["n_masked"]
                counts[1] += m["n_masked"]
            else:
                gcount = count_targets(batch["labels"], batch["k"], k_max=cfg.noise.k_max)
                if world > 1:
                    dist.all_reduce(gcount)
                loss, m = stage1_loss(logits, batch["labels"], batch["k"], lam=cfg.train.lam, k_max=cfg.noise.k_max,
                                      global_count_by_k=gcount, world_size=world)
                loss = loss / cfg.train.grad_accum
                sums += m["ce_sum_by_k"]
                counts += m["count_by_k"]
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if world > 1:
            stats = torch.stack([sums, counts]).to(device)
            dist.all_reduce(stats)
            sums, counts = stats[0], stats[1]
            tok = torch.tensor([n_tokens, wait], device=device, dtype=torch.float64)
            dist.all_reduce(tok)
            n_tokens, wait = int(tok[0]), float(tok[1]) / world
        dt = time.time() - t0
        metrics = metrics_from_sums(sums, counts, lam=cfg.train.lam)
        metrics.update(step=step, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                       tokens_per_s=n_tokens / dt, data_wait_share=wait / dt, step_time_s=dt,
                       elapsed_s=time.time() - t_start)
        _log(rank, metrics_path, metrics)
        out_of_time = cfg.train.time_budget_s is not None and metrics["elapsed_s"] >= cfg.train.time_budget_s
        out_of_time = _agree(out_of_time, device)
        last = step >= total or out_of_time
        if step % cfg.train.checkpoint_every == 0 or last:
            _report_with_checkpoint(model, optimizer, scheduler, step, metrics, cfg)
        else:
            ray.train.report(_scalar(metrics))
        if fail_at is not None and step == fail_at and not (run_dir / ".failed_once").exists():
            if rank == 0:
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / ".failed_once").write_text(str(step))
            raise RuntimeError(f"injected failure at step {step} (train.fail_at_step)")
        if out_of_time:
            if rank == 0:
                print(f"[fluid] time budget of {cfg.train.time_budget_s:.0f} s reached at step {step}", flush=True)
            break

    if val_ds is not None:
        after = evaluate(model, val_ds, cfg, device, max_batches=eval_batches, micro_global=micro_global)
        _log(rank, metrics_path, {"event": "eval", "step": step, **{f"val_{k}": v for k, v in after.items()}})
    export_dir = loop_config.get("export_dir")
    if export_dir:
        _export(model, cfg, loop_config, export_dir, step)


def _agree(flag: bool, device) -> bool:
    """All ranks take rank 0's decision (time budgets must not diverge across workers)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def _scalar(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _log(rank: int, path: Path, record: dict) -> None:
    if rank != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"time": time.time(), **_scalar(record), **{k: v for k, v in record.items() if isinstance(v, str)}}
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    if "event" in record:
        keys = ("val_ar_ce", "val_draft_ce", "val_ce_k2", "val_ce_k4", "val_ce_k8")
        print(f"[fluid] eval at step {record['step']}: " + "  ".join(
            f"{k[4:]} {record[k]:.3f}" for k in keys if k in record), flush=True)
    elif record.get("step", 0) == 1 or record.get("step", 0) % 10 == 0:
        print(f"[fluid] step {record['step']}  loss {record['loss']:.3f}  ar {record['ar_ce']:.3f}  draft "
              f"{record['draft_ce']:.3f}  {record['tokens_per_s']:.0f} tok/s  wait {record['data_wait_share']:.0%}",
              flush=True)


def _report_with_checkpoint(model, optimizer, scheduler, step: int, metrics: dict, cfg: FluidConfig) -> None:
    import ray.train

    from pipeline.checkpoint import save_checkpoint

    extra = {"step": step, "scheduler": scheduler.state_dict(), "elapsed_s": metrics["elapsed_s"],
             "micro_batches_consumed": step * cfg.train.grad_accum, "config": cfg.to_dict()}
    with tempfile.TemporaryDirectory(prefix="fluid-ckpt-") as d:
        save_checkpoint(d, model, optimizer, extra)
        ray.train.report(_scalar(metrics), checkpoint=ray.train.Checkpoint.from_directory(d))


def export_meta(cfg: FluidConfig, mask_token_id: int, base_sha256: str | None, step: int) -> dict:
    """The `fluid.json` content of an export of this run (see pipeline/export.py)."""
    d = cfg.to_dict()
    return {
        "mask_token": cfg.model.mask_token,
        "mask_token_id": mask_token_id,
        "k_max": cfg.noise.k_max,
        "policy_defaults": {"policy": cfg.sampler.policy, "gamma": cfg.sampler.gamma,
                            "max_horizon": min(cfg.sampler.max_horizon, cfg.noise.k_max)},
        "base_model": {"spec": cfg.model.spec, "sha256": base_sha256},
        "data_config": {"data": d["data"], "noise": d["noise"]},
        "train_config": {**d["train"], "steps_done": step},
    }


def _export(model, cfg: FluidConfig, loop_config: dict, export_dir: str, step: int) -> None:
    from transformers import AutoTokenizer

    from pipeline.export import export_hf

    rank, _ = _world()
    tokenizer = AutoTokenizer.from_pretrained(loop_config["model_path"]) if rank == 0 else None
    meta = export_meta(cfg, loop_config["mask_token_id"], loop_config.get("base_sha256"), step)
    out = export_hf(model, tokenizer, export_dir, fluid_meta=meta)
    if out is not None:
        print(f"[fluid] exported Hugging Face folder to {out}", flush=True)
