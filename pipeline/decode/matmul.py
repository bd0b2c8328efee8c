"""Narrow matrix products for decoding: the operand order that multiplies a few token rows fastest here.

In:  a model (its `nn.Linear` modules) on its device; a layout name, or "auto" to measure.
Out: the same modules, computing inputs of at most `MAX_ROWS` token rows in the chosen layout
     (`set_matmul`; `choose_matmul` times the layouts on this device and keeps the fastest). Weights,
     state dict and outputs are unchanged (outputs up to float rounding, ~1e-7 relative).

A decoding forward multiplies 1 to a few dozen token rows by every weight matrix. `nn.Linear`
computes x·Wᵀ. Some CPU BLAS builds run that far below the machine's memory bandwidth when x has few
rows: on a 2-core AMD EPYC (Zen 5) with torch's MKL, SmolLM2-135M's 49 152 × 576 LM head took 7 ms
for one row and 15–21 ms for 2–4 rows, while the same product with the weight as the left operand,
(W·xᵀ)ᵀ, took 3.5–4.9 ms for 2–4 rows. A whole AR step took 37 ms stock and 23 ms in that layout
(a one-row input duplicated into two rows, which takes the faster kernel), and a 4-token step 57 ms
against 32 ms. On other CPUs (and on GPUs, which are not measured: cuBLAS handles narrow products)
the stock layout may be as fast, so `auto` measures instead of assuming.

Layouts:
* `stock`: `nn.Linear` as it is.
* `weight_left`: y = (W·xᵀ)ᵀ + b for inputs of ≤ MAX_ROWS rows (one row is computed as two equal
  rows); wider inputs (prefill) and any forward with autograd on (training) take the stock path.

The layout changes speed, never which token `verify` or `ar` commits beyond float rounding: both read
argmaxes of the same forward, and benchmarks time HF `generate` on the very same modules.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from pipeline.decode.cost_model import time_widths
from pipeline.errors import FluidError

MATMUL_LAYOUTS = ("stock", "weight_left")
MAX_ROWS = 32  # widest decoding step that takes the narrow path (spans of K = 8 are 64 wide: stock)


class WeightLeftLinear(nn.Linear):
    """`nn.Linear` whose narrow inputs are multiplied as (W·xᵀ)ᵀ (module docstring). Swapped in by
    class (`set_matmul`), so parameters, hooks and the state dict stay those of the original module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if rows > MAX_ROWS or rows == 0 or x.dtype != self.weight.dtype or torch.is_grad_enabled():
            return nn.functional.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        if rows == 1:
            flat = flat.expand(2, -1).contiguous()
        y = torch.mm(self.weight, flat.t()).t()[:rows]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


_CLASSES = {"stock": nn.Linear, "weight_left": WeightLeftLinear}


def set_matmul(model: nn.Module, layout: str) -> int:
    """Put every plain `nn.Linear` of `model` in `layout`; returns how many modules it covers.
    Subclasses with a forward of their own (quantized or adapter layers) are left alone."""
    if layout not in _CLASSES:
        raise FluidError(f"unknown matmul layout {layout!r} (auto, {', '.join(MATMUL_LAYOUTS)})")
    n = 0
    for module in model.modules():
        if type(module) in (nn.Linear, WeightLeftLinear):
            module.__class__ = _CLASSES[layout]
            n += 1
    return n


def current_matmul(model: nn.Module) -> str:
    """The layout of the model's plain linear modules ('stock' when it has none swapped)."""
    swapped = any(type(m) is WeightLeftLinear for m in model.modules())
    return "weight_left" if swapped else "stock"


@torch.inference_mode()
def choose_matmul(model: nn.Module, *, widths=(1, 2, 4, 8), rounds: int = 5, token_id: int = 0,
                  mask_token_id: int | None = None, timer=None) -> str:
    """Time a decoding forward of each width in each layout (interleaved rounds, medians; the sum over
    `widths` scores a layout: width 1 is every AR step, the others verify's steps), put the model in
    the fastest and return its name. On a GPU: `stock` without measuring. `timer(model, widths)` →
    {width: [seconds]} replaces the measurement (tests). ~3 s for SmolLM2-135M on 2 CPU cores."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        set_matmul(model, "stock")
        return "stock"
    if timer is None:
        def timer(m, ws):
            return time_widths(m, ws, repeats=1, token_id=token_id, mask_token_id=mask_token_id)

    times: dict[str, dict[int, list[float]]] = {lay: {w: [] for w in widths} for lay in MATMUL_LAYOUTS}
    for r in range(max(1, rounds)):
        for layout in (MATMUL_LAYOUTS if r % 2 == 0 else MATMUL_LAYOUTS[::-1]):
            set_matmul(model, layout)
            for w, ts in timer(model, widths).items():
                times[layout][w].extend(ts)
    score = {lay: sum(statistics.median(ts) for ts in by_w.values()) for lay, by_w in times.items()}
    best = min(MATMUL_LAYOUTS, key=lambda lay: (score[lay], lay != "stock"))  # a tie keeps stock
    set_matmul(model, best)
    return best


def apply_matmul(model: nn.Module, choice: str, **kwargs) -> str:
    """`choice` = auto (measure, `choose_matmul`) or a layout name; returns the layout now in use."""
    if choice == "auto":
        return choose_matmul(model, **kwargs)
    set_matmul(model, choice)
    return choice
