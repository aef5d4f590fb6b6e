"""Intervals for experiment reports: over seeds (Student's t) and over tasks
(a paired bootstrap against a baseline on the same tasks).

Pure functions of numbers; the bootstrap's generator is seeded, so a report
is the same every time it is built from the same artifacts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Two-sided 95% critical values of Student's t for 1..30 degrees of freedom;
# above 30 the normal value 1.96 is used (the difference is under 2%).
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


@dataclass(frozen=True)
class Interval:
    """A mean with a 95% interval; ``lo``/``hi`` are None when it cannot be formed (one value)."""

    mean: float
    lo: float | None
    hi: float | None
    n: int

    def text(self, digits: int = 3) -> str:
        if self.lo is None or self.hi is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def t95(df: int) -> float:
    """The two-sided 95% critical value of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError("a t interval needs at least 2 values")
    return _T95[df - 1] if df <= len(_T95) else 1.96


def seed_interval(values: Sequence[float]) -> Interval:
    """Mean over seeds with a 95% t interval: mean +- t(n-1) * sd / sqrt(n)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, None, None, 1)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t95(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_bootstrap(diffs: Sequence[Sequence[float]], *, resamples: int = 2000, seed: int = 0) -> Interval:
    """95% percentile interval of the mean paired difference (variant - baseline).

    ``diffs[s]`` holds one seed's per-task differences, both models evaluated on
    the same tasks. The statistic is the mean over seeds of each seed's mean
    difference; a resample draws each seed's tasks with replacement (tasks are
    the unit that varies; seeds stay as they are, their spread is the seed
    interval's business)."""
    groups = [np.asarray(d, dtype=np.float64) for d in diffs if len(d)]
    if not groups:
        raise ValueError("no paired differences")
    mean = float(np.mean([g.mean() for g in groups]))
    rng = np.random.default_rng(seed)
    stats = np.zeros(resamples)
    for g in groups:
        idx = rng.integers(0, len(g), size=(resamples, len(g)))
        stats += g[idx].mean(axis=1)
    stats /= len(groups)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return Interval(mean, float(lo), float(hi), sum(len(g) for g in groups))
