"""The batch scheduler of greedy verify (pipeline/decode/scheduler.py): its decisions on synthetic step
costs and acceptances, the step-cost table (interpolation, monotone form, disk cache and its key), and
the decoder running its plans (output stays AR's)."""

import pytest
import torch

from pipeline.decode.cost_model import CostAwareHorizon, ForwardCost
from pipeline.decode.sampler import Sampler
from pipeline.decode.scheduler import (
    GRID_ROWS,
    Choice,
    Demand,
    Scheduler,
    StepCost,
    allowed_rows,
    cache_key,
    calibrate_steps,
    load_cached,
)
from pipeline.errors import FluidError
from tests.decode.test_sampler import PROMPTS, _oracle, ar_tokens, req

WIDTHS = (1, 2, 4, 8, 16, 32, 64)


def table(fn, rows=GRID_ROWS, widths=WIDTHS) -> StepCost:
    return StepCost({(r, w): fn(r, w) for r in rows for w in widths})


# a GPU-like step: a fixed launch/weights cost, then compute that grows with rows × width tokens
GPU = table(lambda r, w: 1.0 + 0.02 * r * w)
STEEP = table(lambda r, w: float(r * w))  # every token costs the same: width never pays for itself


def horizon(acceptance: float, cap: int = 8, layouts=("chain", "spans")) -> CostAwareHorizon:
    """A row whose drafts pass with probability `acceptance` at every depth (a prior held firmly)."""
    return CostAwareHorizon(cap, ForwardCost.flat(), prior=acceptance, prior_weight=1e6, layouts=layouts)


def step_width(cost: StepCost, rows: int, acceptance: float) -> int:
    s = Scheduler(cost)
    plan = s.plan([Demand(1, horizon(acceptance)) for _ in range(rows)])
    assert len({c.k for c in plan}) == 1  # identical rows get identical plans
    return s.last_width


def test_low_acceptance_under_steep_costs_falls_back_to_ar_at_64_rows():
    plan = Scheduler(STEEP).plan([Demand(1, horizon(0.3)) for _ in range(64)])
    assert plan == [Choice(1)] * 64


def test_cheap_width_and_high_acceptance_widen_one_row():
    [c] = Scheduler(GPU).plan([Demand(1, horizon(0.9))])
    assert c.k > 1 and not c.probing and c.layout in ("chain", "spans")


def test_adding_load_never_widens_and_64_rows_decode_ar():
    for acc in (0.5, 0.7, 0.9):
        widths = [step_width(GPU, b, acc) for b in GRID_ROWS]
        assert widths == sorted(widths, reverse=True), (acc, widths)
        assert widths[0] > 1, acc  # one row: drafts pay on a GPU-like table
    assert step_width(GPU, 64, 0.5) == 1  # a full batch with middling drafts: AR


def test_width_returns_as_load_drops():
    s = Scheduler(GPU)
    rows = [Demand(1, horizon(0.8)) for _ in range(64)]
    assert all(c.k == 1 for c in s.plan(rows))
    assert all(c.k > 1 for c in s.plan(rows[:2]))


def test_a_fixed_wide_row_lets_others_widen_or_probe_for_free():
    """An AR row cannot widen, but a row already 16 wide (a prompt, another policy) makes width free."""
    s = Scheduler(STEEP)
    plan = s.plan([Demand(1, horizon(0.9)), Demand(16, width=16)])
    assert plan[0].k > 1 and not plan[0].probing and plan[1] == Choice(1)
    low = s.plan([Demand(1, horizon(0.0, cap=4)), Demand(16, width=16)])
    assert low[0] == Choice(4, probing=True)  # drafts do not pay: its masks are only observed


def test_decisions_are_deterministic_and_the_margin_keeps_ar():
    rows = [Demand(1, horizon(a)) for a in (0.2, 0.5, 0.9, 0.6)]
    assert Scheduler(GPU).plan(rows) == Scheduler(GPU).plan(rows)
    flat = StepCost.flat()
    assert Scheduler(flat).plan([Demand(1, horizon(0.0))]) == [Choice(1)]  # drafts never pass, no free width
    assert Scheduler(flat, margin=10.0).plan([Demand(1, horizon(0.9))])[0].k == 1  # never 11x better


def test_step_cost_interpolates_and_extrapolates():
    c = StepCost({(1, 1): 1.0, (1, 4): 2.0, (4, 1): 2.0, (4, 4): 8.0})
    assert c(1, 1) == 1.0 and c(4, 4) == 8.0
    assert c(1, 2) == pytest.approx(1 + 1 / 3) and c(2, 1) == pytest.approx(1 + 1 / 3)
    assert c(2, 2) == pytest.approx((2 / 3) * (1 + 1 / 3) + (1 / 3) * 4.0)  # bilinear
    assert c(8, 1) == pytest.approx(2.0 + 4 / 3) and c(1, 8) == pytest.approx(2.0 + 4 / 3)  # last slopes
    assert c.relative(4, 4) == pytest.approx(4.0)


def test_step_cost_is_made_monotone():
    """Timing noise must not make a wider step or more rows cheaper."""
    c = StepCost({(1, 1): 1.0, (1, 2): 0.9, (2, 1): 0.8, (2, 2): 0.85})
    assert c(1, 2) == 1.0 and c(2, 1) == 1.0 and c(2, 2) == 1.0
    assert c.raw[1, 2, 32] == 0.9  # the measurement is kept as measured (to_dict, the cache)


def context_table(fn, contexts=(32, 512), rows=GRID_ROWS, widths=WIDTHS) -> StepCost:
    return StepCost({(r, w, c): fn(r, w, c) for r in rows for w in widths for c in contexts})


def test_step_cost_interpolates_in_context():
    c = StepCost({(1, 1, 32): 1.0, (1, 2, 32): 2.0, (1, 1, 512): 3.0, (1, 2, 512): 6.0})
    assert c.contexts == [32, 512] and c.context == 32
    assert c(1, 2) == c(1, 2, 32) == 2.0 and c(1, 2, 512) == 6.0
    assert c(1, 1, 272) == pytest.approx(2.0) and c(1, 2, 272) == pytest.approx(4.0)  # halfway
    assert c(1, 1, 0) == 1.0  # below the grid: the shortest context's cost
    assert c(1, 1, 992) == pytest.approx(5.0)  # beyond: the last slope
    assert c.relative(1, 2, 512) == pytest.approx(2.0)


def test_step_cost_is_monotone_in_context():
    """Noise must not make a longer cache cheaper, at any (rows, width)."""
    c = StepCost({(1, 1, 32): 1.0, (1, 1, 512): 0.9, (1, 1, 1024): 1.5})
    assert c(1, 1, 32) == c(1, 1, 512) == 1.0 and c(1, 1, 1024) == 1.5 and c.raw[1, 1, 512] == 0.9
    g = context_table(lambda r, w, ctx: 1.0 + 0.01 * r * w * ctx / 32 + (5.0 if (r, w, ctx) == (4, 4, 32) else 0))
    for r in (1, 3, 4, 16, 64):
        for w in (1, 3, 4, 16):
            by_ctx = [g(r, w, ctx) for ctx in (0, 32, 100, 512, 2000)]
            assert by_ctx == sorted(by_ctx), (r, w, by_ctx)
    with pytest.raises(FluidError, match="every"):
        StepCost({(1, 1, 32): 1.0, (1, 1, 512): 1.0, (1, 2, 32): 1.0})


def test_long_contexts_plan_narrower_steps():
    """Where a long cache makes every token's attention dear, the same rows plan narrower there."""
    cost = context_table(lambda r, w, ctx: 1.0 + 0.01 * r * w * ctx / 32)
    widths = {}
    for ctx in (32, 512):
        s = Scheduler(cost)
        s.plan([Demand(1, horizon(0.8)) for _ in range(4)], context=ctx)
        widths[ctx] = s.last_width
    assert widths[512] < widths[32] and widths[32] > 1, widths
    s = Scheduler(cost)  # no context: the table's shortest
    s.plan([Demand(1, horizon(0.8)) for _ in range(4)])
    assert s.last_width == widths[32]


def test_step_cost_round_trips_with_contexts_and_reads_the_old_form():
    c = StepCost({(1, 1, 32): 1.0, (1, 2, 32): 2.0, (1, 1, 512): 3.0, (1, 2, 512): 6.0}, key={"a": 1})
    d = c.to_dict()
    back = StepCost.from_dict(d)
    assert back.to_dict() == d and back.contexts == [32, 512] and back(1, 2, 272) == pytest.approx(4.0)
    old = StepCost.from_dict({"rows": [1], "widths": [1, 2], "context": 64, "key": {}, "seconds": [[1.0, 2.0]]})
    assert old.contexts == [64] and old(1, 2) == old(1, 2, 4096) == 2.0
    assert StepCost.from_dict(old.to_dict()).to_dict() == old.to_dict()


def test_step_cost_from_forward_prices_rows_times_width():
    fc = ForwardCost({1: 1.0, 4: 2.0, 16: 5.0})
    c = StepCost.from_forward(fc)
    assert c(1, 4) == pytest.approx(2.0) and c(4, 4) == pytest.approx(5.0) and c(4, 1) == pytest.approx(2.0)
    assert len(c.contexts) == 1 and c(4, 4, 4096) == c(4, 4)  # context-free: one cache length


def test_bad_input_errors():
    with pytest.raises(FluidError, match="every"):
        StepCost({(1, 1): 1.0, (2, 2): 2.0})
    with pytest.raises(FluidError, match="include 1"):
        StepCost({(2, 1): 1.0})
    with pytest.raises(FluidError, match="positive"):
        StepCost({(1, 1): 0.0})
    with pytest.raises(FluidError, match="at least the cost"):
        StepCost({})
    with pytest.raises(FluidError, match="not a step-cost table"):
        StepCost.from_dict({"rows": [1]})
    with pytest.raises(FluidError, match="StepCost"):
        Scheduler(ForwardCost.flat())
    with pytest.raises(FluidError, match="margin"):
        Scheduler(GPU, margin=-1)
    with pytest.raises(FluidError, match="at least"):
        Scheduler(GPU).plan([Demand(0, horizon(0.5))])
    with pytest.raises(FluidError, match="at least"):
        Scheduler(GPU).plan([Demand(3, width=2)])
    with pytest.raises(FluidError, match=">= 1"):
        allowed_rows(0)
    assert Scheduler(GPU).plan([]) == [] and allowed_rows(12) == [1, 2, 4, 8, 12]


def test_cache_round_trips_and_is_keyed_by_dtype(model, tmp_path):
    first, info = calibrate_steps(model, 2, widths=(1, 2), repeats=1, cache_dir=tmp_path)
    assert not info["cached"] and first.rows == [1, 2] and first.widths == [1, 2]
    assert first.contexts == [32, 254] == first.key["context"]  # 512 fitted inside 256 positions
    again, info2 = calibrate_steps(model, 2, widths=(1, 2), repeats=1, cache_dir=tmp_path)
    assert info2["cached"] and info2["file"] == info["file"] and again.to_dict() == first.to_dict()
    assert load_cached({**first.key, "dtype": "bfloat16"}, tmp_path) is None
    assert load_cached({**first.key, "rows": [1, 2, 4]}, tmp_path) is None
    bf16 = type(model)(model.config).to(torch.bfloat16)
    assert cache_key(bf16, [1, 2], (1, 2), 32)["dtype"] == "bfloat16" != first.key["dtype"]
    _, info3 = calibrate_steps(bf16, 2, widths=(1, 2), repeats=1, cache_dir=tmp_path)
    assert not info3["cached"] and info3["file"] != info["file"]


def test_sampler_calibrates_steps_and_decoder_follows_the_scheduler(model, tok, mask_id, monkeypatch, tmp_path):
    """Right drafts: a flat step cost lets every row draft; steep rows × width costs keep the batch at
    AR (1 token per forward); the output is AR's either way."""
    s = Sampler(model, tok, mask_token_id=mask_id, k_max=8, forward_cost=[1.0])
    info = s.calibrate_steps(2, cache_dir=tmp_path)
    assert s.step_cost.rows == [1, 2] and not info["cached"] and s.scheduler.cost is s.step_cost
    ref = ar_tokens(s, PROMPTS, n=30)
    _oracle(monkeypatch, {tuple(tok(p)["input_ids"]): r for p, r in zip(PROMPTS, ref, strict=True)}, 0.0)
    tpf = {}
    for name, cost in (("flat", StepCost.flat()), ("steep", STEEP)):
        s.step_cost = cost
        res = s.generate([req(p, policy="verify", max_tokens=30) for p in PROMPTS])
        assert [r.token_ids for r in res] == ref, name
        tpf[name] = [r.stats.tokens_per_forward for r in res]
    assert min(tpf["flat"]) > 2.5 and tpf["steep"] == [1.0] * len(PROMPTS), tpf


def test_measuring_stops_past_its_budget_and_the_rest_is_extrapolated(model):
    from pipeline.decode.scheduler import measure_steps

    times = measure_steps(model, [1, 2, 4, 8], (1, 2), contexts=(8, 64), repeats=1, budget_s=0.0)
    assert sorted(times) == [(r, w, c) for r in (1, 2) for w in (1, 2) for c in (8, 64)]  # every context alike
    cost = StepCost(times)
    assert cost(8, 2, 64) >= cost(8, 2) >= cost(2, 2) > 0


def test_extrapolated_costs_stay_monotone_in_context():
    """Past the grid each context extrapolates with its own slope; a long context never prices below a short one."""
    table = {(r, w, c): t for (r, w), (t8, t64) in {(1, 1): (1.0, 1.5), (1, 2): (1.2, 1.6), (2, 1): (2.0, 1.6),
                                                  (2, 2): (3.0, 1.7)}.items()
             for c, t in ((8, t8), (64, t64))}
    cost = StepCost(table)
    for rows in (2, 4, 8, 64):
        for width in (1, 2, 4):
            assert cost(rows, width, 64) >= cost(rows, width, 8) > 0, (rows, width)
            assert cost(rows, width, 36) >= cost(rows, width, 8)
