"""Optimizer and learning-rate schedule of the adaptation: AdamW, linear warm-up, cosine decay.

The schedule decays over `train.max_steps`, or — when a time budget (`train.time_budget_s`) will end
the run first — over the number of steps that fit the budget, estimated once after warm-up from the
measured step time. The estimate lives in the schedule object, whose state is saved in every
checkpoint with the scheduler, so a resumed run (with any number of workers) keeps the same schedule.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from pipeline.config import FluidConfig


def lr_lambda(step: int, *, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to `floor` at `total`:
    f(s) = s/warmup for s < warmup; floor + (1 − floor)·½(1 + cos(π·(s − warmup)/(total − warmup)))."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine:
    """The LambdaLR factor as an object: LambdaLR saves and restores its attributes (total included)."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total
        self.estimated = False  # total replaced by the time-budget estimate
        self.step_times: list[float] = []

    def __call__(self, step: int) -> float:
        return lr_lambda(step, warmup=self.warmup, total=self.total)


def build_optimizer(model, cfg: FluidConfig):
    """(AdamW over the trainable parameters, its LambdaLR schedule, the trainable parameter list)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(cfg.train.warmup_steps, cfg.train.max_steps))
    return optimizer, scheduler, trainable


def probe_step(cfg: FluidConfig) -> int:
    """The step after which a time-budgeted run estimates its total steps (warm-up done, ≥ 3 steps timed)."""
    return max(cfg.train.warmup_steps, 4)


def plan_total_steps(scheduler, cfg: FluidConfig, metrics: dict, device=None) -> int | None:
    """Call after every step with its metrics (`step`, `elapsed_s`, `step_time_s`). Once, at
    `probe_step`, in a run with a time budget: total = step + remaining budget ÷ mean step time (the
    first step, with its one-off costs, excluded), at most `train.max_steps`; rank 0's estimate is
    used by all ranks. Returns the new total when it was set, else None."""
    sched = scheduler.lr_lambdas[0]
    budget = cfg.train.time_budget_s
    if budget is None or not isinstance(sched, WarmupCosine) or sched.estimated:
        return None
    step = int(metrics["step"])
    if step > 1:
        sched.step_times.append(float(metrics["step_time_s"]))
    if step < probe_step(cfg):
        return None
    per_step = sum(sched.step_times) / max(1, len(sched.step_times))
    total = min(cfg.train.max_steps, step + int(max(0.0, budget - metrics["elapsed_s"]) / max(per_step, 1e-9)))
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([total], dtype=torch.long, device=device)
        dist.broadcast(t, src=0)
        total = int(t.item())
    sched.total, sched.estimated, sched.step_times = max(total, step + 1), True, []
    return sched.total
