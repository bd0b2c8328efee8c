"""The held-out evaluation of a training run: validation loss and `val_verify_tpf`, the same on every rank.

In:  the model being trained, the config, the held-out `Rows` (pipeline/data/rows.py; None: nothing to
     evaluate) and the loop config (model folder and `[M]` id for decoding). Out: `Evaluator()` → a dict
     of metrics (AR CE, draft CE per k, or the baseline's masked CE; `verify_tpf` and its counts), exact
     over all ranks; `MetricsLog.eval` writes them with the `val_` prefix.
"""

from __future__ import annotations

from pipeline.config import FluidConfig
from pipeline.train.decode_eval import held_out_verify
from pipeline.train.step import evaluate, local_batches


class Evaluator:
    """Collective: every rank calls it at the same steps. `enabled` is False without held-out rows."""

    def __init__(self, model, cfg: FluidConfig, val_rows, loop_config: dict, *, rank: int, world_size: int,
                 device, max_batches: int):
        self.model, self.cfg, self.rows, self.loop_config = model, cfg, val_rows, loop_config
        self.rank, self.world_size, self.device, self.max_batches = rank, world_size, device, max_batches

    @property
    def enabled(self) -> bool:
        return self.rows is not None

    def __call__(self) -> dict:
        micro_global = self.cfg.train.global_batch_size // self.cfg.train.grad_accum
        batches = local_batches(self.rows, micro_global=micro_global, rank=self.rank, world=self.world_size,
                                device=self.device, mode=self.cfg.noise.mode)
        return {**evaluate(self.model, batches, self.cfg, self.device, max_batches=self.max_batches),
                **held_out_verify(self.model, self.rows, self.cfg, self.loop_config, rank=self.rank,
                                  world_size=self.world_size)}
