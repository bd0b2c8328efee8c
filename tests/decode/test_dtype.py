"""`sampler.dtype=auto`: bf16 on CUDA, or on a CPU with bf16 units where the start-up measurement agrees."""

import pytest
import torch

from pipeline.decode import dtype as d
from pipeline.errors import FluidError

AMX = "processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile amx_bf16\n"
PLAIN = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n"


def test_cpu_flags_are_read_from_cpuinfo():
    assert d.cpu_has_bf16_units(AMX) and not d.cpu_has_bf16_units(PLAIN) and not d.cpu_has_bf16_units("")


def test_named_dtypes_are_kept_and_unknown_ones_refused():
    assert d.inference_dtype("float32") is torch.float32 and d.inference_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(FluidError, match=r"unknown dtype 'fp8' \(auto, float32, bfloat16, float16\)"):
        d.inference_dtype("fp8")


@pytest.mark.parametrize("units, wide, narrow, expected", [
    (False, 3.0, 1.0, torch.float32),   # no bf16 units: never measured, fp32
    (True, 3.0, 1.0, torch.bfloat16),   # units and a real gain where drafts are
    (True, 1.1, 1.0, torch.float32),    # units, gain under the margin
    (True, 3.0, 0.8, torch.float32),    # drafting faster but every AR step slower
])
def test_auto_on_a_cpu_follows_the_flags_and_the_measurement(monkeypatch, tmp_path, units, wide, narrow, expected):
    (tmp_path / "config.json").write_text('{"hidden_size": 576}')
    seen = []
    monkeypatch.setattr(d, "cpu_has_bf16_units", lambda: units)
    monkeypatch.setattr(d, "bf16_speedup", lambda h, rows: seen.append((h, rows)) or (wide if rows > 1 else narrow))
    assert d.inference_dtype("auto", "cpu", tmp_path) is expected
    assert all(h == 576 for h, _ in seen) and (not seen) == (not units)


def test_auto_is_bf16_on_cuda_without_measuring(monkeypatch):
    monkeypatch.setattr(d, "bf16_speedup", lambda *a, **k: pytest.fail("measured on CUDA"))
    assert d.inference_dtype("auto", "cuda") is torch.bfloat16


def test_the_measurement_returns_a_positive_ratio():
    r = d.bf16_speedup(64, rows=2, rounds=1)
    assert r > 0 and r == d.bf16_speedup(64, rows=2, rounds=1)  # cached per process and width
