"""The dtype a sampler runs in: `auto` picks what this hardware computes fast.

In:  a dtype name (auto | float32 | bfloat16 | float16), the device, optionally the model folder (its
     config.json's hidden size sizes the start-up measurement).
Out: a torch dtype.

`auto` is bfloat16 on CUDA. On a CPU it is bfloat16 only where the CPU has bf16 matrix units (the
`amx_bf16` or `avx512_bf16` flag) *and* a start-up measurement agrees: a product of a 16-token step at
the model's width ([16, h] × [h, 4h], where drafting happens) takes at most 1 / BF16_MARGIN of its
float32 time, and a 1-token product (an AR step) is not slower than in float32 by more than 10 %
(medians of interleaved rounds, well under a second, once per process and width). Everywhere else float32: on CPUs without those
units bf16 is emulated and slower, and a tiny model's step is dispatch-bound, where bf16 gains nothing.

What the choice means for output: float32 `verify` is bit-identical to float32 AR. bfloat16 `verify` is
the bf16 model's greedy output up to near-ties, where rounding (which depends on a step's width and
batch) may pick the other token — as bf16 AR itself does between batch sizes (docs/method.md). Set the
dtype explicitly (`sampler.dtype=float32`) where bit-exactness matters more than speed.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from pathlib import Path

import torch

from pipeline.errors import FluidError

DTYPES = ("auto", "float32", "bfloat16", "float16")
BF16_MARGIN = 1.25  # bf16 must be this much faster: a small gain does not pay for departing from fp32 at ties
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def inference_dtype(name: str, device=None, model_dir: str | Path | None = None) -> torch.dtype:
    """The dtype named, or for `auto` the one this device is fast in (module docstring)."""
    if name not in DTYPES:
        raise FluidError(f"unknown dtype {name!r} ({', '.join(DTYPES)})")
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device or "cpu").type == "cuda":
        return torch.bfloat16
    if not cpu_has_bf16_units():
        return torch.float32
    hidden = _hidden_size(model_dir)
    fast = bf16_speedup(hidden, rows=16) >= BF16_MARGIN and bf16_speedup(hidden, rows=1) >= 0.9
    return torch.bfloat16 if fast else torch.float32


def cpu_has_bf16_units(cpuinfo: str | None = None) -> bool:
    """Whether the CPU lists a bf16 matrix or vector-dot unit (Linux /proc/cpuinfo flags)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return any(f in flags for f in BF16_CPU_FLAGS)


@functools.lru_cache(maxsize=8)
@torch.inference_mode()
def bf16_speedup(hidden: int, rows: int, rounds: int = 7) -> float:
    """float32 time ÷ bfloat16 time of a step's product for `rows` tokens at width `hidden` on this CPU."""
    x = torch.randn(rows, hidden)
    w = torch.randn(4 * hidden, hidden) / hidden**0.5
    pairs = {torch.float32: (x, w), torch.bfloat16: (x.bfloat16(), w.bfloat16())}

    def once(dtype) -> float:
        a, b = pairs[dtype]
        t0 = time.perf_counter()
        for _ in range(4):
            torch.nn.functional.linear(a, b)
        return time.perf_counter() - t0

    times: dict = {d: [] for d in pairs}
    for r in range(rounds + 2):
        for d in (pairs if r % 2 else reversed(list(pairs))):
            t = once(d)
            if r > 1:  # two rounds warm up (the first bf16 call picks and builds its kernel)
                times[d].append(t)
    return statistics.median(times[torch.float32]) / statistics.median(times[torch.bfloat16])


def _hidden_size(model_dir) -> int:
    try:
        return int(json.loads((Path(model_dir) / "config.json").read_text())["hidden_size"])
    except (TypeError, OSError, KeyError, ValueError):
        return 1024
