"""Local, example-level DP-SGD: the exact step without noise, bounded per-row influence, the
calibrated noise, the accounting and the job wiring."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cdp_federated.coordinator.linear_params import HorizontalParams
from cdp_federated.coordinator.runner import run_horizontal
from cdp_federated.errors import ConfigError
from cdp_federated.federation.transport import InProcessTransport
from cdp_federated.jobs import JobSpec
from cdp_federated.learning import linear
from cdp_federated.learning.strategy import FedAvg
from cdp_federated.privacy.accountant import epsilon
from cdp_federated.privacy.dp_fedavg import DPConfig, job_privacy_spend
from cdp_federated.privacy.dp_local import dp_sgd_fit, local_fit_for
from cdp_federated.privacy.noise import SeededSource
from tests.privacy.test_dp_job import _agents


def data(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 3.0, size=(n, 3))
    y = (rng.random(n) < 1 / (1 + np.exp(-(x @ [0.5, -0.3, 0.2] - 1)))).astype(float)
    return x, y, x.mean(0), x.std(0)


PEN = linear.Penalty(l2=0.01)


def test_without_noise_or_clipping_it_is_the_full_batch_step() -> None:
    x, y, mean, scale = data()
    theta = np.array([0.1, -0.2, 0.3, 0.05])
    precond = np.diag([2.0, 1.5, 1.0, 3.0])
    kwargs = dict(objective="binary", penalty=PEN, steps=3, learning_rate=0.5, precond=precond)
    exact, _ = linear.local_fit(theta, x, y, mean, scale, **kwargs)
    dp, loss = dp_sgd_fit(
        theta, x, y, mean, scale, clip=1e6, noise_multiplier=1e-12, sampling_rate=1.0, **kwargs
    )
    assert np.allclose(dp, exact, atol=1e-6)
    assert math.isnan(loss)  # the exact local loss is not released


def test_one_row_moves_the_step_by_at_most_twice_the_clip() -> None:
    x, y, mean, scale = data(200)
    outlier = x.copy()
    outlier[0] = [1e6, -1e6, 1e6]
    theta = np.zeros(4)
    kwargs = dict(
        objective="binary",
        penalty=linear.Penalty(l2=0.0),
        steps=1,
        learning_rate=1.0,
        clip=0.3,
        noise_multiplier=1e-12,
        sampling_rate=1.0,
    )
    a, _ = dp_sgd_fit(theta, x, y, mean, scale, **kwargs)
    b, _ = dp_sgd_fit(theta, outlier, y, mean, scale, **kwargs)
    assert np.linalg.norm(a - b) <= 2 * 0.3 / 200 + 1e-9


def test_noise_on_the_step_is_z_clip_over_the_expected_batch() -> None:
    x, y, mean, scale = data(100)
    z, clip, n = 2.0, 0.5, 100
    runs = np.array(
        [
            dp_sgd_fit(
                np.zeros(4),
                x,
                y,
                mean,
                scale,
                objective="binary",
                penalty=PEN,
                steps=1,
                learning_rate=1.0,
                clip=clip,
                noise_multiplier=z,
                sampling_rate=1.0,
                source=SeededSource(i),
            )[0]
            for i in range(3000)
        ]
    )
    assert runs.std(axis=0) == pytest.approx(np.full(4, z * clip / n), rel=0.05)


def test_accounting_counts_every_local_step_of_every_round() -> None:
    params = {"dp_local": True, "dp_noise_multiplier": 1.2, "dp_batch_fraction": 0.05}
    params["local_steps"] = 4
    dp = DPConfig.from_params(params, rounds=10)
    assert dp.local and dp.rounds == 40 and dp.sampling_rate == 0.05
    spend = job_privacy_spend(JobSpec("j", "horizontal", "logreg", "p", ("a",), "y", 10, params))
    assert spend.epsilon == pytest.approx(epsilon(1.2, 40, 0.05, 1e-5))


def test_local_fit_is_plain_without_dp_local() -> None:
    assert local_fit_for({"dp_epsilon": 1.0}, 5) is linear.local_fit
    assert local_fit_for({}, 5) is linear.local_fit
    with pytest.raises(ConfigError):
        local_fit_for({"dp_local": True}, 5)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (
            {"dp_local": True, "dp_epsilon": 1.0, "dp_adaptive_clip": True},
            "params.dp_adaptive_clip",
        ),
        ({"dp_local": "yes", "dp_epsilon": 1.0}, "params.dp_local"),
        ({"dp_epsilon": 1.0, "dp_batch_fraction": 0.1}, "params.dp_batch_fraction"),
        (
            {"dp_local": True, "dp_epsilon": 1.0, "dp_batch_fraction": 0.0},
            "params.dp_batch_fraction",
        ),
    ],
)
def test_inconsistent_local_params_are_refused(params, field) -> None:
    with pytest.raises(ConfigError) as err:
        DPConfig.from_params(params, rounds=3)
    assert err.value.field == field


def test_l1_is_refused() -> None:
    x, y, mean, scale = data(50)
    with pytest.raises(ConfigError):
        dp_sgd_fit(
            np.zeros(4),
            x,
            y,
            mean,
            scale,
            objective="binary",
            penalty=linear.Penalty(0.1, 0.1),
            steps=1,
            learning_rate=1.0,
            clip=1.0,
            noise_multiplier=1.0,
            sampling_rate=0.5,
        )


def test_a_local_dp_job_trains_without_a_central_wrapper() -> None:
    agents, features = _agents(3)
    params = {"dp_local": True, "dp_epsilon": 3.0, "dp_batch_fraction": 0.2}
    job = JobSpec(
        "dp-local", "horizontal", "logreg", "model_training", features, "churn", 5, params
    )
    strategy = HorizontalParams.from_job(job).build_strategy(min_fit_participants=3)
    assert type(strategy) is FedAvg  # the noise is the participants' own
    result = run_horizontal(job, InProcessTransport({n: a.handle for n, a in agents.items()}))
    assert all(math.isnan(r.train_loss) for r in result.history)  # no loss left a participant
    assert result.evaluations["train"].auc > 0.55  # the parties have no test rows here
