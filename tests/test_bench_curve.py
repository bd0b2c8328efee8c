"""`fluid bench curve`: which checkpoint each point takes, and the measurement on a tiny sampler."""

import json

import pytest

from pipeline.bench.curve import ar_vs_verify, flat_tokens_per_forward, merged, points, record_rows, table
from pipeline.decode.cost_model import ForwardCost
from pipeline.decode.sampler import Sampler
from pipeline.errors import FluidError
from pipeline.model.tiny import build_tiny


def _checkpoint(run, name, step, seconds):
    d = run / f"checkpoint_{name}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "elapsed_s": seconds}))
    return d


def test_each_point_takes_the_last_checkpoint_at_or_before_its_minutes(tmp_path):
    with pytest.raises(FluidError, match="no checkpoint_"):
        points(tmp_path, [15])
    a = _checkpoint(tmp_path, "a", 100, 14 * 60)
    b = _checkpoint(tmp_path, "b", 120, 16 * 60)
    c = _checkpoint(tmp_path, "c", 240, 30 * 60)
    (tmp_path / "checkpoint_d").mkdir()  # an unfinished checkpoint (no state yet) is skipped
    got = points(tmp_path, [15, 30, 16])
    assert [(s, p) for _, s, p in got] == [(100, a), (240, c), (120, b)]
    assert got[0][0] == pytest.approx(14.0)
    with pytest.raises(FluidError, match="at or before 10 training minutes .*14.0 min, step 100"):
        points(tmp_path, [10])


def test_ar_vs_verify_and_flat_cost_on_a_tiny_sampler():
    model, tok, mask_id = build_tiny()
    s = Sampler(model, tok, mask_token_id=mask_id, k_max=4, forward_cost=[1.0, 1.3, 1.5, 1.8])
    ids = [s.encode(p) for p in ("the cat sat", "once upon a time")]
    r = ar_vs_verify(s, ids, 8, repeats=2)
    assert len(r["rounds"]) == 2 and all(x > 0 for x in r["rounds"])
    assert r["differs"] == 0.0 and r["tokens_per_forward"] >= 1.0  # float32 verify is AR's output
    flat = flat_tokens_per_forward(s, ids, 8)
    assert flat >= 1.0 and s.forward_cost.table(4) == ForwardCost([1.0, 1.3, 1.5, 1.8]).table(4)  # restored
    curve = {"rows": [{"minutes": 15.0, "step": 100, "dtype": "float32", "flat_tokens_per_forward": flat, **r}]}
    assert record_rows(curve)[0]["× ar"] == r["speedup_vs_ar"] and "| 15 | 100 | float32 |" in table(curve)
    assert "ar_floor" not in r and "— (fp32: exact)" in table(curve)
    import torch

    half = Sampler(model.to(torch.bfloat16), tok, mask_token_id=mask_id, k_max=4, forward_cost=[1.0, 1.3])
    low = ar_vs_verify(half, ids, 8, repeats=1)  # below float32: the noise floor beside verify's departures
    assert 0.0 <= low["ar_floor"] <= 1.0 and 0.0 <= low["differs"] <= 1.0


def test_points_measured_later_join_the_earlier_ones_of_the_same_settings(tmp_path):
    path = tmp_path / "curve.json"
    settings = {"prompts": 12, "max_tokens": 64, "repeats": 2, "torch_threads": 1}
    row = lambda step, dtype, x: {"step": step, "dtype": dtype, "speedup_vs_ar": x}  # noqa: E731
    assert merged(path, settings, [row(100, "float32", 1.0)]) == [row(100, "float32", 1.0)]
    path.write_text(json.dumps({**settings, "rows": [row(100, "float32", 1.0), row(100, "bfloat16", 1.2)]}))
    got = merged(path, settings, [row(200, "float32", 1.1), row(100, "bfloat16", 1.3)])
    assert got == [row(100, "float32", 1.0), row(100, "bfloat16", 1.3), row(200, "float32", 1.1)]
    assert merged(path, {**settings, "max_tokens": 128}, [row(200, "float32", 1.1)]) == [row(200, "float32", 1.1)]
