"""memora.evaluation.stats against a second implementation: statsmodels' Wilson interval, an exact hypergeometric
sum for Fisher's test, the normal approximation for the bootstrap, and published values."""
from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.proportion import proportion_confint

from memora.evaluation import stats


@pytest.mark.parametrize("k,n", [(0, 1), (0, 32), (12, 32), (28, 32), (32, 32), (5, 128), (64, 128), (1, 500)])
@pytest.mark.parametrize("confidence", [0.95, 0.9])
def test_wilson_matches_statsmodels(k, n, confidence):
    low, high = stats.wilson_interval(k, n, confidence)
    ref_low, ref_high = proportion_confint(k, n, alpha=1 - confidence, method="wilson")
    assert low == pytest.approx(ref_low, abs=1e-9)
    assert high == pytest.approx(ref_high, abs=1e-9)


def test_wilson_published_value():
    # Newcombe (1998), Statistics in Medicine 17, table I: 81/263 -> 0.2553 to 0.3662 (Wilson, 95 %).
    low, high = stats.wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)


def _fisher_greater_by_hand(a, n1, b, n0):
    # P(X >= a) for X ~ Hypergeometric(total n1+n0, successes a+b, draws n1): the one-sided exact test.
    total, succ = n1 + n0, a + b
    denom = math.comb(total, n1)
    return sum(math.comb(succ, x) * math.comb(total - succ, n1 - x)
               for x in range(a, min(succ, n1) + 1)) / denom


@pytest.mark.parametrize("k1,n1,k0,n0", [(12, 32, 0, 32), (3, 16, 2, 16), (0, 32, 5, 32), (40, 128, 30, 128),
                                         (32, 32, 32, 32)])
def test_fisher_matches_exact_sum(k1, n1, k0, n0):
    assert stats.fisher_greater(k1, n1, k0, n0) == pytest.approx(_fisher_greater_by_hand(k1, n1, k0, n0), rel=1e-9)


def test_fisher_direction():
    assert stats.fisher_greater(12, 32, 0, 32) < 0.001
    assert stats.fisher_greater(0, 32, 12, 32) == pytest.approx(1.0)


def test_bootstrap_close_to_normal_interval_and_seeded():
    x = np.random.default_rng(3).normal(0.5, 0.1, size=400)
    low, high = stats.bootstrap_mean_interval(x)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert low == pytest.approx(x.mean() - half, abs=0.25 * half)
    assert high == pytest.approx(x.mean() + half, abs=0.25 * half)
    assert (low, high) == stats.bootstrap_mean_interval(x)


def test_bootstrap_degenerate_samples():
    assert stats.bootstrap_mean_interval([0.3]) == (None, None)
    assert stats.bootstrap_mean_interval([0.4, 0.4, 0.4]) == (0.4, 0.4)


def test_records_and_formatting():
    rec = stats.rate_record(12, 32, "micro-top1")
    assert rec["rate"] == 12 / 32 and rec["n"] == 32 and rec["convention"] == "micro-top1"
    assert rec["ci_low"] < 0.375 < rec["ci_high"]
    assert stats.format_rate(rec) == "0.375 (12/32; 95% CI 0.229-0.547; micro-top1)"
    m = stats.mean_record([0.4, 0.5, 0.6, 0.5])
    assert m["n"] == 4 and m["mean"] == pytest.approx(0.5)
    assert m["ci_low"] <= 0.5 <= m["ci_high"]
    assert "no interval" in stats.format_mean(stats.mean_record([0.5]))


@pytest.mark.parametrize("call,needle", [
    (lambda: stats.wilson_interval(3, 0), "n >= 1"),
    (lambda: stats.wilson_interval(5, 4), "between 0 and n=4"),
    (lambda: stats.wilson_interval(1.5, 4), "whole numbers"),
    (lambda: stats.wilson_interval(1, 4, confidence=95), "between 0 and 1"),
    (lambda: stats.bootstrap_mean_interval([]), "at least one value"),
    (lambda: stats.bootstrap_mean_interval([0.1, float("nan")]), "finite"),
    (lambda: stats.rate_record(1, 4, ""), "convention"),
    (lambda: stats.fisher_greater(1, 4, 5, 4), "control rate"),
])
def test_bad_input_is_specific(call, needle):
    with pytest.raises(stats.StatsInputError, match=needle):
        call()
