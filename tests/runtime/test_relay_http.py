"""The relay over the live HTTP service (127.0.0.1, port 0; SQLite and PostgreSQL): participants
exchange sealed messages through the coordinator, which sees neither the plaintext on the wire
nor in its database, cannot open what it stores, and refuses outsiders, spoofed senders,
replayed sequence numbers and oversized envelopes."""

from __future__ import annotations

import base64
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from sqlalchemy import func, select

from cdp_federated.coordinator import schema
from cdp_federated.coordinator.relay import RelayState
from cdp_federated.coordinator.service import Coordinator, ServiceConfig, create_app
from cdp_federated.errors import ConfigError, ConflictError, ProtocolError, TransportError
from cdp_federated.federation import FitRes, encode
from cdp_federated.federation.envelope import (
    RELAY_CODEC,
    RelayKeyPair,
    open_envelope,
    seal,
)
from cdp_federated.federation.relay import RelayChannel, unpack_deliveries
from cdp_federated.participant.http_client import FRAME_TYPE, CoordinatorClient
from cdp_federated.participant.relay import HttpRelayLink, http_relay_channel
from tests.runtime.conftest import LiveService
from tests.test_horizontal_run import make_job

SESSION = "relay-job/secagg/round-1"
JOB, OTHER_JOB = "relay-job", "other-job"
MARKER = 1234.5678125  # exactly representable: its float64 bytes are recognisable
NOTE = "PLAINTEXT-MARKER-vip-segment"
FRAME_LIMIT = 64 * 1024


def message(i: int, size: int = 64) -> FitRes:
    parameters = np.full(size, MARKER)
    parameters[0] = i
    return FitRes(parameters=parameters, num_examples=i, metrics={"note": f"{NOTE}-{i}"})


def needles() -> list[bytes]:
    """What must never reach the coordinator: the marker's bytes, the note, and their base64."""
    raw = np.float64(MARKER).tobytes() * 2
    found = [raw, NOTE.encode()]
    return found + [base64.b64encode(x)[:12] for x in found]


# --- a live service whose every HTTP body is recorded ---------------------------------------------


class WireRecorder:
    """ASGI middleware: every request (query string and body) and response body of the app."""

    def __init__(self, app) -> None:
        self.app = app
        self.bodies: list[tuple[str, str, bytes]] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        self.bodies.append(("query", path, scope.get("query_string", b"")))

        async def receiving():
            msg = await receive()
            if msg["type"] == "http.request":
                self.bodies.append(("in", path, msg.get("body", b"")))
            return msg

        async def sending(msg) -> None:
            if msg["type"] == "http.response.body":
                self.bodies.append(("out", path, msg.get("body", b"")))
            await send(msg)

        await self.app(scope, receiving, sending)


@dataclass
class Relay:
    live: LiveService
    wire: WireRecorder
    keys: dict[str, RelayKeyPair] = field(default_factory=dict)
    clients: dict[str, CoordinatorClient] = field(default_factory=dict)

    def channel(self, name: str, **options) -> RelayChannel:
        return http_relay_channel(self.clients[name], JOB, self.keys[name], **options)

    def http(self, name: str | None = None) -> httpx.Client:
        headers = {}
        if name is not None:
            headers["Authorization"] = f"Bearer {self.clients[name].token.access_token}"
        return httpx.Client(base_url=self.live.base_url, headers=headers, timeout=10)

    def rows(self, table) -> list:
        with self.live.coordinator.store.begin() as conn:
            return conn.execute(select(table)).all()

    def count(self, table) -> int:
        with self.live.coordinator.store.begin() as conn:
            return conn.execute(select(func.count()).select_from(table)).scalar_one()


def start(db_url: str, key_dir, **settings) -> tuple[LiveService, WireRecorder]:
    config = ServiceConfig(db_url=db_url, key_dir=key_dir, recheck_seconds=0.2, **settings)
    coordinator = Coordinator.open(config)
    wire = WireRecorder(create_app(coordinator=coordinator))
    server = uvicorn.Server(
        uvicorn.Config(
            wire, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=2
        )
    )
    thread = threading.Thread(target=server.run, name="coordinator", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the coordinator did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return LiveService(coordinator, f"http://127.0.0.1:{port}", server, thread), wire


def serve_relay(db_url: str, tmp_path):
    """Participants a, b (job ``relay-job``) and c (job ``other-job`` with b), admin ops and
    observer eye; the participants' relay keys published. Frames up to 64 KiB."""
    live, wire = start(db_url, tmp_path / "keys", max_frame_bytes=FRAME_LIMIT)
    try:
        state = live.coordinator.state
        for job_id, members in ((JOB, ["a", "b"]), (OTHER_JOB, ["b", "c"])):
            spec = make_job(rounds=1).__class__(**{**make_job(rounds=1).__dict__, "job_id": job_id})
            state.create_job(spec, members, {}, submitted_by="ops")
        setup = Relay(live, wire)
        for name, role in (("a", "participant"), ("b", "participant"), ("c", "participant")):
            setup.clients[name] = live.client(name, role)
            setup.keys[name] = RelayKeyPair.generate()
        setup.clients["ops"] = live.client("ops", "admin")
        setup.clients["eye"] = live.client("eye", "observer")
        for name in ("a", "b", "c"):
            setup.clients[name].publish_relay_key(name, setup.keys[name].public_bytes())
        yield setup
    finally:
        live.close()


@pytest.fixture
def relay(db_url, tmp_path):
    """On SQLite and PostgreSQL: for what the database decides (uniqueness, deletion)."""
    yield from serve_relay(db_url, tmp_path)


@pytest.fixture
def relay_sqlite(tmp_path):
    """On SQLite only: for checks made before anything reaches the database."""
    yield from serve_relay(f"sqlite:///{tmp_path / 'cdp.sqlite'}", tmp_path)


def sealed(relay: Relay, i: int, *, sender="a", recipient="b", seq=0, keys_of=None, **kw) -> bytes:
    envelope = seal(
        message(i, **kw),
        sender=sender,
        recipient=recipient,
        recipient_public=relay.keys[recipient].public_bytes(),
        sender_keys=relay.keys[keys_of or sender],
        session=SESSION,
        seq=seq,
    )
    return RELAY_CODEC.encode(envelope)


def post(http: httpx.Client, frame: bytes, recipient="b", job=JOB) -> httpx.Response:
    return http.post(
        f"/v1/jobs/{job}/relay/{recipient}", content=frame, headers={"Content-Type": FRAME_TYPE}
    )


# --- round trip and what the coordinator sees ------------------------------------------------------


def test_a_round_trip_never_shows_the_plaintext_to_the_coordinator(relay, tmp_path):
    a, b = relay.channel("a"), relay.channel("b")
    for i in range(3):
        a.send("b", message(i), SESSION)
    got = [b.receive("a", SESSION, timeout=5) for _ in range(3)]
    b.send("a", message(99), SESSION)
    back = a.receive("b", SESSION, timeout=5)

    assert [m.num_examples for m in got] == [0, 1, 2] and back.num_examples == 99
    np.testing.assert_array_equal(got[1].parameters, message(1).parameters)
    assert got[2].metrics == {"note": f"{NOTE}-2"}
    with relay.http("b") as http:
        assert http.get(f"/v1/jobs/{JOB}/relay").status_code == 204  # nothing left to deliver
    rows = relay.rows(schema.relay_envelopes)
    assert len(rows) == 4 and all(r.body is None and r.acked_at is not None for r in rows)
    assert {(r.sender, r.recipient, r.seq) for r in rows} == {
        ("a", "b", 0),
        ("a", "b", 1),
        ("a", "b", 2),
        ("b", "a", 0),
    }

    # the search works: the marker is in the plaintext frame, and in what the recipient opened
    assert all(n in encode(message(0)) for n in needles()[:2])
    posted = [body for kind, path, body in relay.wire.bodies if kind == "in" and "/relay/" in path]
    assert len(posted) == 4 and all(len(body) > 64 * 8 for body in posted)
    for kind, path, body in relay.wire.bodies:
        for needle in needles():
            assert needle not in body, (kind, path)
    with relay.live.coordinator.store.begin() as conn:
        for table in schema.metadata.sorted_tables:
            for row in conn.execute(select(table)):
                for value in row:
                    raw = value if isinstance(value, bytes) else str(value).encode()
                    assert not any(n in raw for n in needles()), table.name
    files = list(tmp_path.glob("*.sqlite*"))  # the database files themselves, WAL included
    assert files or relay.live.coordinator.store.dialect != "sqlite"
    for path in files:
        data = path.read_bytes()
        assert not any(n in data for n in needles()), path.name


def test_the_coordinator_cannot_open_what_it_relays(relay_sqlite):
    relay = relay_sqlite
    frame = sealed(relay, 5)
    with relay.http("a") as http:
        assert post(http, frame).status_code == 200
    (row,) = relay.rows(schema.relay_envelopes)
    envelope = RELAY_CODEC.decode(bytes(row.body))
    directory = relay.clients["b"].relay_keys(JOB)
    opening = dict(
        sender_public=directory,
        expected_sender="a",
        expected_recipient="b",
        session=SESSION,
        expect_seq=0,
    )

    # every private key the coordinator holds (its token signing keys, used as X25519 scalars)
    held = [
        RelayKeyPair(X25519PrivateKey.from_private_bytes(k.private_key.private_bytes_raw()))
        for k in relay.live.coordinator.keyring.keys
    ]
    assert held
    for keys in [*held, RelayKeyPair.generate()]:
        with pytest.raises(ProtocolError, match="failed authentication"):
            open_envelope(envelope, recipient_keys=keys, **opening)
    opened = open_envelope(envelope, recipient_keys=relay.keys["b"], **opening)  # control
    assert opened.num_examples == 5


# --- who may do what -------------------------------------------------------------------------------


def test_only_the_jobs_participants_reach_its_relay(relay_sqlite):
    relay = relay_sqlite
    frame = sealed(relay, 1)
    with relay.http("c") as c, relay.http("a") as a, relay.http("ops") as ops:
        with relay.http("eye") as eye, relay.http() as anonymous:
            # c is not in the job: no keys, no posting, no inbox, no acknowledging
            assert c.get(f"/v1/jobs/{JOB}/relay/keys").status_code == 403
            assert c.get(f"/v1/jobs/{JOB}/relay").status_code == 403
            assert c.delete(f"/v1/jobs/{JOB}/relay", params={"id": 1}).status_code == 403
            assert post(c, sealed(relay, 1, sender="c")).status_code == 403
            # a is not in the other job, and no job is a job nobody is in
            assert post(a, frame, recipient="b", job=OTHER_JOB).status_code == 403
            assert a.get(f"/v1/jobs/{OTHER_JOB}/relay").status_code == 403
            assert a.get("/v1/jobs/no-such-job/relay/keys").status_code == 403
            # admins and observers have no business with the relay; tokens are required
            for other in (ops, eye):
                assert other.get(f"/v1/jobs/{JOB}/relay/keys").status_code == 403
                assert post(other, frame).status_code == 403
            assert anonymous.get(f"/v1/jobs/{JOB}/relay/keys").status_code == 401
            assert post(anonymous, frame).status_code == 401
            # a participant publishes only its own key
            key = base64.urlsafe_b64encode(relay.keys["a"].public_bytes()).rstrip(b"=").decode()
            spoofed = a.put("/v1/participants/b/relay-key", json={"public_key": key})
            assert spoofed.status_code == 403

            keys = a.get(f"/v1/jobs/{JOB}/relay/keys").json()
    assert sorted(keys["keys"]) == ["a", "b"] and keys["missing"] == []
    assert relay.count(schema.relay_envelopes) == 0


def test_spoofed_senders_wrong_recipients_and_outsiders_are_refused(relay_sqlite):
    relay = relay_sqlite
    with relay.http("a") as a:
        spoof = post(a, sealed(relay, 1, sender="b", recipient="a", keys_of="a"), recipient="a")
        assert spoof.status_code == 403 and spoof.json()["field"] == "relay_envelope.sender"
        elsewhere = post(a, sealed(relay, 1), recipient="a")
        assert elsewhere.status_code == 400 and "another participant" in elsewhere.json()["message"]
        outsider = post(a, sealed(relay, 1, recipient="c"), recipient="c")
        assert outsider.status_code == 403 and outsider.json()["field"] == "recipient"
        garbage = post(a, b"CDPF not really")
        assert garbage.status_code == 400
        not_envelope = post(a, encode(message(1)))
        assert not_envelope.status_code == 400 and "unknown message type" in not_envelope.text
        json_body = a.post(f"/v1/jobs/{JOB}/relay/b", json={"x": 1})
        assert json_body.status_code == 415
    assert relay.count(schema.relay_envelopes) == 0


def test_one_participant_never_reads_or_acknowledges_anothers_inbox(relay_sqlite):
    relay = relay_sqlite
    with relay.http("a") as a, relay.http("b") as b:
        ident = post(a, sealed(relay, 1)).json()["id"]
        # a's own inbox is empty; b's envelope id means nothing to a
        assert a.get(f"/v1/jobs/{JOB}/relay", params={"sender": "a"}).status_code == 204
        assert a.delete(f"/v1/jobs/{JOB}/relay", params={"id": ident}).json() == {"acknowledged": 0}
        delivered = unpack_deliveries(b.get(f"/v1/jobs/{JOB}/relay").content)
        assert [d.id for d in delivered] == [ident]
        again = unpack_deliveries(b.get(f"/v1/jobs/{JOB}/relay").content)  # at least once
        assert again == delivered
        assert b.delete(f"/v1/jobs/{JOB}/relay", params={"id": ident}).json() == {"acknowledged": 1}
        assert b.get(f"/v1/jobs/{JOB}/relay").status_code == 204


# --- replays, sizes, lost connections --------------------------------------------------------------


def test_a_replayed_sequence_number_is_409_and_a_repeated_post_idempotent(relay):
    first, other = sealed(relay, 1), sealed(relay, 2)  # both seq 0
    with relay.http("a") as a, relay.http("b") as b:
        ack = post(a, first).json()
        repeat = post(a, first)
        assert repeat.status_code == 200
        assert repeat.json() == ack | {"duplicate": True} and ack["duplicate"] is False
        replay = post(a, other)
        assert replay.status_code == 409 and replay.json()["field"] == "relay_envelope.seq"

        b.delete(f"/v1/jobs/{JOB}/relay", params={"id": ack["id"]})  # delivered and deleted
        assert post(a, other).status_code == 409  # still refused after the frame is gone
        assert post(a, first).json()["duplicate"] is True
        assert post(a, sealed(relay, 3, seq=1)).status_code == 200
    assert relay.count(schema.relay_envelopes) == 2


def test_an_oversized_envelope_is_413_with_a_clear_message(relay_sqlite):
    relay = relay_sqlite
    big = sealed(relay, 1, size=20_000)  # 160 kB of parameters: over 64 KiB + 64 KiB
    with relay.http("a") as a:
        response = post(a, big)
    assert response.status_code == 413
    body = response.json()
    assert body["error"] == "PayloadTooLargeError" and "too large" in body["message"]
    assert str(FRAME_LIMIT + 64 * 1024) in body["fix"]
    with pytest.raises(ConfigError, match="413"):
        relay.channel("a", retries=0).send("b", message(1, size=20_000), SESSION)
    assert relay.count(schema.relay_envelopes) == 0


class DropOnce(httpx.BaseTransport):
    """Lets the first relay POST, inbox GET and acknowledgement DELETE reach the service, then
    loses the answer (as a dropped connection would)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.dropped: Counter[str] = Counter()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        path = request.url.path
        relay_call = path.endswith("/relay") or (request.method == "POST" and "/relay/" in path)
        if relay_call and not self.dropped[request.method]:
            response.read()
            response.close()
            self.dropped[request.method] += 1
            raise httpx.ReadError("connection dropped", request=request)
        return response

    def close(self) -> None:
        self.inner.close()


def test_dropped_connections_are_retried_and_each_message_delivered_once(relay):
    flaky = {name: DropOnce() for name in ("a", "b")}
    clients = {}
    for name in ("a", "b"):
        token = relay.clients[name].token
        clients[name] = CoordinatorClient(relay.live.base_url, token=token, transport=flaky[name])
    try:
        a = RelayChannel(HttpRelayLink(clients["a"], JOB), relay.keys["a"], backoff=0.01)
        b = RelayChannel(HttpRelayLink(clients["b"], JOB), relay.keys["b"], backoff=0.01)
        a.send("b", message(1), SESSION)  # stored, answer lost, posted again: a duplicate
        a.send("b", message(2), SESSION)
        got = [b.receive("a", SESSION, timeout=5).num_examples for _ in range(2)]
        assert got == [1, 2]
        with pytest.raises(TransportError, match="no relay message"):
            b.receive("a", SESSION, timeout=0.3)
    finally:
        for client in clients.values():
            client.close()
    assert flaky["a"].dropped["POST"] == 1
    assert flaky["b"].dropped["GET"] == 1 and flaky["b"].dropped["DELETE"] == 1
    rows = relay.rows(schema.relay_envelopes)
    assert sorted(r.seq for r in rows) == [0, 1]
    assert all(r.body is None for r in rows)  # the lost acknowledgement was sent again


# --- keys, long-polls and the end of a job -----------------------------------------------------------


def test_keys_are_versioned_and_frozen_while_the_job_runs(relay):
    a = relay.clients["a"]
    same = a.publish_relay_key("a", relay.keys["a"].public_bytes())
    assert same["changed"] is False and same["version"] == 1
    with pytest.raises(ConfigError, match="409.*running job"):
        a.publish_relay_key("a", RelayKeyPair.generate().public_bytes())
    with relay.http("a") as http:
        small_order = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
        refused = http.put("/v1/participants/a/relay-key", json={"public_key": small_order})
        assert refused.status_code == 400 and refused.json()["field"] == "public_key"
        malformed = http.put("/v1/participants/a/relay-key", json={"public_key": "abc"})
        assert malformed.status_code == 422

    relay.live.coordinator.state.job_finished(JOB, error={"error": "Test"})
    new = RelayKeyPair.generate()
    changed = a.publish_relay_key("a", new.public_bytes())
    assert changed["changed"] is True and changed["version"] == 2
    versions = {(r.version, r.replaced_at is None) for r in relay.rows(schema.relay_keys)}
    assert {(1, False), (2, True)} <= versions
    assert relay.clients["b"].relay_keys(OTHER_JOB)["b"] == relay.keys["b"].public_bytes()


def test_a_long_poll_wakes_when_an_envelope_arrives(relay_sqlite):
    relay = relay_sqlite
    found = {}

    def wait_for_it() -> None:
        started = time.monotonic()
        found["deliveries"] = relay.clients["b"].relay_inbox(JOB, wait=10)
        found["seconds"] = time.monotonic() - started

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    time.sleep(0.3)
    relay.clients["a"].relay_send(JOB, "b", sealed(relay, 1))
    waiter.join(10)
    assert len(found["deliveries"]) == 1
    assert 0.25 < found["seconds"] < 3


def test_a_finished_job_deletes_its_envelopes_and_closes_its_relay(relay):
    with relay.http("a") as a:
        assert post(a, sealed(relay, 1)).status_code == 200
        assert post(a, sealed(relay, 2, seq=1)).status_code == 200
        relay.live.coordinator.state.job_finished(JOB, result={"metrics": {}})
        assert relay.count(schema.relay_envelopes) == 0
        closed = post(a, sealed(relay, 3, seq=2))
        assert closed.status_code == 409 and "finished" in closed.json()["message"]
    with relay.http("b") as b:
        assert b.get(f"/v1/jobs/{JOB}/relay").status_code == 409
    assert relay.count(schema.relay_envelopes) == 0


def test_a_post_racing_the_end_of_its_job_deletes_what_it_wrote(relay_sqlite, monkeypatch):
    relay = relay_sqlite
    state = RelayState(relay.live.coordinator.store)
    relay.live.coordinator.state.job_finished(JOB, error={"error": "Test"})
    real = RelayState._finished
    calls = []

    def open_at_first(conn, job_id):  # the job finishes between the check and the commit
        calls.append(job_id)
        return False if len(calls) == 1 else real(conn, job_id)

    monkeypatch.setattr(RelayState, "_finished", staticmethod(open_at_first))
    envelope = RELAY_CODEC.decode(sealed(relay, 1))
    with pytest.raises(ConflictError, match="finished"):
        state.post(JOB, envelope, sealed(relay, 1))
    assert len(calls) == 2 and relay.count(schema.relay_envelopes) == 0
