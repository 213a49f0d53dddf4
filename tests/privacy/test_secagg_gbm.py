"""Horizontal GBM over secure aggregation (params.secure_aggregation): the same trees as the
plain run within fixed-point tolerance, no participant's histogram at the coordinator, a
dropout stops the job, and a policy that requires secure aggregation accepts such GBM jobs and
refuses histograms in the clear."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cdp_federated.coordinator.gbm_runner import run_horizontal_gbm
from cdp_federated.errors import ConfigError, PolicyViolation, TrainingError, TransportError
from cdp_federated.federation import InProcessTransport, decode
from cdp_federated.federation.messages import (
    GBMHistogramIns,
    GBMHistogramRes,
    SecAggIns,
    SecAggRes,
)
from cdp_federated.participant import ParticipantAgent
from cdp_federated.participant.secagg_tasks import SecAggTasks, in_process_channels
from cdp_federated.privacy.secagg_gbm import MAX_FRAC_BITS, histograms_from_params
from tests.learning.test_gbm_core import assert_same_trees, heap_trees
from tests.test_horizontal_gbm import LABEL, make_job, make_parties, make_transport


def secure_transport(parties, *, recorder=None, offline=None, **options):
    channels = in_process_channels(parties)
    handlers = {}
    for name, frames in parties.items():
        agent = ParticipantAgent(name, (lambda f: lambda job, split: f[split])(frames))
        tasks = SecAggTasks(name, agent.handle, channels[name], **options)

        def handle(message, tasks=tasks, name=name):
            if offline and offline(name, message):
                raise TransportError(f"{name} is offline")
            return tasks.handle(message)

        handlers[name] = handle
    return InProcessTransport(handlers, recorder=recorder)


@pytest.mark.parametrize("objective", ["binary", "regression"])
def test_secure_gbm_grows_the_plain_runs_trees(objective):
    parties = make_parties(regression=objective == "regression")
    params = {"objective": objective, "subtraction": True}
    plain = run_horizontal_gbm(make_job(**params), make_transport(parties))
    setting = {"gradient_bound": 20.0} if objective == "regression" else True
    frames: list = []
    secure = run_horizontal_gbm(
        make_job(**params, secure_aggregation=setting),
        secure_transport(parties, recorder=lambda *f: frames.append(f)),
    )
    assert_same_trees(heap_trees(secure.ensemble), heap_trees(plain.ensemble))
    x = np.vstack([p["test"].select(make_job().features).to_numpy() for p in parties.values()])
    np.testing.assert_allclose(
        secure.estimator.decision_function(x), plain.estimator.decision_function(x), atol=1e-8
    )
    # on the wire: every histogram request was wrapped; no participant's histograms came back
    requests = [decode(f) for d, _, f in frames if d == "request"]
    replies = [decode(f) for d, _, f in frames if d == "reply"]
    assert not any(isinstance(m, GBMHistogramRes) for m in replies)
    advertised = [m for m in requests if isinstance(m, SecAggIns) and m.stage == "advertise"]
    masked = [m for m in replies if isinstance(m, SecAggRes) and m.stage == "mask"]
    assert advertised and len(masked) == len(advertised)
    assert all(m.masked.dtype == np.uint64 for m in masked)


def test_a_participant_dropping_out_of_a_level_stops_the_job():
    parties = make_parties()

    def offline(name, message):  # uk drops after sharing its keys, at the first level
        return name == "uk" and isinstance(message, SecAggIns) and message.stage == "mask"

    with pytest.raises(TrainingError, match="every participant's histograms"):
        run_horizontal_gbm(
            make_job(secure_aggregation=True), secure_transport(parties, offline=offline)
        )


def test_a_policy_requiring_secure_aggregation_refuses_histograms_in_the_clear():
    parties = make_parties()
    with pytest.raises(PolicyViolation, match="requires secure aggregation"):
        run_horizontal_gbm(make_job(), secure_transport(parties, require_secure=True))
    result = run_horizontal_gbm(
        make_job(secure_aggregation=True), secure_transport(parties, require_secure=True)
    )
    assert result.rounds == 4
    tasks = SecAggTasks("x", lambda m: m, lambda job: None, require_secure=True)
    bare = GBMHistogramIns(
        job={},
        tree=0,
        depth=0,
        seed=1,
        base_score=0.0,
        build_nodes=np.zeros(1, np.int64),
        features=np.arange(4),
    )
    with pytest.raises(PolicyViolation, match="requires secure aggregation"):
        tasks.handle(bare)


def test_the_ring_leaves_room_for_every_cell_and_settings_are_checked():
    secure = histograms_from_params("j", {"secure_aggregation": True}, "binary")
    ring = secure.ring(parties=3, largest_rows=1_000_000)
    # 3 parties x 10^6 rows x |g| <= 1 at 2^frac_bits stays below 2^63
    assert 3 * 1e6 * 2 ** ring["frac_bits"] < 2**63 and ring["frac_bits"] >= 30
    assert secure.ring(parties=3, largest_rows=10)["frac_bits"] == MAX_FRAC_BITS
    with pytest.raises(ConfigError, match="gradient_bound"):
        histograms_from_params("j", {"secure_aggregation": True}, "regression")
    with pytest.raises(ConfigError, match="fractional bits"):
        histograms_from_params(
            "j", {"secure_aggregation": {"gradient_bound": 1e12}}, "regression"
        ).ring(parties=20, largest_rows=10**6)
    with pytest.raises(ConfigError, match="secure_aggregation"):
        histograms_from_params("j", {"secure_aggregation": {"bits": 32}}, "binary")


def test_a_gradient_over_the_bound_is_refused_by_its_participant():
    parties = {  # labels in the thousands: gradients far over the declared bound of 1
        name: {s: f.with_columns(pl.col(LABEL) * 1000.0) for s, f in frames.items()}
        for name, frames in make_parties(regression=True).items()
    }
    job = make_job(objective="regression", secure_aggregation={"gradient_bound": 1.0})
    with pytest.raises(TrainingError, match="exceeds the encoder's bound"):
        run_horizontal_gbm(job, secure_transport(parties))


def test_a_policy_requiring_secure_aggregation_accepts_a_secure_gbm_job(tmp_path):
    from cdp_federated.jobs import JobSpec
    from tests.governance.test_privacy_policy import FEATURES, _governance, _policy

    gov = _governance(tmp_path, _policy(tmp_path, "secure_aggregation: required"))

    def gbm(n: int, **params) -> JobSpec:
        return JobSpec(f"gbm-{n}", "horizontal", "gbm", "model_training", FEATURES, "y", 4, params)

    with pytest.raises(PolicyViolation, match="privacy.secure_aggregation"):
        gov.decide(gbm(1), stage="before_read")
    assert gov.decide(gbm(2, secure_aggregation=True), stage="before_read").allow


@pytest.fixture
def live(tmp_path):
    from tests.runtime.conftest import start_service

    service = start_service(f"sqlite:///{tmp_path / 'coordinator.sqlite'}", tmp_path / "keys")
    try:
        yield service
    finally:
        service.close()


def test_secure_gbm_over_http_grows_the_plain_trees(live):
    from cdp_federated.federation.envelope import RelayKeyPair
    from cdp_federated.participant.relay import http_relay_channel

    parties = make_parties()
    plain = run_horizontal_gbm(make_job(), make_transport(parties))
    clients, bodies = {}, []
    for name, frames in parties.items():
        keys, channels = RelayKeyPair.generate(), {}

        def channel_for(job_id, name=name, keys=keys, channels=channels):
            if job_id not in channels:
                channels[job_id] = http_relay_channel(clients[name], job_id, keys)
            return channels[job_id]

        agent = ParticipantAgent(name, (lambda f: lambda job, split: f[split])(frames))
        tasks = SecAggTasks(name, agent.handle, channel_for, require_secure=True)
        clients[name] = live.participant(
            name, tasks.handle, recorder=lambda d, path, body: bodies.append((d, path, body))
        )
    admin = live.client("ops", role="admin")
    job = make_job(secure_aggregation=True).to_dict()
    job["job_id"] = "secagg-gbm-http"
    job_id = admin.submit_job(job, sorted(parties), {})
    status = admin.job_status(job_id, wait=90)
    assert status["status"] == "succeeded", status
    assert status["metrics"]["auc"] == pytest.approx(plain.auc, abs=1e-9)
    sent = [body for direction, _, body in bodies if direction == "request"]
    assert not any(b'"gbm_histogram_res"' in body[:64] for body in sent)
    assert any(b'"secagg_res"' in body[:64] for body in sent)
