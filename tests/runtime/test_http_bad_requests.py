"""Bad requests over the live HTTP service: malformed JSON bodies, malformed frames, wrong dtypes
and shapes, oversized arrays, NaN/Inf updates. Each is a 4xx whose JSON body names the field, and
the job is not corrupted: one participant answers every task of a real job with a string of bad
replies before the good one, and the job still ends with exactly the in-process model.
"""

from __future__ import annotations

import json
import struct

import httpx
import numpy as np
import pytest

from cdp_federated.coordinator import run_horizontal
from cdp_federated.federation import InProcessTransport, decode, encode
from cdp_federated.federation.codec import FORMAT_VERSION, MAGIC
from cdp_federated.federation.messages import Failure, Message, StatsIns, StatsRes
from cdp_federated.participant import ParticipantAgent
from cdp_federated.participant.http_client import FRAME_TYPE
from tests.runtime.conftest import start_service
from tests.test_horizontal_run import make_job, make_parties, provider

ROUNDS = 2
FRAME_LIMIT = 256 * 1024
MANUAL = "uk"  # the participant the test drives by hand


# --- hand-made frames (the codec's encoder refuses to make bad ones) ----------------------------


def raw_frame(message: Message, *, fields=None, arrays=None, trailing: bytes = b"") -> bytes:
    """``message`` framed by hand; ``fields`` replace scalars, ``arrays`` replace arrays by name
    with ``(dtype, shape, buffer)``, declared exactly as given (offsets and lengths computed)."""
    header_fields = {name: getattr(message, name) for name in message.SCALARS} | (fields or {})
    specs, buffers, offset = [], [], 0
    for name in message.ARRAYS:
        dtype, shape, raw = _parts(np.asarray(getattr(message, name)))
        if arrays and name in arrays:
            dtype, shape, raw = arrays[name]
        specs.append(
            {"name": name, "dtype": dtype, "shape": shape, "offset": offset, "length": len(raw)}
        )
        buffers.append(raw)
        offset += len(raw)
    header = {
        "type": message.TYPE,
        "version": message.VERSION,
        "fields": header_fields,
        "arrays": specs,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    prefix = struct.pack("<4sHI", MAGIC, FORMAT_VERSION, len(head))
    return b"".join([prefix, head, *buffers, trailing])


def _parts(array: np.ndarray) -> tuple[str, list[int], bytes]:
    """How the codec declares and lays out ``array``: dtype name, shape, little-endian bytes."""
    raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return array.dtype.name, list(array.shape), raw


def with_value(array: np.ndarray, index: int, value: float) -> bytes:
    """``array``'s wire bytes with one element replaced (NaN, Inf...)."""
    out = np.array(array, dtype=array.dtype.newbyteorder("<"))
    out.flat[index] = value
    return out.tobytes()


def bad_replies(good: Message) -> dict[str, tuple[bytes, int, str]]:
    """name -> (body, expected status, the field the error must name) for a task whose good
    reply is ``good`` (its first array is the one spoilt)."""
    name = next(iter(good.ARRAYS))
    array = np.asarray(getattr(good, name))
    dtype, shape, raw = _parts(array)
    field = f"{good.TYPE}.{name}"

    def spoilt(*parts) -> bytes:
        return raw_frame(good, arrays={name: parts})

    longer = np.concatenate([array.ravel(), array.ravel()[:1]])
    scalar = next(iter(good.SCALARS))
    cases = {
        "truncated": (encode(good)[:7], 400, "frame"),
        "garbage": (b"GET / HTTP/1.1\r\n\r\n" * 3, 400, "magic"),
        "trailing_bytes": (raw_frame(good, trailing=b"\0" * 8), 400, "frame"),
        "a_request_type": (encode(StatsIns(job={"x": 1})), 400, "type"),
        "failure_for_another": (encode(Failure("eu-west", "fit", "X", "y")), 400, "failure"),
        "oversized_body": (b"\0" * (FRAME_LIMIT + 1), 413, "body"),
        "complex_dtype": (spoilt("complex128", shape, b"\0" * (16 * array.size)), 400, field),
        "object_dtype": (spoilt("object", shape, raw), 400, field),
        "wrong_shape_longer": (spoilt(dtype, [longer.size], _parts(longer)[2]), 400, field),
        "wrong_shape_2d": (spoilt(dtype, [1, *shape], raw), 400, field),
        "too_many_elements": (spoilt(dtype, [9_000_000], b""), 400, field),
        "length_disagrees": (spoilt(dtype, shape, b"\0" * 3), 400, field),
        "negative_dimension": (spoilt(dtype, [-1], b""), 400, field),
        "scalar_wrong_type": (
            raw_frame(good, fields={scalar: ["x"]}),
            400,
            f"{good.TYPE}.{scalar}",
        ),
    }
    if array.dtype.kind == "f":
        cases["nan_update"] = (spoilt(dtype, shape, with_value(array, 0, np.nan)), 400, field)
        cases["inf_update"] = (spoilt(dtype, shape, with_value(array, -1, -np.inf)), 400, field)
        cases["integer_dtype"] = (spoilt("int64", shape, array.astype("<i8").tobytes()), 400, field)
    else:
        cases["float_dtype"] = (spoilt("float64", shape, array.astype("<f8").tobytes()), 400, field)
    return cases


# --- the service ---------------------------------------------------------------------------------


@pytest.fixture
def live(tmp_path):
    service = start_service(
        f"sqlite:///{tmp_path / 'coordinator.sqlite'}",
        tmp_path / "keys",
        max_frame_bytes=FRAME_LIMIT,
    )
    try:
        yield service
    finally:
        service.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One service for the JSON-body cases (they create nothing): participant a, admin ops."""
    root = tmp_path_factory.mktemp("bad-json")
    service = start_service(f"sqlite:///{root / 'coordinator.sqlite'}", root / "keys")
    try:
        participant, admin = service.client("a"), service.client("ops", role="admin")
        yield service, participant.token.access_token, admin.token.access_token
    finally:
        service.close()


def _post(http: httpx.Client, token: str, task_id: str, body: bytes, media=FRAME_TYPE):
    return http.post(
        f"/v1/participants/{MANUAL}/tasks/{task_id}/result",
        content=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": media},
    )


def _clear(response: httpx.Response, status: int, field: str) -> str | None:
    """Why ``response`` is not the expected clear refusal (None when it is)."""
    if response.status_code != status:
        return f"status {response.status_code}: {response.text[:200]}"
    body = response.json()
    if not (body.get("error") and body.get("message") and body.get("field")):
        return f"unclear body {body}"
    if not str(body["field"]).startswith(field):
        return f"names field {body['field']!r}, expected {field!r} ({body['message']})"
    return None


def test_bad_replies_are_refused_and_the_job_still_gets_the_exact_model(live):
    parties = make_parties()
    expected = run_horizontal(
        make_job(rounds=ROUNDS),
        InProcessTransport(
            {n: ParticipantAgent(n, provider(f)).handle for n, f in parties.items()}
        ),
    )
    for name, frames in parties.items():
        if name != MANUAL:
            live.participant(name, ParticipantAgent(name, provider(frames)).handle)
    manual = live.client(MANUAL)
    agent = ParticipantAgent(MANUAL, provider(parties[MANUAL]))
    admin = live.client("ops", role="admin")
    job = make_job(rounds=ROUNDS).to_dict() | {"job_id": "bad-replies"}
    job_id = admin.submit_job(job, sorted(parties), {"round_deadline_seconds": 60})

    refused: dict[str, int] = {}
    wrong: list[str] = []
    tasks = 0
    with httpx.Client(base_url=live.base_url, timeout=10) as http:
        token = manual.token.access_token
        while admin.job_status(job_id)["status"] not in ("succeeded", "failed"):
            task = manual.poll(MANUAL, wait=1)
            if task is None:
                continue
            tasks += 1
            good = agent.handle(decode(task.frame))
            history = admin.job_status(job_id)["history"]
            for case, (body, status, field) in bad_replies(good).items():
                why = _clear(_post(http, token, task.task_id, body), status, field)
                if why:
                    wrong.append(f"{task.stage}/{case}: {why}")
                refused[case] = refused.get(case, 0) + 1
            json_body = _post(http, token, task.task_id, b'{"parameters": [1]}', "application/json")
            if json_body.status_code != 415:
                wrong.append(f"{task.stage}/json_body: {json_body.status_code}")
            # nothing the bad replies did reached a round: history unchanged, task still open
            assert admin.job_status(job_id)["history"] == history
            ack = _post(http, token, task.task_id, encode(good))
            assert ack.status_code == 200 and ack.json()["duplicate"] is False, ack.text
    assert not wrong, wrong

    status = admin.job_status(job_id, wait=30)
    assert status["status"] == "succeeded", status
    assert [r["participants"] for r in status["history"]] == [sorted(parties)] * ROUNDS
    model = admin.job_model(job_id)
    assert np.array_equal(np.array(model["parameters"]), expected.parameters)
    assert status["metrics"]["auc"] == expected.auc
    # every task (stats, a fit per round, two evaluations) got its string of bad replies
    assert tasks == ROUNDS + 3
    assert refused["wrong_shape_longer"] == refused["too_many_elements"] == tasks
    assert refused["nan_update"] == refused["inf_update"] == 1 + ROUNDS  # float replies


def test_a_reply_of_the_wrong_shape_names_the_field_and_the_expected_shape(live):
    parties = make_parties()
    names = sorted(parties)
    clients = {name: live.client(name) for name in names}
    admin = live.client("ops", role="admin")
    job = make_job(rounds=1).to_dict() | {"job_id": "shapes"}
    admin.submit_job(job, names, {"round_deadline_seconds": 60})
    task = clients[MANUAL].poll(MANUAL, wait=5)
    good = ParticipantAgent(MANUAL, provider(parties[MANUAL])).handle(decode(task.frame))
    assert isinstance(good, StatsRes)
    d = good.sums.shape[0]
    short = StatsRes(good.count, good.sums[:-1], good.scatter[:-1, :-1], good.label_positives)
    with httpx.Client(base_url=live.base_url, timeout=10) as http:
        response = _post(http, clients[MANUAL].token.access_token, task.task_id, encode(short))
    assert response.status_code == 400
    body = response.json()
    assert body["field"] == "stats_res.sums"
    assert f"[{d - 1}]" in body["message"] and f"[{d}]" in body["message"]
    assert "shape" in body["fix"]


BAD_JOB_BODIES = [
    ("not_json", b'{"job": ', 422, "body"),
    ("not_an_object", b"[1, 2, 3]", 422, "body"),
    ("missing_participants", b'{"job": {}}', 422, "participants"),
    ("unknown_top_level_key", b'{"job": {}, "participants": ["a"], "evil": 1}', 422, "evil"),
    ("participants_not_a_list", b'{"job": {}, "participants": "a"}', 422, "participants"),
    ("job_not_an_object", b'{"job": "x", "participants": ["a"]}', 422, "job"),
]


def _job_body(**changes) -> bytes:
    job = make_job(rounds=1).to_dict() | {"job_id": "bad-job"}
    body = {"job": job, "participants": ["a"], "options": {}}
    for path, value in changes.items():
        target = body
        *parents, leaf = path.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return json.dumps(body).encode()


BAD_JOB_VALUES = [
    ("rounds_a_string", _job_body(**{"job.rounds": "ten"}), 400, "job"),
    ("rounds_zero", _job_body(**{"job.rounds": 0}), 400, "job.rounds"),
    ("features_not_a_list", _job_body(**{"job.features": 5}), 400, "job"),
    ("kind_vertical", _job_body(**{"job.kind": "vertical"}), 400, "job.kind"),
    ("job_id_with_a_slash", _job_body(**{"job.job_id": "../etc"}), 400, "job.job_id"),
    ("C_negative", _job_body(**{"job.params": {"C": -1}}), 400, "params.C"),
    ("C_infinite", _job_body(**{"job.params": {"C": 1e400}}), 400, "params.C"),
    ("unknown_option", _job_body(**{"options": {"retries": 3}}), 400, "options"),
    ("deadline_nan", _job_body(**{"options": {"round_deadline_seconds": float("nan")}}), 400, "options.round_deadline_seconds"),
    ("min_participants_too_many", _job_body(**{"options": {"min_participants": 9}}), 400, "options.min_participants"),
    ("unknown_participant", _job_body(participants=["ghost"]), 400, "participants"),
    ("participant_listed_twice", _job_body(participants=["a", "a"]), 400, "participants"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [c[1:] for c in BAD_JOB_BODIES + BAD_JOB_VALUES],
    ids=[c[0] for c in BAD_JOB_BODIES + BAD_JOB_VALUES],
)
def test_bad_job_submissions_are_4xx_naming_the_field_and_create_nothing(
    shared, body, status, field
):
    live, _participant, admin = shared
    with httpx.Client(base_url=live.base_url, timeout=10) as http:
        response = http.post(
            "/v1/jobs",
            content=body,
            headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"},
        )
    assert _clear(response, status, field) is None, _clear(response, status, field)
    assert live.coordinator.state.jobs_with_status("queued", "running", "succeeded", "failed") == []


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("POST", "/v1/enrol", b'{"secret": ', 422, "body"),
        ("POST", "/v1/enrol", b'{"secret": "\xff\xfe"}', 400, "body"),  # not UTF-8
        ("POST", "/v1/enrol", b'{"secret": ""}', 422, "secret"),
        ("POST", "/v1/enrol", b'{"secret": "x", "role": "admin"}', 422, "role"),
        ("POST", "/v1/enrol", json.dumps({"secret": "s" * 300}).encode(), 422, "secret"),
        ("GET", "/v1/jobs/x?wait=soon", None, 422, "query.wait"),
        ("GET", "/v1/jobs/x?wait=-1", None, 422, "query.wait"),
        ("GET", "/v1/participants/a/tasks?wait=nan", None, 422, "query.wait"),
        ("DELETE", "/v1/jobs", None, 405, "method"),
        ("GET", "/v1/no-such-endpoint", None, 404, "path"),
    ],
)
def test_malformed_requests_are_4xx_naming_the_field(shared, method, path, body, status, field):
    live, participant, _admin = shared
    with httpx.Client(base_url=live.base_url, timeout=10) as http:
        response = http.request(
            method,
            path,
            content=body,
            headers={"Authorization": f"Bearer {participant}", "Content-Type": "application/json"},
        )
    assert _clear(response, status, field) is None, _clear(response, status, field)
