"""The coordinator's HTTP API: authentication, authorisation, idempotent results, frame checks."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from cdp_federated.errors import AuthError, ForbiddenError
from cdp_federated.federation import encode
from cdp_federated.federation.messages import Failure, FitRes, StatsIns
from cdp_federated.participant.http_client import FRAME_TYPE
from tests.test_horizontal_run import make_job


@pytest.fixture
def job_with_task(live):
    """Participants a and b enrolled; a job whose first task (statistics) waits for a."""
    a, b = live.client("a"), live.client("b")
    admin = live.client("ops", role="admin")
    job = make_job(rounds=1).to_dict() | {"job_id": "api-job"}
    job_id = admin.submit_job(job, ["a", "b"], {"round_deadline_seconds": 30})
    task = a.poll("a", wait=5)
    assert task is not None
    return live, a, b, admin, job_id, task


def _reply(participant="a") -> bytes:
    return encode(
        Failure(participant=participant, stage="stats", error_type="Test", message="no data")
    )


def test_openapi_and_jwks_are_public(live):
    with httpx.Client(base_url=live.base_url) as http:
        spec = http.get("/openapi.json").json()
        assert "/v1/participants/{participant_id}/tasks" in spec["paths"]
        assert "/v1/jobs" in spec["paths"]
        keys = http.get("/.well-known/jwks.json").json()["keys"]
        assert keys and keys[0]["alg"] == "EdDSA"


def test_no_token_is_401_with_a_bearer_challenge(live):
    with httpx.Client(base_url=live.base_url) as http:
        for method, path in [
            ("GET", "/v1/participants/a/tasks"),
            ("GET", "/v1/jobs/x"),
            ("POST", "/v1/token/refresh"),
        ]:
            response = http.request(method, path)
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["error"] == "AuthError"
        bad = http.get("/v1/jobs/x", headers={"Authorization": "Bearer not.a.token"})
        assert bad.status_code == 401
        assert bad.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_enrolment_secret_is_one_time(live):
    secret = live.coordinator.registry.create("p1", "participant")
    with httpx.Client(base_url=live.base_url) as http:
        first = http.post("/v1/enrol", json={"secret": secret})
        assert first.status_code == 200 and first.json()["participant_id"] == "p1"
        assert http.post("/v1/enrol", json={"secret": secret}).status_code == 401


def test_refresh_gives_a_new_token(live):
    client = live.client("p1")
    old = client.token.access_token
    assert client.refresh().access_token != old
    assert client.poll("p1", wait=0) is None


def test_another_participants_tasks_are_403(job_with_task):
    live, a, b, admin, job_id, task = job_with_task
    with pytest.raises(ForbiddenError):
        b.poll("a", wait=0)
    with pytest.raises(ForbiddenError):  # an admin never acts as a participant
        admin.poll("a", wait=0)


def test_result_for_a_task_not_yours_is_403(job_with_task):
    live, a, b, admin, job_id, task = job_with_task
    with pytest.raises(ForbiddenError):  # b posts to a's queue
        b.submit("a", task.task_id, _reply())
    with pytest.raises(ForbiddenError):  # b posts a's task id under its own name
        b.submit("b", task.task_id, _reply("b"))
    with pytest.raises(ForbiddenError):  # unknown task ids look the same
        a.submit("a", "no-such-task", _reply())


def test_duplicate_result_is_idempotent(job_with_task):
    live, a, b, admin, job_id, task = job_with_task
    first = a.submit("a", task.task_id, _reply())
    again = a.submit("a", task.task_id, _reply())
    assert first["duplicate"] is False and again["duplicate"] is True
    assert again["received_at"] == first["received_at"]
    with httpx.Client(base_url=live.base_url) as http:  # other bytes for the same task: 409
        other = encode(Failure("a", "stats", "Other", "changed"))
        response = http.post(
            f"/v1/participants/a/tasks/{task.task_id}/result",
            content=other,
            headers={"Authorization": f"Bearer {a.token.access_token}", "Content-Type": FRAME_TYPE},
        )
        assert response.status_code == 409


@pytest.mark.parametrize(
    "body,fragment",
    [
        (b"CDP", "truncated"),
        (b"XXXX" + b"\0" * 20, "bad magic"),
        (None, "unknown message type"),  # a request type, not a reply
    ],
)
def test_bad_frames_are_400_with_the_codec_message(job_with_task, body, fragment):
    live, a, b, admin, job_id, task = job_with_task
    if body is None:
        body = encode(StatsIns(job={"x": 1}))
    with httpx.Client(base_url=live.base_url) as http:
        response = http.post(
            f"/v1/participants/a/tasks/{task.task_id}/result",
            content=body,
            headers={"Authorization": f"Bearer {a.token.access_token}", "Content-Type": FRAME_TYPE},
        )
    assert response.status_code == 400
    error = response.json()
    assert error["error"] == "CodecError" and fragment in error["message"]
    assert set(error) >= {"error", "message", "field", "fix"}


def test_wrong_content_type_and_oversized_bodies(job_with_task):
    live, a, b, admin, job_id, task = job_with_task
    headers = {"Authorization": f"Bearer {a.token.access_token}"}
    url = f"/v1/participants/a/tasks/{task.task_id}/result"
    with httpx.Client(base_url=live.base_url) as http:
        wrong = http.post(url, content=_reply(), headers=headers)
        assert wrong.status_code == 415
        big = np.zeros(live.coordinator.config.max_frame_bytes // 8 + 16)
        frame = b"x" * (live.coordinator.config.max_frame_bytes + 1)
        assert big.size  # a frame larger than the limit is refused before it is read
        huge = http.post(url, content=frame, headers={**headers, "Content-Type": FRAME_TYPE})
        assert huge.status_code == 413
        assert http.post("/v1/enrol", content=b"{" + b" " * (2 << 20) + b"}").status_code == 413


def test_job_status_is_scoped_to_the_jobs_participants(job_with_task):
    live, a, b, admin, job_id, task = job_with_task
    outsider = live.client("c")
    assert a.job_status(job_id)["status"] == "running"
    with pytest.raises(ForbiddenError):
        outsider.job_status(job_id)
    with pytest.raises(ForbiddenError):  # participants may not submit jobs
        a.submit_job(make_job(rounds=1).to_dict(), ["a", "b"])
    observer = live.client("watcher", role="observer")
    assert observer.job_status(job_id)["job_id"] == job_id


def test_bad_job_submissions_are_400(live):
    admin = live.client("ops", role="admin")
    live.client("a")
    from cdp_federated.errors import ConfigError

    with pytest.raises(ConfigError, match="enrolled"):
        admin.submit_job(make_job(rounds=1).to_dict(), ["a", "ghost"])
    with pytest.raises(ConfigError, match="horizontal"):
        admin.submit_job(make_job(rounds=1).to_dict() | {"kind": "vertical"}, ["a"])
    with pytest.raises(ConfigError, match="round_deadline_seconds"):
        admin.submit_job(make_job(rounds=1).to_dict(), ["a"], {"round_deadline_seconds": -1})


def test_disabled_participant_is_refused(live):
    client = live.client("p1")
    live.coordinator.registry.disable("p1")
    with pytest.raises(AuthError):
        client.poll("p1", wait=0)


def test_fitres_reply_accepted(job_with_task):
    live, a, b, admin, job_id, task = job_with_task
    ack = a.submit("a", task.task_id, encode(FitRes(np.zeros(3), num_examples=1)))
    assert ack["task_id"] == task.task_id
