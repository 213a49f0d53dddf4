"""Client-level DP-FedAvg: participant clipping, coordinator noise, sampling, shortfall, adaptive
clipping and the job-parameter contract."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest

from cdp_federated.errors import ConfigError, TrainingError
from cdp_federated.learning.strategy import FedAvg, FedAvgM
from cdp_federated.privacy.accountant import calibrate
from cdp_federated.privacy.dp_fedavg import (
    DPConfig,
    DPFedAvg,
    DPShortfallWarning,
    clip_update,
)
from cdp_federated.privacy.noise import SeededSource


@dataclass
class Result:
    parameters: np.ndarray
    num_examples: int = 100
    metrics: dict = field(default_factory=dict)


def config(**params) -> DPConfig:
    return DPConfig.from_params({"dp_noise_multiplier": 1.0, **params}, rounds=10)


def wrapper(dp: DPConfig, seed="s", **kwargs) -> DPFedAvg:
    return DPFedAvg(FedAvg(), dp, seed=seed, source=SeededSource(seed), **kwargs)


# --- participant side ------------------------------------------------------------------------------


def test_participant_clips_its_delta_and_sends_no_loss() -> None:
    incoming = np.array([1.0, 1.0, 1.0])
    theta = incoming + np.array([3.0, 4.0, 0.0])  # delta of norm 5
    out, metrics = clip_update({"dp_clip": 0.5}, incoming, theta, {"loss": 0.3, "val_count": 9})
    assert np.linalg.norm(out - incoming) == pytest.approx(0.5)
    assert np.allclose((out - incoming) / 0.5, [0.6, 0.8, 0.0])  # direction kept
    assert metrics == {}
    small, _ = clip_update({"dp_clip": 10.0}, incoming, theta, {})
    assert np.array_equal(small, theta)


def test_without_dp_the_update_passes_through() -> None:
    theta = np.array([5.0, -2.0])
    out, metrics = clip_update({"C": 1.0}, np.zeros(2), theta, {"loss": 0.3})
    assert out is theta and metrics == {"loss": 0.3}


def test_adaptive_clipping_reports_only_the_clip_indicator() -> None:
    cfg = {"dp_clip": 1.0, "dp_adaptive_clip": True}
    _, inside = clip_update(cfg, np.zeros(2), np.array([0.6, 0.0]), {"loss": 1.0})
    _, outside = clip_update(cfg, np.zeros(2), np.array([3.0, 0.0]), {"loss": 1.0})
    assert inside == {"dp_unclipped": 1.0} and outside == {"dp_unclipped": 0.0}


# --- coordinator side ------------------------------------------------------------------------------


def test_mean_of_clipped_deltas_uniformly_weighted_by_the_expected_count() -> None:
    strategy = wrapper(config(dp_noise_multiplier=1e-6, dp_clip=1.0))
    start = np.array([0.5, -0.5])
    instructions = strategy.configure_fit(1, start, ["a", "b", "c"])
    assert sorted(instructions) == ["a", "b", "c"]
    assert instructions["a"].config["dp_clip"] == 1.0
    results = {
        "a": Result(start + [0.3, 0.0], num_examples=10),
        "b": Result(start + [0.0, 0.6], num_examples=10_000),  # weight ignored
        "c": Result(start + [30.0, 40.0]),  # skipped clipping: re-clipped to norm 1
    }
    new = strategy.aggregate_fit(1, results, {})
    expected = start + (np.array([0.3, 0.0]) + [0.0, 0.6] + [0.6, 0.8]) / 3
    assert np.allclose(new, expected, atol=1e-5)


def test_noise_on_the_mean_has_std_z_clip_over_expected() -> None:
    dp = config(dp_noise_multiplier=2.0, dp_clip=0.5)
    strategy = wrapper(dp, seed="noise")
    start = np.zeros(20_000)  # one round, many coordinates: an empirical std per coordinate
    strategy.configure_fit(1, start, ["a", "b", "c", "d"])
    new = strategy.aggregate_fit(1, {p: Result(start.copy()) for p in "abcd"}, {})
    assert new.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.02)
    assert strategy.rounds[0].noise_std == pytest.approx(1.0, rel=1e-4)


def test_server_optimiser_runs_on_the_noisy_average() -> None:
    dp = config(dp_noise_multiplier=1e-6, dp_clip=10.0)
    strategy = DPFedAvg(FedAvgM(server_momentum=0.0, server_learning_rate=2.0), dp, seed=1)
    strategy.configure_fit(1, np.zeros(2), ["a"])
    new = strategy.aggregate_fit(1, {"a": Result(np.array([1.0, 0.0]))}, {})
    assert np.allclose(new, [2.0, 0.0], atol=1e-3)  # rate 2 on the pseudo-gradient


def test_fewer_replies_warn_and_keep_the_noise_at_its_calibrated_level() -> None:
    strategy = wrapper(config(dp_clip=1.0), min_fit_participants=2)
    start = np.zeros(3)
    strategy.configure_fit(1, start, ["a", "b", "c"])
    full_std = None
    with pytest.warns(
        DPShortfallWarning, match="2 of 3 sampled participants replied.*calibrated for 3 expected"
    ):
        strategy.aggregate_fit(1, {"a": Result(start), "b": Result(start)}, {"c": "timeout"})
    report = strategy.rounds[0]
    assert (report.sampled, report.replied, report.expected) == (3, 2, 3.0)
    assert report.effective_noise_multiplier == pytest.approx(1.5)
    strategy.configure_fit(2, start, ["a", "b", "c"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a full round does not warn
        strategy.aggregate_fit(2, {p: Result(start) for p in "abc"}, {})
    full_std = strategy.rounds[1].noise_std
    assert report.noise_std == full_std  # never lowered when parties drop


def test_too_few_replies_refuse_the_round() -> None:
    strategy = wrapper(config(), min_fit_participants=3)
    strategy.configure_fit(1, np.zeros(2), ["a", "b", "c"])
    with pytest.raises(TrainingError) as err:
        strategy.aggregate_fit(1, {"a": Result(np.zeros(2))}, {"b": "x", "c": "y"})
    assert "1 of 3 sampled participants replied, needs 3" in str(err.value)


def test_poisson_sampling_at_the_accounted_rate_and_reproducible() -> None:
    names = [f"p{i}" for i in range(2000)]
    a = wrapper(config(fraction_fit=0.25), seed=5)
    b = wrapper(config(fraction_fit=0.25), seed=5)
    sizes = [len(a.configure_fit(r, np.zeros(2), names)) for r in range(1, 6)]
    assert all(abs(s - 500) < 5 * np.sqrt(2000 * 0.25 * 0.75) for s in sizes)
    assert len(set(sizes)) > 1  # Poisson: the count varies
    assert (
        a.configure_fit(3, np.zeros(2), names).keys()
        == b.configure_fit(3, np.zeros(2), names).keys()
    )
    assert a.rounds == [] and a._expected == pytest.approx(500.0)


def test_an_empty_poisson_draw_still_releases_only_noise() -> None:
    strategy = wrapper(config(fraction_fit=0.01))
    names = ["a", "b"]
    round_number = next(r for r in range(1, 1000) if not strategy.sample(r, names))
    strategy.configure_fit(round_number, np.zeros(2), names)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nobody sampled is no shortfall
        new = strategy.aggregate_fit(round_number, {}, {})
    assert new.shape == (2,) and np.all(new != 0)


def test_state_round_trip_keeps_sampling_key_and_clip() -> None:
    strategy = DPFedAvg(FedAvgM(), config(dp_adaptive_clip=True, fraction_fit=0.5), seed=9)
    strategy.configure_fit(1, np.zeros(2), ["a", "b"])
    strategy.inner.velocity = np.array([0.1, 0.2])
    strategy.clip = 0.7
    state = strategy.state_dict()
    other = DPFedAvg(FedAvgM(), config(dp_adaptive_clip=True, fraction_fit=0.5), seed=10)
    other.load_state_dict(state)
    assert other.clip == 0.7 and other.key == strategy.key
    assert np.array_equal(other.inner.velocity, [0.1, 0.2])


@pytest.mark.parametrize(("norm", "grows"), [(10.0, True), (0.01, False)])
def test_adaptive_clip_moves_towards_the_target_quantile(norm: float, grows: bool) -> None:
    dp = config(dp_adaptive_clip=True, dp_clip=1.0, dp_clip_count_stddev=2.0)
    strategy = wrapper(dp, seed=f"adapt-{norm}")
    names = [f"p{i}" for i in range(40)]
    start = np.zeros(2)
    for r in range(1, 16):
        strategy.configure_fit(r, start, names)
        results = {p: Result(np.array([norm, 0.0])) for p in names}
        strategy.aggregate_fit(r, results, {})
    assert (strategy.clip > 3.0) if grows else (strategy.clip < 0.3)


def test_adaptive_clipping_leaves_less_noise_for_the_update() -> None:
    dp = config(dp_adaptive_clip=True, dp_clip_count_stddev=1.0)
    assert dp.update_noise_multiplier(10) == pytest.approx((1.0 - 0.25) ** -0.5)
    with pytest.raises(ConfigError) as err:
        config(dp_adaptive_clip=True, dp_clip_count_stddev=0.4).update_noise_multiplier(10)
    assert err.value.field == "params.dp_clip_count_stddev"


# --- job parameters ----------------------------------------------------------------------------------


def test_target_epsilon_is_calibrated_the_same_way_everywhere() -> None:
    dp = DPConfig.from_params({"dp_epsilon": 3.0, "fraction_fit": 0.5}, rounds=20)
    assert dp.noise_multiplier == calibrate(3.0, 1e-5, 20, 0.5)
    assert dp.spend().epsilon == pytest.approx(3.0, rel=1e-3)
    assert dp.spend().sampling_rate == 0.5


def test_no_dp_params_no_config() -> None:
    assert DPConfig.from_params({"C": 1.0}, rounds=5) is None


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"dp_clip": 1.0}, "params.dp_clip"),
        ({"dp_epsilon": 1.0, "dp_noise_multiplier": 2.0}, "params.dp_noise_multiplier"),
        ({"dp_epsilon": 1.0, "clients_per_round": 2}, "params.clients_per_round"),
        ({"dp_epsilon": 1.0, "patience": 2}, "params.patience"),
        ({"dp_noise_multiplier": -1.0}, "params.dp_noise_multiplier"),
        ({"dp_noise_multiplier": 1.0, "dp_delta": 1.0}, "params.dp_delta"),
        ({"dp_noise_multiplier": 1.0, "dp_accountant": "x"}, "params.dp_accountant"),
        ({"dp_noise_multiplier": 1.0, "dp_adaptive_clip": "yes"}, "params.dp_adaptive_clip"),
    ],
)
def test_inconsistent_dp_params_are_refused(params, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        DPConfig.from_params(params, rounds=5)
    assert err.value.field == field


def test_wrapped_strategy_must_not_sample() -> None:
    from cdp_federated.learning.rounds import ClientSampler

    with pytest.raises(ConfigError):
        DPFedAvg(FedAvg(sampler=ClientSampler(fraction=0.5)), config())
