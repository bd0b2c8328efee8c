"""Cost-aware horizon of greedy `verify`: forward cost by width × running acceptance by draft position.

In:  a forward-cost table (`ForwardCost`: the time of one forward by its width in tokens, relative to a
     1-token AR step; measured on the device by `calibrate`, or given so that tests and configs can pin
     it), and after every `verify` step its verdict (drafts tested, drafts accepted).
Out: per row, the horizon K of the next step that maximises expected committed tokens per unit of
     forward cost (`CostAwareHorizon.choose`), K = 1 (a plain AR step) when drafts do not pay.

Four layouts of a `verify` step with horizon K (D = K − 1 masks per span, b_1 exact):
* *chain*: the pending block [b_1 … b_K] then one span of D masks after b_K. If every draft passes,
  the masks' outputs are the next drafts; after a rejection the next step only drafts again
  (width K). Width 2K − 1.
* *spans*: the same block, then one span of D masks anchored at each b_i (span i sees b_1 … b_i only:
  the two-stream layout of training). Whatever the verdict m, the span anchored at b_{m+1} — the last
  committed token — holds the next drafts, so no step is spent drafting after a rejection. Width K².
* *candidates*: the pending drafts are a candidate tree of n nodes (candidates.py: the most likely
  paths over the drafter's top tokens at D depths) under a tree mask, then one span of D masks after
  its most likely leaf: if the walk ends there the next tree is ready, else the next step only drafts
  (the chain is the one-path tree). Width 1 + n + D.
* *spans+candidates*: the tree, and a span of D masks after the root and after every node: the next
  tree is ready whatever the verdict. Width 1 + n + (n + 1)·D.
With a_j the probability that draft j is accepted once drafts 1…j−1 were, S = Σ_{i≤D} Π_{j≤i} a_j the
expected accepted drafts and P = Π_{j≤D} a_j the chance that all pass, the stationary rates are

    chain(K) = (2 + S − P) / (c(2K − 1) + (1 − P) · c(K)),   spans(K) = (1 + S) / (m(K²) · c(K²)),
    rate(1) = 1 / c(1),

tokens per unit of cost, m(w) ≥ 1 being what an explicit 4-D attention mask adds to a step of width w (a spans or
tree step cannot take the model's built-in causal path, e.g. a fused causal kernel; measured
at calibration, at MASK_CALIBRATION_WIDTHS — for SmolLM2 with SDPA on this project's CPU 1.0–1.06 in fp32 and
1.0–1.17 in bf16, one core). Where width is free (a GPU, a bf16 CPU
with matrix units) spans win: with a_j = 0.5 it commits 1 + S ≈ 2 tokens per forward against ≈ 1.5 for the chain. On a CPU whose
4-token forward costs 1.5 AR steps the chain's width 3 (K = 2) may be the only one that pays. In a
batch every row pays for the batch's width: there the batch scheduler (scheduler.py) prices the whole
step by rows × width and picks each row's plan from its `frontier`. K > 1 is chosen only when it beats AR by `margin`.

Trees: a[j][r] is the chance that greedy AR's token at depth j is the drafter's rank-r token once depth
j − 1 was reached (rank 1: a_j; ranks 2…TOP_K: decayed counts of the rank AR's token had, which every
greedy verify step observes, chain or tree). The expected tree of n nodes is the best-first tree on a
(a node's reach = Π a along its path); E = Σ reach (expected accepted drafts), L = the reach of its
most likely leaf (candidates.expected_tree), and

    candidates(K, n) = (2 + E − L) / (m·c(1 + n + D) + (1 − L) · c(K)),
    spans+candidates(K, n) = (1 + E) / (m·c(1 + n + (n + 1) · D)),

for n ≤ MAX_NODES, D < SPANS_MAX_K, widths ≤ TREE_MAX_WIDTH; the controller takes the best (K, n, layout).
A one-path tree gives E = S, L = P: chain and spans rates times the mask's price m, so trees are not
chosen (nor priced) until AR's token is the drafter's 2nd…4th choice MIN_RANK_EVIDENCE of the time.

The a_j are decayed counts per position with a prior chained from position to position (a position
never tested inherits the estimate of the one before it, so the controller is optimistic about
extending a horizon that works). While drafts do not pay, the row decodes AR and now and then makes one
cheap *probe*: the masks ride along one step (as wide as costs at most `probe_budget` AR steps extra), their
drafts are only compared with the tokens AR then commits. Probes may spend a share `probe_share` of
the AR steps' cost (a probe whose extra width costs 0.6 of an AR step comes every 15 steps at 4 %); a
probe after which drafts still do not pay halves the share (exponential back-off, down to `min_share`), so the worst
case stays within a few per cent of AR — on a busy CPU, where a 2-token forward may cost many AR
steps, probes become rare by themselves. The first probe rides along the prompt.

On a GPU, where a forward of up to ~16 tokens costs about as much as one token, rate(K) grows with K
for any useful acceptance and the horizon opens; on a 2-core CPU (4–8 tokens cost ~1.3–1.6 AR steps)
it stays at 1 until acceptance pays for the width. The horizon changes speed only: `verify` output
is the AR output whatever K is, so timing may drive it. Lossy policies must not use this controller
(their output would depend on the machine's timing).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence

import torch

from pipeline.decode.candidates import MAX_NODES, TOP_K, expected_tree
from pipeline.errors import FluidError
from pipeline.model.attention import to_additive
from pipeline.model.causal_lm import cache_kwarg

LAYOUTS = ("chain", "spans", "candidates", "spans+candidates")
TREE_LAYOUTS = ("candidates", "spans+candidates")  # the masks' drafts form a candidate tree
# The spans layout's width grows as K²: beyond K = 8 (64 tokens, 56 of them masks) the last drafts add little
# (acceptance compounds) while a step's transient KV entries and mask grow quadratically. Candidate trees
# are as deep at most (D = K − 1 ≤ 7), and no tree step is wider than spans at K = 8.
SPANS_MAX_K = 8
TREE_MAX_WIDTH = SPANS_MAX_K**2
MIN_RANK_EVIDENCE = 0.01  # trees are priced once AR's token is the drafter's 2nd…4th this often somewhere
# 3 is the chain's width at K = 2 and 4 the spans layout's; CPU BLAS kernels often jump between them
CALIBRATION_WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
# widths at which a step with an explicit 4-D mask is timed against the same step without: spans steps of
# K = 2, 3, 4 (4, 9, 16) and candidate-tree widths (24, 32, 64), where the mask's price grows on some kernels
MASK_CALIBRATION_WIDTHS = (4, 9, 16, 24, 32, 64)


class ForwardCost:
    """Relative cost of one forward by width: `cost(w)`, 1.0 at w = 1.

    Built from a list (costs of widths 1, 2, 3, …) or a {width: cost} mapping; made non-decreasing,
    linearly interpolated between given widths and extrapolated beyond the last with the last slope.
    `masked` (≥ 1) multiplies the cost of a step that carries an explicit attention mask (a spans step:
    several spans), which the model cannot run on its built-in causal path. `mask_overhead` (≥ 0, in AR
    steps) is what the first mask token adds to a step of clean tokens beyond its width: a frozen-base
    drafter's adapter runs only when masks are present (~250 small products for SmolLM2, ~0.13 AR steps
    in fp32 on a 2-core CPU). The table's widths ≥ 2 are timed with masks and include it; a step of many
    clean tokens (a prompt) does not, so a probe that rides along one pays it on top of the width."""

    def __init__(self, table: Sequence[float] | Mapping[int, float], masked: float | Mapping[int, float] = 1.0,
                 mask_overhead: float = 0.0):
        if not mask_overhead >= 0.0:
            raise FluidError(f"the mask overhead must be a number >= 0, got {mask_overhead}")
        self.mask_overhead = float(mask_overhead)
        factors = dict(masked) if isinstance(masked, Mapping) else {1: masked}
        if not factors or any(not f >= 1.0 for f in factors.values()):
            raise FluidError(f"the masked-step factor must be a number >= 1, got {masked}")
        self._factors = sorted((int(w), float(f)) for w, f in factors.items())
        self.masked = statistics.median(f for _, f in self._factors)  # one number, for reports
        items = sorted(table.items()) if isinstance(table, Mapping) else list(enumerate(table, start=1))
        if not items:
            raise FluidError("a forward-cost table needs at least one entry (the cost of width 1)")
        widths = [int(w) for w, _ in items]
        costs = [float(c) for _, c in items]
        if widths[0] != 1 or any(w2 <= w1 for w1, w2 in zip(widths, widths[1:], strict=False)):
            raise FluidError(f"forward-cost widths must start at 1 and increase, got {widths}")
        if any(not c > 0 for c in costs):
            raise FluidError(f"forward costs must be positive numbers, got {costs}")
        base, run = costs[0], 0.0
        self.widths, self.costs = widths, []
        for c in costs:  # relative to width 1, non-decreasing (timing noise must not make width pay)
            run = max(run, c / base)
            self.costs.append(run)
        self._memo: dict[int, float] = {}

    def mask_factor(self, width: int) -> float:
        """What an explicit attention mask multiplies a step of `width` by: measured at a few widths,
        linearly interpolated between them and held constant beyond: a kernel may price the mask
        differently by width, which one factor from widths 4 and 9 did not see."""
        fs = self._factors
        if width <= fs[0][0] or len(fs) == 1:
            return fs[0][1]
        if width >= fs[-1][0]:
            return fs[-1][1]
        i = next(j for j in range(1, len(fs)) if fs[j][0] >= width)
        (w0, f0), (w1, f1) = fs[i - 1], fs[i]
        return f0 + (width - w0) / (w1 - w0) * (f1 - f0)

    def explicit(self, width: int) -> float:
        """The cost of a step of `width` that carries an explicit attention mask (spans, candidate trees)."""
        return self(width) * self.mask_factor(width)

    @classmethod
    def flat(cls) -> ForwardCost:
        """Every width costs one AR step (an idealised accelerator; hardware-independent horizons)."""
        return cls([1.0])

    def __call__(self, width: int) -> float:
        width = max(1, int(width))
        hit = self._memo.get(width)
        if hit is not None:
            return hit
        ws, cs = self.widths, self.costs
        if len(ws) == 1:
            value = cs[0]
        elif width >= ws[-1]:
            slope = (cs[-1] - cs[-2]) / (ws[-1] - ws[-2])
            value = cs[-1] + slope * (width - ws[-1])
        else:
            i = next(j for j in range(1, len(ws)) if ws[j] >= width)
            t = (width - ws[i - 1]) / (ws[i] - ws[i - 1])
            value = cs[i - 1] + t * (cs[i] - cs[i - 1])
        self._memo[width] = value
        return value

    def table(self, up_to: int = 32) -> list[float]:
        """Costs of widths 1…up_to (what a config pins)."""
        return [round(self(w), 4) for w in range(1, up_to + 1)]

    def __repr__(self) -> str:
        table = dict(zip(self.widths, (round(c, 3) for c in self.costs), strict=True))
        extra = f", mask_overhead={self.mask_overhead:.3f}" if self.mask_overhead else ""
        if all(f == 1.0 for _, f in self._factors):
            return f"ForwardCost({table}{extra})"
        masked = {w: round(f, 3) for w, f in self._factors}
        return f"ForwardCost({table}, masked={masked if len(masked) > 1 else self.masked}{extra})"


def check_layouts(layouts: Sequence[str]) -> tuple[str, ...]:
    """The step layouts greedy verify may use, checked: a non-empty subset of LAYOUTS."""
    out = tuple(layouts)
    if "tree" in out:
        raise FluidError("the verify layout 'tree' was renamed 'spans' (a span of masks anchored at every "
                         "pending token); the candidate tree (top-k drafts verified in one forward) is "
                         "'candidates'")
    if not out or any(x not in LAYOUTS for x in out):
        raise FluidError(f"verify layouts must be a non-empty subset of {', '.join(LAYOUTS)}, got {list(out)}")
    return out


@torch.inference_mode()
def calibrate(model, *, widths: Sequence[int] = CALIBRATION_WIDTHS, past: int = 32, repeats: int = 3,
              token_id: int = 0, mask_token_id: int | None = None) -> ForwardCost:
    """Measure the forward cost by width on the model's device (`time_widths`, median of `repeats`
    interleaved rounds), relative to width 1, and the factor a spans step pays for its explicit mask
    (MASK_CALIBRATION_WIDTHS, each with and without one), and what the masks themselves add to the
    narrowest wider step (`ForwardCost.mask_overhead`, from `masked_step_ratios` at that width). ~5 s for
    SmolLM2-135M on 2 CPU cores, well under a second on a GPU."""
    kw = dict(past=past, repeats=repeats, token_id=token_id, mask_token_id=mask_token_id)
    mask_widths = [w for w in MASK_CALIBRATION_WIDTHS if w <= max(9, *widths)]  # spans of K = 2, 3 at least
    times = time_widths(model, sorted(set(widths) | set(mask_widths)), **kw)  # the plain steps of those widths too
    masked = time_widths(model, mask_widths, explicit_mask=True, **kw)
    factors = {w: max(1.0, statistics.median(masked[w]) / statistics.median(times[w])) for w in mask_widths}
    overhead, wide = 0.0, min((w for w in times if w >= 2), default=None)
    if mask_token_id is not None and wide is not None:
        ratio = masked_step_ratios(model, mask_token_id=mask_token_id, token_id=token_id, widths=(wide,), past=past,
                                   repeats=repeats)[wide]  # masked ÷ clean, interleaved rounds
        overhead = max(0.0, 1.0 - 1.0 / ratio) * statistics.median(times[wide]) / statistics.median(times[1])
    return ForwardCost({w: statistics.median(times[w]) for w in sorted(widths)}, masked=factors,
                       mask_overhead=overhead)


@torch.inference_mode()
def time_widths(model, widths: Sequence[int], *, past: int = 32, repeats: int = 3, token_id: int = 0,
                mask_token_id: int | None = None, explicit_mask: bool = False, rows: int = 1) -> dict[int, list[float]]:
    """Seconds of one forward of w new tokens in each of `rows` rows after a `past`-token KV cache, per
    width (one warm-up each, then `repeats` rounds in alternating order), as the sampler runs them: width 1 is one clean
    token (`token_id`), a wider step one clean token then w − 1 masks (`mask_token_id`; a frozen-base
    drafter's adapter runs only where masks are: ~200 extra small matrix products per forward for
    SmolLM2, which a step with masks pays and an AR step does not). `explicit_mask`: pass the causal
    mask as a 4-D attention mask, as the decoder must for a spans step."""
    from transformers import DynamicCache

    from pipeline.decode import kvcache

    device = next(model.parameters()).device
    kwarg = cache_kwarg(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cache = DynamicCache(config=model.config)
    ids = torch.full((max(1, int(rows)), past + max(widths)), int(token_id), dtype=torch.long, device=device)
    model(input_ids=ids[:, :past], use_cache=True, logits_to_keep=1, **{kwarg: cache})
    step = ids[:, : max(widths)].clone()
    if mask_token_id is not None:
        step[:, 1:] = int(mask_token_id)

    def once(w: int) -> float:
        pos = torch.arange(past, past + w, device=device)[None, :].expand(ids.shape[0], -1)
        extra = {"attention_mask": _causal_4d(model, past, w, device)} if explicit_mask else {}
        sync()
        t0 = time.perf_counter()
        model(input_ids=step[:, :w], position_ids=pos, use_cache=True, logits_to_keep=w, **extra, **{kwarg: cache})
        sync()
        dt = time.perf_counter() - t0
        kvcache.drop_last(cache, w)
        return dt

    for w in widths:  # warm-up: first calls of each shape allocate
        once(w)
    times: dict[int, list[float]] = {w: [] for w in widths}
    for r in range(max(1, repeats)):
        order = list(widths) if r % 2 == 0 else list(reversed(widths))
        for w in order:
            times[w].append(once(w))
    return times


MASKED_STEP_WIDTHS = (2, 4, 8, 16)


def masked_step_ratios(model, *, mask_token_id: int, token_id: int = 0, widths: Sequence[int] = MASKED_STEP_WIDTHS,
                       past: int = 32, repeats: int = 5) -> dict[int, float]:
    """What drafting adds to a step of the same width: per width w, the median time of a step of one
    clean token then w − 1 masks (a frozen-base drafter's adapter runs on the masks) ÷ the median time of
    a step of w clean tokens, measured in interleaved rounds. 1.0 = the masks cost nothing extra."""
    clean: dict[int, list[float]] = {w: [] for w in widths}
    masked: dict[int, list[float]] = {w: [] for w in widths}
    for r in range(max(1, repeats)):  # alternate the two kinds of step round by round: load drifts
        for kind in ((clean, None), (masked, mask_token_id))[:: 1 if r % 2 == 0 else -1]:
            for w, t in time_widths(model, widths, past=past, repeats=1, token_id=token_id,
                                    mask_token_id=kind[1]).items():
                kind[0][w] += t
    return {w: statistics.median(masked[w]) / statistics.median(clean[w]) for w in widths}


def _causal_4d(model, past: int, w: int, device) -> torch.Tensor:
    """[1, 1, w, past + w] causal mask in the form the model's attention takes (bool for SDPA, else additive)."""
    m = torch.ones(w, past + w, dtype=torch.bool, device=device).tril(past)[None, None]
    return m if str(getattr(model.config, "_attn_implementation", "eager")) == "sdpa" else to_additive(m, model.dtype)


class CostAwareHorizon:
    """Per-row horizon controller of greedy `verify` (see the module docstring).

    The sampler calls `choose(clean, floor)` before each forward (`clean`: tokens the row feeds;
    `floor`: the width the batch has anyway) and, with each verdict, `update_ranks(ranks)` (the
    drafter's rank of greedy AR's token at each observed depth, candidates.ranks) then
    `update(k_used, accepted)` (k_used − 1 drafts of the rank-1 chain tested, accepted − 1 of them
    accepted; k_used = 1 for a step that tested none). After `choose`, `probing` says whether the
    drafts of the step just planned are only to be observed (a probe), `spans` whether its masks form
    one span per pending token (else one span, after the pending block or the most likely leaf;
    spans up to K = SPANS_MAX_K), `candidates` whether the masks' drafts form a candidate tree of
    `nodes` nodes (else a chain). `layouts` limits the layouts it may choose (LAYOUTS)."""

    def __init__(self, cap: int, cost: ForwardCost, *, prior: float = 0.5, prior_weight: float = 1.0,
                 decay: float = 0.9, margin: float = 0.05, probe_budget: float = 0.1, probe_cap: int = 8,
                 probe_share: float = 0.04, min_share: float = 1 / 256,
                 layouts: Sequence[str] = LAYOUTS):
        self.cap, self.cost, self.layouts = max(1, int(cap)), cost, check_layouts(layouts)
        self.prior, self.prior_weight, self.decay, self.margin = prior, prior_weight, decay, margin
        self.probe_budget, self.probe_cap = probe_budget, probe_cap
        self.probe_share, self.min_share = probe_share, min_share
        self.hits = [0.0] * self.cap  # decayed counts per draft position j = 1…cap − 1 (index j)
        self.tries = [0.0] * self.cap
        self.rank_hits = [[0.0] * (TOP_K - 1) for _ in range(self.cap)]  # ranks 2…TOP_K per depth j
        self.rank_tries = [0.0] * self.cap
        self._memo: dict = {}  # tree tables and best plans by floor, until the next verdict
        self._priced: dict[int, tuple[list[float], list[float]]] = {}
        self.share = probe_share
        self.wait = 1e9  # AR steps since the last probe: the first one is due at once (along the prompt)
        self.plan, self.plan_layout, self.plan_nodes = self.best()  # K, layout, tree size at a floor of 1
        self._memo.clear()
        self.probing = self.spans = self.candidates = False
        self.nodes = 0

    @property
    def k(self) -> int:
        return self.plan

    def acceptance(self) -> list[float]:
        """a_j for draft positions j = 1…cap − 1 (posterior means, each prior chained from a_{j−1})."""
        out, prev = [], self.prior
        for j in range(1, self.cap):
            prev = (self.hits[j] + self.prior_weight * prev) / (self.tries[j] + self.prior_weight)
            out.append(prev)
        return out

    def rank_acceptance(self) -> list[list[float]]:
        """a[j − 1][r − 1]: the chance that greedy AR's token at depth j is the drafter's rank-r token once
        depth j − 1 was reached. Rank 1 is `acceptance()`; ranks 2…TOP_K are decayed counts at that depth
        with a prior of 0 (weight `prior_weight`); a depth sums to ≤ 1. Unlike rank 1 they do not inherit the
        depth before: a tree priced on depth 1's evidence at every depth drafted wide trees after one probe
        that passed (probes observe depth 1 only) and lost ~5 % to AR with a weak drafter; deeper
        ranks are seen once chains or trees reach there."""
        out = []
        for j, a1 in enumerate(self.acceptance(), start=1):
            w, t = self.prior_weight, self.rank_tries[j]
            row, room = [a1], 1.0 - a1
            for a in (h / (t + w) for h in self.rank_hits[j]):
                row.append(max(0.0, min(a, room)))
                room -= row[-1]
            out.append(row)
        return out

    def trees(self) -> list[tuple[list[float], list[float]]] | None:
        """(E, L) by tree size (candidates.expected_tree) for depths D = 1…min(cap, SPANS_MAX_K) − 1, or
        None while no rank below 1 is accepted MIN_RANK_EVIDENCE of the time at any depth (a tree is
        then a chain, which the chain and spans layouts run without the tree's mask)."""
        if "trees" not in self._memo:
            acc = self.rank_acceptance()
            seen = any(a >= MIN_RANK_EVIDENCE for row in acc for a in row[1:])
            self._memo["trees"] = [expected_tree(acc[:d], MAX_NODES) for d in range(1, min(self.cap, SPANS_MAX_K))
                                   ] if seen else None
        return self._memo["trees"]

    def rates(self, floor: int = 1, layout: str = "chain") -> list[float]:
        """Expected committed tokens per unit of cost for K = 1…cap (index K − 1) in `layout` (a tree
        layout: at its best size)."""
        return [r for r, _ in self._rates(floor, layout)]

    def _rates(self, floor: int, layout: str) -> list[tuple[float, int]]:
        """(rate, tree size) for K = 1…cap; size 0 for chain and spans."""
        if layout not in LAYOUTS:
            raise FluidError(f"unknown verify layout {layout!r}; one of {', '.join(LAYOUTS)}")
        if layout in TREE_LAYOUTS:
            return self._tree_rates(floor, layout == "spans+candidates")
        c = self.cost
        out = [(1.0 / c(max(1, floor)), 0)]
        surv, s = 1.0, 0.0
        for k, a in enumerate(self.acceptance(), start=2):
            surv *= a
            s += surv
            if layout == "spans":
                out.append(((1.0 + s) / c.explicit(max(k * k, floor)) if k <= SPANS_MAX_K else 0.0, 0))
            else:
                out.append(((2.0 + s - surv) / (c(max(2 * k - 1, floor)) + (1.0 - surv) * c(max(k, floor))), 0))
        return out

    def _tree_rates(self, floor: int, spans: bool) -> list[tuple[float, int]]:
        """Candidate trees of depth D = K − 1 and n nodes (module docstring):
        candidates(K, n) = (2 + E − L) / (m · c(1 + n + D) + (1 − L) · c(K)),
        spans+candidates(K, n) = (1 + E) / (m · c(1 + n + (n + 1) · D)), widths up to TREE_MAX_WIDTH."""
        trees = self.trees()
        if trees is None:  # chain-shaped trees: no better than the chain, or spans, unless they are not allowed
            acc = [[a] for a in self.acceptance()]
            own = "spans" if spans else "chain"
            trees = [] if own in self.layouts else [expected_tree(acc[:d], MAX_NODES)
                                                     for d in range(1, min(self.cap, SPANS_MAX_K))]
        priced = self._priced.get(floor)  # cost by width at this floor, plain and masked (the table never changes)
        if priced is None:
            widths = range(1, TREE_MAX_WIDTH + 1)
            priced = self._priced[floor] = ([0.0] + [self.cost(max(w, floor)) for w in widths],
                                            [0.0] + [self.cost.explicit(max(w, floor)) for w in widths])
        cw, cm = priced
        out = [(1.0 / cw[1], 0)]
        for d, (e_by_n, leaf_by_n) in enumerate(trees, start=1):
            if spans:
                sizes = [(n, e) for n, e in enumerate(e_by_n, start=1) if 1 + n + (n + 1) * d <= TREE_MAX_WIDTH]
                rates = [((1.0 + e) / cm[1 + n + (n + 1) * d], n) for n, e in sizes]
            else:
                rates = [((2.0 + e - leaf) / (cm[1 + n + d] + (1.0 - leaf) * cw[d + 1]), n)
                         for n, (e, leaf) in enumerate(zip(e_by_n, leaf_by_n, strict=True), start=1)]
            out.append(max(rates, key=lambda x: x[0], default=(0.0, 0)))
        return out + [(0.0, 0)] * (self.cap - len(out))

    def best(self, floor: int = 1) -> tuple[int, str, int]:
        """(K, layout, tree size) of the highest rate over the allowed layouts (ties: the earlier layout of
        LAYOUTS); K = 1 (a chain step) unless that rate beats AR's by the margin."""
        if ("best", floor) in self._memo:
            return self._memo["best", floor]
        top, top_rate = (1, "chain", 0), 0.0
        ar = 1.0 / self.cost(max(1, floor))
        for layout in self.layouts:
            r = self._rates(floor, layout)
            k = max(range(len(r)), key=lambda i: r[i][0]) + 1
            if r[k - 1][0] > top_rate:
                top, top_rate = (k, layout, r[k - 1][1]), r[k - 1][0]
        top = top if top[0] > 1 and top_rate >= (1.0 + self.margin) * ar else (1, "chain", 0)
        self._memo["best", floor] = top
        return top

    def frontier(self) -> list[tuple[int, float, int, str, int]]:
        """The plans a batch scheduler (scheduler.py) chooses among: (stationary step width, expected
        tokens committed per forward when every forward costs the same, K, layout, tree size), by width,
        each committing more than every narrower one; the first is AR (1, 1.0, 1, "chain", 0). Widths:
        chain 2K − 1, spans K², candidates 1 + n + D, spans+candidates 1 + n + (n + 1)·D (module
        docstring; the same rates with c ≡ 1, m = 1: in a batch the step is priced as a whole)."""
        if "frontier" in self._memo:
            return self._memo["frontier"]
        plans, surv, s = [(1, 1.0, 1, "chain", 0)], 1.0, 0.0
        for k, a in enumerate(self.acceptance(), start=2):
            surv *= a
            s += surv
            if "chain" in self.layouts:
                plans.append((2 * k - 1, (2.0 + s - surv) / (2.0 - surv), k, "chain", 0))
            if "spans" in self.layouts and k <= SPANS_MAX_K:
                plans.append((k * k, 1.0 + s, k, "spans", 0))
        for layout, own in (("candidates", "chain"), ("spans+candidates", "spans")):
            trees = self.trees()
            if layout not in self.layouts or (trees is None and own in self.layouts):
                continue  # chain-shaped trees: the chain or spans layout runs them without a tree's mask
            if trees is None:
                acc = [[a] for a in self.acceptance()]
                trees = [expected_tree(acc[:d], MAX_NODES) for d in range(1, min(self.cap, SPANS_MAX_K))]
            for d, (e_by_n, leaf_by_n) in enumerate(trees, start=1):
                for n, (e, leaf) in enumerate(zip(e_by_n, leaf_by_n, strict=True), start=1):
                    if layout == "candidates":
                        plans.append((1 + n + d, (2.0 + e - leaf) / (2.0 - leaf), d + 1, layout, n))
                    elif 1 + n + (n + 1) * d <= TREE_MAX_WIDTH:
                        plans.append((1 + n + (n + 1) * d, 1.0 + e, d + 1, layout, n))
        out: list[tuple[int, float, int, str, int]] = []
        for p in sorted(plans, key=lambda p: (p[0], -p[1])):  # stable: ties keep the order of LAYOUTS
            if not out or p[1] > out[-1][1]:
                out.append(p)
        self._memo["frontier"] = out
        return out

    def assign(self, k: int, layout: str = "chain", nodes: int = 0, probing: bool = False) -> int:
        """Take the plan a batch scheduler chose for the next step (instead of `choose`); returns K."""
        self.probing = bool(probing) and k > 1
        self.spans = k > 1 and not self.probing and layout in ("spans", "spans+candidates")
        self.candidates = k > 1 and not self.probing and layout in TREE_LAYOUTS
        self.nodes = int(nodes) if self.candidates else 0
        return max(1, int(k))

    def choose(self, clean: int = 1, floor: int = 1) -> int:
        """The horizon of the next step, for a row feeding `clean` tokens in a batch at least `floor`
        wide. Sets `probing` when the step's drafts are only to be observed: when drafts do not pay
        but a probe is due (within `probe_budget` AR steps of extra cost), or its masks cost nothing extra; and
        `spans`, `candidates` and `nodes` from the step's layout."""
        self.probing = self.spans = self.candidates = False
        self.nodes = 0
        if self.plan > 1:
            k, layout, self.nodes = self.best(floor)
            self.spans, self.candidates = layout in ("spans", "spans+candidates"), layout in TREE_LAYOUTS
            return k
        if self.cap == 1:
            return 1
        # in AR steps (c(1) = 1), as the share accrues: along a 64-token prompt a relative budget (10 % of
        # the prefill) let every request of a sampler that knew its drafter spend ~0.4 AR steps on a probe
        # a step of clean tokens (a prompt) pays the drafter's mask overhead on top of the extra width
        base = self.cost(max(clean, floor)) - (self.cost.mask_overhead if clean > 1 else 0.0)
        due = self.wait * self.share >= self.cost(max(clean + 1, floor)) - base
        limit = base + (self.probe_budget if due else 1e-9)
        k = 1
        while k < min(self.cap, self.probe_cap) and self.cost(max(clean + k, floor)) <= limit:
            k += 1
        if due:
            k = max(k, 2)
        self.probing = k > 1
        return k

    def update_ranks(self, ranks: Sequence[int]) -> None:
        """Count the drafter's rank (1…TOP_K; 0: not among its candidates) of greedy AR's token at each
        depth a verify step observed; the candidate-tree rates read them (call before `update`)."""
        for j, rank in enumerate(ranks[: self.cap - 1], start=1):
            self.rank_tries[j] = self.decay * self.rank_tries[j] + 1.0
            self.rank_hits[j] = [self.decay * h + (1.0 if rank == r else 0.0)
                                 for r, h in enumerate(self.rank_hits[j], start=2)]
        self._memo.clear()

    def update(self, k_used: int, accepted: int) -> None:
        drafts, good = k_used - 1, accepted - 1
        if drafts <= 0:  # nothing tested: an AR step (or a probe's own step)
            self.wait += 1
            return
        for j in range(1, min(drafts, good + 1, self.cap - 1) + 1):  # tested: 1…good, and good + 1 if rejected
            self.hits[j] = self.decay * self.hits[j] + (1.0 if j <= good else 0.0)
            self.tries[j] = self.decay * self.tries[j] + 1.0
        self._memo.clear()
        self.plan, self.plan_layout, self.plan_nodes = self.best()
        if self.plan == 1:
            # drafts still do not pay, whether or not some passed: probe half as often (a weak drafter's
            # probes often pass a draft or two; resetting the rate then kept them at probe_share for good)
            self.share = max(self.min_share, self.share / 2)
        elif good > 0:
            self.share = self.probe_share
        self.wait = 0


class AcceptanceMemory:
    """What a sampler's greedy-verify rows learned of its drafter, handed to its next rows.

    A new `CostAwareHorizon` starts from the prior (a_j = 0.5) and has to learn the drafter's acceptance
    from its own verdicts, paying for the wide steps that find out — a few forwards that a short request
    never wins back. The drafter's acceptance is mostly a property of the model, not of the request, so
    a sampler keeps the counts of its finished rows: `learn(h)` blends a finished row's decayed counts
    (and its probe schedule: the share and the AR steps since its last probe) in, halving what was
    there; `seed(h)` starts a new row from them, scaled to at most `weight` tries per depth so that the
    row's own verdicts still override them within a few steps, its probes due where the last row's
    were (a new row of a sampler that already knows its drafter does not probe along every prompt).
    Output is unchanged (greedy verify is lossless whatever K is); only where drafts start."""

    def __init__(self, weight: float = 4.0, keep: float = 0.5):
        self.weight, self.keep = float(weight), float(keep)
        self.hits: list[float] = []
        self.tries: list[float] = []
        self.rank_hits: list[list[float]] = []
        self.rank_tries: list[float] = []
        self.share: float | None = None
        self.wait: float | None = None

    def learn(self, h: CostAwareHorizon) -> None:
        n = len(h.hits)
        if len(self.hits) < n:
            extra = n - len(self.hits)
            self.hits += [0.0] * extra
            self.tries += [0.0] * extra
            self.rank_hits += [[0.0] * (TOP_K - 1) for _ in range(extra)]
            self.rank_tries += [0.0] * extra
        k = self.keep
        for j in range(n):
            self.hits[j] = k * self.hits[j] + h.hits[j]
            self.tries[j] = k * self.tries[j] + h.tries[j]
            self.rank_hits[j] = [k * a + b for a, b in zip(self.rank_hits[j], h.rank_hits[j], strict=True)]
            self.rank_tries[j] = k * self.rank_tries[j] + h.rank_tries[j]
        self.share, self.wait = h.share, h.wait

    def seed(self, h: CostAwareHorizon) -> None:
        if not self.tries:
            return
        n = min(len(h.hits), len(self.hits))
        for j in range(1, n):
            s = min(1.0, self.weight / self.tries[j]) if self.tries[j] > 0 else 0.0
            h.hits[j], h.tries[j] = s * self.hits[j], s * self.tries[j]
            r = min(1.0, self.weight / self.rank_tries[j]) if self.rank_tries[j] > 0 else 0.0
            h.rank_hits[j] = [r * a for a in self.rank_hits[j]]
            h.rank_tries[j] = r * self.rank_tries[j]
        if self.share is not None:
            h.share = self.share
        if self.wait is not None:  # the probe schedule goes on: no probe along every new prompt
            h.wait = self.wait
        h._memo.clear()
        h.plan, h.plan_layout, h.plan_nodes = h.best()
        h._memo.clear()
