"""Cost-aware horizon of greedy `verify`: the cost table, the rate model, the controller's choices."""

import random

import pytest

from pipeline.decode.cost_model import CostAwareHorizon, ForwardCost, calibrate
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
        assert h.plan == 1 and h.best() == 1
        assert h.choose(clean=1) == 1 or h.probing  # only a probe's drafts may ride along


def test_flat_cost_opens_the_horizon_where_cpu_waits_for_acceptance_to_pay():
    assert CostAwareHorizon(16, FLAT).plan == 16  # prior acceptance 0.5: free masks are worth trying
    assert CostAwareHorizon(16, CPU).plan == 1  # the same prior does not pay for 1.6x forwards
    flat, cpu = CostAwareHorizon(16, FLAT), CostAwareHorizon(16, CPU)
    for h in (flat, cpu):
        _observe(h, 0.5, 40, 6)
    assert flat.plan > 1 and flat.choose() > 1
    assert cpu.plan == 1
    _observe(cpu, 0.95, 40, 6, seed=1)  # acceptance that pays for the width
    assert cpu.plan > 4


def test_rate_model_matches_a_simulated_verify_loop():
    """rate(K) = expected committed tokens per unit cost of the verify pipeline with fixed K."""
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
                cost += CPU(1 + pending + k - 1)
                tokens += good + 1
                pending = k - 1 if good == pending else 0
            else:
                cost += CPU(k)
                tokens += 1
                pending = k - 1
        assert h.rates()[k - 1] == pytest.approx(tokens / cost, rel=0.02), k
    assert h.rates()[0] == 1.0


def test_probes_back_off_when_drafts_keep_failing():
    h = CostAwareHorizon(16, CPU)
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


def test_batch_width_and_prompt_make_masks_free():
    h = CostAwareHorizon(16, CPU)
    h.wait = 0  # no probe due
    assert h.choose(clean=1) == 1 and not h.probing
    assert h.choose(clean=1, floor=9) == 8 and h.probing  # up to the batch's width masks cost nothing
    h = CostAwareHorizon(16, CPU, probe_budget=0.1)
    assert h.choose(clean=40) > 2 and h.probing  # the first probe rides along a long prompt


def test_calibrate_measures_a_relative_table(tmp_path):
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(50)
    cost = calibrate(model, widths=(1, 2, 8), past=8, repeats=2)
    assert cost.widths == [1, 2, 8] and cost(1) == 1.0 and cost(2) <= cost(8)
