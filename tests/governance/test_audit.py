"""Audit chain: appending, canonical hashing, payload validation, signed checkpoints, the anchor
file, concurrency, and verification on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError

from cdp_federated.errors import AuditIntegrityError, AuditKeyError
from cdp_federated.governance.audit import (
    BUDGET_CHARGED,
    CONSENT_FILTER,
    GENESIS_HASH,
    JOB_STARTED,
    MAX_PAYLOAD_BYTES,
    MODEL_PUBLISHED,
    POLICY_DECISION,
    ROUND_COMMITTED,
    AuditLog,
    AuditPayloadError,
    canonical_json,
    db_fingerprint,
    entry_hash,
)
from cdp_federated.governance.audit_keys import (
    AuditSigner,
    generate_key,
    load_public_key,
    load_signer,
)
from cdp_federated.store import open_store, schema

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


class Clock:
    """Deterministic, strictly increasing time with microseconds (they must survive the store)."""

    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> datetime:
        self.t += timedelta(seconds=1, microseconds=123)
        return self.t


@pytest.fixture
def key(tmp_path):
    return generate_key(tmp_path / "keys" / "audit-ed25519.key")


@pytest.fixture
def store(db_url):
    store = open_store(db_url, create=True)
    yield store
    store.dispose()


@pytest.fixture
def log(store, key):
    return AuditLog(store, key, now=Clock())


def consent_payload(**overrides):
    payload = {
        "participant": "retailer",
        "purpose": "analytics",
        "rows_in": 1000,
        "consented": 800,
        "aligned": 700,
        "trained": 700,
    }
    payload.update(overrides)
    return payload


# -- appending ----------------------------------------------------------------------------------


def test_entries_are_chained_from_the_genesis_hash(log):
    first = log.append(POLICY_DECISION, {"allow": True, "reasons": []})
    second = log.append(CONSENT_FILTER, consent_payload())
    third = log.append(ROUND_COMMITTED, {"job_id": "j1", "round": 1})

    assert [first.seq, second.seq, third.seq] == [1, 2, 3]
    assert first.prev_hash == GENESIS_HASH
    assert second.prev_hash == first.hash and third.prev_hash == second.hash
    assert first.hash == entry_hash(1, first.timestamp, first.kind, first.payload, GENESIS_HASH)
    assert log.head() == (3, third.hash)


def test_hash_does_not_depend_on_key_order_and_commits_to_every_field():
    base = entry_hash(1, T0, POLICY_DECISION, {"a": 1, "b": [1, 2]}, GENESIS_HASH)
    assert base == entry_hash(1, T0, POLICY_DECISION, {"b": [1, 2], "a": 1}, GENESIS_HASH)
    variants = [
        entry_hash(2, T0, POLICY_DECISION, {"a": 1, "b": [1, 2]}, GENESIS_HASH),
        entry_hash(
            1, T0 + timedelta(microseconds=1), POLICY_DECISION, {"a": 1, "b": [1, 2]}, GENESIS_HASH
        ),
        entry_hash(1, T0, JOB_STARTED, {"a": 1, "b": [1, 2]}, GENESIS_HASH),
        entry_hash(1, T0, POLICY_DECISION, {"a": 1, "b": [2, 1]}, GENESIS_HASH),
        entry_hash(1, T0, POLICY_DECISION, {"a": 1.0, "b": [1, 2]}, GENESIS_HASH),
        entry_hash(1, T0, POLICY_DECISION, {"a": 1, "b": [1, 2]}, "f" * 64),
    ]
    assert base not in variants and len(set(variants)) == len(variants)
    # a timestamp in another zone is the same instant, hence the same hash
    cet = T0.astimezone(ZoneInfo("Europe/Paris"))
    assert base == entry_hash(1, cet, POLICY_DECISION, {"a": 1, "b": [1, 2]}, GENESIS_HASH)


def test_canonical_json_is_compact_sorted_utf8():
    assert canonical_json({"b": 1, "a": [True, None, "é"]}) == '{"a":[true,null,"é"],"b":1}'


def test_awkward_values_survive_the_database_round_trip(log):
    payload = {
        "floats": [0.1, 1e16, -0.0, 1.5e-300, 2.0**-1074, 123456789.123456789, 1e300],
        "ints": [0, -1, 2**63 - 1, -(2**63)],
        "text": 'é ✓ \u0000 "quoted" \\ 𝄞',
        "nested": {"z": {"y": [[], {}]}, "a": None},
        "tuple": (1, 2),
        "numpy": [np.int64(7), np.float64(0.25), np.int32(-3)],
    }
    entry = log.append(BUDGET_CHARGED, payload)

    assert entry.payload["tuple"] == [1, 2] and entry.payload["numpy"] == [7, 0.25, -3]
    [stored] = log.recent(1)
    assert stored.payload == entry.payload and stored.hash == entry.hash
    assert stored.timestamp == entry.timestamp
    report = log.verify()
    assert report.ok and report.entries == 1, report


@pytest.mark.parametrize(
    ("kind", "payload", "field"),
    [
        (POLICY_DECISION, {"x": float("nan")}, "payload.x"),
        (POLICY_DECISION, {"x": [float("inf")]}, "payload.x[0]"),
        (POLICY_DECISION, {1: "a"}, "payload"),
        (POLICY_DECISION, {"x": {1, 2}}, "payload.x"),
        (POLICY_DECISION, {"x": datetime(2026, 1, 1, tzinfo=UTC)}, "payload.x"),
        (POLICY_DECISION, {"x": b"bytes"}, "payload.x"),
        (POLICY_DECISION, {"x": 2**63}, "payload.x"),
        (POLICY_DECISION, {"x": "\ud800"}, "payload"),
        (POLICY_DECISION, {"x": "y" * MAX_PAYLOAD_BYTES}, "payload"),
        (POLICY_DECISION, ["not", "a", "dict"], "payload"),
        ("nope", {}, "kind"),
        ("Policy Decision", {}, "kind"),
        ("x" * 70 + ".y", {}, "kind"),
        (CONSENT_FILTER, {"participant": "p", "purpose": "q", "rows_in": 3}, "payload"),
        (CONSENT_FILTER, consent_payload(consented=1001), "payload.consented"),
        (CONSENT_FILTER, consent_payload(trained=-1), "payload.trained"),
        (CONSENT_FILTER, consent_payload(aligned=2.5), "payload.aligned"),
    ],
)
def test_invalid_entries_are_refused_with_a_typed_error(log, kind, payload, field):
    with pytest.raises(AuditPayloadError) as info:
        log.append(kind, payload)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
    assert log.head() == (0, GENESIS_HASH)


def test_deep_nesting_is_refused(log):
    payload: dict = {}
    inner = payload
    for _ in range(40):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(AuditPayloadError, match="nested too deeply"):
        log.append(POLICY_DECISION, payload)


def test_namespaced_plugin_kinds_and_skipped_funnel_steps_are_accepted(log):
    log.append("acme.export", {"rows": 3})
    log.append(CONSENT_FILTER, consent_payload(aligned=None, trained=None))
    assert log.verify().ok


def test_naive_timestamps_are_refused(log):
    with pytest.raises(AuditPayloadError, match="timezone-aware"):
        log.append(POLICY_DECISION, {}, at=datetime(2026, 1, 1))


def test_an_entry_commits_with_the_callers_transaction(log, store):
    with store.writer() as conn:
        log.append(MODEL_PUBLISHED, {"model_id": "m1"}, conn=conn)
        conn.rollback()
    assert log.head()[0] == 0

    with store.writer() as conn:
        conn.execute(
            schema.jobs.insert().values(
                job_id="j1", kind="horizontal", status="done", spec={}, created_at=T0
            )
        )
        entry = log.append(MODEL_PUBLISHED, {"model_id": "m1", "job_id": "j1"}, conn=conn)
        conn.commit()
    assert log.head() == (1, entry.hash)
    assert log.verify().ok


def test_store_begin_connections_work_too(log, store):
    with store.begin() as conn:
        log.append(POLICY_DECISION, {"allow": False}, conn=conn)
    assert log.head()[0] == 1


@pytest.mark.parametrize("transaction", ["own", "caller"])
def test_two_concurrent_appenders_do_not_fork_the_chain(db_url, key, store, transaction):
    per_thread = 40
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(name: str) -> None:
        own = open_store(db_url)
        try:
            writer = AuditLog(own, key)
            barrier.wait()
            for i in range(per_thread):
                if transaction == "own":
                    writer.append(ROUND_COMMITTED, {"writer": name, "round": i})
                else:  # a plain (deferred) transaction of the caller's, as Store.begin gives
                    with own.begin() as conn:
                        writer.append(ROUND_COMMITTED, {"writer": name, "round": i}, conn=conn)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=work, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert not errors, errors
    log = AuditLog(store, key)
    report = log.verify()
    assert report.ok and report.entries == 2 * per_thread, report
    seen = {(e.payload["writer"], e.payload["round"]) for e in log.entries()}
    assert len(seen) == 2 * per_thread


def test_a_forked_seq_fails_loudly(log, store):
    entry = log.append(POLICY_DECISION, {"allow": True})
    with pytest.raises(IntegrityError), store.begin() as conn:
        conn.execute(
            schema.audit_entries.insert().values(
                seq=entry.seq,
                timestamp=T0,
                kind=POLICY_DECISION,
                payload={},
                prev_hash=GENESIS_HASH,
                hash=entry.hash,
            )
        )
    assert log.verify().ok


# -- checkpoints, keys and the anchor -------------------------------------------------------------


def test_checkpoint_signs_the_head_and_anchors_it_outside_the_database(log, key, store):
    for i in range(5):
        log.append(ROUND_COMMITTED, {"round": i})
    checkpoint = log.checkpoint()

    assert checkpoint.entry_seq == 5 and checkpoint.head_hash == log.head()[1]
    assert checkpoint.key_id == key.key_id == load_public_key(key.path).key_id
    assert key.public.verify(checkpoint.message(), bytes.fromhex(checkpoint.signature))
    assert log.anchor_path == key.path.parent / f"audit-head-{db_fingerprint(store.url)}.json"
    anchor = json.loads(log.anchor_path.read_text())
    assert anchor["seq"] == 5 and anchor["signature"] == checkpoint.signature
    assert anchor["head_hash"] == checkpoint.head_hash
    report = log.verify()
    assert report.ok and report.anchor_status == "match" and report.unsigned_tail == 0
    assert report.latest_checkpoint == checkpoint and report.warnings == ()


def test_checkpoint_is_idempotent_when_nothing_was_appended(log):
    log.append(POLICY_DECISION, {"allow": True})
    first = log.checkpoint()
    assert log.checkpoint() == first
    log.append(POLICY_DECISION, {"allow": False})
    assert log.checkpoint().entry_seq == 2
    assert log.verify().checkpoints == 2


def test_an_empty_log_can_be_checkpointed_and_verifies(log):
    assert log.verify().ok
    checkpoint = log.checkpoint()
    assert checkpoint.entry_seq == 0 and checkpoint.head_hash == GENESIS_HASH
    report = log.verify()
    assert report.ok and report.entries == 0 and report.anchor_status == "match"
    log.append(POLICY_DECISION, {"allow": True})
    assert log.verify().unsigned_tail == 1


def test_unsigned_tail_is_a_warning_unless_strict(log):
    for i in range(3):
        log.append(ROUND_COMMITTED, {"round": i})
    log.checkpoint()
    log.append(MODEL_PUBLISHED, {"model_id": "m"})

    report = log.verify()
    assert report.ok and report.unsigned_tail == 1
    assert report.warnings and "unsigned tail" in report.warnings[0]
    strict = log.verify(strict=True)
    assert not strict.ok and strict.first_bad_seq == 4 and "unsigned tail" in strict.reason
    with pytest.raises(AuditIntegrityError):
        strict.raise_for_failure()


def test_checkpointing_needs_the_private_key(store, key):
    log = AuditLog(store, load_public_key(key.path))
    log.append(POLICY_DECISION, {"allow": True})
    with pytest.raises(AuditKeyError):
        log.checkpoint()
    with pytest.raises(AuditKeyError):
        AuditLog(store).checkpoint()


def test_checkpoint_refuses_to_sign_a_tampered_chain(log, store):
    for i in range(4):
        log.append(ROUND_COMMITTED, {"round": i})
    log.checkpoint()
    log.append(ROUND_COMMITTED, {"round": 4})
    with store.begin() as conn:
        conn.execute(
            update(schema.audit_entries)
            .where(schema.audit_entries.c.seq == 5)
            .values(payload={"round": 99})
        )
    with pytest.raises(AuditIntegrityError, match="entry 5"):
        log.checkpoint()
    assert log.latest_checkpoint().entry_seq == 4


def test_checkpoint_refuses_when_newest_checkpoints_were_deleted(log, store):
    log.append(POLICY_DECISION, {"allow": True})
    log.checkpoint()
    with store.begin() as conn:
        conn.execute(delete(schema.audit_checkpoints))
    with pytest.raises(AuditIntegrityError, match="anchor"):
        log.checkpoint()


def test_a_public_key_verifier_needs_no_private_key(log, key, tmp_path):
    for i in range(3):
        log.append(ROUND_COMMITTED, {"round": i})
    log.checkpoint()
    public_file = tmp_path / "elsewhere" / "audit.pub"
    public_file.parent.mkdir()
    public_file.write_text(key.public_pem())

    verifier = AuditLog(log.store, load_public_key(public_file), anchor_path=log.anchor_path)
    report = verifier.verify()
    assert report.ok and report.key_id == key.key_id and report.anchor_status == "match"
    without_anchor = AuditLog(log.store, load_public_key(public_file)).verify()
    assert without_anchor.ok and without_anchor.anchor_status == "missing"
    assert any("anchor" in w for w in without_anchor.warnings)
    assert not AuditLog(log.store, load_public_key(public_file)).verify(strict=True).ok


def test_checkpoints_from_another_key_fail(log, store):
    log.append(POLICY_DECISION, {"allow": True})
    log.checkpoint()
    stranger = AuditLog(store, AuditSigner.generate(), anchor_path=log.anchor_path)
    report = stranger.verify()
    assert not report.ok and "signed by key" in report.reason


def test_verify_reads_in_chunks(log, store):
    for i in range(23):
        log.append(ROUND_COMMITTED, {"round": i})
        if i % 4 == 0:
            log.checkpoint()
    log.checkpoint()
    report = log.verify(chunk_size=3)
    assert report.ok and report.entries == 23 and report.checkpoints == 7
    with store.begin() as conn:
        conn.execute(delete(schema.audit_entries).where(schema.audit_entries.c.seq == 17))
    report = log.verify(chunk_size=3)
    assert not report.ok and report.first_bad_seq == 17 and report.entries == 16


def test_listing_entries(log):
    for i in range(7):
        log.append(ROUND_COMMITTED if i % 2 else POLICY_DECISION, {"i": i})
    assert [e.seq for e in log.entries(chunk_size=2)] == list(range(1, 8))
    assert [e.payload["i"] for e in log.entries(kind=ROUND_COMMITTED)] == [1, 3, 5]
    assert [e.seq for e in log.recent(3)] == [5, 6, 7]
    assert [e.seq for e in log.recent(2, kind=POLICY_DECISION)] == [5, 7]
    assert log.recent(1)[0].to_dict()["timestamp"].endswith("+00:00")


def test_open_creates_the_key_when_asked(tmp_path, sqlite_url, monkeypatch):
    monkeypatch.setenv("CDP_FL_DATA_DIR", str(tmp_path / "data"))
    open_store(sqlite_url, create=True).dispose()
    with pytest.raises(AuditKeyError, match="not found"):
        AuditLog.open(sqlite_url)
    log = AuditLog.open(sqlite_url, create_key=True)
    assert log.key.path == tmp_path / "data" / "keys" / "audit-ed25519.key"
    monkeypatch.setenv("CDP_FL_AUDIT_KEY", str(tmp_path / "k" / "audit.key"))
    assert AuditLog.open(sqlite_url, create_key=True).key.path == tmp_path / "k" / "audit.key"


# -- key files -------------------------------------------------------------------------------------


def test_key_file_is_private_and_never_overwritten(key):
    assert stat.S_IMODE(os.stat(key.path).st_mode) == 0o600
    assert load_signer(key.path).key_id == key.key_id
    assert len(key.key_id) == 16
    with pytest.raises(AuditKeyError, match="already exists"):
        generate_key(key.path)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_key_readable_by_others_is_refused(key):
    os.chmod(key.path, 0o644)
    with pytest.raises(AuditKeyError, match="chmod 600"):
        load_signer(key.path)


def test_malformed_key_files_are_typed_errors(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    os.chmod(bad, 0o600)
    with pytest.raises(AuditKeyError):
        load_signer(bad)
    with pytest.raises(AuditKeyError):
        load_public_key(bad)
    with pytest.raises(AuditKeyError, match="not found"):
        load_public_key(tmp_path / "absent.pem")


def test_db_fingerprint_names_the_location_not_the_user(tmp_path):
    path = tmp_path / "cdp.sqlite"
    assert db_fingerprint(str(path)) == db_fingerprint(f"sqlite:///{path}")
    assert db_fingerprint(str(path)) != db_fingerprint(str(tmp_path / "other.sqlite"))
    assert db_fingerprint("postgresql+psycopg://a:x@Host:5432/db") == db_fingerprint(
        "postgresql://b@host:5432/db"
    )
    assert db_fingerprint("postgresql://h/db1") != db_fingerprint("postgresql://h/db2")
    assert db_fingerprint("sqlite://") is None


def test_signed_at_keeps_microseconds_through_the_store(log):
    log.append(POLICY_DECISION, {"allow": True})
    at = datetime(2026, 6, 1, 8, 30, 15, 654321, tzinfo=UTC)
    checkpoint = log.checkpoint(at=at)
    assert log.latest_checkpoint() == checkpoint
    assert log.latest_checkpoint().signed_at == at


def test_verify_returns_a_json_ready_report(log):
    log.append(POLICY_DECISION, {"allow": True})
    log.checkpoint()
    out = log.verify().to_dict()
    json.dumps(out)
    for field in ("ok", "entries", "first_bad_seq", "reason", "latest_checkpoint", "unsigned_tail"):
        assert field in out
    assert out["latest_checkpoint"]["seq"] == 1


def test_a_conflicting_append_is_retried_once(log, monkeypatch):
    from cdp_federated.governance import audit

    log.append(POLICY_DECISION, {"allow": True})
    real_head = audit._head
    stale = iter([(0, GENESIS_HASH)])  # the first read misses the entry another writer added

    def head(conn):
        return next(stale, None) or real_head(conn)

    monkeypatch.setattr(audit, "_head", head)
    entry = log.append(POLICY_DECISION, {"allow": False})
    assert entry.seq == 2
    assert log.verify().ok

    monkeypatch.setattr(audit, "_head", lambda conn: (0, GENESIS_HASH))
    with pytest.raises(AuditIntegrityError, match="conflicted twice"):
        log.append(POLICY_DECISION, {"allow": False})
