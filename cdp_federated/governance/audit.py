"""Tamper-evident audit log: an append-only hash chain whose head is signed with Ed25519.

What is recorded
    Policy decisions, consent-filter counts (rows in, after consent, after alignment, trained),
    jobs, rounds, published models, refusals and privacy-budget charges: one ``audit_entries``
    row per event, kinds in :data:`KINDS` (plugins may add namespaced kinds such as
    ``"acme.export"``). A payload is a JSON object of at most :data:`MAX_PAYLOAD_BYTES`.

The chain
    Each entry stores the SHA-256 of its own contents and of the previous entry's hash, over
    canonical JSON, so what is hashed is exactly what is stored (:mod:`.audit_format`).

Signed heads and the anchor file
    :meth:`AuditLog.checkpoint` signs ``b"cdp-fl audit head v1\\x00" + canonical JSON of [seq,
    head_hash, signed_at, key_id]`` with a key kept outside the database
    (:mod:`.audit_keys`), inserts the checkpoint into ``audit_checkpoints`` and then, after the
    commit, writes the same signed head to an *anchor file* next to the key:
    ``<key dir>/audit-head-<db fingerprint>.json`` (the fingerprint hashes the database's
    location: SQLite file path, or PostgreSQL host, port and database name, not the user). The
    anchor never moves backwards. Before signing, the checkpoint re-checks the entries since
    the newest signed head, so the key never attests a chain that was already tampered with.

Verification (:meth:`AuditLog.verify`)
    Streams the whole chain in one read snapshot and reports the first bad entry and why; what
    it detects, and what the key and the anchor cannot protect, is in :mod:`.audit_verify`.
    Reading the tables and the anchor file: :mod:`.audit_store`.

Concurrency
    Appends are serialised: on SQLite the transaction takes the write lock before reading the
    head (``BEGIN IMMEDIATE``, or a no-op write inside a caller's transaction), on PostgreSQL a
    transaction-scoped advisory lock. The ``seq`` primary key makes a fork fail loudly; an
    append in its own transaction retries once on such a conflict.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select, text
from sqlalchemy.exc import IntegrityError

from ..errors import AuditIntegrityError, AuditKeyError, AuditPayloadError
from ..settings import normalize_db_url
from ..store import Store, open_store, schema
from .audit_format import CONSENT_FILTER_COUNTS as CONSENT_FILTER_COUNTS
from .audit_format import ENTRY_DOMAIN as ENTRY_DOMAIN
from .audit_format import (
    GENESIS_HASH,
    MAX_PAYLOAD_BYTES,
    AuditEntry,
    Checkpoint,
    as_utc,
    canonical_json,
    check_consent_filter,
    db_fingerprint,
    entry_hash,
    head_message,
    normalise_json,
)
from .audit_format import HEAD_DOMAIN as HEAD_DOMAIN
from .audit_keys import (
    AuditPublicKey,
    AuditSigner,
    default_key_path,
    generate_key,
    load_public_key,
    load_signer,
)
from .audit_store import ANCHOR_FORMAT as ANCHOR_FORMAT
from .audit_store import (
    DEFAULT_CHUNK,
    entry_from_row,
    entry_select,
    latest_checkpoint,
    signature_ok,
    store_errors,
    write_anchor,
)
from .audit_verify import VerifyReport, signable_head, verify_chain

__all__ = [
    "AuditLog",
    "AuditEntry",
    "Checkpoint",
    "VerifyReport",
    "AuditPayloadError",
    "GENESIS_HASH",
    "MAX_PAYLOAD_BYTES",
    "KINDS",
    "POLICY_DECISION",
    "CONSENT_FILTER",
    "JOB_STARTED",
    "ROUND_COMMITTED",
    "MODEL_PUBLISHED",
    "JOB_REFUSED",
    "BUDGET_CHARGED",
    "canonical_json",
    "entry_hash",
    "head_message",
    "db_fingerprint",
]

POLICY_DECISION = "policy_decision"
CONSENT_FILTER = "consent_filter"
JOB_STARTED = "job_started"
ROUND_COMMITTED = "round_committed"
MODEL_PUBLISHED = "model_published"
JOB_REFUSED = "job_refused"
BUDGET_CHARGED = "budget_charged"
KINDS = frozenset(
    {
        POLICY_DECISION,
        CONSENT_FILTER,
        JOB_STARTED,
        ROUND_COMMITTED,
        MODEL_PUBLISHED,
        JOB_REFUSED,
        BUDGET_CHARGED,
    }
)

_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
_KIND_MAX = 64  # audit_entries.kind is String(64)
# pg_advisory_xact_lock key: the first 8 bytes of sha256("cdp-fl audit chain"), as a signed int64.
_PG_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"cdp-fl audit chain").digest()[:8], "big", signed=True
)

_entries = schema.audit_entries
_checkpoints = schema.audit_checkpoints


def _check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not _KIND_RE.match(kind) or len(kind) > _KIND_MAX:
        raise AuditPayloadError(
            "audit kind must be lower_snake_case words separated by dots, at most 64 characters",
            field="kind",
            value=kind,
            fix=f"use one of {sorted(KINDS)} or a namespaced kind such as 'myplugin.event'",
        )
    if "." not in kind and kind not in KINDS:
        raise AuditPayloadError(
            "unknown audit kind",
            field="kind",
            value=kind,
            fix=f"use one of {sorted(KINDS)}, or namespace a plugin's own kind: 'myplugin.{kind}'",
        )
    return kind


def normalise_payload(kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``payload`` and return it as it will be stored and hashed."""
    body = normalise_json(payload)
    if kind == CONSENT_FILTER:
        check_consent_filter(body)
    return body


# -- the log ------------------------------------------------------------------------------------


class AuditLog:
    """The audit chain of one store. ``key`` is an :class:`AuditSigner` to checkpoint (and
    verify), an :class:`AuditPublicKey` to verify only, or None (chain checks only; appending
    never needs the key). ``anchor_path`` defaults to ``<key dir>/audit-head-<db fingerprint>.json``
    when the key came from a file. ``now`` injects the clock."""

    def __init__(
        self,
        store: Store,
        key: AuditPublicKey | None = None,
        *,
        anchor_path: str | os.PathLike[str] | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self._now = now or (lambda: datetime.now(UTC))
        if anchor_path is not None:
            self.anchor_path: Path | None = Path(anchor_path)
        else:
            fingerprint = db_fingerprint(store.url)
            self.anchor_path = (
                key.path.parent / f"audit-head-{fingerprint}.json"
                if key is not None and key.path is not None and fingerprint is not None
                else None
            )

    @classmethod
    def open(
        cls,
        db: str | Store | None = None,
        *,
        key_path: str | os.PathLike[str] | None = None,
        public_key_path: str | os.PathLike[str] | None = None,
        create_key: bool = False,
        anchor_path: str | os.PathLike[str] | None = None,
    ) -> AuditLog:
        """The log of ``db`` (a Store, a URL or a SQLite path; default the configured store) with
        the signing key at ``key_path`` (default setting ``audit_key``), created when absent if
        ``create_key``; or verify-only with ``public_key_path``."""
        from ..settings import default_db_url

        store = (
            db if isinstance(db, Store) else open_store(normalize_db_url(db or default_db_url()))
        )
        key: AuditPublicKey
        if public_key_path is not None:
            key = load_public_key(public_key_path)
        else:
            path = Path(key_path) if key_path is not None else default_key_path()
            if create_key and not path.exists():
                key = generate_key(path)
            else:
                key = load_signer(path)
        return cls(store, key, anchor_path=anchor_path)

    # -- writing -------------------------------------------------------------------------------

    def append(
        self,
        kind: str,
        payload: Mapping[str, Any],
        *,
        at: datetime | None = None,
        conn: Connection | None = None,
    ) -> AuditEntry:
        """Append one entry. With ``conn`` it is written in the caller's transaction, committed or
        rolled back with the action it records; appends are then serialised until that
        transaction ends, so keep it short. (On SQLite, append before the transaction reads
        anything, or use a :meth:`Store.writer` connection: a transaction that has already read
        cannot always upgrade to the write lock.)"""
        kind = _check_kind(kind)
        body = normalise_payload(kind, payload)
        when = as_utc(at if at is not None else self._now(), "at")
        if conn is not None:
            return self._append(conn, kind, body, when, own_transaction=False)
        try:
            return self._append_committed(kind, body, when)
        except IntegrityError:
            pass  # another writer took this seq (the primary key stopped a fork): retry once
        try:
            return self._append_committed(kind, body, when)
        except IntegrityError as exc:
            raise AuditIntegrityError(
                "audit append conflicted twice with a concurrent writer",
                field="seq",
                fix="retry; if it persists, look for writers that bypass AuditLog",
            ) from exc

    def _append_committed(self, kind: str, body: dict[str, Any], when: datetime) -> AuditEntry:
        with self.store.writer() as conn:
            entry = self._append(conn, kind, body, when, own_transaction=True)
            conn.commit()
        return entry

    def _lock(self, conn: Connection, *, own_transaction: bool) -> None:
        if self.store.dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        elif self.store.dialect == "sqlite" and not own_transaction:
            # A no-op write takes SQLite's write lock now, before the head is read.
            conn.execute(text("UPDATE audit_entries SET seq = seq WHERE 0 = 1"))

    def _append(
        self,
        conn: Connection,
        kind: str,
        body: dict[str, Any],
        when: datetime,
        *,
        own_transaction: bool,
    ) -> AuditEntry:
        self._lock(conn, own_transaction=own_transaction)
        seq, prev = _head(conn)
        seq += 1
        digest = entry_hash(seq, when, kind, body, prev)
        conn.execute(
            _entries.insert().values(
                seq=seq, timestamp=when, kind=kind, payload=body, prev_hash=prev, hash=digest
            )
        )
        return AuditEntry(seq, when, kind, body, prev, digest)

    def checkpoint(self, *, at: datetime | None = None) -> Checkpoint:
        """Sign the current head, store the checkpoint, then update the anchor file. Refuses
        (:class:`AuditIntegrityError`) when the entries since the newest signed head do not
        verify: the key never attests a tampered chain."""
        signer = self.key
        if not isinstance(signer, AuditSigner) or signer.private_key is None:
            raise AuditKeyError(
                "checkpointing the audit log needs the private signing key",
                field="audit_key",
                value=self.key.key_id if self.key else None,
                fix="open the log with the key file (AuditLog.open(key_path=...))",
            )
        signed_at = as_utc(at if at is not None else self._now(), "at")
        with self.store.writer() as conn:
            self._lock(conn, own_transaction=True)
            seq, head_hash = signable_head(conn, signer, self.anchor_path)
            latest = latest_checkpoint(conn)
            if (
                latest is not None
                and latest.entry_seq == seq
                and latest.head_hash == head_hash
                and latest.key_id == signer.key_id
                and signature_ok(signer, latest)
            ):
                checkpoint = latest  # nothing new to sign: idempotent
            else:
                message = head_message(seq, head_hash, signed_at, signer.key_id)
                signature = signer.sign(message).hex()
                result = conn.execute(
                    _checkpoints.insert().values(
                        entry_seq=seq,
                        head_hash=head_hash,
                        signed_at=signed_at,
                        key_id=signer.key_id,
                        signature=signature,
                    )
                )
                checkpoint = Checkpoint(
                    result.inserted_primary_key[0],
                    seq,
                    head_hash,
                    signed_at,
                    signer.key_id,
                    signature,
                )
            conn.commit()
        write_anchor(self.anchor_path, signer, self.store, checkpoint)
        return checkpoint

    # -- reading -------------------------------------------------------------------------------

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the newest entry; (0, GENESIS_HASH) for an empty log."""
        with store_errors(self.store), self.store.engine.connect() as conn:
            return _head(conn)

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint row as stored (not verified: use :meth:`verify`)."""
        with store_errors(self.store), self.store.engine.connect() as conn:
            return latest_checkpoint(conn)

    def entries(
        self, *, kind: str | None = None, after_seq: int = 0, chunk_size: int = DEFAULT_CHUNK
    ) -> Iterator[AuditEntry]:
        """Entries in seq order, read in chunks (not verified: use :meth:`verify`)."""
        last = after_seq
        while True:
            with store_errors(self.store), self.store.engine.connect() as conn:
                query = entry_select(conn).where(_entries.c.seq > last).order_by(_entries.c.seq)
                if kind is not None:
                    query = query.where(_entries.c.kind == kind)
                rows = conn.execute(query.limit(chunk_size)).all()
            for row in rows:
                yield entry_from_row(row)
            if len(rows) < chunk_size:
                return
            last = rows[-1].seq

    def recent(self, limit: int = 50, *, kind: str | None = None) -> list[AuditEntry]:
        """The newest ``limit`` entries (of ``kind``), oldest first."""
        with store_errors(self.store), self.store.engine.connect() as conn:
            query = entry_select(conn).order_by(_entries.c.seq.desc()).limit(limit)
            if kind is not None:
                query = query.where(_entries.c.kind == kind)
            rows = conn.execute(query).all()
        return [entry_from_row(row) for row in reversed(rows)]

    # -- verification --------------------------------------------------------------------------

    def verify(self, *, strict: bool = False, chunk_size: int = DEFAULT_CHUNK) -> VerifyReport:
        """Recompute the chain, check every checkpoint and the anchor; see :mod:`.audit_verify`."""
        return verify_chain(
            self.store, self.key, self.anchor_path, strict=strict, chunk_size=chunk_size
        )


def _head(conn: Connection) -> tuple[int, str]:
    row = conn.execute(
        select(_entries.c.seq, _entries.c.hash).order_by(_entries.c.seq.desc()).limit(1)
    ).first()
    return (row.seq, row.hash) if row is not None else (0, GENESIS_HASH)
