"""Small statistics for the study, numpy only (scipy is not a dependency).

mean_std       mean and sample standard deviation (ddof 1) of the runs of one kernel
bootstrap_diff a percentile bootstrap interval for the difference of two kernels' means:
               each resample draws every kernel's seeds with replacement (Efron and
               Tibshirani 1993, ch. 13); an interval that excludes 0 says the kernels differ
               by more than their seed-to-seed spread explains
spearman       Spearman's rank correlation over runs (evaluate.metrics.spearman: numpy
               ranks, ties averaged, as scipy.stats.spearmanr), skipping missing values
"""
from __future__ import annotations

import numpy as np

from explicam.evaluate import metrics

BOOTSTRAP_RESAMPLES = 10000
CONFIDENCE = 0.95


def finite(values) -> np.ndarray:
    a = np.asarray([float(v) for v in values if v is not None], np.float64)
    return a[np.isfinite(a)]


def mean_std(values) -> tuple:
    """(mean, sample std, n) of the finite values; std is NaN for fewer than two."""
    a = finite(values)
    if not len(a):
        return float("nan"), float("nan"), 0
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else float("nan"), len(a)


def bootstrap_diff(a, b, resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
                   seed: int = 0) -> dict:
    """Interval for mean(a) - mean(b), resampling each group's runs with replacement.
    {"diff", "low", "high", "excludes_zero", "n": (len a, len b)}; NaN bounds below 2 runs each."""
    a, b = finite(a), finite(b)
    out = {"diff": float(a.mean() - b.mean()) if len(a) and len(b) else float("nan"),
           "low": float("nan"), "high": float("nan"), "excludes_zero": False, "n": (len(a), len(b))}
    if len(a) < 2 or len(b) < 2:
        return out
    rng = np.random.default_rng(seed)
    ma = a[rng.integers(0, len(a), (resamples, len(a)))].mean(axis=1)
    mb = b[rng.integers(0, len(b), (resamples, len(b)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ma - mb, [tail, 100 - tail])
    out.update(low=float(low), high=float(high), excludes_zero=bool(low > 0 or high < 0))
    return out


def spearman(x, y) -> float:
    """Spearman's rho over the pairs where both are finite; NaN below 3 pairs or a constant side."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        return float("nan")
    return metrics.spearman(x, y)  # average ranks for ties, NaN when a side is constant
