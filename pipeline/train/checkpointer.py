"""The run's checkpoints through Ray Train: restore the latest on (re)start, save and report during training.

In:  the (sharded) model, optimizer and scheduler, the config and `trained_on` (pipeline/train/resume.py:
     what the run trains on). Out: `restore()` → the saved state of the latest checkpoint (`step`,
     `elapsed_s`, …; {} on a fresh start), with model, optimizer and scheduler restored in place;
     `save(step, metrics)` writes a sharded DCP checkpoint (pipeline/train/checkpoint.py) with that
     state and reports it with the metrics; `report(metrics)` reports metrics alone.

A re-submitted run is checked before any worker starts (`resume.check_resume`, on the driver); a worker
restarted by Ray Train within the same run resumes the same run, so it needs no check.
"""

from __future__ import annotations

import tempfile

import ray.train

from pipeline.config import FluidConfig
from pipeline.train.checkpoint import load_checkpoint, save_checkpoint
from pipeline.train.metrics import scalars


class Checkpointer:
    """Collective: every rank calls `restore` and `save` at the same points."""

    def __init__(self, model, optimizer, scheduler, cfg: FluidConfig, trained_on: dict | None = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.cfg, self.trained_on = cfg, trained_on

    def restore(self) -> dict:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return {}
        with ckpt.as_directory() as d:
            state = load_checkpoint(d, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        return state

    def state(self, step: int, metrics: dict) -> dict:
        """What a checkpoint saves beside the weights and optimizer (`trainer_state.json`)."""
        total = getattr(self.scheduler.lr_lambdas[0], "total", self.cfg.train.max_steps)
        return {"step": step, "scheduler": self.scheduler.state_dict(), "elapsed_s": metrics["elapsed_s"],
                "schedule_total_steps": total, "micro_batches_consumed": step * self.cfg.train.grad_accum,
                "config": self.cfg.to_dict(), "trained_on": self.trained_on}

    def save(self, step: int, metrics: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="fluid-ckpt-") as d:
            save_checkpoint(d, self.model, self.optimizer, self.state(step, metrics))
            ray.train.report(scalars(metrics), checkpoint=ray.train.Checkpoint.from_directory(d))

    @staticmethod
    def report(metrics: dict) -> None:
        ray.train.report(scalars(metrics))
