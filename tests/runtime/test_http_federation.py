"""The same job on the in-process transport and over real HTTP gives the same model; the wire
carries no row or identifier; dropouts and deadlines."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cdp_federated.coordinator import run_horizontal
from cdp_federated.federation import InProcessTransport
from cdp_federated.federation.messages import FitIns, Message, StatsIns
from cdp_federated.participant import ParticipantAgent
from tests.test_horizontal_run import make_job, make_parties, provider

ROUNDS = 4


def _job(**params):
    job = make_job(rounds=ROUNDS, **params).to_dict()
    job["job_id"] = "http-parity"
    return job


def _run_http(live, parties, *, job=None, options=None, recorder=None, handlers=None):
    for name, frames in parties.items():
        handler = (handlers or {}).get(name) or ParticipantAgent(name, provider(frames)).handle
        live.participant(name, handler, recorder=recorder)
    admin = live.client("ops", role="admin")
    job_id = admin.submit_job(job or _job(), sorted(parties), options or {})
    status = admin.job_status(job_id, wait=30)
    return admin, job_id, status


def test_http_and_in_process_give_identical_parameters(live):
    parties = make_parties()
    in_process = run_horizontal(
        make_job(rounds=ROUNDS),
        InProcessTransport(
            {n: ParticipantAgent(n, provider(f)).handle for n, f in parties.items()}
        ),
    )

    started = time.perf_counter()
    admin, job_id, status = _run_http(live, parties)
    seconds = time.perf_counter() - started

    assert status["status"] == "succeeded", status
    assert status["rounds_done"] == ROUNDS
    model = admin.job_model(job_id)
    assert np.array_equal(np.array(model["parameters"]), in_process.parameters)
    assert np.array_equal(np.array(model["mean"]), in_process.mean)
    assert status["metrics"]["auc"] == in_process.auc
    assert [r["participants"] for r in status["history"]] == [sorted(parties)] * ROUNDS
    # the status shows aggregates only: no per-party row counts or parameters
    assert "parameters" not in str(status) and "rows_per_party" not in status
    assert seconds < 20


def test_no_identifier_or_row_on_the_wire(live):
    parties = make_parties()
    bodies: list[tuple[str, str, bytes]] = []
    _, _, status = _run_http(
        live, parties, recorder=lambda d, path, body: bodies.append((d, path, body))
    )
    assert status["status"] == "succeeded"
    assert any(path.endswith("/result") for _, path, _ in bodies)
    wire = b"".join(body for _, _, body in bodies)
    for frames in parties.values():
        for split in ("train", "test"):
            frame = frames[split]
            for pid in frame["profile_id"].to_list()[:200]:
                assert pid.encode() not in wire
            # no raw feature row: a row's float64 bytes never appear in any body
            for row in frame.drop("profile_id").to_numpy()[:50]:
                assert row.astype("<f8").tobytes() not in wire
    assert b"cust_" not in wire


class Silent:
    """Answers statistics, then never answers again (a participant that hangs mid-job)."""

    def __init__(self, agent: ParticipantAgent, hold, stop_after: type[Message] = StatsIns):
        self.agent = agent
        self.hold = hold  # the test's stop event: released at teardown
        self.stop_after = stop_after

    def __call__(self, message: Message) -> Message:
        if isinstance(message, self.stop_after):
            return self.agent.handle(message)
        self.hold.wait(30)  # the coordinator gives up at the deadline
        raise TimeoutError("late")


@pytest.mark.parametrize("minimum,expected", [(2, "succeeded"), (3, "failed")])
def test_silent_participant_is_a_dropout_within_the_deadline(live, minimum, expected):
    parties = make_parties()
    handlers = {"uk": Silent(ParticipantAgent("uk", provider(parties["uk"])), live.stop)}
    deadline = 1.0
    job = make_job(rounds=1).to_dict() | {"job_id": f"dropout-{minimum}"}
    started = time.perf_counter()
    admin, job_id, status = _run_http(
        live,
        parties,
        job=job,
        handlers=handlers,
        options={"min_participants": minimum, "round_deadline_seconds": deadline},
    )
    elapsed = time.perf_counter() - started
    assert status["status"] == expected, status
    if expected == "succeeded":
        assert status["history"][0]["failed"] == ["uk"]
        assert status["history"][0]["participants"] == ["eu-west", "us-east"]
        # the fit round plus two evaluations each wait one deadline for the silent party
        assert elapsed < 3 * deadline + 5
    else:
        assert status["error"]["error"] == "TrainingError"
        assert elapsed < deadline + 5


def test_participant_silent_from_the_start_fails_the_job_at_standardisation(live):
    parties = make_parties()
    handlers = {"uk": Silent(ParticipantAgent("uk", provider(parties["uk"])), live.stop, FitIns)}
    job = make_job(rounds=1).to_dict() | {"job_id": "silent-start"}
    started = time.perf_counter()
    _, _, status = _run_http(
        live, parties, job=job, handlers=handlers, options={"round_deadline_seconds": 1.0}
    )
    assert status["status"] == "failed"
    assert "deadline exceeded" in status["error"]["message"]
    assert time.perf_counter() - started < 1.0 + 5
