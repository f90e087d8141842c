"""Statistics of experiments: Student's t-test between two sets of per-seed figures, and the smallest difference
it can detect. scipy is imported only when a test is computed (``pip install 'kdkit[report]'``)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kdkit.errors import KdkitError

REPORT_EXTRA = "pip install 'kdkit[report]'"


# --------------------------------------------------------------------------- optional dependencies
def require_scipy_stats() -> Any:
    try:
        from scipy import stats
    except ImportError:
        raise KdkitError(f"this command computes t-tests with scipy, which is not installed: {REPORT_EXTRA}") from None
    return stats



# --------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class TTest:
    """Result of a two-sided two-sample t-test of ``a`` against ``b``."""

    diff: float  # mean(a) - mean(b)
    t: float | None
    df: int
    p: float | None  # None when a side has fewer than two values


def t_test(a: Sequence[float], b: Sequence[float]) -> TTest:
    """Student's two-sample t-test with pooled variance (``scipy.stats.ttest_ind(equal_var=True)``), two-sided.

    With fewer than two values on a side there is no variance to pool: ``t`` and ``p`` are None. When both
    sides have no spread at all, ``p`` is 1 for equal means and 0 otherwise (scipy returns NaN there).
    """
    diff = statistics.fmean(a) - statistics.fmean(b)
    df = len(a) + len(b) - 2
    if len(a) < 2 or len(b) < 2:
        return TTest(diff, None, df, None)
    if statistics.variance(a) == 0 and statistics.variance(b) == 0:
        return TTest(diff, math.copysign(math.inf, diff) if diff else 0.0, df, 0.0 if diff else 1.0)
    stats = require_scipy_stats()
    res = stats.ttest_ind(list(a), list(b), equal_var=True)
    return TTest(diff, float(res.statistic), df, float(res.pvalue))


def smallest_detectable(pooled_std: float, n: int, alpha: float = 0.05) -> float | None:
    """The difference of two means of ``n`` values each that reaches ``p < alpha`` (two-sided Student t) when both
    have standard deviation ``pooled_std``: ``t_{1-alpha/2, 2n-2} * s * sqrt(2 / n)``."""
    if n < 2:
        return None
    stats = require_scipy_stats()
    return float(stats.t.ppf(1 - alpha / 2, 2 * n - 2)) * pooled_std * math.sqrt(2 / n)
