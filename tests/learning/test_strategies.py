"""Server optimisers, client sampling and early stopping against hand-computed expectations."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest

from cdp_federated.errors import ConfigError
from cdp_federated.learning.rounds import (
    ClientSampler,
    EarlyStopping,
    validation_fraction,
    validation_mask,
)
from cdp_federated.learning.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    strategy_from_params,
)


@dataclass
class Result:
    parameters: np.ndarray
    num_examples: int
    metrics: dict = field(default_factory=dict)


def one_round(strategy, round_number, current, average):
    """Hand ``current`` out to one party and get ``average`` back."""
    strategy.configure_fit(round_number, np.asarray(current, dtype=float), ["a"])
    return strategy.aggregate_fit(round_number, {"a": Result(np.asarray(average, float), 5)}, {})


def test_fedavgm_momentum_by_hand():
    s = FedAvgM(server_learning_rate=1.0, server_momentum=0.5)
    # g1 = [1, 1] - [0, 2] = [1, -1]; v1 = g1; x1 = [1, 1] - v1 = [0, 2]
    np.testing.assert_allclose(one_round(s, 1, [1.0, 1.0], [0.0, 2.0]), [0.0, 2.0])
    # g2 = [0, 2] - [0, 4] = [0, -2]; v2 = 0.5 [1, -1] + g2 = [0.5, -2.5]; x2 = [-0.5, 4.5]
    np.testing.assert_allclose(one_round(s, 2, [0.0, 2.0], [0.0, 4.0]), [-0.5, 4.5])
    np.testing.assert_allclose(s.state_dict()["velocity"], [0.5, -2.5])


def test_fedavgm_without_momentum_is_fedavg_and_rate_scales_the_step():
    plain = FedAvgM(server_learning_rate=1.0, server_momentum=0.0)
    np.testing.assert_allclose(one_round(plain, 1, [3.0], [1.0]), [1.0])
    half = FedAvgM(server_learning_rate=0.5, server_momentum=0.0)
    np.testing.assert_allclose(one_round(half, 1, [3.0], [1.0]), [2.0])


def test_fedadam_and_fedyogi_first_and_second_round_by_hand():
    kw = {"server_learning_rate": 1.0, "beta1": 0.5, "beta2": 0.5, "tau": 0.1}
    adam, yogi = FedAdam(**kw), FedYogi(**kw)
    # Round 1: delta = 2; m = 1; v starts at tau^2 = 0.01.
    # Adam: v = 0.5 * 0.01 + 0.5 * 4 = 2.005.  Yogi: v = 0.01 + 0.5 * 4 = 2.01 (v < delta^2).
    x_adam = one_round(adam, 1, [0.0], [2.0])
    x_yogi = one_round(yogi, 1, [0.0], [2.0])
    np.testing.assert_allclose(x_adam, [1.0 / (math.sqrt(2.005) + 0.1)])
    np.testing.assert_allclose(x_yogi, [1.0 / (math.sqrt(2.01) + 0.1)])
    # Round 2: delta = 0.1; m = 0.5 * 1 + 0.5 * 0.1 = 0.55.
    # Adam: v = 0.5 * 2.005 + 0.5 * 0.01 = 1.0075. Yogi: v = 2.01 - 0.5 * 0.01 = 2.005 (v > delta^2).
    np.testing.assert_allclose(
        one_round(adam, 2, x_adam, x_adam + 0.1), x_adam + 0.55 / (math.sqrt(1.0075) + 0.1)
    )
    np.testing.assert_allclose(
        one_round(yogi, 2, x_yogi, x_yogi + 0.1), x_yogi + 0.55 / (math.sqrt(2.005) + 0.1)
    )
    np.testing.assert_allclose(adam.state_dict()["v"], [1.0075])
    np.testing.assert_allclose(yogi.state_dict()["m"], [0.55])


def test_fedprox_sends_mu_and_averages_like_fedavg():
    prox = FedProx(mu=0.25, fit_config={"C": 1.0})
    out = prox.configure_fit(3, np.zeros(2), ["b", "a"])
    assert out["a"].config == {"C": 1.0, "proximal_mu": 0.25, "round": 3}
    results = {"a": Result(np.array([0.0, 4.0]), 1), "b": Result(np.array([4.0, 0.0]), 3)}
    np.testing.assert_allclose(prox.aggregate_fit(3, results, {}), [3.0, 1.0])


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAvgM(server_momentum=0.7),
        lambda: FedAdam(server_learning_rate=0.3),
        lambda: FedYogi(server_learning_rate=0.3),
    ],
)
def test_state_dict_resumes_a_strategy_exactly(make):
    trajectory = [([0.0, 1.0], [1.0, 0.5]), ([1.0, 0.5], [1.5, -0.5]), ([1.5, -0.5], [2.0, 0.0])]
    reference = make()
    for i, (cur, avg) in enumerate(trajectory[:2], start=1):
        one_round(reference, i, cur, avg)
    state = reference.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    resumed = make()
    resumed.load_state_dict(state)
    cur, avg = trajectory[2]
    np.testing.assert_array_equal(
        one_round(resumed, 3, cur, avg), one_round(reference, 3, cur, avg)
    )


def test_state_of_another_strategy_is_refused():
    with pytest.raises(ConfigError, match="does not keep"):
        FedAvg().load_state_dict({"velocity": np.zeros(2)})
    with pytest.raises(ConfigError, match="does not keep"):
        FedAdam().load_state_dict({"velocity": np.zeros(2)})
    assert FedAvg().state_dict() == {}


def test_label_standardisation_in_fit_config_is_part_of_the_state():
    s = FedAvg(fit_config={"label_mean": 3.5, "label_scale": 2.0, "C": 1.0})
    assert s.state_dict() == {"label_mean": 3.5, "label_scale": 2.0}
    fresh = FedAvg(fit_config={"C": 1.0})
    fresh.load_state_dict(s.state_dict())
    assert fresh.configure_fit(1, np.zeros(1), ["a"])["a"].config["label_scale"] == 2.0


def test_strategy_from_params_selects_and_validates():
    made = strategy_from_params(
        {"strategy": "fedadam", "beta1": 0.8, "tau": 0.01}, min_fit_participants=2
    )
    assert isinstance(made, FedAdam) and made.beta1 == 0.8 and made.tau == 0.01
    assert made.min_fit_participants == 2
    assert type(strategy_from_params({}, min_fit_participants=1)) is FedAvg
    bad = [
        ({"strategy": "sgd"}, "params.strategy"),
        ({"strategy": "fedavg", "mu": 0.1}, "params.mu"),  # a FedProx parameter
        ({"strategy": "fedprox"}, "params.mu"),  # mu is required
        ({"strategy": "fedadam", "beta1": 1.0}, "params.beta1"),
        ({"strategy": "fedyogi", "tau": 0}, "params.tau"),
        ({"strategy": "fedavgm", "server_momentum": -0.1}, "params.server_momentum"),
        ({"weighting": "median"}, "params.weighting"),
    ]
    for params, field_name in bad:
        with pytest.raises(ConfigError) as info:
            strategy_from_params(params, min_fit_participants=1)
        assert info.value.field == field_name, params


def test_seeded_sampler_is_reproducible_uniformly_sized_and_varies_by_round():
    names = [f"p{i}" for i in range(10)]
    a = ClientSampler(fraction=0.3, seed=7)
    b = ClientSampler(fraction=0.3, seed=7)
    draws = [a.sample(r, names) for r in range(1, 41)]
    assert draws == [b.sample(r, list(reversed(names))) for r in range(1, 41)]
    assert all(len(d) == 3 and d == sorted(d) for d in draws)
    assert len({tuple(d) for d in draws}) > 10  # not the same three every round
    assert set().union(*draws) == set(names)
    assert ClientSampler(fraction=0.3, seed=8).sample(1, names) != draws[0] or (
        ClientSampler(fraction=0.3, seed=8).sample(2, names) != draws[1]
    )
    assert ClientSampler(count=4).size(10) == 4 and ClientSampler(count=40).size(10) == 10


def test_unseeded_samplers_draw_keys_from_secrets_and_checkpoint_them():
    a, b = ClientSampler(count=2), ClientSampler(count=2)
    assert len(a.key) == 32 and a.key != b.key
    b.load_state_dict(a.state_dict())
    names = ["x", "y", "z", "w"]
    assert [a.sample(r, names) for r in range(5)] == [b.sample(r, names) for r in range(5)]


@pytest.mark.parametrize(
    "kwargs", [{}, {"fraction": 0.5, "count": 2}, {"fraction": 0.0}, {"count": 0}]
)
def test_bad_sampling_settings(kwargs):
    with pytest.raises(ConfigError):
        ClientSampler(**kwargs)


def test_early_stopping_by_hand():
    stop = EarlyStopping(patience=2, min_delta=0.1)
    losses = [1.0, 0.8, 0.75, 0.74, 0.5, 0.45, 0.44]
    decisions = []
    for r, loss in enumerate(losses):
        decisions.append(stop.update(r, loss, np.array([float(r)])))
        if r == 3:
            # 0.75 and 0.74 are within min_delta of 0.8: two checks without improvement: stop.
            assert decisions == [False, False, False, True]
            assert stop.best_round == 1 and stop.best_parameters.tolist() == [1.0]
    # Going on anyway: 0.5 improves, then 0.45 and 0.44 do not (by more than 0.1).
    assert decisions[4:] == [False, False, True] and stop.best_round == 4
    restored = EarlyStopping(patience=2, min_delta=0.1)
    restored.load_state_dict(stop.state_dict())
    assert restored.best_round == 4 and restored.waited == stop.waited
    assert EarlyStopping(patience=1).update(0, float("nan"), np.zeros(1))  # NaN never improves


def test_validation_mask_is_keyed_stable_and_order_free():
    ids = np.array([f"cust_{i}" for i in range(20_000)])
    mask = validation_mask(ids, 0.1, b"k" * 32)
    assert abs(mask.mean() - 0.1) < 0.01
    order = np.arange(ids.size)[::-1]
    np.testing.assert_array_equal(validation_mask(ids[order], 0.1, b"k" * 32), mask[order])
    other = validation_mask(ids, 0.1, b"j" * 32)
    assert (other != mask).any()
    assert not validation_mask(ids, 0.0, b"k" * 32).any()


def test_validation_fraction_defaults_and_checks():
    assert validation_fraction({}) == 0.0
    assert validation_fraction({"patience": 3}) == 0.1
    assert validation_fraction({"patience": 3, "validation_fraction": 0.2}) == 0.2
    for params in ({"validation_fraction": 1.0}, {"patience": 2, "validation_fraction": 0}):
        with pytest.raises(ConfigError):
            validation_fraction(params)
