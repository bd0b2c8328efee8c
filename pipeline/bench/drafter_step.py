"""What a draft step costs over a plain one (`fluid bench drafter-step`, `python -m jobs.bench_drafter_step`).

In:  a base model spec, the drafter's shape (rank, targets, layer subsets) — its weights are random: the
     cost of a step does not depend on their values — the dtypes and widths to measure.
Out: a table, one row per dtype × adapter form × layer subset: the masked-step cost ratio at each width
     (`cost_model.masked_step_ratios`: a step of one clean token and w − 1 masks ÷ a step of w clean tokens
     through the same model, medians of interleaved rounds) and the time of a 1-token step; optionally a
     record (pipeline/records.py). Exit status 1 when the target (≤ `--target` at every width, for the
     draft-rows form on all layers) is not met.

Adapter forms: `draft rows` = decoding's form (the LoRA delta computed on the masks' rows only, added in
place); `all rows` = the training form (x ⊙ gate through A, then B added on every row; what decoding ran
before), kept for comparison.
"""

from __future__ import annotations

import statistics

import torch

from pipeline.decode.cost_model import MASKED_STEP_WIDTHS, masked_step_ratios, time_widths
from pipeline.model.causal_lm import load_causal_lm
from pipeline.model.drafter import attach_drafter, find_drafter
from pipeline.sources.model_source import resolve_model

FORMS = ("draft rows", "all rows")


def drafter_model(path, dtype: torch.dtype, *, rank: int, targets: list[str], layers: list[int] | None,
                  mask_token_id: int):
    """The base model in `dtype` with a drafter of random (non-zero) weights attached."""
    model = load_causal_lm(path, dtype=dtype).eval()
    attach_drafter(model, mask_token_id, rank=rank, alpha=2.0 * rank, targets=targets, layers=layers)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    return model


def measure(model, mask_token_id: int, token_id: int, widths, repeats: int) -> dict:
    """Masked-step ratio per width for each adapter form, and the 1-token step in ms."""
    gate = find_drafter(model)._gate
    out = {}
    for form in FORMS:
        gate.row_path = form == "draft rows"
        out[form] = masked_step_ratios(model, mask_token_id=mask_token_id, token_id=token_id, widths=widths,
                                       repeats=repeats)
    gate.row_path = True
    one = time_widths(model, [1], repeats=repeats, token_id=token_id)[1]
    return {"ratios": out, "step_ms": 1e3 * statistics.median(one)}


def run(spec: str, *, dtypes: list[str], rank: int, targets: list[str], layer_sets: list[list[int] | None],
        widths=MASKED_STEP_WIDTHS, repeats: int = 5, threads: int | None = None) -> list[dict]:
    """One row per dtype × form × layer subset (columns: dtype, adapter, layers, modules, 1-token ms, w=…)."""
    if threads:
        torch.set_num_threads(threads)
    resolved = resolve_model(spec)
    rows = []
    for name in dtypes:
        for layers in layer_sets:
            model = drafter_model(resolved.path, getattr(torch, name), rank=rank, targets=targets, layers=layers,
                                  mask_token_id=resolved.mask_token_id)
            n_mod = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))
            got = measure(model, resolved.mask_token_id, token_id=0 if resolved.mask_token_id else 1,
                          widths=widths, repeats=repeats)
            for form in FORMS if layers is None else FORMS[:1]:
                rows.append({"dtype": name, "adapter": form, "layers": "all" if layers is None else _span(layers),
                             "modules": n_mod, "1-token step ms": round(got["step_ms"], 2),
                             **{f"w={w}": round(r, 3) for w, r in got["ratios"][form].items()}})
            print(f"[fluid] {name} layers {rows[-1]['layers']}: " + ", ".join(
                f"{f} {[round(r, 3) for r in got['ratios'][f].values()]}" for f in FORMS), flush=True)
    return rows


def goals(rows: list[dict], target: float) -> list[dict]:
    """≤ target at every width, for decoding's form on all layers, per dtype."""
    out = []
    for r in rows:
        if r["adapter"] == "draft rows" and r["layers"] == "all":
            worst = max(v for k, v in r.items() if k.startswith("w="))
            out.append({"goal": f"{r['dtype']}: masked step ≤ {target:g}× a plain step of the same width",
                        "value": worst, "met": worst <= target})
    return out


def _span(layers: list[int]) -> str:
    return ",".join(str(i) for i in layers)
