"""Cost-aware horizon of greedy `verify`: the cost table, the rate model, the controller's choices."""

import random

import pytest
import torch

from pipeline.decode.cost_model import SPANS_MAX_K, AcceptanceMemory, CostAwareHorizon, ForwardCost, calibrate
from pipeline.errors import FluidError

# 2-core CPU, SmolLM2-135M (docs): 2–3 tokens ~1.6 AR steps, 8 ~1.6, 16 ~1.9, 32 ~2.5
CPU = ForwardCost({1: 1.0, 2: 1.6, 4: 1.45, 8: 1.6, 16: 1.93, 32: 2.5})
FLAT = ForwardCost.flat()


def test_forward_cost_table_is_relative_monotone_and_interpolated():
    c = ForwardCost({1: 0.06, 2: 0.096, 4: 0.087, 8: 0.096, 16: 0.116})
    assert c(1) == 1.0 and c(2) == pytest.approx(1.6)
    assert c(4) == pytest.approx(1.6)  # a noisy dip is not a reason to widen
    assert c(12) == pytest.approx((1.6 + 0.116 / 0.06) / 2)
    assert c(24) == pytest.approx(0.116 / 0.06 + 8 * (0.116 / 0.06 - 1.6) / 8)  # last slope beyond the table
    assert ForwardCost([2.0, 2.0, 3.0]).table(4) == [1.0, 1.0, 1.5, 2.0]
    assert FLAT(1) == FLAT(1000) == 1.0
    with pytest.raises(FluidError, match="start at 1"):
        ForwardCost({2: 1.0, 4: 1.2})
    with pytest.raises(FluidError, match="positive"):
        ForwardCost([1.0, 0.0])


def _observe(h: CostAwareHorizon, rate: float, steps: int, k: int, seed: int = 0) -> None:
    """Feed verdicts of `steps` verify steps with k − 1 drafts each accepted with probability `rate`."""
    rng = random.Random(seed)
    for _ in range(steps):
        good = 0
        while good < k - 1 and rng.random() < rate:
            good += 1
        h.update(k, good + 1)


def test_zero_acceptance_gives_k1_whatever_the_cost():
    for cost in (CPU, FLAT):
        h = CostAwareHorizon(16, cost)
        _observe(h, 0.0, 30, 8)
        assert h.plan == 1 and h.best() == (1, "chain", 0)
        # only a probe's drafts may ride along: none at CPU costs; with free widths the masks of a
        # full probe (probe_cap) cost nothing, and their drafts are only observed
        want = (1, False) if cost is CPU else (h.probe_cap, True)
        assert (h.choose(clean=1), h.probing) == want


def test_a_new_row_starts_from_what_the_rows_before_it_learned():
    memory = AcceptanceMemory(weight=4.0)
    fresh = CostAwareHorizon(16, FLAT)
    memory.seed(fresh)  # nothing learned yet: the prior
    assert fresh.plan == SPANS_MAX_K and fresh.tries == [0.0] * 16
    assert CostAwareHorizon(16, CPU).plan == 3  # the prior pays for a spans step at CPU costs
    for seed in range(3):  # three finished rows whose drafts always failed
        h = CostAwareHorizon(16, CPU)
        memory.seed(h)
        _observe(h, 0.0, 30, 8, seed=seed)
        memory.learn(h)
    new = CostAwareHorizon(16, CPU)
    memory.seed(new)
    assert new.plan == 1 and new.acceptance()[0] < 0.15  # it does not pay for wide steps to find out again
    assert max(new.tries) <= 4.0 + 1e-9 and new.share == h.share < new.probe_share
    # its probes come where the last row's schedule had them, not at once along its prompt
    assert new.wait == h.wait < 1e9 and (new.choose(clean=1), new.probing) == (1, False)
    unseeded = CostAwareHorizon(16, CPU, prior=0.05)  # drafts do not pay either, but nothing was learned
    assert unseeded.plan == 1 and (unseeded.choose(clean=1), unseeded.probing) == (2, True)  # probes at once
    _observe(new, 0.95, 6, 8)  # its own verdicts still override the memory within a few steps
    assert new.plan > 4
    good = CostAwareHorizon(16, CPU)
    _observe(good, 0.95, 40, 8)
    memory.learn(good)  # the newest row weighs most: the memory halves what was there
    later = CostAwareHorizon(16, CPU)
    memory.seed(later)
    assert later.plan > 1 and later.acceptance()[0] > 0.45


def test_flat_cost_opens_the_horizon_where_cpu_waits_for_acceptance_to_pay():
    flat = CostAwareHorizon(16, FLAT)
    assert (flat.plan, flat.plan_layout) == (SPANS_MAX_K, "spans")  # prior acceptance 0.5: free masks are worth trying
    # the same prior does not pay for the chain's 1.6x forwards; the spans' width 9 (K = 3, 1.64 AR
    # steps) commits 1 + 0.5 + 0.25 tokens: 1.07 x AR, just past the 5 % margin
    assert CostAwareHorizon(16, CPU, layouts=("chain",)).plan == 1
    cpu = CostAwareHorizon(16, CPU)
    assert (cpu.plan, cpu.plan_layout) == (3, "spans")
    flat, cpu = CostAwareHorizon(16, FLAT), CostAwareHorizon(16, CPU)
    for h in (flat, cpu):
        _observe(h, 0.3, 40, 6)
    assert flat.plan > 1 and flat.choose() > 1 and flat.spans
    assert cpu.plan == 1
    _observe(cpu, 0.95, 40, 6, seed=1)  # acceptance that pays for the width
    assert cpu.plan > 4


def test_cheap_narrow_widths_pick_the_chain_wide_free_widths_the_spans():
    """A CPU whose BLAS is flat up to 3 rows and jumps at 4 (this project's fp32 CPUs): the chain at
    K = 2 (width 3) is the only horizon that pays for moderate acceptance; free widths take the spans."""
    narrow = ForwardCost({1: 1.0, 2: 1.0, 3: 1.07, 4: 1.52, 8: 1.8, 16: 1.95, 32: 2.3})
    for cost, want in ((narrow, (2, "chain", 0)), (FLAT, (8, "spans", 0))):
        h = CostAwareHorizon(8, cost, prior_weight=1e9)
        h.acceptance = lambda: [0.5] * 7
        assert h.best() == want, cost
    h = CostAwareHorizon(8, narrow, prior_weight=1e9)
    h.acceptance = lambda: [0.5] * 7
    assert h.rates(layout="chain")[1] == pytest.approx(2.0 / (1.07 + 0.5 * 1.0))
    assert h.rates(layout="spans")[2] == pytest.approx((1 + 0.5 + 0.25) / narrow(9))
    with pytest.raises(FluidError, match="layouts"):
        CostAwareHorizon(8, FLAT, layouts=("star",))
    with pytest.raises(FluidError, match="'tree' was renamed 'spans'.*'candidates'"):
        CostAwareHorizon(8, FLAT, layouts=("chain", "tree"))


@pytest.mark.parametrize("layout", ["chain", "spans"])
def test_rate_model_matches_a_simulated_verify_loop(layout):
    """rate(K) = expected committed tokens per unit cost of the verify pipeline with fixed K: the chain
    drafts again after a rejection; the spans layout has a span at every pending token, so it never has to."""
    accept = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    h = CostAwareHorizon(8, CPU, prior_weight=1e9)
    h.acceptance = lambda: accept
    rng = random.Random(0)
    for k in (2, 4, 8):
        tokens = cost = 0.0
        pending = 0  # drafts waiting to be checked
        for _ in range(40_000):
            if pending:
                good = 0
                while good < pending and rng.random() < accept[good]:
                    good += 1
                spans = pending + 1 if layout == "spans" else 1
                cost += CPU(1 + pending + spans * (k - 1))
                tokens += good + 1
                pending = k - 1 if good == pending or layout == "spans" else 0
            else:
                cost += CPU(k)
                tokens += 1
                pending = k - 1
        assert h.rates(layout=layout)[k - 1] == pytest.approx(tokens / cost, rel=0.02), k
    assert h.rates(layout=layout)[0] == 1.0


def test_probes_back_off_when_drafts_keep_failing():
    h = CostAwareHorizon(16, CPU, layouts=("chain",))  # the prior alone does not pay here
    ks, probes = [], []
    for i in range(600):
        k = h.choose(clean=1)
        ks.append(k)
        h.update(1, 1)  # the step itself tests nothing
        if h.probing:
            probes.append(i)
            h.update(k, 1)  # the observed probe's verdict: its first draft is wrong
    assert ks[0] == 2 and len(probes) <= 6, probes  # 1 mask per probe: the worst case stays ~AR
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert gaps == sorted(gaps) and gaps[0] >= 0.6 / 0.02, gaps  # a probe costs 0.6 AR steps here
    h = CostAwareHorizon(16, ForwardCost([1.0, 14.0]))  # a busy CPU: 2 tokens cost 14 AR steps
    h.update(2, 1)  # the first probe (along the prompt) failed
    ks = []
    for _ in range(300):
        h.update(1, 1)
        ks.append(h.choose(clean=1))
    assert set(ks) == {1}  # 300 AR steps pay for less than one probe


def test_probes_back_off_while_drafts_do_not_pay_even_when_some_pass():
    """A weak drafter's probe often passes a draft: as long as drafting still does not pay, probes become
    rarer all the same (they used to return to probe_share after every passing draft)."""
    h = CostAwareHorizon(16, CPU, layouts=("chain",))
    probes, verdicts = [], 0
    for i in range(600):
        k = h.choose(clean=1)
        if k > 1 and not h.probing:  # a drafting step's verdict
            verdicts += 1
            h.update(k, 1 + verdicts % 2)
            continue
        h.update(1, 1)
        if h.probing:
            probes.append(i)
            verdicts += 1
            h.update(k, 1 + verdicts % 2)  # every other probe passes its first draft: a_1 ~ 0.5 does not pay
    assert h.plan == 1 and len(probes) <= 8, probes
    gaps = [b - a for a, b in zip(probes, probes[1:], strict=False)]
    assert gaps == sorted(gaps)


def test_batch_width_and_prompt_make_masks_free():
    h = CostAwareHorizon(16, CPU, layouts=("chain",))
    h.wait = 0  # no probe due
    assert h.choose(clean=1) == 1 and not h.probing
    assert h.choose(clean=1, floor=9) == 8 and h.probing  # up to the batch's width masks cost nothing
    h = CostAwareHorizon(16, CPU, probe_budget=0.1, layouts=("chain",))
    assert h.choose(clean=40) > 2 and h.probing  # the first probe rides along a long prompt


def test_a_probe_along_a_prompt_costs_at_most_its_budget_in_ar_steps():
    """The budget is in AR steps, as the share accrues: 10 % of a 64-token prefill is ~0.4 AR steps."""
    cost = ForwardCost({1: 1.0, 2: 1.6, 32: 2.5, 64: 4.0, 128: 7.0})  # ~0.047 AR steps per token past 64
    h = CostAwareHorizon(16, cost, probe_budget=0.1, layouts=("chain",))
    assert h.plan == 1 and h.choose(clean=64) == 3 and h.probing  # 2 masks: 0.094 AR steps
    assert cost(64 + 2) - cost(64) <= 0.1 < cost(64 + 3) - cost(64)
    h.wait, h.share = 1, 0.01  # 0.01 AR steps accrued: not even one mask (0.047) is due
    assert h.choose(clean=64) == 1 and not h.probing


def test_a_probe_along_a_prompt_pays_the_drafters_mask_overhead():
    """The table's widths >= 2 are timed with masks; a prompt of clean tokens is not: its first mask adds
    the adapter's fixed cost (`mask_overhead`) on top of the width, so the probe is due only once the
    share has accrued that much (a probe every request cost ~1 % of a 32-token request on a 2-core CPU)."""
    table = {1: 1.0, 2: 1.6, 32: 2.5, 64: 4.0, 128: 7.0}
    free, dear = (CostAwareHorizon(16, ForwardCost(table, mask_overhead=o), probe_budget=0.1, layouts=("chain",))
                  for o in (0.0, 0.3))
    for h in (free, dear):
        h.wait, h.share = 10, 0.01  # 0.1 AR steps accrued
    assert free.choose(clean=64) == 3 and free.probing  # two masks: 0.094 AR steps, within the budget
    assert dear.choose(clean=64) == 1 and not dear.probing  # 0.347 AR steps: not yet
    dear.wait = 40  # 0.4 accrued
    assert dear.choose(clean=64) == 2 and dear.probing
    # a decode step's price is the table's (its widths were timed with masks): the overhead adds nothing
    for h in (free, dear):
        h.wait, h.share = 10, 0.07  # 0.7 accrued ≥ cost(2) − 1 = 0.6
    assert free.choose(clean=1) == dear.choose(clean=1) == 2
    assert "mask_overhead=0.300" in repr(dear.cost) and "mask_overhead" not in repr(free.cost)
    with pytest.raises(FluidError, match="mask overhead"):
        ForwardCost(table, mask_overhead=-0.1)


def test_calibrate_measures_a_relative_table(tmp_path):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(50)
    cost = calibrate(model, widths=(1, 2, 8), past=8, repeats=2)
    assert cost.widths == [1, 2, 8] and cost(1) == 1.0 and cost(2) <= cost(8)


def test_calibrate_times_steps_as_decoding_feeds_them():
    """Width 1 is a clean AR step; a wider step is one clean token then masks — the masks are what a
    frozen-base drafter's adapter runs on, so an all-mask width 1 would price AR steps too high."""
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(50)
    seen = []
    forward = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return forward(*args, **kwargs)

    model.forward = spy
    calibrate(model, widths=(1, 3), past=4, repeats=1, token_id=5, mask_token_id=49)
    steps = [s for s in seen if s != [5] * 4]  # without the prefills of the past
    # the table's widths, then the spans widths 4 and 9 (with and without an explicit mask), and the
    # narrowest wider step all clean: what the masks add to it is the drafter's mask overhead
    assert {tuple(s) for s in steps} == {(5,), (5, 49, 49), (5, 49, 49, 49), (5,) + (49,) * 8, (5, 5, 5)}


def test_spans_steps_pay_the_measured_price_of_their_explicit_mask():
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(50)
    masks = []
    forward = model.forward

    def spy(*args, **kwargs):
        if kwargs.get("attention_mask") is not None:
            masks.append(kwargs["attention_mask"])
        return forward(*args, **kwargs)

    model.forward = spy
    cost = calibrate(model, widths=(1, 2, 4, 9, 16), past=4, repeats=1)
    # the mask's price at the mask widths the table reaches (spans of K = 2, 3, 4)
    assert cost.masked >= 1.0 and {tuple(m.shape) for m in masks} == {(1, 1, 4, 8), (1, 1, 9, 13), (1, 1, 16, 20)}
    m = masks[0][0, 0]  # the causal rule over the past 4 entries and the step
    assert m.dtype == torch.bool and torch.equal(m, torch.ones(4, 8, dtype=torch.bool).tril(4))
    with pytest.raises(FluidError, match="masked-step factor"):
        ForwardCost([1.0], masked=0.5)
    # the same acceptance: spans priced 1.5x dearer for its mask loses its rate by exactly that factor
    plain, dear = (CostAwareHorizon(4, ForwardCost([1.0, 1.1, 1.2, 1.3], masked=f), layouts=("spans",))
                   for f in (1.0, 1.5))
    for h in (plain, dear):
        h.hits, h.tries = [0.0, 8.0, 8.0, 8.0], [0.0, 10.0, 10.0, 10.0]
    for a, b in zip(plain.rates(layout="spans")[1:], dear.rates(layout="spans")[1:], strict=True):
        assert a == pytest.approx(1.5 * b)
    assert plain.rates(layout="chain") == dear.rates(layout="chain")
    # measured by width: interpolated between the widths, constant beyond; a wide masked step pays its own price
    by_width = ForwardCost([1.0, 1.1, 1.2, 1.3], masked={4: 1.0, 16: 1.3})
    assert [by_width.mask_factor(w) for w in (2, 4, 10, 16, 40)] == pytest.approx([1.0, 1.0, 1.15, 1.3, 1.3])
    assert by_width.explicit(10) == pytest.approx(by_width(10) * 1.15) and "masked={4: 1.0, 16: 1.3}" in repr(by_width)
    narrow, wide = (CostAwareHorizon(8, ForwardCost([1.0] * 4, masked=m), layouts=("spans",))
                    for m in ({4: 1.0, 9: 1.0}, {4: 1.0, 9: 1.0, 16: 2.0}))
    for h in (narrow, wide):
        h.hits, h.tries = [0.0] + [8.0] * 7, [0.0] + [10.0] * 7
    assert narrow.best()[0] > 3 and wide.best()[0] == 3  # a mask that doubles width 16 stops spans at K = 3


def test_masked_step_ratio_is_one_without_a_drafter_and_sees_an_adapter_that_costs(monkeypatch):
    """masked_step_ratios compares steps of equal width with and without masks: a model whose masks cost
    nothing reads ~1 (a fake clock makes it exact), one whose mask steps cost 1.5× reads 1.5."""
    from pipeline.decode import cost_model as cm

    def fake(model, widths, *, mask_token_id=None, **_):
        return {w: [w * (1.5 if mask_token_id is not None and model == "slow" else 1.0)] for w in widths}

    monkeypatch.setattr(cm, "time_widths", fake)
    assert cm.masked_step_ratios("plain", mask_token_id=7) == {2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0}
    assert cm.masked_step_ratios("slow", mask_token_id=7, widths=(2, 8)) == {2: 1.5, 8: 1.5}
