"""Statistics of timed repetitions: llama-bench's mean and stddev of tok/s, and the spread beyond
them (median, extremes, a Student-t 95 % interval, the CV). The worker computes them; the
collector recomputes them from the samples. Knows no schema beyond Stats.
"""

from __future__ import annotations

import math
import statistics

from farm.contract import Stats

# Coefficient of variation above which a result is flagged noisy (a busy or throttling machine).
NOISY_CV = 0.05

# Two-sided 95 % Student t critical values for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(dof: int) -> float:
    """The 97.5 % quantile of Student's t; beyond the table, the Cornish-Fisher expansion."""
    if dof < 1:
        raise ValueError("a t quantile needs at least one degree of freedom")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def sample_stats(n_tokens: int, samples_ns: list[int], noisy_cv: float = NOISY_CV) -> Stats:
    """Median, extremes, a 95 % confidence interval of the mean (Student t) and the CV of tok/s."""
    rates = [tok_s(n_tokens, ns) for ns in samples_ns]
    mean, std = _mean_stdev(rates)
    if len(rates) < 2:
        return Stats(median_ts=mean, min_ts=mean, max_ts=mean, ci95_low_ts=mean, ci95_high_ts=mean)
    half = t975(len(rates) - 1) * std / math.sqrt(len(rates))
    cv = std / mean
    return Stats(median_ts=statistics.median(rates), min_ts=min(rates), max_ts=max(rates),
                 ci95_low_ts=mean - half, ci95_high_ts=mean + half, cv=cv, noisy=cv > noisy_cv)


def tok_s(n_tokens: int, ns: int) -> float:
    return n_tokens * 1e9 / ns


def summarize(n_tokens: int, samples_ns: list[int]) -> tuple[float, float]:
    """Mean and sample stddev of per-repetition tok/s, as llama-bench's avg_ts / stddev_ts."""
    return _mean_stdev([tok_s(n_tokens, ns) for ns in samples_ns])


def _mean_stdev(rates: list[float]) -> tuple[float, float]:
    # Two-pass float sums: statistics.stdev is exact through Fractions and costs the collector
    # a third of a millisecond per result, for digits far below every tolerance it checks.
    mean = math.fsum(rates) / len(rates)
    if len(rates) < 2:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((r - mean) ** 2 for r in rates) / (len(rates) - 1))


