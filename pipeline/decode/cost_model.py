"""Cost-aware horizon of greedy `verify`: forward cost by width × running acceptance by draft position.

In:  a forward-cost table (`ForwardCost`: the time of one forward by its width in tokens, relative to a
     1-token AR step; measured on the device by `calibrate`, or given so that tests and configs can pin
     it), and after every `verify` step its verdict (drafts tested, drafts accepted).
Out: per row, the horizon K of the next step that maximises expected committed tokens per unit of
     forward cost (`CostAwareHorizon.choose`), K = 1 (a plain AR step) when drafts do not pay.

Model of a fixed horizon K (D = K − 1 drafts). With `verify` a step either checks D pending drafts
(width 1 + D clean + D masks = 2K − 1) or, after a rejection, only drafts again (width K). With a_j the
probability that draft j is accepted once drafts 1…j−1 were, S = Σ_{i≤D} Π_{j≤i} a_j the expected
accepted drafts and P = Π_{j≤D} a_j the chance that all pass, the stationary rate is

    rate(K) = (2 + S − P) / (c(2K − 1) + (1 − P) · c(K)),   rate(1) = 1 / c(1),

tokens per unit of cost. In a batch every row pays for the batch's width, so widths are priced at
least at the width the batch has anyway (`floor`). K > 1 is chosen only when it beats AR by `margin`.

The a_j are decayed counts per position with a prior chained from position to position (a position
never tested inherits the estimate of the one before it, so the controller is optimistic about
extending a horizon that works). While drafts do not pay, the row decodes AR and now and then makes one
cheap *probe*: the masks ride along one step (as wide as costs at most `probe_budget` extra), their
drafts are only compared with the tokens AR then commits. Probes may spend a share `probe_share` of
the AR steps' cost (a probe whose extra width costs 0.6 of an AR step comes every 15 steps at 4 %); a
probe that finds nothing halves the share (exponential back-off, down to `min_share`), so the worst
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

from pipeline.errors import FluidError
from pipeline.model.causal_lm import cache_kwarg

CALIBRATION_WIDTHS = (1, 2, 4, 8, 16, 32)


class ForwardCost:
    """Relative cost of one forward by width: `cost(w)`, 1.0 at w = 1.

    Built from a list (costs of widths 1, 2, 3, …) or a {width: cost} mapping; made non-decreasing,
    linearly interpolated between given widths and extrapolated beyond the last with the last slope."""

    def __init__(self, table: Sequence[float] | Mapping[int, float]):
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
        return f"ForwardCost({dict(zip(self.widths, (round(c, 3) for c in self.costs), strict=True))})"


@torch.inference_mode()
def calibrate(model, *, widths: Sequence[int] = CALIBRATION_WIDTHS, past: int = 32, repeats: int = 3,
              token_id: int = 0) -> ForwardCost:
    """Measure the forward cost by width on the model's device: a `past`-token KV cache, then one
    forward of w new tokens per width (interleaved over `repeats` rounds, median), as the sampler runs
    them. Takes ~2 s for SmolLM2-135M on 2 CPU cores, well under a second on a GPU."""
    from transformers import DynamicCache

    from pipeline.decode import kvcache

    device = next(model.parameters()).device
    kwarg = cache_kwarg(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cache = DynamicCache(config=model.config)
    ids = torch.full((1, past + max(widths)), int(token_id), dtype=torch.long, device=device)
    model(input_ids=ids[:, :past], use_cache=True, logits_to_keep=1, **{kwarg: cache})

    def once(w: int) -> float:
        pos = torch.arange(past, past + w, device=device)[None, :]
        sync()
        t0 = time.perf_counter()
        model(input_ids=ids[:, :w], position_ids=pos, use_cache=True, logits_to_keep=w, **{kwarg: cache})
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
    return ForwardCost({w: statistics.median(ts) for w, ts in sorted(times.items())})


class CostAwareHorizon:
    """Per-row horizon controller of greedy `verify` (see the module docstring).

    The sampler calls `choose(clean, floor)` before each forward (`clean`: tokens the row feeds;
    `floor`: the width the batch has anyway) and `update(k_used, accepted)` with each verdict
    (k_used − 1 drafts tested, accepted − 1 of them accepted; k_used = 1 for a step that tested none).
    `probing` says whether the drafts of the step just planned are only to be observed (a probe)."""

    def __init__(self, cap: int, cost: ForwardCost, *, prior: float = 0.5, prior_weight: float = 1.0,
                 decay: float = 0.9, margin: float = 0.05, probe_budget: float = 0.1, probe_cap: int = 8,
                 probe_share: float = 0.04, min_share: float = 1 / 256):
        self.cap, self.cost = max(1, int(cap)), cost
        self.prior, self.prior_weight, self.decay, self.margin = prior, prior_weight, decay, margin
        self.probe_budget, self.probe_cap = probe_budget, probe_cap
        self.probe_share, self.min_share = probe_share, min_share
        self.hits = [0.0] * self.cap  # decayed counts per draft position j = 1…cap − 1 (index j)
        self.tries = [0.0] * self.cap
        self.share = probe_share
        self.wait = 1e9  # AR steps since the last probe: the first one is due at once (along the prompt)
        self.plan = self.best()  # K at a width floor of 1, from the current estimates
        self.probing = False

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

    def rates(self, floor: int = 1) -> list[float]:
        """Expected committed tokens per unit of cost for K = 1…cap (index K − 1)."""
        c = self.cost
        out = [1.0 / c(max(1, floor))]
        surv, s = 1.0, 0.0
        for k, a in enumerate(self.acceptance(), start=2):
            surv *= a
            s += surv
            out.append((2.0 + s - surv) / (c(max(2 * k - 1, floor)) + (1.0 - surv) * c(max(k, floor))))
        return out

    def best(self, floor: int = 1) -> int:
        """The K of the highest rate; 1 unless that rate beats AR's by the margin."""
        r = self.rates(floor)
        k = max(range(len(r)), key=r.__getitem__) + 1
        return k if r[k - 1] >= (1.0 + self.margin) * r[0] else 1

    def choose(self, clean: int = 1, floor: int = 1) -> int:
        """The horizon of the next step, for a row feeding `clean` tokens in a batch at least `floor`
        wide. Sets `probing` when the step's drafts are only to be observed: when drafts do not pay
        but a probe is due (within `probe_budget` extra cost), or its masks cost nothing extra."""
        self.probing = False
        if self.plan > 1:
            return self.best(floor)
        if self.cap == 1:
            return 1
        base = self.cost(max(clean, floor))
        due = self.wait * self.share >= self.cost(max(clean + 1, floor)) / base - 1.0
        limit = base * (1.0 + (self.probe_budget if due else 1e-9))
        k = 1
        while k < min(self.cap, self.probe_cap) and self.cost(max(clean + k, floor)) <= limit:
            k += 1
        if due:
            k = max(k, 2)
        self.probing = k > 1
        return k

    def update(self, k_used: int, accepted: int) -> None:
        drafts, good = k_used - 1, accepted - 1
        if drafts <= 0:  # nothing tested: an AR step (or a probe's own step)
            self.wait += 1
            return
        for j in range(1, min(drafts, good + 1, self.cap - 1) + 1):  # tested: 1…good, and good + 1 if rejected
            self.hits[j] = self.decay * self.hits[j] + (1.0 if j <= good else 0.0)
            self.tries[j] = self.decay * self.tries[j] + 1.0
        self.plan = self.best()
        if self.plan == 1 and good == 0:
            self.share = max(self.min_share, self.share / 2)  # nothing passed: probe half as often
        elif good > 0:
            self.share = self.probe_share
        self.wait = 0
