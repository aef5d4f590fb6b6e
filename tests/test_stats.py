"""The experiment report's interval math on hand-computed examples."""

from __future__ import annotations

import math

import pytest

from ipr_core.stats import paired_bootstrap, seed_interval, t95


def test_seed_interval_by_hand():
    # mean 2, sd 1, se 1/sqrt(3); t(2 df) = 4.303 -> half-width 2.4843
    iv = seed_interval([1.0, 2.0, 3.0])
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.lo == pytest.approx(2 - 4.303 / math.sqrt(3), abs=1e-9)
    assert iv.hi == pytest.approx(2 + 4.303 / math.sqrt(3), abs=1e-9)
    assert iv.text() == "2.000 [-0.484, 4.484]"
    # two values: sd = 0.5 * sqrt(2) ... (0.2, 0.4): mean 0.3, sd 0.1414, se 0.1, t(1) = 12.706
    two = seed_interval([0.2, 0.4])
    assert (two.lo, two.hi) == (pytest.approx(0.3 - 1.2706), pytest.approx(0.3 + 1.2706))
    one = seed_interval([0.7])
    assert (one.mean, one.lo, one.hi) == (0.7, None, None) and one.text() == "0.700"
    assert seed_interval([0.5] * 4).lo == seed_interval([0.5] * 4).hi == 0.5


def test_t_table_edges():
    assert t95(1) == 12.706 and t95(30) == 2.042 and t95(31) == 1.96
    with pytest.raises(ValueError):
        t95(0)


def test_paired_bootstrap_by_hand():
    # Every difference equal: the interval collapses onto it.
    same = paired_bootstrap([[0.25] * 10, [0.25] * 7], resamples=500)
    assert (same.mean, same.lo, same.hi) == (0.25, 0.25, 0.25) and same.n == 17
    # One seed, tasks {0, 1}: resampled means are 0, .5, 1 with probability
    # 1/4, 1/2, 1/4, so the 2.5th and 97.5th percentiles are 0 and 1.
    two = paired_bootstrap([[0.0, 1.0]], resamples=4000, seed=1)
    assert (two.mean, two.lo, two.hi) == (0.5, 0.0, 1.0)
    # The statistic averages seeds' means (not pooled tasks): seed A +1 on 1 task, seed B 0 on 3 tasks.
    mixed = paired_bootstrap([[1.0], [0.0, 0.0, 0.0]], resamples=200)
    assert mixed.mean == 0.5 and mixed.lo == mixed.hi == 0.5
    # Deterministic for a seed.
    assert paired_bootstrap([[0.1, -0.3, 0.4]], seed=5) == paired_bootstrap([[0.1, -0.3, 0.4]], seed=5)
    with pytest.raises(ValueError):
        paired_bootstrap([[]])
