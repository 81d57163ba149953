"""Intervals and tests for every recovery figure the pack reports (one implementation, on scipy).

A rate (share of images where a concept is detected) comes with its n and a Wilson 95 % score interval; a mean
similarity with a bootstrap 95 % percentile interval over images (or seeds); a recovered rate is compared with the
never-learned control's by a one-sided Fisher exact test. scipy does the maths (ComfyUI already installs it); this
module only fixes the conventions and the record layout every node, memora-batch and the docs share:

    rate record:  {"k", "n", "rate", "ci_low", "ci_high", "confidence", "interval", "convention"}
    mean record:  {"n", "mean", "ci_low", "ci_high", "confidence", "interval"}

The Wilson interval: E. B. Wilson, "Probable inference, the law of succession, and statistical inference",
JASA 22 (1927); scipy.stats.binomtest(...).proportion_ci(method="wilson"). The bootstrap: scipy.stats.bootstrap
(percentile method: BCa is undefined on the constant samples a rate of 0 or 1 gives).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy import stats as _sps

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
RATE_INTERVAL = "wilson"
MEAN_INTERVAL = "bootstrap-percentile"


class StatsInputError(ValueError):
    """A count, sample or confidence level the statistics cannot be computed from."""


def _check_confidence(confidence: float) -> float:
    c = float(confidence)
    if not (0.0 < c < 1.0):
        raise StatsInputError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence!r}")
    return c


def _check_counts(k, n, what: str = "rate") -> tuple[int, int]:
    try:
        ki, ni = int(k), int(n)
    except (TypeError, ValueError):
        raise StatsInputError(f"{what}: counts must be whole numbers, got k={k!r}, n={n!r}") from None
    if ki != k or ni != n:
        raise StatsInputError(f"{what}: counts must be whole numbers, got k={k!r}, n={n!r}")
    if ni <= 0:
        raise StatsInputError(f"{what}: needs at least one image (n >= 1), got n={n!r}")
    if not (0 <= ki <= ni):
        raise StatsInputError(f"{what}: the count k must be between 0 and n={ni}, got k={k!r}")
    return ki, ni


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (two-sided, at `confidence`)."""
    ki, ni = _check_counts(k, n)
    ci = _sps.binomtest(ki, ni).proportion_ci(confidence_level=_check_confidence(confidence), method="wilson")
    return float(max(0.0, ci.low)), float(min(1.0, ci.high))


def bootstrap_mean_interval(values: Sequence[float], confidence: float = CONFIDENCE,
                            n_resamples: int = BOOTSTRAP_RESAMPLES,
                            seed: int = BOOTSTRAP_SEED) -> tuple[Optional[float], Optional[float]]:
    """Percentile bootstrap interval of the mean; (None, None) for fewer than two values (no spread to resample).

    Seeded, so the same values always give the same interval (a report regenerated from stored values matches)."""
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise StatsInputError("mean interval: needs at least one value, got none")
    if not np.all(np.isfinite(x)):
        raise StatsInputError("mean interval: every value must be a finite number (found NaN or infinity)")
    c = _check_confidence(confidence)
    if x.size < 2:
        return None, None
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = _sps.bootstrap((x,), np.mean, confidence_level=c, n_resamples=int(n_resamples), method="percentile",
                         random_state=np.random.default_rng(seed), vectorized=True)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def fisher_greater(k1: int, n1: int, k0: int, n0: int) -> float:
    """One-sided Fisher exact p-value for 'rate 1 (k1/n1) is greater than rate 0 (k0/n0)'.

    Used with the recovered (or unlearned) model as 1 and the never-learned control as 0."""
    a, m = _check_counts(k1, n1, "tested rate")
    b, o = _check_counts(k0, n0, "control rate")
    return float(_sps.fisher_exact([[a, m - a], [b, o - b]], alternative="greater").pvalue)


def rate_record(k: int, n: int, convention: str, confidence: float = CONFIDENCE) -> dict:
    """The JSON layout of one rate: count, n, rate, Wilson interval and the scoring convention it was counted by."""
    ki, ni = _check_counts(k, n)
    if not isinstance(convention, str) or not convention.strip():
        raise StatsInputError("a rate needs the name of the convention it was counted by (e.g. 'micro-top1')")
    low, high = wilson_interval(ki, ni, confidence)
    return {"k": ki, "n": ni, "rate": ki / ni, "ci_low": low, "ci_high": high, "confidence": float(confidence),
            "interval": RATE_INTERVAL, "convention": convention.strip()}


def mean_record(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """The JSON layout of one mean (e.g. SSIM to the original): n, mean and its bootstrap interval."""
    low, high = bootstrap_mean_interval(values, confidence)
    x = [float(v) for v in values]
    return {"n": len(x), "mean": float(np.mean(x)), "ci_low": low, "ci_high": high, "confidence": float(confidence),
            "interval": MEAN_INTERVAL}


def paired_difference_record(tested: Sequence[float], control: Sequence[float],
                             confidence: float = CONFIDENCE) -> dict:
    """The mean of the paired differences tested[i] - control[i] (e.g. per LoRA seed) with its bootstrap interval:
    :func:`mean_record` of the differences, plus ``difference`` = "tested - control"."""
    if len(tested) != len(control):
        raise StatsInputError(f"paired difference: {len(tested)} tested values but {len(control)} control values; "
                              f"expected one pair per seed")
    rec = mean_record([float(a) - float(b) for a, b in zip(tested, control)], confidence)
    rec["difference"] = "tested - control"
    return rec


def _pct(confidence: float) -> str:
    p = confidence * 100
    return f"{p:.0f}" if math.isclose(p, round(p)) else f"{p:g}"


def format_rate(rec: dict, digits: int = 3) -> str:
    """'0.375 (12/32; 95% CI 0.229-0.547; micro-top1)' from a rate record."""
    return (f"{rec['rate']:.{digits}f} ({rec['k']}/{rec['n']}; {_pct(rec['confidence'])}% CI "
            f"{rec['ci_low']:.{digits}f}-{rec['ci_high']:.{digits}f}; {rec['convention']})")


def format_mean(rec: dict, digits: int = 3) -> str:
    """'0.500 (n=32; 95% CI 0.47-0.53)' from a mean record (no interval shown for n < 2)."""
    if rec["ci_low"] is None:
        return f"{rec['mean']:.{digits}f} (n={rec['n']}; no interval for n < 2)"
    return (f"{rec['mean']:.{digits}f} (n={rec['n']}; {_pct(rec['confidence'])}% CI "
            f"{rec['ci_low']:.{digits}f}-{rec['ci_high']:.{digits}f})")
