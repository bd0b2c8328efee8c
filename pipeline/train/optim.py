"""Optimizer and learning-rate schedule of the adaptation: AdamW, linear warm-up, cosine decay."""

from __future__ import annotations

import math

import torch

from pipeline.config import FluidConfig


def lr_lambda(step: int, *, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to `floor` at `total`:
    f(s) = s/warmup for s < warmup; floor + (1 − floor)·½(1 + cos(π·(s − warmup)/(total − warmup)))."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model, cfg: FluidConfig):
    """(AdamW over the trainable parameters, its LambdaLR schedule, the trainable parameter list)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, warmup=cfg.train.warmup_steps, total=cfg.train.max_steps))
    return optimizer, scheduler, trainable
