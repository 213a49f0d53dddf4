"""The JWT tamper matrix against the live HTTP service: every forged, stale or replayed token is a
401 on every protected endpoint, and the coordinator's tables are identical before and after.

tests/coordinator/test_auth.py checks the same forgeries against the verifier alone; here they go
over loopback HTTP to each endpoint, each forged from a token that would be accepted for that
endpoint's role (the control at the end proves it), and each a one-time token, so a verifier that
consulted the replay cache before rejecting would visibly write to the database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import select

from cdp_federated.coordinator import schema
from cdp_federated.coordinator.auth import issue_token, kid_of
from cdp_federated.federation import encode
from cdp_federated.federation.messages import Failure
from cdp_federated.participant.http_client import FRAME_TYPE
from tests.runtime.conftest import LiveService, start_service
from tests.test_horizontal_run import make_job

JOB = "auth-job"
ATTACKER = Ed25519PrivateKey.generate()


# --- forging tokens ------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def segment(obj: object) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


DROP = object()


@dataclass(frozen=True)
class Forge:
    """Forges tokens for the live service's issuer, audience and current key."""

    live: LiveService

    @property
    def ring(self):
        return self.live.coordinator.keyring

    def claims(self, sub: str, role: str, *, at: float | None = None, **changes) -> dict:
        now = int(time.time() if at is None else at)
        config = self.live.coordinator.config
        claims = {
            "iss": config.issuer,
            "aud": config.audience,
            "sub": sub,
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "jti": secrets.token_urlsafe(16),
            "role": role,
            "one_time": True,
        }
        for name, value in changes.items():
            if value is DROP:
                claims.pop(name)
            else:
                claims[name] = value
        return claims

    def sign(self, header: dict, claims: dict, key: Ed25519PrivateKey | None = None) -> str:
        signing_input = f"{segment(header)}.{segment(claims)}"
        signer = key or self.ring.current.private_key
        return f"{signing_input}.{b64(signer.sign(signing_input.encode()))}"

    def token(self, sub: str, role: str, *, header=None, key=None, at=None, **changes) -> str:
        head = {"alg": "EdDSA", "kid": self.ring.current.kid, "typ": "JWT"}
        for name, value in (header or {}).items():
            if value is DROP:
                head.pop(name)
            else:
                head[name] = value
        return self.sign(head, self.claims(sub, role, at=at, **changes), key)

    def hs256(self, sub: str, role: str, secret: bytes) -> str:
        """HS256 keyed with the coordinator's public key: the algorithm-confusion forgery."""
        head = {"alg": "HS256", "kid": self.ring.current.kid, "typ": "JWT"}
        signing_input = f"{segment(head)}.{segment(self.claims(sub, role))}"
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(mac)}"

    def public(self, encoding: Encoding, fmt: PublicFormat) -> bytes:
        return self.ring.current.public_key.public_bytes(encoding, fmt)


def flip_bit(token: str, part: int, byte: int, bit: int = 0) -> str:
    parts = token.split(".")
    raw = bytearray(unb64(parts[part]))
    raw[byte] ^= 1 << bit
    parts[part] = b64(bytes(raw))
    return ".".join(parts)


def swap_in_payload(token: str, old: bytes, new: bytes) -> str:
    head, payload, signature = token.split(".")
    raw = unb64(payload)
    assert old in raw
    return f"{head}.{b64(raw.replace(old, new))}.{signature}"


PEM = (Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
RAW = (Encoding.Raw, PublicFormat.Raw)
HOUR = 3600

# case -> forge(forge, sub, role): a token that differs from an accepted one by its tamper only
TAMPERS: dict[str, Callable[[Forge, str, str], str]] = {
    "alg_none": lambda f, s, r: (
        f"{segment({'alg': 'none', 'kid': f.ring.current.kid})}.{segment(f.claims(s, r))}."
    ),
    "hs256_with_public_pem": lambda f, s, r: f.hs256(s, r, f.public(*PEM)),
    "hs256_with_raw_public_key": lambda f, s, r: f.hs256(s, r, f.public(*RAW)),
    "wrong_kid": lambda f, s, r: f.token(s, r, header={"kid": "AAAAAAAAAAA"}),
    "attacker_key_own_kid": lambda f, s, r: f.token(
        s, r, key=ATTACKER, header={"kid": kid_of(ATTACKER.public_key())}
    ),
    "attacker_key_our_kid": lambda f, s, r: f.token(s, r, key=ATTACKER),
    "expired": lambda f, s, r: f.token(s, r, at=time.time() - 2 * HOUR),
    "future_nbf": lambda f, s, r: f.token(s, r, nbf=int(time.time()) + 600),
    "wrong_aud": lambda f, s, r: f.token(s, r, aud="cdp-federated-staging"),
    "issuer_prefix": lambda f, s, r: f.token(s, r, iss="cdp-federated"),
    "issuer_substring": lambda f, s, r: f.token(s, r, iss="federated-coordinator"),
    "issuer_extended": lambda f, s, r: f.token(s, r, iss="cdp-federated-coordinator.evil"),
    "missing_exp": lambda f, s, r: f.token(s, r, exp=DROP),
    "unknown_crit": lambda f, s, r: f.token(s, r, header={"crit": ["exp"], "exp": 1}),
    "flipped_signature_bit": lambda f, s, r: flip_bit(f.token(s, r), 2, 10),
    "flipped_payload_bit": lambda f, s, r: flip_bit(f.token(s, r), 1, 20),
    "payload_role_escalated": lambda f, s, r: swap_in_payload(
        f.token(s, "observer"), b'"observer"', f'"{r}"'.encode()
    ),
}


# --- the service and its endpoints --------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A protected endpoint, called as ``sub`` with ``role`` (the role it would accept)."""

    name: str
    method: str
    path: str
    sub: str
    role: str
    json: dict | None = None
    frame: bytes | None = None

    def call(self, http: httpx.Client, token: str | None) -> httpx.Response:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        if self.frame is not None:
            headers["Content-Type"] = FRAME_TYPE
        return http.request(
            self.method, self.path, headers=headers, json=self.json, content=self.frame
        )


def endpoints(task_id: str) -> list[Endpoint]:
    job = make_job(rounds=1).to_dict() | {"job_id": "auth-job-2"}
    reply = encode(Failure("a", "stats", "Test", "no data"))
    return [
        Endpoint("refresh", "POST", "/v1/token/refresh", "a", "participant"),
        Endpoint(
            "submit_job",
            "POST",
            "/v1/jobs",
            "ops",
            "admin",
            json={"job": job, "participants": ["a", "b"], "options": {}},
        ),
        Endpoint("job_status", "GET", f"/v1/jobs/{JOB}", "a", "participant"),
        Endpoint("job_model", "GET", f"/v1/jobs/{JOB}/model", "a", "participant"),
        Endpoint("poll_task", "GET", "/v1/participants/a/tasks?wait=0", "a", "participant"),
        Endpoint(
            "submit_result",
            "POST",
            f"/v1/participants/a/tasks/{task_id}/result",
            "a",
            "participant",
            frame=reply,
        ),
    ]


def snapshot(live: LiveService) -> dict[str, list[tuple]]:
    """Every row of every coordinator table."""
    with live.coordinator.store.begin() as conn:
        return {
            table.name: sorted(tuple(map(repr, row)) for row in conn.execute(select(table)))
            for table in schema.metadata.sorted_tables
        }


@pytest.fixture
def service(db_url, tmp_path):
    """A live service with participants a, b and admin ops; job ``auth-job`` waits (deadline
    10 min) for a's and b's statistics, a's task already delivered. Nothing else runs."""
    live = start_service(db_url, tmp_path / "keys")
    try:
        a, _b = live.client("a"), live.client("b")
        admin = live.client("ops", role="admin")
        job = make_job(rounds=1).to_dict() | {"job_id": JOB}
        admin.submit_job(job, ["a", "b"], {"round_deadline_seconds": 600})
        task = a.poll("a", wait=5)
        assert task is not None
        yield live, task.task_id
    finally:
        live.close()


def _refused(response: httpx.Response) -> bool:
    return (
        response.status_code == 401
        and response.headers.get("www-authenticate") == 'Bearer error="invalid_token"'
        and response.json()["error"] == "AuthError"
    )


def test_tamper_matrix_is_401_with_no_state_change_on_every_endpoint(service):
    live, task_id = service
    forge = Forge(live)
    targets = endpoints(task_id)
    wrong: list[str] = []
    with httpx.Client(base_url=live.base_url, timeout=10) as http:
        for case, build in TAMPERS.items():
            for endpoint in targets:
                token = build(forge, endpoint.sub, endpoint.role)
                before = snapshot(live)
                response = endpoint.call(http, token)
                if not _refused(response):
                    wrong.append(f"{case} @ {endpoint.name}: {response.status_code}")
                elif snapshot(live) != before:
                    wrong.append(f"{case} @ {endpoint.name}: the database changed")
        assert not wrong, wrong
        checked = len(TAMPERS) * len(targets)

        # control: the same forge without a tamper passes authentication on every endpoint
        for endpoint in targets:
            response = endpoint.call(http, forge.token(endpoint.sub, endpoint.role))
            assert response.status_code in (200, 201, 409), (endpoint.name, response.text)
    assert checked == 17 * 6


def test_replayed_one_time_token_is_401_with_no_state_change(service):
    live, task_id = service
    coord = live.coordinator
    targets = endpoints(task_id)
    with httpx.Client(base_url=live.base_url, timeout=10) as http:
        tokens = {}
        for sub, role in {(e.sub, e.role) for e in targets}:
            tokens[sub] = issue_token(
                coord.keyring,
                sub=sub,
                role=role,
                audience=coord.config.audience,
                issuer=coord.config.issuer,
                ttl=timedelta(minutes=5),
                one_time=True,
            )
            first = http.get(f"/v1/jobs/{JOB}", headers={"Authorization": f"Bearer {tokens[sub]}"})
            assert first.status_code == 200  # the first use is accepted (and its jti recorded)
        before = snapshot(live)
        for endpoint in targets:
            response = endpoint.call(http, tokens[endpoint.sub])
            assert _refused(response), (endpoint.name, response.status_code)
            assert snapshot(live) == before, endpoint.name


def test_missing_or_garbled_bearer_is_401_with_no_state_change(service):
    live, task_id = service
    before = snapshot(live)
    with httpx.Client(base_url=live.base_url, timeout=10) as http:
        for endpoint in endpoints(task_id):
            missing = endpoint.call(http, None)
            assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
            for garbage in ("not.a.token", "a" * 9000, "..", "Basic abc"):
                assert _refused(endpoint.call(http, garbage)), (endpoint.name, garbage)
    assert snapshot(live) == before
