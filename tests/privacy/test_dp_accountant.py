"""The accountant against dp-accounting's published values and independent closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from scipy.optimize import brentq
from scipy.stats import norm

from cdp_federated.errors import ConfigError
from cdp_federated.privacy.accountant import RDP_ORDERS, calibrate, dp_event_of, epsilon


def test_poisson_subsampled_gaussian_rdp_matches_dp_accountings_published_values() -> None:
    # rdp_privacy_accountant_test.test_compute_rdp_poisson_sampled_gaussian
    orders = [1.5, 2.5, 5, 50, 100, np.inf]
    accountant = rdp_privacy_accountant.RdpAccountant(orders=orders)
    accountant.compose(dp_event_of(2.5, 50, 0.01))
    published = [6.70579741e-04, 1.08548710e-03, 2.18075656e-03, 2.38460375e-02, 1.67416308e02]
    assert np.allclose(accountant._rdp[:5], published, rtol=1e-4)
    assert accountant._rdp[5] == np.inf


@pytest.mark.parametrize(
    ("noise", "rounds", "rate", "delta"),
    [
        (math.sqrt(3), 3, 1.0, 0.126936),  # pld_privacy_accountant_test.test_gaussian_basic
        pytest.param(  # ...test_self_composed_subsampled_gaussian (~2 s of PLD convolutions)
            0.5, 3, 0.2, 0.15594, marks=pytest.mark.slow
        ),
    ],
)
def test_pld_epsilon_matches_dp_accountings_published_values(noise, rounds, rate, delta) -> None:
    assert epsilon(noise, rounds, rate, delta, accountant="pld") == pytest.approx(1.0, abs=1e-3)


def _closed_form_rdp_epsilon(z: float, rounds: int, delta: float) -> float:
    """R rounds of the Gaussian mechanism: RDP R*alpha/(2 z^2) at order alpha, converted with
    Balle et al. 2020 (Prop. 12), minimised over the accountant's orders."""
    best = math.inf
    for alpha in RDP_ORDERS:
        rdp = rounds * alpha / (2 * z**2)
        eps = rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps)
    return max(best, 0.0)


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 1), (2.0, 20), (6.7, 20), (18.0, 100)])
def test_full_participation_rdp_is_the_closed_form(z: float, rounds: int) -> None:
    accountant = rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS))
    accountant.compose(dp_event_of(z, rounds, 1.0))
    closed = np.array([rounds * a / (2 * z**2) for a in RDP_ORDERS])
    assert np.allclose(accountant._rdp, closed, rtol=1e-12)
    ours = epsilon(z, rounds, 1.0, 1e-5, accountant="rdp")
    assert ours == pytest.approx(_closed_form_rdp_epsilon(z, rounds, 1e-5), rel=1e-9)


def _analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity/std ratio mu (Balle & Wang 2018):
    delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""

    def gap(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(gap, 0.0, 100.0)


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 4), (6.7, 20)])
def test_full_participation_pld_is_the_exact_gaussian(z: float, rounds: int) -> None:
    # R compositions of a Gaussian with multiplier z are one Gaussian with multiplier z/sqrt(R).
    exact = _analytic_gaussian_epsilon(math.sqrt(rounds) / z, 1e-5)
    assert epsilon(z, rounds, 1.0, 1e-5, accountant="pld") == pytest.approx(exact, rel=5e-3)
    assert epsilon(z, rounds, 1.0, 1e-5, accountant="rdp") >= exact  # RDP is an upper bound


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibrate_reaches_the_target(target: float) -> None:
    z = calibrate(target, 1e-5, 20, 1.0)
    assert epsilon(z, 20, 1.0, 1e-5) == pytest.approx(target, rel=1e-3)
    assert epsilon(z * 0.98, 20, 1.0, 1e-5) > target  # not more noise than needed


def test_calibrated_noise_follows_rounds_and_sampling() -> None:
    base = calibrate(3.0, 1e-5, 20, 1.0)
    assert calibrate(3.0, 1e-5, 80, 1.0) > base
    assert calibrate(3.0, 1e-5, 20, 0.3) < base


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((0.0, 10, 1.0, 1e-5), "params.dp_noise_multiplier"),
        ((1.0, 0, 1.0, 1e-5), "rounds"),
        ((1.0, 10, 1.5, 1e-5), "params.fraction_fit"),
        ((1.0, 10, 1.0, 0.0), "params.dp_delta"),
    ],
)
def test_bad_parameters_are_refused(args, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        epsilon(*args)
    assert err.value.field == field


def test_unknown_accountant_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        epsilon(1.0, 1, 1.0, 1e-5, accountant="moments")
    assert err.value.field == "params.dp_accountant"
