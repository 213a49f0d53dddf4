"""Robust aggregation: median, trimmed mean and norm bounding, checked against hand computations."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pytest

from cdp_federated.coordinator.linear_params import HorizontalParams
from cdp_federated.coordinator.runner import run_horizontal
from cdp_federated.errors import ConfigError, TrainingError
from cdp_federated.federation.messages import FitIns, FitRes
from cdp_federated.federation.transport import InProcessTransport
from cdp_federated.jobs import JobSpec
from cdp_federated.learning.strategy import FedAvg, FedAvgM
from cdp_federated.participant import ParticipantAgent
from cdp_federated.privacy.robust import (
    RobustAggregation,
    RobustSettings,
    clip_update,
    coordinate_median,
    robust_settings,
    trimmed_mean,
)


@dataclass(frozen=True)
class Result:
    parameters: np.ndarray
    num_examples: int
    metrics: dict = field(default_factory=dict)


def test_coordinate_median_by_hand():
    vectors = [np.array([1.0, 10.0]), np.array([2.0, 20.0]), np.array([100.0, -5.0])]
    np.testing.assert_array_equal(coordinate_median(vectors), [2.0, 10.0])
    even = [np.array([1.0]), np.array([4.0]), np.array([2.0]), np.array([3.0])]
    np.testing.assert_array_equal(coordinate_median(even), [2.5])


def test_trimmed_mean_by_hand():
    vectors = [np.array([v, -v]) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    np.testing.assert_allclose(trimmed_mean(vectors, 0.2), [3.0, -3.0])  # drops 1 at each end
    np.testing.assert_allclose(trimmed_mean(vectors, 0.1), [22.0, -22.0])  # floor(0.5) = 0
    ten = [np.array([float(v)]) for v in [-50, 1, 2, 3, 4, 5, 6, 7, 8, 90]]
    np.testing.assert_allclose(trimmed_mean(ten, 0.25), [(2 + 3 + 4 + 5 + 6 + 7) / 6])
    with pytest.raises(TrainingError):
        trimmed_mean([np.zeros(2), np.zeros(3)], 0.1)


def test_clip_update():
    clipped, was = clip_update(np.array([3.0, 4.0]), 1.0)
    np.testing.assert_allclose(clipped, [0.6, 0.8])
    assert was
    same, was = clip_update(np.array([0.3, 0.4]), 1.0)
    np.testing.assert_array_equal(same, [0.3, 0.4])
    assert not was


def _round(strategy, results, global_=None):
    global_ = np.zeros(2) if global_ is None else global_
    strategy.configure_fit(1, global_, sorted(results))
    return strategy.aggregate_fit(1, results, {})


def test_median_wrapper_ignores_sample_weights_and_outliers():
    results = {
        "a": Result(np.array([1.0, 1.0]), 10),
        "b": Result(np.array([2.0, 3.0]), 10),
        "c": Result(np.array([-90.0, 500.0]), 10_000),  # claims many rows, sends garbage
    }
    robust = RobustAggregation(FedAvg(), RobustSettings("median"))
    np.testing.assert_allclose(_round(robust, results), [1.0, 3.0])
    plain = _round(FedAvg(), results)
    assert abs(plain[0]) > 80  # FedAvg follows the heavy outlier


def test_norm_bound_clips_updates_before_averaging():
    global_ = np.array([1.0, 1.0])
    results = {
        "a": Result(global_ + [0.3, 0.4], 1),  # norm 0.5: kept
        "b": Result(global_ + [30.0, 40.0], 1),  # norm 50: scaled to 1 -> [0.6, 0.8]
    }
    robust = RobustAggregation(FedAvg(), RobustSettings(norm_bound=1.0))
    np.testing.assert_allclose(_round(robust, results, global_), global_ + [0.45, 0.6])
    assert robust.last_clipped == ("b",)


def test_trimmed_mean_wrapper_keeps_the_inner_server_optimiser():
    """FedAvgM's momentum applies to the robust aggregate: new = current - lr * (current - agg)
    in the first round (velocity starts at zero)."""
    results = {
        n: Result(np.array([v, v]), 5) for n, v in zip("abcde", [1, 2, 3, 4, 100.0], strict=True)
    }
    inner = FedAvgM(server_learning_rate=0.5, server_momentum=0.9)
    robust = RobustAggregation(inner, RobustSettings("trimmed_mean", trim_fraction=0.2))
    np.testing.assert_allclose(_round(robust, results), [1.5, 1.5])  # 0 - 0.5 * (0 - 3)
    np.testing.assert_allclose(robust.state_dict()["velocity"], [-3.0, -3.0])
    again = RobustAggregation(FedAvgM(server_learning_rate=0.5), RobustSettings("median"))
    again.load_state_dict(robust.state_dict())
    np.testing.assert_allclose(again.inner.velocity, [-3.0, -3.0])


def test_wrapper_refuses_a_round_below_min_fit():
    robust = RobustAggregation(FedAvg(min_fit_participants=3), RobustSettings("median"))
    with pytest.raises(TrainingError):
        _round(robust, {"a": Result(np.ones(2), 1), "b": Result(np.ones(2), 1)})


@pytest.mark.parametrize(
    ("params", "field_name"),
    [
        ({"aggregation": "mode"}, "params.aggregation"),
        ({"aggregation": "trimmed_mean", "trim_fraction": 0.5}, "params.trim_fraction"),
        ({"trim_fraction": 0.1}, "params.trim_fraction"),
        ({"norm_bound": -1}, "params.norm_bound"),
        ({"norm_bound": True}, "params.norm_bound"),
    ],
)
def test_bad_robust_params_name_the_field(params, field_name):
    with pytest.raises(ConfigError) as info:
        robust_settings(params)
    assert info.value.field == field_name


def _job(**params) -> JobSpec:
    return JobSpec(
        job_id="robust",
        kind="horizontal",
        model="logreg",
        purpose="model_training",
        features=("f0", "f1", "f2"),
        label="y",
        rounds=10,
        params=params,
    )


def test_job_params_select_the_wrapper():
    strategy = HorizontalParams.from_job(_job(aggregation="median")).build_strategy(
        min_fit_participants=1
    )
    assert isinstance(strategy, RobustAggregation) and strategy.settings.aggregation == "median"
    plain = HorizontalParams.from_job(_job()).build_strategy(min_fit_participants=1)
    assert isinstance(plain, FedAvg)


def _poisoned_federation(attack: str):
    """Five parties, one of which (20%) flips or scales its update by 10."""
    rng = np.random.default_rng(2)
    handlers = {}
    for i in range(5):
        x = rng.normal(size=(300, 3))
        y = (x @ np.array([1.5, -1.0, 0.5]) + rng.logistic(size=300) > 0).astype(float)
        frame = pl.DataFrame({**{f"f{j}": x[:, j] for j in range(3)}, "y": y})
        agent = ParticipantAgent(f"p{i}", lambda _j, s, f=frame: f if s == "train" else f.head(150))
        honest = i or attack == "none"
        handlers[f"p{i}"] = agent.handle if honest else _attacker(agent.handle, attack)
    return InProcessTransport(handlers)


def _attacker(handle, attack: str):
    factor = -1.0 if attack == "flip" else 10.0

    def poisoned(message):
        reply = handle(message)
        if isinstance(message, FitIns) and isinstance(reply, FitRes):
            update = reply.parameters - message.parameters
            return FitRes(message.parameters + factor * update, reply.num_examples, reply.metrics)
        return reply

    return poisoned


def test_median_resists_a_scaled_update_that_breaks_fedavg():
    clean = run_horizontal(_job(), _poisoned_federation("none"))
    fedavg = run_horizontal(_job(), _poisoned_federation("scale"))
    median = run_horizontal(_job(aggregation="median"), _poisoned_federation("scale"))
    trimmed = run_horizontal(
        _job(aggregation="trimmed_mean", trim_fraction=0.2), _poisoned_federation("scale")
    )
    gap = np.abs(fedavg.parameters - clean.parameters).max()
    assert np.abs(median.parameters - clean.parameters).max() < gap / 3
    assert np.abs(trimmed.parameters - clean.parameters).max() < gap / 3
