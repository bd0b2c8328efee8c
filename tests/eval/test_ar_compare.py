import pytest

from pipeline.eval.ar_compare import paired_speedup


def test_paired_speedup_is_the_median_pair_so_one_slow_run_moves_one_pair():
    ar = [10.0] * 6
    verify = [10.5, 10.5, 10.5, 10.5, 10.5, 5.0]  # one run caught a burst of load: half its speed
    assert paired_speedup(verify, ar) == pytest.approx(1.05)
    # the round's total would have read a slowdown: 6 runs' tokens over their summed times
    total = 6 / sum(1 / v for v in verify) / 10.0
    assert total < 0.95
    assert paired_speedup([2.0, 3.0], [1.0, 1.0]) == pytest.approx(2.5)


def test_paired_speedup_refuses_unpaired_runs():
    with pytest.raises(ValueError, match="paired runs, got 2 and 3"):
        paired_speedup([1.0, 2.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="paired runs"):
        paired_speedup([], [])
