"""Stage I causal-alignment training loop, run by every Ray Train worker (`train_loop_per_worker`).

In:  the `FluidConfig` (as a dict), the model folder (or its staged URL: each node fetches its own
     copy) and mask id, `train_blocks` — the row groups of the training shards, of which each worker
     streams its share (pipeline/data/streaming.py) — and optionally `validation`: an object reference
     to the held-out `Rows` (pipeline/data/rows.py) that every worker evaluates on.
Out: per-step metrics (loss, AR CE, draft CE per k, tokens/s, learning rate, data-wait share) to
     `<run_dir>/metrics.jsonl` (to `ray.train.report` with each checkpoint and every REPORT_EVERY_S);
     sharded DCP checkpoints every `train.checkpoint_every` steps; a Hugging Face export at the end.

The parts, each small (torchtitan's manner): model set-up (`pipeline.model`), optimizer (`optim`), one
step (`step`, no Ray), the `Evaluator` (validation loss and `val_verify_tpf`), the `MetricsLog` (JSONL,
console, and hooks for trackers: rank 0 logs each step to the driver's MLflow run, `tracking`), the
`Checkpointer` (restore and save through Ray Train; what a re-submitted run may resume is checked on the
driver, `resume`), the export (`export`).
`train_loop_per_worker` is the recipe that wires them.

Determinism and exact resume: each optimizer step consumes the same global batch whatever the
number of workers (the shard reader's global order depends only on the seed), and resume starts at
the first micro-batch not consumed, without reading the earlier ones. So an interrupted run that
resumes from its last checkpoint ends with the same weights as an uninterrupted run (up to
floating-point reduction order). Outputs go under the run folder, local or `s3://` / `gs://`.
"""

from __future__ import annotations

import time

import torch

from pipeline.config import FluidConfig, from_dict
from pipeline.logs import quiet_ray_train, say
from pipeline.train.checkpointer import Checkpointer
from pipeline.train.evaluator import Evaluator
from pipeline.train.metrics import MetricsLog
from pipeline.train.optim import plan_total_steps
from pipeline.train.outputs import RunFiles
from pipeline.train.step import agree, train_step, world
from pipeline.train.tracking import Tracker

# Metrics-only reports to Ray Train (every step is in metrics.jsonl): a report waits until the Ray Train
# controller collects the previous one (it polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by
# default), so reporting every step would cap training at one step per poll — on a GPU, where a small
# model's step takes ~0.1 s, a 20x slow-down. Checkpoint reports follow train.checkpoint_every.
REPORT_EVERY_S = 30.0


def build_training(cfg: FluidConfig, loop_config: dict):
    """(model, optimizer, scheduler, trainable params, device): loaded, wrapped and sharded."""
    from pipeline.model.causal_lm import build_model
    from pipeline.model.parallelize import (
        apply_activation_checkpointing,
        apply_fsdp2,
        resolve_device,
    )
    from pipeline.train.optim import build_optimizer

    device, mixed = resolve_device(cfg.train.use_gpu, cfg.model.dtype)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    plain = cfg.train.lora_rank == 0 and cfg.train.drafter == "full" and not cfg.train.from_scratch
    if distributed and plain:
        from pipeline.model.sharded_load import load_sharded  # no rank ever holds the whole model

        model = load_sharded(loop_config["model_path"], loop_config["mask_token_id"], device, mixed_precision=mixed,
                             attn_implementation=cfg.model.attn_implementation,
                             activation_checkpointing=cfg.train.activation_checkpointing)
        optimizer, scheduler, trainable = build_optimizer(model, cfg)
        return model, optimizer, scheduler, trainable, device
    model = build_model(cfg, loop_config["model_path"], loop_config["mask_token_id"], device)  # + LoRA/drafter
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        apply_fsdp2(model, mixed_precision=mixed)
    optimizer, scheduler, trainable = build_optimizer(model, cfg)
    return model, optimizer, scheduler, trainable, device


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entrypoint: set up, resume, train to `max_steps` or the time budget, evaluate, export."""
    cfg, loop_config = _setup(loop_config)
    rank, world_size = world()
    model, optimizer, scheduler, trainable, device = build_training(cfg, loop_config)
    checkpointer = Checkpointer(model, optimizer, scheduler, cfg, loop_config.get("trained_on"))
    state = checkpointer.restore()
    start_step = int(state.get("step", 0))
    if start_step and rank == 0:
        say(f"[fluid] resumed from checkpoint at step {start_step}")
    run_files = RunFiles(loop_config["run_dir"], rank)  # local, shared mount or object storage
    tracker = Tracker.attach(loop_config.get("tracking")) if rank == 0 else None  # MLflow (tracking.py)
    log = MetricsLog(run_files.metrics_path, rank, resume_step=start_step, hooks=[tracker] if tracker else ())
    evaluator = Evaluator(model, cfg, _validation_rows(loop_config), loop_config, rank=rank, world_size=world_size,
                          device=device, max_batches=int(loop_config.get("eval_batches", 8)))
    if evaluator.enabled and start_step == 0:
        log.eval(0, evaluator())
    batches = _train_batches(cfg, loop_config, start_step, rank=rank, world_size=world_size, device=device)
    step = _train(cfg, model, batches, optimizer, scheduler, trainable, start=start_step, device=device, log=log,
                  checkpointer=checkpointer, run_files=run_files, elapsed=float(state.get("elapsed_s", 0.0)))
    if evaluator.enabled:
        log.eval(step, evaluator())
    if tracker:
        tracker.flush()
    run_files.sync()
    if loop_config.get("export_dir"):
        _export(model, cfg, loop_config, loop_config["export_dir"], step)


def _setup(loop_config: dict) -> tuple[FluidConfig, dict]:
    """The config, quiet logs, seeds and threads; the model folder as this node's own copy (a staged URL on
    a multi-node cluster is fetched once and checksummed)."""
    from pipeline.sources.staging import local_folder

    cfg = from_dict(loop_config["fluid"])
    quiet_ray_train(cfg.train.verbose)
    loop_config = {**loop_config, "model_path": str(local_folder(loop_config["model_path"], cfg.model.cache_dir))}
    torch.manual_seed(cfg.train.seed)
    if loop_config.get("threads"):
        torch.set_num_threads(int(loop_config["threads"]))
    return cfg, loop_config


def _validation_rows(loop_config: dict):
    import ray

    ref = loop_config.get("validation")
    return ray.get(ref) if ref is not None else None


def _train_batches(cfg: FluidConfig, loop_config: dict, start_step: int, *, rank: int, world_size: int, device):
    """This worker's share of the shards (pipeline/data/streaming.py), from the first micro-batch not consumed."""
    from pipeline.batch import columns_for
    from pipeline.data.streaming import worker_batches

    return worker_batches(loop_config["train_blocks"], micro_global=cfg.train.global_batch_size // cfg.train.grad_accum,
                          rank=rank, world=world_size, start=start_step * cfg.train.grad_accum, seed=cfg.data.seed,
                          shuffle=cfg.data.shuffle, window=cfg.data.shuffle_buffer,
                          columns=list(columns_for(cfg.noise.mode)), device=device)


def _train(cfg: FluidConfig, model, batches, optimizer, scheduler, trainable, *, start: int, device, log: MetricsLog,
           checkpointer: Checkpointer, run_files, elapsed: float) -> int:
    """Optimizer steps from `start` to `train.max_steps` or the time budget; returns the last step. All
    ranks take every clock-based decision together (`agree`), so collectives stay matched."""
    rank, _ = world()
    t_start, last_report = time.time() - elapsed, time.time()
    step = start
    model.train()
    while step < cfg.train.max_steps:
        metrics = train_step(model, batches, optimizer, scheduler, trainable, cfg, step=step, device=device)
        step += 1
        metrics["elapsed_s"] = time.time() - t_start
        total = plan_total_steps(scheduler, cfg, metrics, device)
        if total is not None:
            metrics["schedule_total_steps"] = total
            if rank == 0:
                say(f"[fluid] the time budget allows ~{total} steps: the learning rate decays over them")
        log.write(metrics)
        budget = cfg.train.time_budget_s
        out_of_time, report_due = agree(budget is not None and metrics["elapsed_s"] >= budget,
                                        time.time() - last_report >= REPORT_EVERY_S, device=device)
        if step % cfg.train.checkpoint_every == 0 or step >= cfg.train.max_steps or out_of_time:
            checkpointer.save(step, metrics)
            run_files.sync()
            last_report = time.time()
        elif report_due:
            checkpointer.report(metrics)
            last_report = time.time()
        _maybe_inject_failure(cfg, run_files, step, rank)
        if out_of_time:
            if rank == 0:
                say(f"[fluid] time budget of {budget:.0f} s reached at step {step}")
            break
    return step


def _maybe_inject_failure(cfg: FluidConfig, run_files, step: int, rank: int) -> None:
    """`train.fail_at_step`: fail once at that step (a marker file per step in the run folder), to test
    recovery; a re-submission with another `fail_at_step` fails once more, at that step."""
    marker = f".failed_at_{step}"
    if cfg.train.fail_at_step is None or step != cfg.train.fail_at_step or run_files.has(marker):
        return
    if rank == 0:
        run_files.put(marker, str(step))
    raise RuntimeError(f"injected failure at step {step} (train.fail_at_step)")


def _export(model, cfg: FluidConfig, loop_config: dict, export_dir: str, step: int) -> None:
    from transformers import AutoTokenizer

    from pipeline.train.export import export_hf, export_meta

    rank, _ = world()
    tokenizer = AutoTokenizer.from_pretrained(loop_config["model_path"]) if rank == 0 else None
    from pipeline.train.outputs import export_to

    meta = export_meta(cfg, loop_config["mask_token_id"], loop_config.get("base_sha256"), step)
    export_to(export_dir, lambda out: export_hf(model, tokenizer, out, fluid_meta=meta,
                                                base_dir=loop_config["model_path"]))
    if rank == 0:
        say(f"[fluid] exported Hugging Face folder to {export_dir}")
