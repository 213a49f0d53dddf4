"""FedAvg through secure aggregation (params.secure_aggregation) equals plaintext FedAvg within
fixed-point error, and the coordinator never receives a participant's parameters."""

from __future__ import annotations

import numpy as np
import pytest

from cdp_federated.coordinator import run_horizontal
from cdp_federated.errors import ConfigError, TransportError
from cdp_federated.federation import FitRes, InProcessTransport, decode
from cdp_federated.federation.messages import SecAggIns, SecAggRes
from cdp_federated.learning.strategy import Strategy
from cdp_federated.participant import ParticipantAgent
from cdp_federated.participant.secagg_tasks import (
    SecAggTasks,
    in_process_channels,
    with_secure_aggregation,
)
from cdp_federated.privacy.secagg import SecureAggregationAborted

from ..test_horizontal_run import make_job, make_parties, provider

ROUNDS = 8


@pytest.fixture(scope="module")
def parties():
    return make_parties()


def secagg_transport(parties, *, recorder=None, offline=None):
    channels = in_process_channels(parties)
    handlers = {}
    for name, frames in parties.items():
        agent = ParticipantAgent(name, provider(frames))
        tasks = SecAggTasks(name, agent.handle, channels[name])

        def handle(message, tasks=tasks, name=name):
            if offline and offline(name, message):
                raise TransportError(f"{name} is offline")
            return tasks.handle(message)

        handlers[name] = handle
    return InProcessTransport(handlers, recorder=recorder)


@pytest.fixture(scope="module")
def both(parties):
    plain = run_horizontal(
        make_job(rounds=ROUNDS),
        InProcessTransport(
            {n: ParticipantAgent(n, provider(f)).handle for n, f in parties.items()}
        ),
    )
    frames = []
    handlers = with_secure_aggregation(
        {n: ParticipantAgent(n, provider(f)).handle for n, f in parties.items()}
    )
    secure = run_horizontal(
        make_job(rounds=ROUNDS, secure_aggregation=True),
        InProcessTransport(handlers, recorder=lambda *f: frames.append(f)),
    )
    return plain, secure, frames


def test_secure_fedavg_equals_plain_fedavg(both):
    plain, secure, _ = both
    np.testing.assert_allclose(secure.parameters, plain.parameters, atol=1e-7)
    assert abs(secure.auc - plain.auc) < 1e-3
    for a, b in zip(plain.history, secure.history, strict=True):
        assert a.participants == b.participants and a.num_examples == b.num_examples
        assert b.train_loss == pytest.approx(a.train_loss, abs=1e-7)


def test_the_coordinator_gets_no_parameters_of_any_participant(both):
    _, _, frames = both
    replies = [decode(frame) for direction, _, frame in frames if direction == "reply"]
    assert not any(isinstance(m, FitRes) for m in replies)
    masked = [m for m in replies if isinstance(m, SecAggRes) and m.stage == "mask"]
    assert len(masked) == 3 * ROUNDS and all(m.masked.dtype == np.uint64 for m in masked)
    requests = [decode(frame) for direction, _, frame in frames if direction == "request"]
    assert {m.stage for m in requests if isinstance(m, SecAggIns)} == {
        "advertise",
        "share",
        "mask",
        "unmask",
    }


def test_a_dropout_after_sharing_keys_leaves_the_round_to_the_others(parties):
    def offline(name, message):  # us-east drops at the masked-input stage of round 2
        return (
            name == "us-east"
            and isinstance(message, SecAggIns)
            and message.stage == "mask"
            and "round-2/" in message.session
        )

    job = make_job(rounds=3, secure_aggregation=True, min_fit_participants=2)
    result = run_horizontal(job, secagg_transport(parties, offline=offline))
    second = result.history[1]
    assert second.participants == ("eu-west", "uk")
    assert "SecureAggregationDropout" in second.failures["us-east"]
    assert second.num_examples == sum(parties[n]["train"].height for n in ("eu-west", "uk"))


def test_below_threshold_the_job_stops_cleanly(parties):
    def offline(name, message):
        return name != "uk" and isinstance(message, SecAggIns) and message.stage == "share"

    with pytest.raises(SecureAggregationAborted, match="threshold is 2"):
        run_horizontal(
            make_job(rounds=2, secure_aggregation=True), secagg_transport(parties, offline=offline)
        )


def test_bad_settings_and_unsupported_strategies_are_refused(parties):
    with pytest.raises(ConfigError, match="secure_aggregation"):
        run_horizontal(
            make_job(rounds=1, secure_aggregation={"ring": 32}), secagg_transport(parties)
        )

    class Median(Strategy):  # needs every update on its own: impossible under secagg
        def initialize(self, d):
            return np.zeros(d + 1)

        def configure_fit(self, round_number, parameters, participants):
            raise AssertionError("never reached")

        def aggregate_fit(self, round_number, results, failures):
            raise AssertionError("never reached")

    with pytest.raises(ConfigError, match="cannot feed"):
        run_horizontal(
            make_job(rounds=1, secure_aggregation=True),
            secagg_transport(parties),
            strategy=Median(),
        )


def test_values_over_the_bound_are_refused_on_the_participant(parties):
    job = make_job(rounds=1, secure_aggregation={"bound": 1e-6})
    with pytest.raises(SecureAggregationAborted, match="exceeds the encoder's bound") as info:
        run_horizontal(job, secagg_transport(parties))
    assert sorted(info.value.context["dropped"]) == sorted(parties)


def test_dp_fedavg_composes_with_secure_aggregation(parties):
    """DP-FedAvg sums clipped deltas with uniform weights: fed the secure average once per
    survivor it gets exactly that sum, so only its (tiny, here) noise tells the runs apart."""
    dp = {"dp_noise_multiplier": 1e-4, "dp_clip": 5.0}
    plain = run_horizontal(
        make_job(rounds=3, **dp),
        InProcessTransport(
            {n: ParticipantAgent(n, provider(f)).handle for n, f in parties.items()}
        ),
    )
    secure = run_horizontal(
        make_job(rounds=3, secure_aggregation=True, **dp), secagg_transport(parties)
    )
    np.testing.assert_allclose(secure.parameters, plain.parameters, atol=1e-2)
    assert abs(secure.auc - plain.auc) < 1e-3
