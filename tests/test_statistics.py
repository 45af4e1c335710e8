"""Intervals and paired tests on known values (sau/evaluation/statistics.py)."""
import math

import numpy as np
import pytest

from sau.evaluation import statistics as st


def test_wilson_interval_on_known_values():
    assert st.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert st.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = st.wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(1 - 0.2775, abs=1e-4)  # mirror image of 0/10
    assert st.wilson_interval(0, 200)[1] == pytest.approx(0.01884, abs=1e-4)  # a removed backdoor still has room
    assert st.wilson_interval(0, 0) == (0.0, 1.0)  # nothing measured, nothing known


def test_wilson_interval_narrows_with_n_and_widens_with_confidence():
    narrow, wide = st.wilson_interval(50, 100), st.wilson_interval(5, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]
    loose = st.wilson_interval(5, 10, confidence=0.99)
    assert loose[0] < wide[0] and loose[1] > wide[1]


@pytest.mark.parametrize("bad", [(-1, 10), (11, 10), (1.5, 10), (1, -2)])
def test_wilson_interval_refuses_impossible_counts(bad):
    with pytest.raises(ValueError, match="whole numbers"):
        st.wilson_interval(*bad)


def test_wilson_interval_refuses_a_confidence_outside_0_1():
    with pytest.raises(ValueError, match="confidence"):
        st.wilson_interval(1, 10, confidence=1.0)


def test_mcnemar_exact_on_known_values():
    assert st.mcnemar_exact(0, 6) == 0.03125
    assert st.mcnemar_exact(1, 9) == 0.021484375
    assert st.mcnemar_exact(9, 1) == 0.021484375  # two-sided: symmetric
    assert st.mcnemar_exact(5, 5) == 1.0
    assert st.mcnemar_exact(0, 0) == 1.0
    assert st.mcnemar_exact(2, 5) == pytest.approx(2 * (1 + 7 + 21) / 128)  # SAU 2 against UCE 5: no difference
    with pytest.raises(ValueError, match="whole numbers"):
        st.mcnemar_exact(-1, 3)


def test_mcnemar_exact_stays_exact_for_large_counts():
    # with 2000 discordant pairs a float sum of 2^-2000 terms would underflow; the integer sum does not
    p = st.mcnemar_exact(900, 1100)
    assert 0 < p < 1e-5 and math.isfinite(p)


def test_bootstrap_interval_is_deterministic_and_contains_the_mean():
    values = np.random.default_rng(3).random(200)
    first = st.bootstrap_interval(values, seed=0)
    assert first == st.bootstrap_interval(values, seed=0)
    assert first != st.bootstrap_interval(values, seed=1)
    assert first[0] < values.mean() < first[1]
    assert first[1] - first[0] < 0.2  # about 4 standard errors of a uniform mean over 200
    median = st.bootstrap_interval(values, statistic=np.median, samples=500)
    assert median[0] <= np.median(values) <= median[1]
    with pytest.raises(ValueError, match="non-empty"):
        st.bootstrap_interval([])


def test_rate_over_seeds_keeps_raw_counts_and_pools_for_the_interval():
    summary = st.rate_over_seeds([2, 4, 0], [200, 200, 200])
    assert summary["rate"] == pytest.approx(0.01) and summary["pooled"] == pytest.approx(0.01)
    assert (summary["low"], summary["high"]) == st.wilson_interval(6, 600)
    assert summary["successes"] == [2, 4, 0] and summary["trials"] == [200, 200, 200]
    assert summary["per_seed"] == [0.01, 0.02, 0.0] and summary["seeds"] == 3
    uneven = st.rate_over_seeds([1, 9], [10, 90])
    assert uneven["rate"] == pytest.approx(0.1) and uneven["pooled"] == pytest.approx(0.1)
    uneven = st.rate_over_seeds([0, 9], [10, 90])
    assert uneven["rate"] == pytest.approx(0.05) and uneven["pooled"] == pytest.approx(0.09)  # mean of rates
    with pytest.raises(ValueError, match="at least one seed"):
        st.rate_over_seeds([], [])
    with pytest.raises(ValueError, match="one of each per seed"):
        st.rate_over_seeds([1, 2], [10])
    with pytest.raises(ValueError, match="at least one trial"):
        st.rate_over_seeds([0], [0])


def test_rate_from_outcomes_counts_booleans_per_seed():
    summary = st.rate_from_outcomes([[True, False, False, False], [False] * 4, [True, True, False, False]])
    assert summary["successes"] == [1, 0, 2] and summary["trials"] == [4, 4, 4]
    with pytest.raises(ValueError, match="booleans"):
        st.rate_from_outcomes([[0.3, 0.5]])


def test_paired_comparison_counts_the_discordant_pairs():
    a = [True, True, False, False, True, False, False]
    b = [True, False, True, False, False, False, False]
    result = st.paired_comparison(a, b)
    assert (result["only_a"], result["only_b"], result["both"], result["neither"]) == (2, 1, 1, 3)
    assert result["n"] == 7 and result["p_value"] == st.mcnemar_exact(2, 1) == 1.0
    assert result["rate_a"] == pytest.approx(3 / 7) and result["rate_b"] == pytest.approx(2 / 7)
    # six prompts where only the first method lets the target through: the exact test says p = 1/32
    result = st.paired_comparison([True] * 6 + [False] * 94, [False] * 100)
    assert result["p_value"] == 0.03125
    with pytest.raises(ValueError, match="same prompts and seeds"):
        st.paired_comparison([True], [True, False])
