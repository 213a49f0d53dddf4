"""Secure aggregation over the live HTTP service (127.0.0.1, port 0): participants run the client
stage machine behind the task loop, share packets travel sealed through the coordinator's relay,
and the model equals the in-process plaintext FedAvg one within fixed-point error."""

from __future__ import annotations

import numpy as np
import pytest

from cdp_federated.coordinator import run_horizontal
from cdp_federated.federation import InProcessTransport
from cdp_federated.federation.envelope import RelayKeyPair
from cdp_federated.participant import ParticipantAgent
from cdp_federated.participant.relay import http_relay_channel
from cdp_federated.participant.secagg_tasks import SecAggTasks
from tests.runtime.conftest import start_service
from tests.test_horizontal_run import make_job, make_parties, provider

ROUNDS = 2


@pytest.fixture
def live(tmp_path):
    service = start_service(f"sqlite:///{tmp_path / 'coordinator.sqlite'}", tmp_path / "keys")
    try:
        yield service
    finally:
        service.close()


def test_secure_fedavg_over_http_matches_plain_in_process(live):
    parties = make_parties()
    plain = run_horizontal(
        make_job(rounds=ROUNDS),
        InProcessTransport(
            {n: ParticipantAgent(n, provider(f)).handle for n, f in parties.items()}
        ),
    )
    clients, bodies = {}, []
    for name, frames in parties.items():
        keys, channels = RelayKeyPair.generate(), {}

        def channel_for(job_id, name=name, keys=keys, channels=channels):
            if job_id not in channels:
                channels[job_id] = http_relay_channel(clients[name], job_id, keys)
            return channels[job_id]

        tasks = SecAggTasks(name, ParticipantAgent(name, provider(frames)).handle, channel_for)
        clients[name] = live.participant(
            name, tasks.handle, recorder=lambda d, path, body: bodies.append((d, path, body))
        )
    admin = live.client("ops", role="admin")
    job = make_job(rounds=ROUNDS, secure_aggregation=True).to_dict()
    job["job_id"] = "secagg-http"
    job_id = admin.submit_job(job, sorted(parties), {})
    status = admin.job_status(job_id, wait=60)
    assert status["status"] == "succeeded", status
    model = admin.job_model(job_id)
    np.testing.assert_allclose(np.array(model["parameters"]), plain.parameters, atol=1e-7)
    assert abs(status["metrics"]["auc"] - plain.auc) < 1e-3
    assert [r["participants"] for r in status["history"]] == [sorted(parties)] * ROUNDS
    sent = b"\x00".join(body for direction, _, body in bodies if direction == "request")
    assert b'"secagg_res"' in sent and b'"fit_res"' not in sent  # masked inputs, never FitRes
    assert any("/relay/" in path for _, path, _ in bodies)  # the share packets took the relay
