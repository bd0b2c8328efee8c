"""A small held set of rows, shipped whole to every training worker (no Ray).

In:  equally long numpy columns (a validation set, the horizon fit's examples), collected on the driver
     from a Ray Dataset (`pipeline.data.ray_pipeline.collect_rows`) and put in the object store once.
Out: `Rows.iter_torch_batches(batch_size, drop_last)` → dicts of torch tensors in row order — the part of
     Ray Data's iterator the training loop and the horizon fit use.

Why not Ray Train's `datasets=`: in every run each worker then executes a streaming split of the
dataset through Train's DatasetManager (seconds of start-up on 2 cores), for a few hundred rows that
every worker reads whole anyway.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class Rows:
    def __init__(self, columns: dict[str, np.ndarray]):
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns of unequal length: { {k: len(v) for k, v in columns.items()} }")
        self.columns = dict(columns)
        self.num_rows = lengths.pop() if lengths else 0

    def __len__(self) -> int:
        return self.num_rows

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        stop = self.num_rows - self.num_rows % batch_size if drop_last else self.num_rows
        for start in range(0, stop, batch_size):
            # a copy: arrays read from the object store are read-only, and torch wants writable memory
            yield {k: torch.from_numpy(np.array(v[start:start + batch_size])) for k, v in self.columns.items()}
