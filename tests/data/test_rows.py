"""Held-out rows shipped whole to workers: batches in row order, and the driver-side collection."""

import numpy as np
import pytest
import torch

from pipeline.data.rows import Rows


def test_rows_batches_in_order_with_and_without_the_last_partial_batch():
    rows = Rows({"input_ids": np.arange(14, dtype=np.int32).reshape(7, 2), "weight": np.linspace(0, 1, 7)})
    full = list(rows.iter_torch_batches(batch_size=3))
    assert [b["input_ids"].shape[0] for b in full] == [3, 3, 1] and len(rows) == 7
    assert torch.equal(torch.cat([b["input_ids"] for b in full]), torch.arange(14, dtype=torch.int32).view(7, 2))
    assert [b["weight"].shape[0] for b in rows.iter_torch_batches(batch_size=3, drop_last=True)] == [3, 3]
    batch = next(rows.iter_torch_batches(batch_size=2))
    batch["input_ids"] += 100  # batches are copies: the held rows are never changed
    assert int(rows.columns["input_ids"][0, 0]) == 0
    with pytest.raises(ValueError, match="unequal length"):
        Rows({"a": np.zeros(3), "b": np.zeros(4)})
    with pytest.raises(ValueError, match="batch_size"):
        next(Rows({"a": np.zeros(3)}).iter_torch_batches(batch_size=0))


@pytest.mark.ray
def test_collect_rows_takes_the_first_rows_in_the_dataset_order(ray_local):
    import ray

    from pipeline.data.ray_pipeline import collect_rows

    ds = ray.data.from_numpy(np.arange(40, dtype=np.int64).reshape(20, 2)).repartition(4)
    ds.context.execution_options.preserve_order = True
    rows = collect_rows(ds, 7)
    assert len(rows) == 7 and rows.columns["data"][:, 0].tolist() == list(range(0, 14, 2))
    assert len(collect_rows(ds, 100)) == 20
    assert collect_rows(ds.filter(lambda r: False), 5) is None and collect_rows(ds, 0) is None
