"""FedAvg: configure/aggregate with failures passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from cdp_federated.errors import ConfigError, TrainingError
from cdp_federated.learning.strategy import FedAvg


@dataclass
class Result:
    parameters: np.ndarray
    num_examples: int
    metrics: dict = field(default_factory=dict)


def test_initialize_is_zeros_with_an_intercept():
    np.testing.assert_array_equal(FedAvg().initialize(3), np.zeros(4))


def test_configure_fit_gives_every_participant_a_copy_and_the_config():
    strategy = FedAvg(fit_config={"C": 0.5})
    params = np.ones(3)
    out = strategy.configure_fit(2, params, ["a", "b"])
    assert set(out) == {"a", "b"}
    assert out["a"].config == {"C": 0.5, "round": 2}
    out["a"].parameters[0] = 9.0
    assert params[0] == 1.0 and out["b"].parameters[0] == 1.0


def test_aggregate_fit_weights_by_samples_or_uniformly():
    results = {"a": Result(np.array([0.0, 4.0]), 1), "b": Result(np.array([4.0, 0.0]), 3)}
    np.testing.assert_allclose(FedAvg().aggregate_fit(1, results, {}), [3.0, 1.0])
    uniform = FedAvg(weighting="uniform").aggregate_fit(1, results, {})
    np.testing.assert_allclose(uniform, [2.0, 2.0])


def test_round_holds_with_a_failure_when_enough_results_arrive():
    results = {"a": Result(np.array([1.0]), 2), "b": Result(np.array([3.0]), 2)}
    out = FedAvg(min_fit_participants=2).aggregate_fit(4, results, {"c": "timed out"})
    np.testing.assert_allclose(out, [2.0])


def test_too_few_results_is_a_training_error_naming_the_failures():
    with pytest.raises(TrainingError, match="round 4 got 1 results, needs 2") as info:
        FedAvg(min_fit_participants=2).aggregate_fit(
            4, {"a": Result(np.array([1.0]), 2)}, {"b": RuntimeError("disk full")}
        )
    assert "b: RuntimeError: disk full" in str(info.value)


def test_fit_metrics_are_weighted_by_examples():
    results = {
        "a": Result(np.zeros(1), 1, {"loss": 1.0}),
        "b": Result(np.zeros(1), 3, {"loss": 2.0}),
    }
    assert FedAvg().aggregate_fit_metrics(results) == {"loss": pytest.approx(1.75)}


@pytest.mark.parametrize("kwargs", [{"min_fit_participants": 0}, {"weighting": "median"}])
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        FedAvg(**kwargs)
