"""DP for GBM histograms: the sensitivity the noise assumes, the noise itself, the accounting,
the refusals, and a DP GBM job end to end."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cdp_federated.coordinator.gbm_runner import run_horizontal_gbm
from cdp_federated.errors import ConfigError, TrainingError
from cdp_federated.federation.transport import InProcessTransport
from cdp_federated.jobs import JobSpec
from cdp_federated.learning.gbm.binning import bin_codes
from cdp_federated.learning.gbm.histograms import LocalBooster
from cdp_federated.privacy.accountant import epsilon
from cdp_federated.privacy.dp_fedavg import job_privacy_spend
from cdp_federated.privacy.dp_gbm import HistogramDP, gbm_histogram_dp
from cdp_federated.privacy.noise import SeededSource
from tests.privacy.test_dp_job import _agents


def _histograms(x, y, edges, margin_seed: int):
    booster = LocalBooster(
        bin_codes(x, edges), y, objective="binary", base_score=0.0, n_bins=8, max_depth=3
    )
    booster.margin[:] = np.random.default_rng(margin_seed).normal(0, 3, size=y.size)
    booster.start_tree(None)
    return booster.histograms(np.zeros(1, dtype=np.int64), np.arange(x.shape[1]))


def test_one_row_moves_a_level_by_at_most_the_assumed_sensitivity() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 5)), (rng.random(300) < 0.4).astype(float)
    edges = [np.quantile(x[:, j], np.linspace(0.1, 0.9, 7)) for j in range(5)]
    for seed in range(20):
        g_all, h_all = _histograms(x, y, edges, seed)  # at a random model (margins)
        booster = LocalBooster(
            bin_codes(x, edges), y, objective="binary", base_score=0.0, n_bins=8, max_depth=3
        )
        booster.margin[:] = np.random.default_rng(seed).normal(0, 3, size=y.size)
        booster.start_tree(None)
        booster.active = np.arange(1, 300)  # the same model without row 0
        g_less, h_less = booster.histograms(np.zeros(1, dtype=np.int64), np.arange(5))
        assert np.linalg.norm(g_all - g_less) <= np.sqrt(5) * 1.0 + 1e-12
        assert np.linalg.norm(h_all - h_less) <= np.sqrt(5) * 0.25 + 1e-12


def test_cell_noise_is_z_sqrt_2d_times_the_bounds() -> None:
    dp = HistogramDP(
        noise_multiplier=1.5, delta=1e-5, releases=2, n_features=8, source=SeededSource("gbm")
    )
    grad, hess = dp.noisy(np.zeros((4, 8, 16_000)), np.full((4, 8, 16_000), 1e6))
    assert grad.std() == pytest.approx(1.5 * np.sqrt(16) * 1.0, rel=0.01)
    assert (hess - 1e6).std() == pytest.approx(1.5 * np.sqrt(16) * 0.25, rel=0.01)
    _, clamped = dp.noisy(np.zeros(1000), np.zeros(1000))
    assert clamped.min() == 0.0 and (clamped > 0).any()  # negative noisy hessians clamped
    with pytest.raises(TrainingError):
        dp.noisy(np.zeros(3), np.zeros(3))  # a third release was never accounted


def gbm_job(rounds=4, **params) -> JobSpec:
    return JobSpec(
        "gbm-dp",
        "horizontal",
        "gbm",
        "model_training",
        ("tenure", "tickets", "monthly_charges"),
        "churn",
        rounds,
        {"max_depth": 3, "max_bins": 16, **params},
    )


def test_accounting_is_trees_times_levels() -> None:
    job = gbm_job(rounds=5, dp_noise_multiplier=3.0)
    spend = job_privacy_spend(job)
    assert spend.rounds == 15 and spend.sampling_rate == 1.0
    assert spend.epsilon == pytest.approx(epsilon(3.0, 15, 1.0, 1e-5))
    target = gbm_histogram_dp(gbm_job(rounds=5, dp_epsilon=2.0))
    assert target.spend().epsilon == pytest.approx(2.0, rel=1e-3)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"dp_epsilon": 1.0, "objective": "regression"}, "params.objective"),
        ({"dp_epsilon": 1.0, "dp_clip": 1.0}, "params.dp_clip"),
        ({"dp_delta": 1e-6}, "params.dp_delta"),
        ({"dp_epsilon": 1.0, "dp_delta": 2.0}, "params.dp_delta"),
    ],
)
def test_dp_the_histograms_cannot_honour_is_refused(params, field) -> None:
    with pytest.raises(ConfigError) as err:
        job_privacy_spend(gbm_job(**params))
    assert err.value.field == field


def test_a_dp_gbm_job_trains_on_noisy_histograms() -> None:
    agents, _ = _agents(3)
    transport = InProcessTransport({n: a.handle for n, a in agents.items()})
    plain = run_horizontal_gbm(gbm_job(seed=1), transport)
    noisy = run_horizontal_gbm(gbm_job(seed=1, dp_noise_multiplier=0.5), transport)
    probe = np.random.default_rng(2).normal([30, 0, 70], [12, 1, 20], size=(50, 3))
    frame = pl.DataFrame(probe, schema=["tenure", "tickets", "monthly_charges"], orient="row")
    noisy_p = noisy.estimator.predict_proba(frame)[:, 1]
    assert not np.allclose(plain.estimator.predict_proba(frame)[:, 1], noisy_p)  # leaves moved
    assert 0.0 <= noisy.evaluations["train"].auc <= 1.0
    assert plain.evaluations["train"].auc > 0.6
