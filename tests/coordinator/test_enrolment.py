"""Enrolment secrets are one-time (also under concurrent redemption), expire, and are stored only as
hashes; disabling a participant revokes it; the replay cache is atomic and persisted. SQLite and
PostgreSQL."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from cdp_federated.coordinator import schema
from cdp_federated.coordinator.auth import KeyRing, TokenVerifier, issue_token
from cdp_federated.coordinator.enrolment import (
    Enrolment,
    EnrolmentRegistry,
    StoreReplayCache,
)
from cdp_federated.coordinator.schema import (
    COORDINATOR_SCHEMA_VERSION,
    create_coordinator_schema,
    open_coordinator_store,
)
from cdp_federated.errors import AuthError, ConfigError, SchemaVersionError

T0 = datetime(2030, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def store(db_url):
    store = open_coordinator_store(db_url, create=True)
    yield store
    store.dispose()


@pytest.fixture
def registry(store) -> EnrolmentRegistry:
    return EnrolmentRegistry(store)


def snapshot(store) -> dict[str, list[tuple]]:
    with store.begin() as conn:
        return {
            table.name: sorted(tuple(row) for row in conn.execute(select(table)))
            for table in schema.metadata.sorted_tables
        }


def race(n: int, fn) -> list[object]:
    """Run ``fn`` in ``n`` threads released together; each result or exception, in thread order."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as exc:  # noqa: BLE001 - collected for the assertions
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


# --- enrolment -----------------------------------------------------------------------------------


def test_redeem_enrols_once_and_stores_only_the_hash(registry, store):
    secret = registry.create("acme", "participant", ttl=timedelta(hours=1), now=T0)
    assert len(secret) >= 43  # 32 random bytes, base64url
    with store.begin() as conn:
        stored = [str(v) for row in conn.execute(select(schema.enrolments)) for v in row]
    assert not any(secret in value for value in stored)

    assert registry.redeem(secret, now=T0 + timedelta(minutes=5)) == Enrolment(
        "acme", "participant"
    )
    record = registry.participant("acme")
    assert record is not None and record.role == "participant" and record.active
    assert record.enrolled_at == T0 + timedelta(minutes=5)
    assert registry.is_active("acme")
    assert not registry.is_active("nobody")

    before = snapshot(store)
    with pytest.raises(AuthError) as info:
        registry.redeem(secret, now=T0 + timedelta(minutes=6))
    assert info.value.code == "replayed"
    assert info.value.http_status == 401
    assert secret not in str(info.value)
    assert snapshot(store) == before


def test_expired_secret_is_refused_and_changes_nothing(registry, store):
    secret = registry.create("acme", "observer", ttl=timedelta(hours=1), now=T0)
    before = snapshot(store)
    with pytest.raises(AuthError) as info:
        registry.redeem(secret, now=T0 + timedelta(hours=1))  # expiry is exclusive
    assert info.value.code == "expired"
    assert snapshot(store) == before
    assert registry.participant("acme") is None
    # just before expiry it still works
    other = registry.create("beta", "observer", ttl=timedelta(hours=1), now=T0)
    assert registry.redeem(other, now=T0 + timedelta(minutes=59, seconds=59)).role == "observer"


@pytest.mark.parametrize("secret", ["wrong-secret", "", "x" * 300, None])
def test_wrong_or_malformed_secret_is_refused(registry, store, secret):
    real = registry.create("acme", "participant", now=T0)
    before = snapshot(store)
    with pytest.raises(AuthError) as info:
        registry.redeem(secret, now=T0)
    assert info.value.code in ("unknown_secret", "malformed")
    assert snapshot(store) == before
    almost = real[:-1] + ("A" if real[-1] != "A" else "B")
    with pytest.raises(AuthError) as info:
        registry.redeem(almost, now=T0)
    assert info.value.code == "unknown_secret"
    assert registry.redeem(real, now=T0).participant_id == "acme"


def test_concurrent_redemptions_exactly_one_wins(registry, store):
    for attempt in range(3):
        secret = registry.create(f"p{attempt}", "participant", now=T0)
        results = race(4, lambda s=secret: registry.redeem(s, now=T0))
        winners = [r for r in results if isinstance(r, Enrolment)]
        losers = [r for r in results if isinstance(r, AuthError)]
        assert len(winners) == 1, results
        assert len(losers) == 3 and all(e.code == "replayed" for e in losers), results
    assert [p.participant_id for p in registry.participants()] == ["p0", "p1", "p2"]


def test_disable_revokes_tokens_and_pending_secrets_and_a_new_secret_reenables(registry, store):
    registry.redeem(registry.create("acme", "participant", now=T0), now=T0)
    pending = registry.create("acme", "participant", now=T0)
    ring = KeyRing.generate(now=T0)
    token = issue_token(ring, sub="acme", role="participant", audience="a", issuer="i", now=T0)
    verifier = TokenVerifier(
        ring, issuer="i", audience="a", clock=lambda: T0, is_active=registry.is_active
    )
    assert verifier.verify(token).sub == "acme"

    registry.disable("acme", now=T0 + timedelta(minutes=1))
    assert not registry.is_active("acme")
    assert registry.participant("acme").disabled_at == T0 + timedelta(minutes=1)
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    assert info.value.code == "disabled"
    with pytest.raises(AuthError) as info:
        registry.redeem(pending, now=T0 + timedelta(minutes=2))
    assert info.value.code == "unknown_secret"  # revoked

    registry.disable("acme", now=T0 + timedelta(minutes=3))  # idempotent: keeps the first time
    assert registry.participant("acme").disabled_at == T0 + timedelta(minutes=1)
    fresh = registry.create("acme", "observer", now=T0 + timedelta(minutes=4))
    assert registry.redeem(fresh, now=T0 + timedelta(minutes=5)).role == "observer"
    assert registry.is_active("acme") and registry.participant("acme").role == "observer"


def test_disabling_an_unknown_participant_is_an_error(registry):
    with pytest.raises(ConfigError, match="unknown participant"):
        registry.disable("ghost", now=T0)


def test_disabling_before_redemption_revokes_the_secret(registry, store):
    secret = registry.create("acme", "participant", now=T0)
    registry.disable("acme", now=T0)
    with pytest.raises(AuthError):
        registry.redeem(secret, now=T0)
    assert registry.participant("acme") is None


@pytest.mark.parametrize(
    ("participant_id", "role", "ttl"),
    [
        ("", "participant", timedelta(hours=1)),
        ("a b", "participant", timedelta(hours=1)),
        ("-lead", "participant", timedelta(hours=1)),
        ("x" * 129, "participant", timedelta(hours=1)),
        ("acme", "root", timedelta(hours=1)),
        ("acme", "participant", timedelta(0)),
        ("acme", "participant", timedelta(days=31)),
    ],
)
def test_create_refuses_bad_arguments(registry, participant_id, role, ttl):
    with pytest.raises(ConfigError):
        registry.create(participant_id, role, ttl=ttl, now=T0)


def test_enrolment_survives_a_restart(db_url):
    first = open_coordinator_store(db_url, create=True)
    secret = EnrolmentRegistry(first).create("acme", "participant", now=T0)
    first.dispose()
    second = open_coordinator_store(db_url)
    try:
        assert EnrolmentRegistry(second).redeem(secret, now=T0).participant_id == "acme"
    finally:
        second.dispose()


# --- replay cache --------------------------------------------------------------------------------


def test_replay_cache_claims_once_and_purges_expired(store):
    cache = StoreReplayCache(store)
    until = T0 + timedelta(minutes=15)
    assert cache.claim("jti-1", expires_at=until, now=T0)
    assert not cache.claim("jti-1", expires_at=until, now=T0 + timedelta(minutes=1))
    assert cache.claim("jti-2", expires_at=T0 + timedelta(minutes=30), now=T0)
    assert StoreReplayCache(store).is_used("jti-1")  # another worker sees it
    assert cache.purge(until) == 1
    assert not cache.is_used("jti-1") and cache.is_used("jti-2")


def test_replay_cache_purges_as_it_goes(store):
    cache = StoreReplayCache(store, purge_every=2)
    cache.claim("old", expires_at=T0, now=T0 - timedelta(minutes=1))
    cache.claim("new", expires_at=T0 + timedelta(hours=1), now=T0 + timedelta(minutes=1))
    assert not cache.is_used("old") and cache.is_used("new")


def test_concurrent_uses_of_a_one_time_token_exactly_one_wins(store):
    ring = KeyRing.generate(now=T0)
    token = issue_token(
        ring, sub="acme", role="participant", audience="a", issuer="i", now=T0, one_time=True
    )
    results = race(
        4,
        lambda: TokenVerifier(
            ring, issuer="i", audience="a", replay_cache=StoreReplayCache(store)
        ).verify(token, now=T0),
    )
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(results) - len(errors) == 1, results
    assert all(isinstance(e, AuthError) and e.code == "replayed" for e in errors), results


# --- schema --------------------------------------------------------------------------------------


def test_schema_is_versioned_and_refuses_another_version(db_url):
    with pytest.raises(SchemaVersionError, match="no coordinator schema"):
        open_coordinator_store(db_url)
    store = open_coordinator_store(db_url, create=True)
    try:
        assert create_coordinator_schema(store) == COORDINATOR_SCHEMA_VERSION  # idempotent
        with store.begin() as conn:
            conn.execute(
                update(schema.coord_meta)
                .where(schema.coord_meta.c.key == "schema_version")
                .values(value="999")
            )
        with pytest.raises(SchemaVersionError):
            create_coordinator_schema(store)
        with pytest.raises(SchemaVersionError):
            open_coordinator_store(db_url)
    finally:
        store.dispose()


def test_coordinator_tables_do_not_clash_with_a_participant_store(db_url):
    from cdp_federated.store import open_store
    from cdp_federated.store.schema import metadata as participant_metadata

    participant = open_store(db_url, create=True)
    coordinator = open_coordinator_store(db_url, create=True)
    try:
        assert not set(participant_metadata.tables) & set(schema.metadata.tables)
        assert EnrolmentRegistry(coordinator).create("acme", "participant", now=T0)
    finally:
        participant.dispose()
        coordinator.dispose()
