"""Batch-aware scheduling of greedy `verify`: the cost of a whole step × each row's expected acceptance.

In:  a step-cost table (`StepCost`: the time of one forward of B rows × W tokens each after a cache of
     C entries, measured at start-up over the batch sizes and widths the deployment allows and a few
     cache lengths by `calibrate_steps`, cached on disk per model, machine, dtype and torch version; or
     derived from the batch-1 `ForwardCost` (one cache length), or given); per step, the rows' demands
     (`Demand`: the tokens a row feeds anyway, and its `CostAwareHorizon`, or the fixed width of a row
     whose policy sets its own K) and the step's cache length (the rows share one cache).
Out: `Scheduler.plan(demands, context=C)` → a `Choice` per row (K, layout, tree size, probe), the plan that
     maximises the batch's committed tokens per second (pure: deterministic, no model, no Ray; the
     decoder — the runner — executes it, decoder.py).

How (vLLM's v1 scheduler decides, a runner executes; here the decision is the draft width). A step's
width is its widest row's, and every row pays for it. For each candidate step width W (the widths of the
rows' plans, `CostAwareHorizon.frontier`), every cost-aware row takes its best plan no wider than W
(expected tokens per forward, the elastic horizon's stationary rates with c ≡ 1); the batch's rate is

    rate(W) = (Σ_rows expected tokens) / step_cost(B, max(W_used, floor), C),

C being the step's cache length and `floor` the width of the rows whose policy fixes their K. Widths are the plans' stationary
widths (what a row at that plan feeds step after step); a row's pending block or prompt is this step's
cost only, whatever is chosen, so it is not priced. The best W wins if it beats the narrowest by
`margin`. Under load wide steps of many rows cost more than the drafts they commit (a GPU turns
compute-bound), so the plan falls back to width 1 — AR — on its own, and widens again as rows leave.
A row held to K = 1 while this step is wider anyway probes for free
(its masks ride inside the step's width: `Choice.probing`). Outputs never depend on these choices:
greedy verify commits AR's tokens whatever K is.

The table is made monotone (cost non-decreasing in rows, in width and in cache length), interpolated
linearly between grid points and extrapolated with the last slope (below the shortest cache length
measured: that length's cost). Where the price of width, cost(B, W) ÷ cost(B, 1),
grows with B — a GPU past its memory-bound region, the rows × width pricing of a batch-1 table that is
flat then linear — identical rows never get a wider plan when rows are added. A long cache makes every token's attention
dearer, so where width costs more at long contexts a long-context batch plans narrower than the same
rows at a short one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.decode.cost_model import CostAwareHorizon, ForwardCost, time_widths
from pipeline.decode.matmul import current_matmul
from pipeline.errors import FluidError

GRID_ROWS = (1, 2, 4, 8, 16, 32, 64)
GRID_WIDTHS = (1, 2, 4, 8, 16)
GRID_CONTEXTS = (32, 512)  # cache lengths the steps are timed at (beyond 512: the last slope)
BUDGET_S = 20.0  # measuring stops at the next batch size past this (seconds)
CACHE_FOLDER = "step_cost"  # under the FLUID cache dir (sources.model_source.default_cache_dir)


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Linear in [xs[0], xs[-1]], the last slope beyond, ys[0] below."""
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    i = next((j for j in range(1, len(xs)) if xs[j] >= x), len(xs) - 1)
    t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + t * (ys[i] - ys[i - 1])


def _grid(values, what: str) -> list[int]:
    out = sorted({int(v) for v in values})
    if not out or out[0] != 1 or any(v < 1 for v in out):
        raise FluidError(f"a step-cost table's {what} must include 1 and be >= 1, got {sorted(values)}")
    return out


class StepCost:
    """Cost of one forward of `rows` rows × `width` new tokens each after a cache of `context` entries:
    `cost(rows, width, context)`; `cost(rows, width)` is at the shortest context of the table.

    Built from {(rows, width, context): seconds} over a full grid (rows and widths each starting at 1, a
    full rows × widths grid at every context), or from {(rows, width): seconds} timed at one cache length
    (`context`: a table of one context, the same cost at every cache length); made monotone (module
    docstring), interpolated and extrapolated linearly. `key`: what the table was measured for (cache
    key, see `calibrate_steps`)."""

    def __init__(self, table: Mapping[tuple, float], *, context: int = 32, key: dict | None = None):
        if not table:
            raise FluidError("a step-cost table needs at least the cost of (1 row, width 1)")
        if any(not float(c) > 0 for c in table.values()):
            raise FluidError(f"step costs must be positive numbers, got {sorted(table.values())[:4]}")
        self.raw = {(int(k[0]), int(k[1]), int(k[2]) if len(k) > 2 else int(context)): float(c)
                    for k, c in table.items()}  # kept as measured (to_dict, the cache)
        self.rows = _grid([r for r, _, _ in self.raw], "batch sizes")
        self.widths = _grid([w for _, w, _ in self.raw], "widths")
        self.contexts = sorted({c for _, _, c in self.raw})
        if self.contexts[0] < 0:
            raise FluidError(f"a step-cost table's contexts must be >= 0, got {self.contexts}")
        missing = [k for k in ((r, w, c) for c in self.contexts for r in self.rows for w in self.widths)
                   if k not in self.raw]
        if missing:
            raise FluidError(f"a step-cost table must cover every (rows, width, context) of its grid; missing {missing[:4]}")
        self.key = dict(key or {})
        self.table: list[list[list[float]]] = []  # per context: non-decreasing in width, rows, context
        for c in self.contexts:
            grid: list[list[float]] = []
            for r in self.rows:
                line = [self.raw[r, w, c] for w in self.widths]
                line = [max(line[: j + 1]) for j in range(len(line))]
                grid.append(_upper(line, grid[-1]) if grid else line)
            self.table.append([_upper(line, below) for line, below in zip(grid, self.table[-1], strict=True)]
                              if self.table else grid)

    @property
    def context(self) -> int:
        """The shortest cache length of the table (what `cost(rows, width)` prices)."""
        return self.contexts[0]

    @classmethod
    def flat(cls) -> StepCost:
        """Every step costs the same, whatever its rows, width and context (tests; an idealised accelerator)."""
        return cls({(1, 1): 1.0})

    @classmethod
    def from_forward(cls, cost: ForwardCost, rows: Sequence[int] = GRID_ROWS,
                     widths: Sequence[int] = GRID_WIDTHS) -> StepCost:
        """The batch-1 table priced as rows × width tokens: cost(B, W) = cost(B·W) (no measurement; the
        default until `calibrate_steps` measures the batch). Context-free: the batch-1 table was timed
        at one cache length, so this table has one context and prices every cache length alike."""
        return cls({(r, w): cost(r * w) for r in rows for w in widths})

    def __call__(self, rows: int, width: int, context: int | None = None) -> float:
        rows, width = max(1, int(rows)), max(1, int(width))
        by_context = [_interp(self.rows, [_interp(self.widths, line, width) for line in grid], rows)
                      for grid in self.table]
        # beyond the measured rows or widths each context extrapolates with its own slope: keep the result
        # non-decreasing in context there too (a running max of functions non-decreasing in rows and width)
        by_context = [max(by_context[: i + 1]) for i in range(len(by_context))]
        return _interp(self.contexts, by_context, self.contexts[0] if context is None else int(context))

    def relative(self, rows: int, width: int, context: int | None = None) -> float:
        """cost(rows, width) ÷ cost(rows, 1) (at `context`): what widening a step of `rows` rows costs."""
        return self(rows, width, context) / self(rows, 1, context)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "widths": self.widths, "contexts": self.contexts, "key": self.key,
                "seconds": [[[self.raw[r, w, c] for w in self.widths] for r in self.rows] for c in self.contexts]}

    @classmethod
    def from_dict(cls, d: dict) -> StepCost:
        """`to_dict`'s form, or the older form of one context ("context", "seconds" by rows × widths)."""
        try:
            if "contexts" not in d:
                return cls(_by_rows_widths(d, d["seconds"]), context=int(d.get("context", 32)), key=d.get("key"))
            table = {(r, w, int(c)): s for c, grid in zip(d["contexts"], d["seconds"], strict=True)
                     for (r, w), s in _by_rows_widths(d, grid).items()}
            return cls(table, key=d.get("key"))
        except (KeyError, TypeError, ValueError) as e:
            raise FluidError(f"not a step-cost table ({type(e).__name__}: {e})") from None

    def __repr__(self) -> str:
        return f"StepCost(rows {self.rows}, widths {self.widths}, contexts {self.contexts})"


def _upper(line: list[float], below: list[float]) -> list[float]:
    return [max(c, b) for c, b in zip(line, below, strict=True)]


def _by_rows_widths(d: dict, grid) -> dict[tuple[int, int], float]:
    return {(int(r), int(w)): float(c) for r, line in zip(d["rows"], grid, strict=True)
            for w, c in zip(d["widths"], line, strict=True)}


# ------------------------------------------------------------ measuring and caching


def model_fingerprint(model) -> str:
    """What a step's cost depends on in the model: its config (paths and versions aside), its
    parameters' names and shapes (a drafter's adapter too) and the matmul layout."""
    cfg = {k: v for k, v in model.config.to_dict().items()
           if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")}
    params = [(n, list(p.shape)) for n, p in model.named_parameters()]
    blob = json.dumps([cfg, params, current_matmul(model)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def machine_id(device: torch.device) -> str:
    """The host and what runs the steps on it (GPU name, or CPU and torch threads)."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip()
    return f"{platform.node()}|{device.type}|{what}"


def cache_key(model, rows: Sequence[int], widths: Sequence[int], contexts: Sequence[int] | int) -> dict:
    p = next(model.parameters())
    contexts = [contexts] if isinstance(contexts, int) else contexts
    return {"model": model_fingerprint(model), "machine": machine_id(p.device), "dtype": str(p.dtype).split(".")[-1],
            "torch": torch.__version__, "rows": list(rows), "widths": list(widths),
            "context": [int(c) for c in contexts]}


def cache_file(key: dict, cache_dir: str | Path) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / CACHE_FOLDER / f"{digest}.json"


def load_cached(key: dict, cache_dir: str | Path) -> StepCost | None:
    """The cached table measured for exactly `key`, or None (absent, unreadable, or another key)."""
    path = cache_file(key, cache_dir)
    try:
        cost = StepCost.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, FluidError):
        return None
    return cost if cost.key == key else None


def save_cached(cost: StepCost, cache_dir: str | Path) -> Path:
    path = cache_file(cost.key, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary file of this process's own, renamed into place: replicas starting together on one node
    # never read half a file, nor rename another replica's half-written one
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cost.to_dict(), indent=1))
    tmp.replace(path)
    return path


def allowed_rows(max_rows: int, grid: Sequence[int] = GRID_ROWS) -> list[int]:
    """The batch sizes of the grid up to `max_rows`, and `max_rows` itself."""
    if int(max_rows) < 1:
        raise FluidError(f"the largest batch must be >= 1, got {max_rows}")
    return sorted({r for r in grid if r <= max_rows} | {int(max_rows)})


def fit_contexts(model, contexts: Sequence[int], widths: Sequence[int]) -> list[int]:
    """`contexts` with the longest steps kept inside the model's positions (a context past
    max_position_embeddings − the widest step is timed at that limit instead)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    top = max(0, int(limit) - max(widths)) if limit else None
    out = sorted({min(int(c), top) if top is not None else int(c) for c in contexts})
    if not out or out[0] < 0:
        raise FluidError(f"a step-cost table needs cache lengths >= 0, got {list(contexts)}")
    return out


@torch.inference_mode()
def measure_steps(model, rows: Sequence[int], widths: Sequence[int] = GRID_WIDTHS, *,
                  contexts: Sequence[int] = GRID_CONTEXTS, repeats: int = 2, token_id: int = 0,
                  mask_token_id: int | None = None, budget_s: float = BUDGET_S) -> dict[tuple[int, int, int], float]:
    """Median seconds of a step per (rows, width, context) (`cost_model.time_widths` at each batch size,
    smallest first, at every context). One budget covers all contexts: past `budget_s` (a slow device:
    a CPU) the larger batch sizes are left to extrapolation, at every context alike.

    Every context is measured on the same rows grid rather than the long one on a sparser grid scaled
    by a measured ratio: attention's share of a step (rows × width × context) differs from the weights'
    (rows × width), so the long/short ratio itself depends on rows and width, and scaling would assume
    what the table is there to measure. The budget keeps start-up bounded (a GPU measures the whole
    grid in well under it; a CPU gives up its largest batch sizes, as before)."""
    out, t0 = {}, time.perf_counter()
    for r in sorted(rows):
        if len(out) >= 2 * len(widths) * len(contexts) and time.perf_counter() - t0 > budget_s:
            break
        for c in contexts:
            times = time_widths(model, list(widths), past=c, repeats=repeats, token_id=token_id,
                                mask_token_id=mask_token_id, rows=r)
            out.update({(r, w, c): statistics.median(t) for w, t in times.items()})
    return out


def calibrate_steps(model, max_rows: int, *, widths: Sequence[int] = GRID_WIDTHS,
                    contexts: Sequence[int] = GRID_CONTEXTS, repeats: int = 2,
                    token_id: int = 0, mask_token_id: int | None = None,
                    cache_dir: str | Path | None = None) -> tuple[StepCost, dict]:
    """The step-cost table of `model` on its device and dtype over the batch sizes up to `max_rows`
    (`allowed_rows`), `widths` and cache lengths `contexts` (`fit_contexts`): read from the cache (`cache_dir`; None = the FLUID cache dir) when
    measured before for the same key, else measured (`measure_steps`) and cached. Returns (table,
    {"cached": bool, "seconds": time taken, "file": cache file})."""
    t0 = time.perf_counter()
    rows = allowed_rows(max_rows)
    contexts = fit_contexts(model, contexts, widths)
    key = cache_key(model, rows, widths, contexts)
    if cache_dir is None:
        from pipeline.sources.model_source import default_cache_dir

        cache_dir = default_cache_dir()
    cost = load_cached(key, cache_dir)
    cached = cost is not None
    if cost is None:
        table = measure_steps(model, rows, widths, contexts=contexts, repeats=repeats, token_id=token_id,
                              mask_token_id=mask_token_id)
        cost = StepCost(table, key=key)
        try:
            save_cached(cost, cache_dir)
        except OSError:
            pass  # a read-only cache: measured again next time
    return cost, {"cached": cached, "seconds": time.perf_counter() - t0, "file": str(cache_file(key, cache_dir))}


# ------------------------------------------------------------ the decision


@dataclass(frozen=True)
class Demand:
    """One row of the step: `clean` tokens it feeds anyway (its pending block), and either its
    cost-aware `horizon` (the scheduler sets its K) or the `width` its own policy gives it."""

    clean: int
    horizon: CostAwareHorizon | None = None
    width: int = 0


@dataclass(frozen=True)
class Choice:
    k: int
    layout: str = "chain"
    nodes: int = 0
    probing: bool = False  # the masks ride inside the step's width; their drafts are only observed


class Scheduler:
    """Chooses each cost-aware row's plan so that the batch commits the most tokens per second."""

    def __init__(self, cost: StepCost, *, margin: float = 0.05):
        if not isinstance(cost, StepCost):
            raise FluidError(f"the scheduler needs a StepCost, got {type(cost).__name__}")
        if not margin >= 0:
            raise FluidError(f"the scheduler's margin must be >= 0, got {margin}")
        self.cost, self.margin = cost, float(margin)
        self.last_width = 0  # the step width of the last plan (observability, tests)

    def plan(self, rows: Sequence[Demand], context: int | None = None) -> list[Choice]:
        """`context`: the step's cache length (the rows share one cache; None: the table's shortest)."""
        if not rows:
            return []
        for d in rows:
            if d.clean < 1 or (d.horizon is None and d.width < d.clean):
                raise FluidError(f"a row feeds at least 1 token and a fixed row is at least that wide, got {d}")
        fronts = {i: d.horizon.frontier() for i, d in enumerate(rows) if d.horizon is not None}
        floor = max((d.width for d in rows if d.horizon is None), default=1)
        fixed = sum(1.0 for d in rows if d.horizon is None)
        caps = sorted({p[0] for f in fronts.values() for p in f})
        at = dict.fromkeys(fronts, 0)  # per row: its best plan no wider than the cap (frontiers increase)
        best = first = None
        for cap in caps:
            for i, f in fronts.items():
                while at[i] + 1 < len(f) and f[at[i] + 1][0] <= cap:
                    at[i] += 1
            width = max(floor, *(fronts[i][j][0] for i, j in at.items()))
            rate = (fixed + sum(fronts[i][j][1] for i, j in at.items())) / self.cost(len(rows), width, context)
            if first is None:
                first = best = (rate, width, dict(at))
            elif rate > best[0]:
                best = (rate, width, dict(at))
        if best is None:  # no cost-aware row
            return [Choice(1) for _ in rows]
        rate, width, picks = best if best[0] >= (1.0 + self.margin) * first[0] else first
        self.last_width = width
        # this step's own width: pending blocks and prompts too (they do not last: not in the rate)
        now = max(width, *(d.clean + fronts[i][picks[i]][2] - 1 if i in picks else d.clean for i, d in enumerate(rows)))
        out = []
        for i, d in enumerate(rows):
            if i not in picks:
                out.append(Choice(1))
                continue
            _, _, k, layout, nodes = fronts[i][picks[i]]
            if k == 1:  # drafts do not pay here: probe if masks fit in the step for free
                free = min(d.horizon.cap, d.horizon.probe_cap, now - d.clean + 1)
                out.append(Choice(free, probing=True) if free > 1 else Choice(1))
            else:
                out.append(Choice(k, layout, nodes))
        return out
