"""Discrete Gaussian noise: calibrated spread, exact shape, grid outputs, secure by default."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cdp_federated.errors import ConfigError
from cdp_federated.privacy.noise import (
    DEFAULT_GRID,
    SeededSource,
    discrete_gaussian,
    gaussian_noise,
    noise_std_for,
    uniform,
)


def test_std_within_one_percent_over_a_million_draws() -> None:
    std = 0.37  # in value units; ~6e6 grid steps
    draws = gaussian_noise(np.zeros(1_000_000), std, source=SeededSource("std"))
    assert abs(draws.std() / std - 1.0) < 0.01
    assert abs(draws.mean()) < 5 * std / 1000  # 5 standard errors of the mean


def test_production_draws_have_the_calibrated_std_too() -> None:
    draws = discrete_gaussian(2_000.0, 1_000_000)  # secrets
    assert abs(draws.std() / 2_000.0 - 1.0) < 0.01


def test_small_scale_matches_the_exact_discrete_gaussian_pmf() -> None:
    # Where the discrete and continuous Gaussians differ, the sampler follows the discrete one.
    scale, n = 0.8, 400_000
    draws = discrete_gaussian(scale, n, SeededSource(7))
    ks = np.arange(-8, 9)
    pmf = np.exp(-(ks**2) / (2 * scale**2))
    pmf /= pmf.sum()
    counts = np.array([(draws == k).sum() for k in ks])
    assert counts.sum() == n  # nothing outside +-8 at this scale
    expected = n * pmf
    chi2 = float((((counts - expected) ** 2) / np.maximum(expected, 1e-9))[expected > 5].sum())
    assert chi2 < 45  # 99.9% quantile of chi-square with ~9 degrees of freedom is ~28
    assert abs(draws.var() / float((pmf * ks**2).sum()) - 1.0) < 0.02


def test_outputs_are_grid_points_whatever_the_input() -> None:
    values = np.array([0.1, 1 / 3, -2.718281828, 1e-9])
    out = gaussian_noise(values, 0.01, source=SeededSource(1))
    steps = out / DEFAULT_GRID
    assert np.array_equal(steps, np.round(steps))


def test_seeded_source_is_reproducible_and_the_default_is_not() -> None:
    a = discrete_gaussian(10.0, 50, SeededSource("x"))
    b = discrete_gaussian(10.0, 50, SeededSource("x"))
    c = discrete_gaussian(10.0, 50)
    d = discrete_gaussian(10.0, 50)
    assert np.array_equal(a, b)
    assert not np.array_equal(c, d)


def test_uniform_is_strictly_inside_the_unit_interval() -> None:
    u = uniform(100_000, SeededSource(3))
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005


def test_noise_std_covers_the_grid_rounding() -> None:
    assert noise_std_for(2.0, 1.0, 16, grid=0.01) == pytest.approx(2.0 * (1.0 + 0.01 * 4))
    assert math.isclose(noise_std_for(1.0, 1.0, 1, grid=DEFAULT_GRID), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), 2.0**41])
def test_bad_scale_is_refused(bad: float) -> None:
    with pytest.raises(ConfigError) as err:
        discrete_gaussian(bad, 10)
    assert err.value.field == "scale"
