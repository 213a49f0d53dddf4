"""Tampering with the audit tables is detected: every kind of single-row edit, deletion, reorder and
truncation at the first, a middle and the last position, whole-chain rewrites, forged and deleted
checkpoints (SQLite and PostgreSQL); and, in the slow suite, 1,000 random single-row tamperings
plus whole-chain rewrites of a 200-entry chain, all detected."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import delete, select, update

from cdp_federated.governance.audit import (
    GENESIS_HASH,
    KINDS,
    AuditLog,
    entry_hash,
    head_message,
)
from cdp_federated.governance.audit_keys import AuditSigner, generate_key, load_public_key
from cdp_federated.store import open_store, schema

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
N = 12  # entries; checkpoints after 4, 8 and 12: the whole chain is signed
E = schema.audit_entries
C = schema.audit_checkpoints


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> datetime:
        self.t += timedelta(seconds=1, microseconds=321)
        return self.t


def utc(value: datetime) -> datetime:
    """A timestamp as read back: naive UTC on SQLite, aware on PostgreSQL."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def build(log: AuditLog, n: int, every: int) -> None:
    kinds = sorted(KINDS - {"consent_filter"})
    for i in range(1, n + 1):
        log.append(kinds[i % len(kinds)], {"i": i, "score": i / 7, "party": f"p{i % 3}"})
        if i % every == 0:
            log.checkpoint()


@pytest.fixture
def key(tmp_path):
    return generate_key(tmp_path / "keys" / "audit-ed25519.key")


@pytest.fixture
def log(db_url, key):
    store = open_store(db_url, create=True)
    log = AuditLog(store, key, now=Clock())
    build(log, N, 4)
    report = log.verify()
    assert report.ok and report.unsigned_tail == 0 and report.anchor_status == "match", report
    yield log
    store.dispose()


def execute(log: AuditLog, *statements) -> None:
    with log.store.begin() as conn:
        for statement in statements:
            conn.execute(statement)


def row(log: AuditLog, seq: int):
    with log.store.engine.connect() as conn:
        return conn.execute(select(E).where(E.c.seq == seq)).one()


def detected(log: AuditLog, first_bad: int | None = None):
    report = log.verify()
    assert not report.ok, report
    assert report.reason
    if first_bad is not None:
        assert report.first_bad_seq == first_bad, report
    return report


POSITIONS = [1, 6, N]


def edited_value(log: AuditLog, seq: int, column: str):
    old = row(log, seq)
    if column == "payload":
        return {**old.payload, "i": old.payload["i"] + 1000}
    if column == "kind":
        return next(k for k in sorted(KINDS) if k != old.kind)
    if column == "timestamp":
        return utc(old.timestamp) + timedelta(microseconds=1)
    return hashlib.sha256(f"forged {seq}".encode()).hexdigest()


@pytest.mark.parametrize("seq", POSITIONS)
@pytest.mark.parametrize("column", ["payload", "kind", "timestamp", "hash", "prev_hash"])
def test_editing_any_column_of_any_row_is_detected(log, seq, column):
    execute(log, update(E).where(E.c.seq == seq).values({column: edited_value(log, seq, column)}))
    detected(log, seq)


@pytest.mark.parametrize("seq", POSITIONS)
def test_deleting_any_row_is_detected(log, seq):
    execute(log, delete(E).where(E.c.seq == seq))
    report = detected(log, seq)
    if seq == N:  # the last row: only the signed head can tell
        assert "truncated" in report.reason


@pytest.mark.parametrize("seq", [1, 6, N - 1])
def test_swapping_two_rows_is_detected(log, seq):
    execute(
        log,
        update(E).where(E.c.seq == seq).values(seq=-1),
        update(E).where(E.c.seq == seq + 1).values(seq=seq),
        update(E).where(E.c.seq == -1).values(seq=seq + 1),
    )
    detected(log, seq)


def test_moving_a_row_out_of_the_chain_is_detected(log):
    execute(log, update(E).where(E.c.seq == 5).values(seq=-5))
    report = detected(log)
    assert report.first_bad_seq in (-5, 5)


@pytest.mark.parametrize("keep", [0, 3, 8, N - 1])
def test_truncating_the_tail_is_detected(log, keep):
    execute(log, delete(E).where(E.c.seq > keep))
    report = detected(log, keep + 1)
    assert "truncated" in report.reason


@pytest.mark.parametrize("keep", [0, 4, 6, N - 1])
def test_truncating_the_tail_with_its_checkpoints_is_caught_by_the_anchor(log, keep):
    execute(log, delete(E).where(E.c.seq > keep), delete(C).where(C.c.entry_seq > keep))
    report = detected(log, keep + 1)
    assert "anchor" in report.reason and report.anchor_status == "mismatch"


def test_deleting_the_newest_checkpoint_is_caught_by_the_anchor(log):
    execute(log, delete(C).where(C.c.entry_seq == N))
    report = detected(log, 9)
    assert "newest checkpoints deleted" in report.reason


def rewrite_chain(log: AuditLog, from_seq: int) -> None:
    """What an attacker with write access to the database does: edit entry ``from_seq`` and
    recompute every hash after it, so the chain links up again."""
    with log.store.begin() as conn:
        rows = conn.execute(select(E).order_by(E.c.seq)).all()
        prev = GENESIS_HASH
        for r in rows:
            payload = dict(r.payload)
            if r.seq == from_seq:
                payload["i"] = -1
            digest = entry_hash(r.seq, utc(r.timestamp), r.kind, payload, prev)
            conn.execute(
                update(E)
                .where(E.c.seq == r.seq)
                .values(payload=payload, prev_hash=prev, hash=digest)
            )
            prev = digest


@pytest.mark.parametrize("from_seq", [1, 7, N])
def test_a_whole_chain_rewrite_is_detected_by_the_signed_heads(log, from_seq):
    rewrite_chain(log, from_seq)
    report = detected(log)
    assert "chain rewritten" in report.reason
    assert report.first_bad_seq >= from_seq


def test_a_rewrite_without_checkpoints_is_caught_by_the_anchor(log):
    rewrite_chain(log, 2)
    execute(log, delete(C))
    report = detected(log, N)
    assert "anchor" in report.reason


def test_a_rewrite_with_re_signed_checkpoints_fails_their_signatures(log):
    rewrite_chain(log, 3)
    attacker = AuditSigner.generate()
    with log.store.begin() as conn:
        for cp in conn.execute(select(C)).all():
            head = row(log, cp.entry_seq).hash
            signed_at = utc(cp.signed_at)
            # same key id as the real key, signature from the attacker's key
            signature = attacker.sign(head_message(cp.entry_seq, head, signed_at, cp.key_id))
            conn.execute(
                update(C).where(C.c.id == cp.id).values(head_hash=head, signature=signature.hex())
            )
    report = detected(log, 4)
    assert "bad signature" in report.reason


def test_a_forged_checkpoint_row_is_detected(log):
    head = row(log, N).hash
    execute(
        log,
        C.insert().values(
            entry_seq=N,
            head_hash=head,
            signed_at=T0,
            key_id=log.key.key_id,
            signature="ab" * 64,
        ),
    )
    report = detected(log, N)
    assert "bad signature" in report.reason


@pytest.mark.parametrize("column", ["entry_seq", "head_hash", "signed_at", "key_id", "signature"])
def test_editing_a_checkpoint_row_is_detected(log, column):
    values = {
        "entry_seq": 7,
        "head_hash": row(log, 8).hash[::-1],
        "signed_at": T0,
        "key_id": "0" * 16,
        "signature": "cd" * 64,
    }
    execute(log, update(C).where(C.c.entry_seq == 8).values({column: values[column]}))
    detected(log)


def test_a_checkpoint_beyond_the_end_is_detected(log):
    signer = log.key
    signed_at = T0
    message = head_message(N + 5, "e" * 64, signed_at, signer.key_id)
    execute(
        log,
        C.insert().values(
            entry_seq=N + 5,
            head_hash="e" * 64,
            signed_at=signed_at,
            key_id=signer.key_id,
            signature=signer.sign(message).hex(),
        ),
    )
    report = detected(log, N + 1)
    assert "truncated" in report.reason


def test_a_tampered_anchor_file_is_detected(log):
    anchor = json.loads(log.anchor_path.read_text())
    anchor["seq"] = N + 3
    log.anchor_path.write_text(json.dumps(anchor))
    report = detected(log)
    assert "anchor file" in report.reason and report.anchor_status == "bad"


def test_rows_appended_without_the_key_are_an_unsigned_tail(log):
    """An attacker can extend the chain (appending needs no key): not a failure, but reported."""
    prev = row(log, N).hash
    ts = T0 + timedelta(days=1)
    payload = {"allow": True}
    execute(
        log,
        E.insert().values(
            seq=N + 1,
            timestamp=ts,
            kind="policy_decision",
            payload=payload,
            prev_hash=prev,
            hash=entry_hash(N + 1, ts, "policy_decision", payload, prev),
        ),
    )
    report = log.verify()
    assert report.ok and report.unsigned_tail == 1
    assert not log.verify(strict=True).ok


def test_limits_without_the_anchor_file(log, key, tmp_path):
    """Documented limit: a verifier without the anchor cannot tell a log truncated back to a
    signed head (with the newer checkpoints deleted) from one that stopped there; it warns, and
    --strict fails. Edits stay detected."""
    public = tmp_path / "audit.pub"
    public.write_text(key.public_pem())
    execute(log, delete(E).where(E.c.seq > 8), delete(C).where(C.c.entry_seq > 8))
    blind = AuditLog(log.store, load_public_key(public))
    report = blind.verify()
    assert report.ok and report.anchor_status == "missing" and report.warnings
    assert not blind.verify(strict=True).ok
    execute(log, update(E).where(E.c.seq == 2).values(kind="job_refused"))
    assert blind.verify().first_bad_seq == 2


def test_limit_rolling_back_the_anchor_file_with_the_tail(log):
    """Documented limit: with write access to the anchor file too, an attacker who puts back an
    older genuine anchor and truncates to it is not detected (keep anchors out of their reach)."""
    anchor = json.loads(log.anchor_path.read_text())
    with log.store.engine.connect() as conn:
        older = conn.execute(select(C).where(C.c.entry_seq == 8)).one()
    anchor.update(
        seq=8,
        head_hash=older.head_hash,
        signature=older.signature,
        signed_at=utc(older.signed_at).isoformat(timespec="microseconds"),
        checkpoint_id=older.id,
    )
    log.anchor_path.write_text(json.dumps(anchor))
    execute(log, delete(E).where(E.c.seq > 8), delete(C).where(C.c.entry_seq > 8))
    assert log.verify().ok


# -- many random tamperings (slow suite) -----------------------------------------------------------

SLOW_ENTRIES = 200
SLOW_TRIALS = 1000
SLOW_REWRITES = 200
SLOW_SEED = 20260501


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """One signed 200-entry chain in a SQLite file; each trial tampers with a copy."""
    base = tmp_path_factory.mktemp("golden")
    key = generate_key(base / "keys" / "audit-ed25519.key")
    store = open_store(f"sqlite:///{base / 'golden.sqlite'}", create=True)
    log = AuditLog(store, key, now=Clock())
    build(log, SLOW_ENTRIES, 50)
    assert log.verify().ok
    anchor = log.anchor_path
    store.dispose()  # the last connection closes the WAL into the file
    public = base / "audit.pub"
    public.write_text(key.public_pem())
    return base / "golden.sqlite", load_public_key(public), anchor


def _random_hex(rng: np.random.Generator) -> str:
    return bytes(rng.integers(0, 256, size=32, dtype=np.uint8)).hex()


def tamper_once(db: sqlite3.Connection, rng: np.random.Generator, kind: str) -> int:
    """Apply one single-row tampering with raw SQL; returns the first seq it should be blamed on."""
    n = SLOW_ENTRIES
    if kind == "edit":
        seq = int(rng.integers(1, n + 1))
        column = ["payload", "kind", "timestamp", "hash", "prev_hash"][int(rng.integers(0, 5))]
        (old,) = db.execute(f"SELECT {column} FROM audit_entries WHERE seq = ?", (seq,)).fetchone()
        if column == "payload":
            payload = json.loads(old)
            field = ["i", "score", "party", "extra"][int(rng.integers(0, 4))]
            payload[field] = int(rng.integers(-(10**9), 10**9)) if field != "party" else "px"
            if payload == json.loads(old):
                payload["i"] = -payload["i"] - 1
            new = json.dumps(payload)
        elif column == "kind":
            others = sorted(KINDS - {old})
            new = others[int(rng.integers(0, len(others)))]
        elif column == "timestamp":
            shifted = datetime.fromisoformat(old) + timedelta(
                microseconds=int(rng.integers(1, 10**10)) * (1 if rng.random() < 0.5 else -1)
            )
            new = shifted.isoformat(" ", "microseconds")
        else:
            new = _random_hex(rng)
        db.execute(f"UPDATE audit_entries SET {column} = ? WHERE seq = ?", (new, seq))
        return seq
    if kind == "delete":
        seq = int(rng.integers(1, n + 1))
        db.execute("DELETE FROM audit_entries WHERE seq = ?", (seq,))
        return seq
    if kind == "reorder":
        a, b = sorted(int(x) for x in rng.choice(np.arange(1, n + 1), size=2, replace=False))
        db.execute("UPDATE audit_entries SET seq = -1 WHERE seq = ?", (a,))
        db.execute("UPDATE audit_entries SET seq = ? WHERE seq = ?", (a, b))
        db.execute("UPDATE audit_entries SET seq = ? WHERE seq = -1", (b,))
        return a
    assert kind == "truncate"
    keep = int(rng.integers(0, n))
    db.execute("DELETE FROM audit_entries WHERE seq > ?", (keep,))
    if rng.random() < 0.5:  # and the checkpoints that signed the deleted entries
        db.execute("DELETE FROM audit_checkpoints WHERE entry_seq > ?", (keep,))
    return keep + 1


def rewrite_once(db: sqlite3.Connection, rng: np.random.Generator) -> None:
    """Edit one entry and recompute all hashes after it; maybe delete or re-sign checkpoints."""
    from_seq = int(rng.integers(1, SLOW_ENTRIES + 1))
    prev = GENESIS_HASH
    rows = db.execute(
        "SELECT seq, timestamp, kind, payload FROM audit_entries ORDER BY seq"
    ).fetchall()
    for seq, ts, kind, payload_text in rows:
        payload = json.loads(payload_text)
        if seq == from_seq:
            payload["i"] = int(rng.integers(10**6, 10**7))
        when = datetime.fromisoformat(ts).replace(tzinfo=UTC)
        digest = entry_hash(seq, when, kind, payload, prev)
        db.execute(
            "UPDATE audit_entries SET payload = ?, prev_hash = ?, hash = ? WHERE seq = ?",
            (json.dumps(payload), prev, digest, seq),
        )
        prev = digest
    variant = int(rng.integers(0, 3))
    if variant == 1:
        db.execute("DELETE FROM audit_checkpoints WHERE entry_seq >= ?", (from_seq,))
    elif variant == 2:  # point every checkpoint at the new heads, with made-up signatures
        db.execute(
            "UPDATE audit_checkpoints SET head_hash = (SELECT hash FROM audit_entries "
            "WHERE seq = audit_checkpoints.entry_seq), signature = ?",
            ("ab" * 64,),
        )


@pytest.mark.slow
def test_one_thousand_random_tamperings_are_all_detected(golden, tmp_path):
    source, public, anchor = golden
    control = tmp_path / "control.sqlite"
    shutil.copyfile(source, control)
    store = open_store(f"sqlite:///{control}")
    untouched = AuditLog(store, public, anchor_path=anchor).verify(strict=True)
    store.dispose()
    assert untouched.ok and untouched.anchor_status == "match", untouched  # the harness is sound
    rng = np.random.default_rng(SLOW_SEED)
    kinds = ("edit", "delete", "reorder", "truncate")
    plan = [kinds[i % 4] for i in range(SLOW_TRIALS)]
    rng.shuffle(plan)
    detected_by_kind = dict.fromkeys(kinds, 0)
    located = 0
    for trial, kind in enumerate(plan):
        copy = tmp_path / f"trial-{trial % 2}.sqlite"
        shutil.copyfile(source, copy)
        db = sqlite3.connect(copy, isolation_level=None)
        expected = tamper_once(db, rng, kind)
        db.close()
        store = open_store(f"sqlite:///{copy}")
        report = AuditLog(store, public, anchor_path=anchor).verify()
        store.dispose()
        if not report.ok:
            detected_by_kind[kind] += 1
            located += report.first_bad_seq == expected
    rewrites_detected = 0
    for trial in range(SLOW_REWRITES):
        copy = tmp_path / f"rewrite-{trial % 2}.sqlite"
        shutil.copyfile(source, copy)
        db = sqlite3.connect(copy, isolation_level=None)
        rewrite_once(db, rng)
        db.close()
        store = open_store(f"sqlite:///{copy}")
        report = AuditLog(store, public, anchor_path=anchor).verify()
        store.dispose()
        rewrites_detected += not report.ok

    total = sum(detected_by_kind.values())
    print(
        f"\naudit tamper detection (seed {SLOW_SEED}, {SLOW_ENTRIES}-entry chain): "
        f"{total}/{SLOW_TRIALS} single-row tamperings detected {detected_by_kind}, "
        f"{located}/{SLOW_TRIALS} blamed on the exact first bad seq; "
        f"{rewrites_detected}/{SLOW_REWRITES} whole-chain rewrites detected"
    )
    assert total == SLOW_TRIALS
    assert located == SLOW_TRIALS
    assert rewrites_detected == SLOW_REWRITES
