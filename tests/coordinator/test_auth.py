"""Coordinator tokens: the JWT tamper matrix (every forged or stale token is a 401 AuthError with
the right code and changes nothing), key rotation with an overlap window, the JWKS, the persisted
key ring, and issuing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import select

from cdp_federated.coordinator import schema
from cdp_federated.coordinator.auth import (
    KeyRing,
    MemoryReplayCache,
    TokenVerifier,
    issue_token,
    keys_from_jwks,
    kid_of,
)
from cdp_federated.coordinator.enrolment import EnrolmentRegistry, StoreReplayCache
from cdp_federated.coordinator.schema import open_coordinator_store
from cdp_federated.errors import AuthError, ConfigError

T0 = datetime(2030, 3, 1, 9, 0, tzinfo=UTC)
ISSUER = "https://coord.example.com"
AUDIENCE = "cdp-fl-coordinator"
SUB = "acme"


# --- crafting tokens by hand ---------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def segment(obj: object) -> str:
    return b64(json.dumps(obj, separators=(",", ":")).encode())


def claims_at(now: datetime, **changes: object) -> dict:
    """Claims as issue_token writes them, for a one-time token (so that a verifier checking the
    replay cache too early would visibly change state)."""
    t = int(now.timestamp())
    claims = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": SUB,
        "iat": t,
        "nbf": t,
        "exp": t + 900,
        "jti": b64(os.urandom(16)),
        "role": "participant",
        "one_time": True,
    }
    for name, value in changes.items():
        if value is DROP:
            claims.pop(name)
        else:
            claims[name] = value
    return claims


DROP = object()


def sign(header: dict, claims: dict, private_key: Ed25519PrivateKey) -> str:
    signing_input = f"{segment(header)}.{segment(claims)}"
    return f"{signing_input}.{b64(private_key.sign(signing_input.encode()))}"


def craft(ring: KeyRing, now: datetime = T0, *, key=None, header=None, **claim_changes) -> str:
    """A token signed with ``key`` (default: the ring's current key); ``header`` entries replace
    (or, with DROP, remove) header parameters."""
    signer = key or ring.current.private_key
    head = {"alg": "EdDSA", "kid": ring.current.kid, "typ": "JWT"}
    for name, value in (header or {}).items():
        if value is DROP:
            head.pop(name)
        else:
            head[name] = value
    return sign(head, claims_at(now, **claim_changes), signer)


def hs256(ring: KeyRing, secret: bytes, now: datetime = T0) -> str:
    """HS256 with the public key as HMAC secret: the classic algorithm-confusion forgery
    (pyjwt refuses a PEM as HMAC key, so it is made by hand)."""
    head = {"alg": "HS256", "kid": ring.current.kid, "typ": "JWT"}
    signing_input = f"{segment(head)}.{segment(claims_at(now, role='admin'))}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def flip_bit(token: str, part: int, byte: int, bit: int = 0) -> str:
    parts = token.split(".")
    raw = bytearray(unb64(parts[part]))
    raw[byte] ^= 1 << bit
    parts[part] = b64(bytes(raw))
    return ".".join(parts)


def replace_in_payload(token: str, old: bytes, new: bytes) -> str:
    h, p, s = token.split(".")
    raw = unb64(p)
    assert old in raw
    return f"{h}.{b64(raw.replace(old, new))}.{s}"


def public_pem(ring: KeyRing) -> bytes:
    return ring.current.public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def public_raw(ring: KeyRing) -> bytes:
    return ring.current.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


ATTACKER = Ed25519PrivateKey.generate()

# (case, token builder, expected code). Every token is a one-time token for an active subject.
TAMPER_MATRIX = [
    ("alg_none", lambda r: f"{segment({'alg': 'none', 'kid': r.current.kid})}.{segment(claims_at(T0))}.", "bad_algorithm"),
    ("alg_None_mixed_case", lambda r: craft(r, header={"alg": "None"}), "bad_algorithm"),
    ("alg_missing", lambda r: craft(r, header={"alg": DROP}), "bad_algorithm"),
    ("alg_Ed25519_not_pinned", lambda r: craft(r, header={"alg": "Ed25519"}), "bad_algorithm"),
    ("hs256_with_public_pem", lambda r: hs256(r, public_pem(r)), "bad_algorithm"),
    ("hs256_with_raw_public_key", lambda r: hs256(r, public_raw(r)), "bad_algorithm"),
    ("wrong_kid", lambda r: craft(r, header={"kid": "AAAAAAAAAAA"}), "unknown_kid"),
    ("missing_kid", lambda r: craft(r, header={"kid": DROP}), "unknown_kid"),
    ("attacker_key_own_kid", lambda r: craft(r, key=ATTACKER, header={"kid": kid_of(ATTACKER.public_key())}), "unknown_kid"),
    ("attacker_key_our_kid", lambda r: craft(r, key=ATTACKER), "bad_signature"),
    ("expired", lambda r: craft(r, T0 - timedelta(hours=1)), "expired"),
    ("future_nbf", lambda r: craft(r, nbf=int(T0.timestamp()) + 600), "not_yet_valid"),
    ("future_iat", lambda r: craft(r, T0 + timedelta(minutes=10)), "not_yet_valid"),
    ("wrong_aud", lambda r: craft(r, aud="cdp-fl-coordinator-staging"), "wrong_audience"),
    ("aud_prefix", lambda r: craft(r, aud="cdp-fl"), "wrong_audience"),
    ("aud_list_without_ours", lambda r: craft(r, aud=["other", "cdp-fl"]), "wrong_audience"),
    ("issuer_prefix", lambda r: craft(r, iss="https://coord.example"), "wrong_issuer"),
    ("issuer_extended", lambda r: craft(r, iss=ISSUER + ".evil.net"), "wrong_issuer"),
    ("issuer_substring", lambda r: craft(r, iss="coord.example"), "wrong_issuer"),
    ("issuer_as_list", lambda r: craft(r, iss=[ISSUER]), "wrong_issuer"),
    ("missing_exp", lambda r: craft(r, exp=DROP), "missing_claim"),
    ("missing_iat", lambda r: craft(r, iat=DROP), "missing_claim"),
    ("missing_iss", lambda r: craft(r, iss=DROP), "missing_claim"),
    ("missing_aud", lambda r: craft(r, aud=DROP), "missing_claim"),
    ("missing_sub", lambda r: craft(r, sub=DROP), "missing_claim"),
    ("missing_jti", lambda r: craft(r, jti=DROP), "missing_claim"),
    ("missing_role", lambda r: craft(r, role=DROP), "missing_claim"),
    ("exp_as_string", lambda r: craft(r, exp=str(int(T0.timestamp()) + 900)), "bad_claim"),
    ("unknown_role", lambda r: craft(r, role="superuser"), "bad_claim"),
    ("lifetime_beyond_max", lambda r: craft(r, exp=int(T0.timestamp()) + 2 * 86400), "bad_claim"),
    ("unknown_crit", lambda r: craft(r, header={"crit": ["exp"], "exp": 1}), "unsupported_crit"),
    ("crit_b64_detached", lambda r: craft(r, header={"crit": ["b64"], "b64": False}), "unsupported_crit"),
    ("extra_header_jku", lambda r: craft(r, header={"jku": "https://evil.example/jwks"}), "bad_header"),
    ("typ_not_jwt", lambda r: craft(r, header={"typ": "at+jwt+evil"}), "bad_header"),
    ("flipped_signature_bit", lambda r: flip_bit(craft(r), 2, 10), "bad_signature"),
    ("flipped_last_signature_bit", lambda r: flip_bit(craft(r), 2, 63, 7), "bad_signature"),
    ("flipped_payload_bit", lambda r: flip_bit(craft(r), 1, 20), "bad_signature"),
    ("payload_role_escalated", lambda r: replace_in_payload(craft(r, role="observer"), b"observer", b"admin"), "bad_signature"),
    ("payload_sub_swapped", lambda r: replace_in_payload(craft(r), b'"acme"', b'"beta"'), "bad_signature"),
    ("signature_stripped", lambda r: craft(r).rsplit(".", 1)[0] + ".", "bad_signature"),
    ("two_segments", lambda r: craft(r).rsplit(".", 1)[0], "malformed"),
    ("non_canonical_base64", lambda r: _non_canonical(craft(r)), "malformed"),
    ("duplicate_header_alg", lambda r: _duplicate_alg(craft(r)), "malformed"),
    ("not_a_token", lambda r: "hello", "malformed"),
    ("deeply_nested_header", lambda r: f"{b64(b'[' * 6000)}.{segment(claims_at(T0))}.", "malformed"),
]  # fmt: skip


def _non_canonical(token: str) -> str:
    """The same signature bytes spelt differently (unused low bits of the last character set)."""
    h, p, s = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(s[-1])
    twin = s[:-1] + alphabet[last ^ 1]
    assert unb64(twin) == unb64(s) and twin != s
    return f"{h}.{p}.{twin}"


def _duplicate_alg(token: str) -> str:
    """A header naming ``alg`` twice: parsers disagree on which one wins, so it is refused."""
    h, p, s = token.split(".")
    doubled = '{"alg":"none",' + unb64(h).decode()[1:]
    return f"{b64(doubled.encode())}.{p}.{s}"


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing.generate(now=T0 - timedelta(days=1), overlap=timedelta(hours=1))


@pytest.fixture
def store(sqlite_url):
    store = open_coordinator_store(sqlite_url, create=True)
    yield store
    store.dispose()


@pytest.fixture
def registry(store) -> EnrolmentRegistry:
    registry = EnrolmentRegistry(store)
    registry.redeem(registry.create(SUB, "participant", now=T0 - timedelta(hours=2)), now=T0)
    registry.create("pending", "participant", now=T0)  # an unused secret: must stay unused
    return registry


@pytest.fixture
def verifier(ring, store, registry) -> TokenVerifier:
    return TokenVerifier(
        ring,
        issuer=ISSUER,
        audience=AUDIENCE,
        replay_cache=StoreReplayCache(store),
        clock=lambda: T0,
        is_active=registry.is_active,
    )


def snapshot(store) -> dict[str, list[tuple]]:
    with store.begin() as conn:
        return {
            table.name: sorted(tuple(row) for row in conn.execute(select(table)))
            for table in schema.metadata.sorted_tables
        }


# --- the tamper matrix ---------------------------------------------------------------------------


def test_hand_crafted_baseline_token_verifies(ring, verifier, store):
    """The crafting helpers make valid tokens: a rejected variant is rejected for its tamper."""
    token = craft(ring)
    claims = verifier.verify(token)
    assert (claims.sub, claims.role, claims.one_time) == (SUB, "participant", True)
    assert StoreReplayCache(store).is_used(claims.jti)
    assert verifier.verify(craft(ring, aud=["other", AUDIENCE])).audience == ("other", AUDIENCE)


@pytest.mark.parametrize(
    ("build", "code"), [c[1:] for c in TAMPER_MATRIX], ids=[c[0] for c in TAMPER_MATRIX]
)
def test_tampered_token_is_rejected_with_401_and_no_state_change(
    ring, verifier, store, build, code
):
    token = build(ring)
    before = snapshot(store)
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    assert info.value.code == code
    assert info.value.http_status == 401
    assert isinstance(info.value, PermissionError)
    assert snapshot(store) == before
    text = str(info.value) + repr(info.value.to_dict())
    for part in token.split("."):
        if len(part) > 8:
            assert part not in text  # the token never appears in the error


def test_replayed_one_time_jti_is_rejected_and_changes_nothing(ring, verifier, store):
    token = issue_token(
        ring, sub=SUB, role="participant", audience=AUDIENCE, issuer=ISSUER, now=T0, one_time=True
    )
    before = snapshot(store)
    first = verifier.verify(token, now=T0 + timedelta(seconds=5))
    after_first = snapshot(store)
    assert after_first != before  # the jti was recorded
    assert StoreReplayCache(store).is_used(first.jti)
    with pytest.raises(AuthError) as info:
        verifier.verify(token, now=T0 + timedelta(seconds=6))
    assert info.value.code == "replayed"
    assert snapshot(store) == after_first


def test_replay_is_caught_by_a_second_worker_sharing_the_database(ring, store, registry):
    token = issue_token(
        ring, sub=SUB, role="participant", audience=AUDIENCE, issuer=ISSUER, now=T0, one_time=True
    )
    workers = [
        TokenVerifier(ring, issuer=ISSUER, audience=AUDIENCE, replay_cache=StoreReplayCache(store))
        for _ in range(2)
    ]
    workers[0].verify(token, now=T0)
    with pytest.raises(AuthError, match="already used") as info:
        workers[1].verify(token, now=T0)
    assert info.value.code == "replayed"


def test_ordinary_tokens_are_reusable_and_leave_no_trace(ring, verifier, store):
    token = issue_token(ring, sub=SUB, role="participant", audience=AUDIENCE, issuer=ISSUER, now=T0)
    before = snapshot(store)
    assert verifier.verify(token).sub == SUB
    assert verifier.verify(token).sub == SUB
    assert snapshot(store) == before


def test_one_time_token_without_replay_cache_is_refused(ring):
    verifier = TokenVerifier(ring, issuer=ISSUER, audience=AUDIENCE, clock=lambda: T0)
    with pytest.raises(AuthError) as info:
        verifier.verify(craft(ring))
    assert info.value.code == "no_replay_cache"


def test_disabled_subject_is_rejected_and_its_one_time_token_not_consumed(
    ring, verifier, registry, store
):
    registry.disable(SUB, now=T0)
    token = craft(ring)
    before = snapshot(store)
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    assert info.value.code == "disabled"
    assert snapshot(store) == before


@pytest.mark.parametrize(
    ("offset", "ok"),
    [
        (timedelta(seconds=-1), True),
        (timedelta(minutes=15) + timedelta(seconds=29), True),  # expired 29s ago, leeway 30s
        (timedelta(minutes=15) + timedelta(seconds=30), False),
        (timedelta(seconds=-29), True),  # a caller's clock 29s behind ours: nbf within leeway
        (timedelta(seconds=-31), False),
    ],
)
def test_leeway_bounds(ring, offset, ok):
    token = issue_token(ring, sub=SUB, role="observer", audience=AUDIENCE, issuer=ISSUER, now=T0)
    verifier = TokenVerifier(ring, issuer=ISSUER, audience=AUDIENCE)
    if ok:
        assert verifier.verify(token, now=T0 + offset).role == "observer"
    else:
        with pytest.raises(AuthError) as info:
            verifier.verify(token, now=T0 + offset)
        assert info.value.code in ("expired", "not_yet_valid")


def test_issuer_and_audience_compare_exactly_even_for_supersets(ring):
    """A verifier expecting a *prefix* of the token's issuer also refuses it."""
    token = issue_token(ring, sub=SUB, role="observer", audience=AUDIENCE, issuer=ISSUER, now=T0)
    for issuer, audience, code in [
        ("https://coord.example", AUDIENCE, "wrong_issuer"),
        ("coord.example.com", AUDIENCE, "wrong_issuer"),
        (ISSUER, "cdp-fl", "wrong_audience"),
    ]:
        verifier = TokenVerifier(ring, issuer=issuer, audience=audience, clock=lambda: T0)
        with pytest.raises(AuthError) as info:
            verifier.verify(token)
        assert info.value.code == code


def test_old_key_token_with_current_kid_is_not_tried_against_other_keys(ring):
    """Keys are selected by kid only: a token signed by the old key but naming the new kid fails."""
    old_key = ring.current.private_key
    ring.rotate(now=T0 - timedelta(minutes=1))
    verifier = TokenVerifier(
        ring, issuer=ISSUER, audience=AUDIENCE, replay_cache=MemoryReplayCache(), clock=lambda: T0
    )
    with pytest.raises(AuthError) as info:
        verifier.verify(craft(ring, key=old_key))
    assert info.value.code == "bad_signature"


# --- rotation and JWKS ---------------------------------------------------------------------------


def test_rotation_overlap_then_retirement():
    ring = KeyRing.generate(now=T0, overlap=timedelta(hours=1))
    old_kid = ring.current.kid
    short = issue_token(ring, sub=SUB, role="participant", audience=AUDIENCE, issuer=ISSUER, now=T0)
    long = issue_token(
        ring,
        sub=SUB,
        role="participant",
        audience=AUDIENCE,
        issuer=ISSUER,
        now=T0,
        ttl=timedelta(hours=3),
    )
    new = ring.rotate(now=T0 + timedelta(minutes=5))
    assert new.kid != old_kid and ring.current is new
    verifier = TokenVerifier(ring, issuer=ISSUER, audience=AUDIENCE)

    during = T0 + timedelta(minutes=10)
    assert verifier.verify(short, now=during).kid == old_kid
    assert [k["kid"] for k in ring.jwks(during)["keys"]] == [new.kid, old_kid]
    fresh = issue_token(
        ring,
        sub=SUB,
        role="participant",
        audience=AUDIENCE,
        issuer=ISSUER,
        now=during,
        ttl=timedelta(hours=2),
    )
    assert verifier.verify(fresh, now=during).kid == new.kid

    after = T0 + timedelta(minutes=5, hours=1)  # overlap over; `long` has not expired
    with pytest.raises(AuthError) as info:
        verifier.verify(long, now=after)
    assert info.value.code == "unknown_kid"
    assert [k["kid"] for k in ring.jwks(after)["keys"]] == [new.kid]
    assert verifier.verify(fresh, now=after).kid == new.kid

    ring.rotate(now=after)  # the retired key is dropped, the previous current key kept
    assert [k.kid for k in ring.keys][1:] == [new.kid]


def test_jwks_is_rfc7517_and_a_remote_verifier_uses_it():
    ring = KeyRing.generate(now=T0)
    token = issue_token(ring, sub=SUB, role="observer", audience=AUDIENCE, issuer=ISSUER, now=T0)
    jwks = json.loads(json.dumps(ring.jwks(T0)))  # as served over HTTP
    (jwk,) = jwks["keys"]
    assert jwk == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64(ring.current.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)),
        "kid": ring.current.kid,
        "alg": "EdDSA",
        "use": "sig",
    }
    digest = hashlib.sha256(unb64(jwk["x"])).digest()[:8]
    assert jwk["kid"] == b64(digest) and len(jwk["kid"]) == 11
    jwks["keys"].append({"kty": "RSA", "kid": "rsa-1", "n": "AQAB", "e": "AQAB"})  # ignored
    verifier = TokenVerifier(jwks, issuer=ISSUER, audience=AUDIENCE, clock=lambda: T0)
    assert verifier.verify(token).sub == SUB
    other = KeyRing.generate(now=T0)
    with pytest.raises(AuthError) as info:
        verifier.verify(
            issue_token(other, sub=SUB, role="observer", audience=AUDIENCE, issuer=ISSUER, now=T0)
        )
    assert info.value.code == "unknown_kid"


def test_malformed_jwks_is_a_config_error():
    with pytest.raises(ConfigError):
        keys_from_jwks({"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "k", "x": "!!"}]})
    with pytest.raises(ConfigError):
        keys_from_jwks({"nokeys": []})


# --- persisted key ring --------------------------------------------------------------------------


def test_persisted_keyring_reloads_and_keeps_verifying(tmp_path):
    path = tmp_path / "keys"
    ring = KeyRing.open(path, now=T0, overlap=timedelta(hours=1))
    old = issue_token(ring, sub=SUB, role="participant", audience=AUDIENCE, issuer=ISSUER, now=T0)
    ring.rotate(now=T0 + timedelta(minutes=1))

    reloaded = KeyRing.open(path)  # a restarted coordinator
    assert [k.kid for k in reloaded.keys] == [k.kid for k in ring.keys]
    assert [k.retires_at for k in reloaded.keys] == [k.retires_at for k in ring.keys]
    assert reloaded.jwks(T0 + timedelta(minutes=2)) == ring.jwks(T0 + timedelta(minutes=2))
    verifier = TokenVerifier(reloaded, issuer=ISSUER, audience=AUDIENCE)
    assert verifier.verify(old, now=T0 + timedelta(minutes=2)).sub == SUB
    new = issue_token(
        reloaded, sub=SUB, role="participant", audience=AUDIENCE, issuer=ISSUER, now=T0
    )
    assert TokenVerifier(ring, issuer=ISSUER, audience=AUDIENCE).verify(new, now=T0).sub == SUB

    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        for pem in path.glob("*.pem"):
            assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert sorted(p.stem for p in path.glob("*.pem")) == sorted(k.kid for k in ring.keys)
    ring.rotate(now=T0 + timedelta(hours=2))  # the first key retired: its file is deleted
    assert sorted(p.stem for p in path.glob("*.pem")) == sorted(k.kid for k in ring.keys)
    assert len(ring.keys) == 2


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_loading_refuses_a_group_readable_private_key(tmp_path):
    ring = KeyRing.open(tmp_path / "keys", now=T0)
    pem = tmp_path / "keys" / f"{ring.current.kid}.pem"
    pem.chmod(0o640)
    with pytest.raises(ConfigError, match="readable by group or others"):
        KeyRing.load(tmp_path / "keys")
    pem.chmod(0o600)
    assert KeyRing.load(tmp_path / "keys").current.kid == ring.current.kid


def test_loading_refuses_a_key_file_that_is_not_the_named_key(tmp_path):
    ring = KeyRing.open(tmp_path / "keys", now=T0)
    impostor = KeyRing.generate(now=T0, path=tmp_path / "other")
    pem = tmp_path / "keys" / f"{ring.current.kid}.pem"
    pem.write_bytes((tmp_path / "other" / f"{impostor.current.kid}.pem").read_bytes())
    with pytest.raises(ConfigError, match="does not hold the key"):
        KeyRing.load(tmp_path / "keys")


def test_a_worker_picks_up_a_rotation_saved_by_another(tmp_path):
    rotating = KeyRing.open(tmp_path / "keys", now=T0)
    worker = KeyRing.load(tmp_path / "keys")
    rotating.rotate(now=T0 + timedelta(minutes=1))
    token = issue_token(
        rotating, sub=SUB, role="participant", audience=AUDIENCE, issuer=ISSUER, now=T0
    )
    verifier = TokenVerifier(worker, issuer=ISSUER, audience=AUDIENCE)
    assert verifier.verify(token, now=T0 + timedelta(minutes=2)).sub == SUB
    assert worker.current.kid == rotating.current.kid
    assert worker.refresh() is False  # nothing new


# --- issuing -------------------------------------------------------------------------------------


def test_issued_token_header_and_claims(ring):
    token = issue_token(
        ring,
        sub=SUB,
        role="participant",
        audience=AUDIENCE,
        issuer=ISSUER,
        now=T0,
        ttl=timedelta(minutes=5),
        extra={"job": "j1"},
    )
    header_text, payload_text, _ = token.split(".")
    header = json.loads(unb64(header_text))
    payload = json.loads(unb64(payload_text))
    assert header == {"alg": "EdDSA", "kid": ring.current.kid, "typ": "JWT"}
    t = int(T0.timestamp())
    assert payload["iat"] == payload["nbf"] == t and payload["exp"] == t + 300
    assert (payload["iss"], payload["aud"], payload["sub"]) == (ISSUER, AUDIENCE, SUB)
    assert len(unb64(payload["jti"])) == 16 and "one_time" not in payload
    claims = TokenVerifier(ring, issuer=ISSUER, audience=AUDIENCE).verify(token, now=T0)
    assert claims.extra == {"job": "j1"}
    assert claims.expires_at == T0 + timedelta(minutes=5)
    other = issue_token(ring, sub=SUB, role="participant", audience=AUDIENCE, issuer=ISSUER, now=T0)
    assert json.loads(unb64(other.split(".")[1]))["jti"] != payload["jti"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"role": "root"},
        {"ttl": timedelta(days=2)},
        {"ttl": timedelta(0)},
        {"extra": {"role": "admin"}},
        {"extra": {"exp": 0}},
        {"sub": ""},
        {"now": datetime(2030, 1, 1)},  # naive: refused
    ],
)
def test_issue_token_refuses_bad_arguments(ring, kwargs):
    args = {"sub": SUB, "role": "participant", "audience": AUDIENCE, "issuer": ISSUER, "now": T0}
    with pytest.raises(ConfigError):
        issue_token(ring, **{**args, **kwargs})


def test_memory_replay_cache_forgets_expired_entries():
    cache = MemoryReplayCache()
    assert cache.claim("a", expires_at=T0 + timedelta(minutes=1), now=T0)
    assert not cache.claim("a", expires_at=T0 + timedelta(minutes=1), now=T0)
    assert cache.claim("b", expires_at=T0 + timedelta(minutes=5), now=T0 + timedelta(minutes=2))
    assert len(cache) == 1
