"""Tamper-evident audit log: an append-only hash chain whose head is signed with Ed25519.

What is recorded
    Policy decisions, consent-filter counts (rows in, after consent, after alignment, trained),
    jobs, rounds, published models, refusals and privacy-budget charges: one ``audit_entries``
    row per event, kinds in :data:`KINDS` (plugins may add namespaced kinds such as
    ``"acme.export"``). A payload is a JSON object of at most :data:`MAX_PAYLOAD_BYTES`.

The chain
    Entry ``seq`` (1, 2, ...) stores ``hash = sha256(canonical JSON of ["cdp-fl audit entry v1",
    seq, timestamp, kind, payload, prev_hash])`` where ``prev_hash`` is the previous entry's hash
    (64 zeros for entry 1) and ``timestamp`` is ISO 8601 UTC with microseconds. Canonical JSON
    (:func:`canonical_json`) sorts keys, has no whitespace, keeps non-ASCII characters as UTF-8,
    and admits only what survives a database round trip unchanged: str keys, finite floats
    (written in Python's shortest round-trip form, so a float read back from SQLite's or
    PostgreSQL's JSON text hashes to the same bytes), integers within 64 bits, str, bool, null.
    The payload is normalised before it is stored (tuples become lists, numpy scalars Python
    numbers), so what is hashed is exactly what is stored.

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
    Streams entries in ``seq`` order in chunks (memory does not grow with the table) inside one
    read snapshot, and merges the checkpoints in by their ``seq``. It reports the first bad
    entry and why: a gap in ``seq`` (deleted row), a ``prev_hash`` that does not link (edit,
    insertion, reorder), contents that do not hash to the stored hash (edit of any column), a
    checkpoint with a bad signature or another key (forged row), a checkpoint whose head does
    not match the entry it signs (whole chain rewritten with recomputed hashes), a checkpoint or
    anchor beyond the end of the log (tail truncated), an anchor newer than every checkpoint in
    the database (newest checkpoints deleted with or without the tail). Entries after the newest
    signed head are chained but unsigned: reported as ``unsigned_tail``, a warning;
    ``strict=True`` turns every warning (unsigned tail, missing or stale anchor, no key) into
    a failure.

Limits (what the key and the anchor do and do not buy)
    An attacker who can write the database but not read the key can append entries after the
    newest signed head (reported as the unsigned tail) and can rewrite or truncate the unsigned
    tail undetectably; everything up to the newest signed head is protected. With the database
    *and* the anchor file writable (still without the key), the attacker can delete the anchor,
    or put back an older genuine anchor, and then truncate the log back to any earlier signed
    head: without an anchor, truncation to a signed head cannot be told from a log that simply
    stopped there. Keep a copy of the anchor (or of ``cdp-fl audit verify --json`` output)
    somewhere the database's writers cannot reach to close that gap. Deleting an older (not the
    newest) checkpoint row loses nothing (the newer signed head still covers those entries) and
    is not reported. A verifier with only the public key detects every edit up to the newest
    checkpoint in the database, and truncation when it is given the anchor (``--anchor``).

Concurrency
    Appends are serialised: on SQLite the transaction takes the write lock before reading the
    head (``BEGIN IMMEDIATE``, or a no-op write inside a caller's transaction), on PostgreSQL a
    transaction-scoped advisory lock. The ``seq`` primary key makes a fork fail loudly; an
    append in its own transaction retries once on such a conflict.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, String, Text, and_, cast, or_, select, text, type_coerce
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError

from ..errors import AuditIntegrityError, AuditKeyError, AuditPayloadError
from ..settings import normalize_db_url
from ..store import Store, open_store, schema
from .audit_keys import (
    AuditPublicKey,
    AuditSigner,
    default_key_path,
    generate_key,
    load_public_key,
    load_signer,
)

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
# consent_filter payloads carry the funnel; counts are non-increasing along it (None: step skipped).
CONSENT_FILTER_COUNTS = ("rows_in", "consented", "aligned", "trained")

GENESIS_HASH = "0" * 64
MAX_PAYLOAD_BYTES = 64 * 1024
ENTRY_DOMAIN = "cdp-fl audit entry v1"
HEAD_DOMAIN = b"cdp-fl audit head v1\x00"
ANCHOR_FORMAT = "cdp-fl audit anchor v1"
DEFAULT_CHUNK = 5000

_MAX_DEPTH = 32
_INT_LIMIT = 1 << 63  # what orjson (the store's JSON codec) writes and reads back exactly
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
_KIND_MAX = 64  # audit_entries.kind is String(64)
# pg_advisory_xact_lock key: the first 8 bytes of sha256("cdp-fl audit chain"), as a signed int64.
_PG_LOCK_KEY = int.from_bytes(
    hashlib.sha256(b"cdp-fl audit chain").digest()[:8], "big", signed=True
)

_entries = schema.audit_entries
_checkpoints = schema.audit_checkpoints


# -- canonical encoding -------------------------------------------------------------------------


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace, UTF-8 text, no NaN/inf: the bytes that are hashed and signed."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _normalise(value: Any, path: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise AuditPayloadError(
            "audit payload is nested too deeply",
            field=path,
            fix=f"keep payloads within {_MAX_DEPTH} levels",
        )
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):
        number = int(value)
        if not -_INT_LIMIT <= number < _INT_LIMIT:
            raise AuditPayloadError(
                "audit payload integer does not fit in 64 bits",
                field=path,
                value=number,
                fix="store it as a string",
            )
        return number
    if isinstance(value, numbers.Real):
        real = float(value)
        if not math.isfinite(real):
            raise AuditPayloadError(
                "audit payload number is NaN or infinite",
                field=path,
                value=real,
                fix="store None or a string instead",
            )
        return real
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise AuditPayloadError(
                    "audit payload keys must be strings", field=path, value=key, fix="use str keys"
                )
            out[key] = _normalise(item, f"{path}.{key}", depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [_normalise(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise AuditPayloadError(
        "audit payload value is not JSON (str, int, float, bool, None, list or dict)",
        field=path,
        value=type(value).__name__,
        fix="convert it first (e.g. a datetime to its ISO string)",
    )


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


def _check_consent_filter(payload: dict[str, Any]) -> None:
    missing = [k for k in ("participant", "purpose", *CONSENT_FILTER_COUNTS) if k not in payload]
    if missing:
        raise AuditPayloadError(
            "consent_filter payload lacks fields",
            field="payload",
            value=missing,
            fix="give participant, purpose, rows_in, consented, aligned and trained (None: step skipped)",
        )
    previous: tuple[str, int] | None = None
    for name in CONSENT_FILTER_COUNTS:
        count = payload[name]
        if count is None:
            continue
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise AuditPayloadError(
                "consent_filter counts must be non-negative integers or None",
                field=f"payload.{name}",
                value=count,
            )
        if previous is not None and count > previous[1]:
            raise AuditPayloadError(
                "consent_filter counts must not grow along the funnel",
                field=f"payload.{name}",
                value=count,
                fix=f"{name} cannot exceed {previous[0]}={previous[1]}",
            )
        previous = (name, count)


def normalise_payload(kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``payload`` and return it as it will be stored and hashed."""
    if not isinstance(payload, Mapping):
        raise AuditPayloadError(
            "audit payload must be a dict", field="payload", value=type(payload).__name__
        )
    body = _normalise(payload, "payload", 0)
    try:
        size = len(canonical_json(body).encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise AuditPayloadError(
            "audit payload text is not valid Unicode (lone surrogate)",
            field="payload",
            fix="encode binary data as base64 or hex",
        ) from exc
    if size > MAX_PAYLOAD_BYTES:
        raise AuditPayloadError(
            "audit payload is too large",
            field="payload",
            value=f"{size} bytes",
            fix=f"keep it under {MAX_PAYLOAD_BYTES} bytes; store large artefacts elsewhere and "
            "record their sha256",
        )
    if kind == CONSENT_FILTER:
        _check_consent_filter(body)
    return body


def _utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is None:
        raise AuditPayloadError(
            "audit timestamps must be timezone-aware", field=name, value=value, fix="use UTC"
        )
    return value.astimezone(UTC)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _stored_time(value: Any) -> datetime:
    """A timestamp as read back: SQLite gives naive UTC text, PostgreSQL an aware datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"not a timestamp: {type(value).__name__}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def entry_hash(seq: int, timestamp: datetime, kind: str, payload: Any, prev_hash: str) -> str:
    """The hash an entry commits to (see the module docstring)."""
    material = canonical_json([ENTRY_DOMAIN, seq, _iso(timestamp), kind, payload, prev_hash])
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def head_message(seq: int, head_hash: str, signed_at: datetime, key_id: str) -> bytes:
    """The bytes a checkpoint signs."""
    return HEAD_DOMAIN + canonical_json([seq, head_hash, _iso(signed_at), key_id]).encode("utf-8")


def db_fingerprint(url: str) -> str | None:
    """16 hex characters naming a database's location (None for an in-memory SQLite)."""
    parsed = make_url(normalize_db_url(url))
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file::memory:"):
            return None
        ident = "sqlite:" + str(Path(database).expanduser().resolve())
    else:
        host = (parsed.host or "").lower()
        ident = f"{backend}://{host}:{parsed.port or ''}/{parsed.database or ''}"
    return hashlib.sha256(ident.encode("utf-8")).hexdigest()[:16]


# -- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    timestamp: datetime
    kind: str
    payload: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "timestamp": _iso(self.timestamp),
            "kind": self.kind,
            "payload": self.payload,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class Checkpoint:
    """A signed chain head. ``id`` is None for one read from an anchor file."""

    id: int | None
    entry_seq: int
    head_hash: str
    signed_at: datetime
    key_id: str
    signature: str  # hex

    def message(self) -> bytes:
        return head_message(self.entry_seq, self.head_hash, self.signed_at, self.key_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "seq": self.entry_seq,
            "head_hash": self.head_hash,
            "signed_at": _iso(self.signed_at),
            "key_id": self.key_id,
            "signature": self.signature,
        }


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`AuditLog.verify` found. ``ok`` is False when tampering is detected (or, with
    ``strict``, when there is any warning); ``first_bad_seq`` and ``reason`` say where and why."""

    ok: bool
    entries: int
    first_bad_seq: int | None
    reason: str | None
    head_seq: int
    head_hash: str
    latest_checkpoint: Checkpoint | None
    checkpoints: int
    unsigned_tail: int
    key_id: str | None
    anchor_path: str | None
    # match, stale (older than the newest checkpoint), mismatch, missing, none (no anchor path),
    # bad (unreadable or badly signed), present (found, not compared: an earlier check failed)
    anchor_status: str
    anchor_seq: int | None
    warnings: tuple[str, ...] = ()
    strict: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "latest_checkpoint": (
                self.latest_checkpoint.to_dict() if self.latest_checkpoint else None
            ),
            "checkpoints": self.checkpoints,
            "unsigned_tail": self.unsigned_tail,
            "key_id": self.key_id,
            "anchor": {
                "path": self.anchor_path,
                "status": self.anchor_status,
                "seq": self.anchor_seq,
            },
            "warnings": list(self.warnings),
            "strict": self.strict,
        }

    def raise_for_failure(self) -> None:
        """Raise :class:`AuditIntegrityError` when the log did not verify."""
        if not self.ok:
            raise AuditIntegrityError(
                f"audit log does not verify: {self.reason}",
                field="seq",
                value=self.first_bad_seq,
                fix="investigate who wrote the audit tables; `cdp-fl audit verify --json` has details",
            )


# -- raw rows as read for verification ------------------------------------------------------------


@dataclass(frozen=True)
class _RawCheckpoint:
    id: Any
    entry_seq: Any
    head_hash: Any
    signed_at: Any
    key_id: Any
    signature: Any

    def parse(self) -> Checkpoint:
        if not isinstance(self.entry_seq, int) or isinstance(self.entry_seq, bool):
            raise TypeError("entry_seq is not an integer")
        for value in (self.head_hash, self.key_id, self.signature):
            if not isinstance(value, str):
                raise TypeError("not text")
        return Checkpoint(
            self.id,
            self.entry_seq,
            self.head_hash,
            _stored_time(self.signed_at),
            self.key_id,
            self.signature,
        )


def _seq_key(value: Any) -> float:
    """Order key for a checkpoint's entry_seq as SQLite may hold it (any type after tampering)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return math.inf


class _Peek:
    def __init__(self, items: Iterator[Any]) -> None:
        self._items = items
        self._next: Any = None
        self._done = False
        self._advance()

    def _advance(self) -> None:
        try:
            self._next = next(self._items)
        except StopIteration:
            self._next, self._done = None, True

    def peek(self) -> Any:
        return None if self._done else self._next

    def pop(self) -> Any:
        item = self._next
        self._advance()
        return item


class _Failure(Exception):
    def __init__(self, seq: int | None, reason: str) -> None:
        super().__init__(reason)
        self.seq = seq
        self.reason = reason


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
        when = _utc(at if at is not None else self._now(), "at")
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
        signed_at = _utc(at if at is not None else self._now(), "at")
        with self.store.writer() as conn:
            self._lock(conn, own_transaction=True)
            seq, head_hash = self._signable_head(conn, signer)
            latest = _latest_checkpoint(conn)
            if (
                latest is not None
                and latest.entry_seq == seq
                and latest.head_hash == head_hash
                and latest.key_id == signer.key_id
                and _signature_ok(signer, latest)
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
        self._write_anchor(checkpoint)
        return checkpoint

    def _signable_head(self, conn: Connection, signer: AuditPublicKey) -> tuple[int, str]:
        """The head, after checking the entries since the newest signed head (in the database
        or the anchor) link up to it."""

        def refuse(reason: str, seq: int | None) -> AuditIntegrityError:
            return AuditIntegrityError(
                f"refusing to sign the audit head: {reason}",
                field="seq",
                value=seq,
                fix="run `cdp-fl audit verify` and investigate; if the database was deliberately "
                f"recreated, move the anchor file {self.anchor_path} away",
            )

        anchor, status, problem = self._read_anchor()
        if status == "bad":
            raise refuse(problem or "anchor file is invalid", None)
        base_seq, base_hash = 0, GENESIS_HASH
        latest = _latest_checkpoint(conn)
        if latest is not None:
            reason = _checkpoint_problem(signer, latest)
            if reason:
                raise refuse(reason, latest.entry_seq)
            base_seq, base_hash = latest.entry_seq, latest.head_hash
        if anchor is not None and anchor.entry_seq > base_seq:
            raise refuse(
                f"the anchor signs seq {anchor.entry_seq} but the newest checkpoint in the "
                f"database is at seq {base_seq}",
                base_seq + 1,
            )
        prev, expected = base_hash, base_seq + 1
        if base_seq > 0:
            row = conn.execute(_entry_select(conn).where(_entries.c.seq == base_seq)).first()
            if row is None:
                raise refuse(f"entry {base_seq}, signed by a checkpoint, is missing", base_seq)
            digest, bad_seq, reason = _check_entry(row, base_seq, None)
            if reason is None and digest != base_hash:
                bad_seq, reason = base_seq, f"entry {base_seq} does not match its signed head"
            if reason is not None:
                raise refuse(reason, bad_seq)
        for row in _entry_rows(conn, base_seq, DEFAULT_CHUNK):
            digest, bad_seq, reason = _check_entry(row, expected, prev)
            if reason is not None:
                raise refuse(reason, bad_seq)
            prev, expected = digest, expected + 1
        return expected - 1, prev

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except DBAPIError as exc:
            error = self.store.store_error(exc)
            if error is not None:
                raise error from exc
            raise

    # -- anchor file ---------------------------------------------------------------------------

    def _read_anchor(self) -> tuple[Checkpoint | None, str, str | None]:
        """(anchor, status, problem): status is none (no path), missing, present or bad."""
        path = self.anchor_path
        if path is None:
            return None, "none", None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None, "missing", None
        except OSError as exc:
            return None, "bad", f"anchor file unreadable: {exc.strerror}"
        try:
            doc = orjson.loads(data)
            if doc.get("format") != ANCHOR_FORMAT:
                raise ValueError("format")
            anchor = _RawCheckpoint(
                doc.get("checkpoint_id"),
                doc["seq"],
                doc["head_hash"],
                doc["signed_at"],
                doc["key_id"],
                doc["signature"],
            ).parse()
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            return None, "bad", f"anchor file {path} is malformed"
        if self.key is not None:
            reason = _checkpoint_problem(self.key, anchor, what="anchor file")
            if reason:
                return None, "bad", reason
        return anchor, "present", None

    def _write_anchor(self, checkpoint: Checkpoint) -> None:
        path = self.anchor_path
        if path is None:
            return
        current, status, _ = self._read_anchor()
        if status == "present" and current is not None and current.entry_seq > checkpoint.entry_seq:
            return  # never move the anchor backwards (a concurrent checkpoint signed more)
        doc = {
            "format": ANCHOR_FORMAT,
            "db": self.store.display_url,
            "db_fingerprint": db_fingerprint(self.store.url),
            "checkpoint_id": checkpoint.id,
            **{k: v for k, v in checkpoint.to_dict().items() if k != "id"},
        }
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    # -- reading -------------------------------------------------------------------------------

    def head(self) -> tuple[int, str]:
        """(seq, hash) of the newest entry; (0, GENESIS_HASH) for an empty log."""
        with self._guard(), self.store.engine.connect() as conn:
            return _head(conn)

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest checkpoint row as stored (not verified: use :meth:`verify`)."""
        with self._guard(), self.store.engine.connect() as conn:
            return _latest_checkpoint(conn)

    def entries(
        self, *, kind: str | None = None, after_seq: int = 0, chunk_size: int = DEFAULT_CHUNK
    ) -> Iterator[AuditEntry]:
        """Entries in seq order, read in chunks (not verified: use :meth:`verify`)."""
        last = after_seq
        while True:
            with self._guard(), self.store.engine.connect() as conn:
                query = _entry_select(conn).where(_entries.c.seq > last).order_by(_entries.c.seq)
                if kind is not None:
                    query = query.where(_entries.c.kind == kind)
                rows = conn.execute(query.limit(chunk_size)).all()
            for row in rows:
                yield _entry_from_row(row)
            if len(rows) < chunk_size:
                return
            last = rows[-1].seq

    def recent(self, limit: int = 50, *, kind: str | None = None) -> list[AuditEntry]:
        """The newest ``limit`` entries (of ``kind``), oldest first."""
        with self._guard(), self.store.engine.connect() as conn:
            query = _entry_select(conn).order_by(_entries.c.seq.desc()).limit(limit)
            if kind is not None:
                query = query.where(_entries.c.kind == kind)
            rows = conn.execute(query).all()
        return [_entry_from_row(row) for row in reversed(rows)]

    # -- verification --------------------------------------------------------------------------

    def verify(self, *, strict: bool = False, chunk_size: int = DEFAULT_CHUNK) -> VerifyReport:
        """Recompute the chain, check every checkpoint and the anchor; see the module docstring."""
        key = self.key
        anchor, anchor_status, anchor_problem = self._read_anchor()
        warnings: list[str] = []
        failure: _Failure | None = None
        count, prev, head_seq = 0, GENESIS_HASH, 0
        latest: Checkpoint | None = None
        n_checkpoints = 0
        anchor_seen_hash: str | None = GENESIS_HASH if anchor and anchor.entry_seq == 0 else None

        def check_checkpoint(raw: _RawCheckpoint, actual: str | None, end: int) -> Checkpoint:
            try:
                checkpoint = raw.parse()
            except (TypeError, ValueError):
                raise _Failure(
                    min(end + 1, _int_or(raw.entry_seq, end + 1)),
                    f"checkpoint #{raw.id} is malformed",
                ) from None
            if key is not None:
                reason = _checkpoint_problem(key, checkpoint)
                if reason:
                    raise _Failure(min(checkpoint.entry_seq, end + 1), reason)
            if actual is None:
                raise _Failure(
                    end + 1,
                    f"log truncated: checkpoint #{checkpoint.id} signs seq {checkpoint.entry_seq} "
                    f"but the log ends at seq {end}",
                )
            if actual != checkpoint.head_hash:
                raise _Failure(
                    checkpoint.entry_seq,
                    f"entry {checkpoint.entry_seq} does not match the head signed by checkpoint "
                    f"#{checkpoint.id} (chain rewritten)",
                )
            return checkpoint

        with self._guard(), self._snapshot() as conn:
            cps = _Peek(_checkpoint_rows(conn, chunk_size))
            try:
                while cps.peek() is not None and _seq_key(cps.peek().entry_seq) <= 0:
                    raw = cps.pop()
                    actual = GENESIS_HASH if raw.entry_seq == 0 else None
                    latest = check_checkpoint(raw, actual, 0)
                    n_checkpoints += 1
                expected = 1
                for row in _entry_rows(conn, None, chunk_size):
                    digest, bad_seq, reason = _check_entry(row, expected, prev)
                    if reason is not None:
                        raise _Failure(bad_seq, reason)
                    prev, head_seq, count = digest, expected, count + 1
                    if anchor is not None and anchor.entry_seq == expected:
                        anchor_seen_hash = digest
                    while cps.peek() is not None and _seq_key(cps.peek().entry_seq) <= expected:
                        raw = cps.pop()
                        actual = digest if raw.entry_seq == expected else None
                        latest = check_checkpoint(raw, actual, expected - 1)
                        n_checkpoints += 1
                    expected += 1
                if cps.peek() is not None:  # signs a seq past the end of the log
                    check_checkpoint(cps.pop(), None, head_seq)
            except _Failure as exc:
                failure = exc

        signed_seq = latest.entry_seq if latest is not None else 0
        if failure is None:
            if anchor_status == "bad":
                failure = _Failure(None, anchor_problem or "anchor file is invalid")
            elif anchor is not None:
                if anchor.entry_seq > head_seq:
                    anchor_status = "mismatch"
                    failure = _Failure(
                        head_seq + 1,
                        f"log truncated: the anchor file signs seq {anchor.entry_seq} but the log "
                        f"ends at seq {head_seq}",
                    )
                elif anchor_seen_hash != anchor.head_hash:
                    anchor_status = "mismatch"
                    failure = _Failure(
                        anchor.entry_seq,
                        f"entry {anchor.entry_seq} does not match the head signed in the anchor "
                        "file (chain rewritten)",
                    )
                elif anchor.entry_seq > signed_seq:
                    anchor_status = "mismatch"
                    failure = _Failure(
                        signed_seq + 1,
                        f"newest checkpoints deleted: the anchor file signs seq {anchor.entry_seq} "
                        f"but the newest checkpoint in the database is at seq {signed_seq}",
                    )
                elif anchor.entry_seq < signed_seq:
                    anchor_status = "stale"
                    warnings.append(
                        f"the anchor file signs seq {anchor.entry_seq}, older than the newest "
                        f"checkpoint (seq {signed_seq}): truncation back to it would go unnoticed"
                    )
                else:
                    anchor_status = "match"
            elif head_seq > 0 or latest is not None:
                if anchor_status == "missing":
                    warnings.append(
                        f"anchor file {self.anchor_path} is missing: truncation of the log back to "
                        "a signed head cannot be ruled out"
                    )
                else:
                    warnings.append(
                        "no anchor file given: truncation of the log back to a signed head cannot "
                        "be ruled out"
                    )
        if key is None and (head_seq > 0 or latest is not None):
            warnings.insert(0, "no public key: checkpoint signatures were not checked")
        unsigned = max(0, head_seq - signed_seq) if failure is None else 0
        if failure is None and unsigned:
            what = f"{unsigned} {'entry' if unsigned == 1 else 'entries'}"
            where = f"after seq {signed_seq}" if signed_seq else "(no checkpoint yet)"
            warnings.insert(0, f"unsigned tail: {what} {where} chained but not signed yet")
        ok = failure is None
        first_bad, reason = (failure.seq, failure.reason) if failure is not None else (None, None)
        if ok and strict and warnings:
            ok, reason = False, f"strict: {warnings[0]}"
            first_bad = signed_seq + 1 if unsigned else None
        return VerifyReport(
            ok=ok,
            entries=count,
            first_bad_seq=first_bad,
            reason=reason,
            head_seq=head_seq,
            head_hash=prev,
            latest_checkpoint=latest,
            checkpoints=n_checkpoints,
            unsigned_tail=unsigned,
            key_id=key.key_id if key is not None else None,
            anchor_path=str(self.anchor_path) if self.anchor_path is not None else None,
            anchor_status=anchor_status,
            anchor_seq=anchor.entry_seq if anchor is not None else None,
            warnings=tuple(warnings),
            strict=strict,
        )

    @contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        """One read transaction: a consistent view however long the scan takes."""
        with self.store.engine.connect() as conn:
            if self.store.dialect == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn


# -- helpers over connections ---------------------------------------------------------------------


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _head(conn: Connection) -> tuple[int, str]:
    row = conn.execute(
        select(_entries.c.seq, _entries.c.hash).order_by(_entries.c.seq.desc()).limit(1)
    ).first()
    return (row.seq, row.hash) if row is not None else (0, GENESIS_HASH)


def _entry_select(conn: Connection) -> Any:
    # Read the raw text of the payload (and, on SQLite, of the timestamp) so an edited row that no
    # longer parses is reported as a bad entry instead of failing the read.
    ts = (
        type_coerce(_entries.c.timestamp, String)
        if conn.dialect.name == "sqlite"
        else _entries.c.timestamp
    )
    return select(
        _entries.c.seq,
        ts.label("timestamp"),
        _entries.c.kind,
        cast(_entries.c.payload, Text).label("payload"),
        _entries.c.prev_hash,
        _entries.c.hash,
    )


def _entry_rows(conn: Connection, after: int | None, chunk: int) -> Iterator[Any]:
    """Entries in seq order, ``chunk`` rows per query (keyset pagination on the primary key)."""
    base = _entry_select(conn).order_by(_entries.c.seq).limit(chunk)
    last = after
    while True:
        query = base if last is None else base.where(_entries.c.seq > last)
        rows = conn.execute(query).all()
        yield from rows
        if len(rows) < chunk:
            return
        last = rows[-1].seq


def _check_entry(row: Any, expected: int, prev: str | None) -> tuple[str | None, int, str | None]:
    """(recomputed hash, seq to blame, reason or None). ``prev`` None skips the link check."""
    seq = row.seq
    if seq != expected:
        if isinstance(seq, int) and seq < expected:
            return None, seq, f"entry with seq {seq} is outside the chain (expected {expected})"
        return None, expected, f"entry {expected} is missing (deleted or renumbered)"
    if prev is not None and row.prev_hash != prev:
        what = "the genesis hash" if expected == 1 else f"entry {expected - 1}'s hash"
        return None, seq, f"entry {seq}'s prev_hash does not match {what} (edited or reordered)"
    try:
        payload = orjson.loads(row.payload)
        digest = entry_hash(seq, _stored_time(row.timestamp), row.kind, payload, row.prev_hash)
    except (orjson.JSONDecodeError, TypeError, ValueError, UnicodeError):
        return None, seq, f"entry {seq} is malformed (payload or timestamp does not parse)"
    if digest != row.hash:
        return None, seq, f"entry {seq}'s contents do not match its hash (edited)"
    return digest, seq, None


def _checkpoint_select(conn: Connection) -> Any:
    signed_at = (
        type_coerce(_checkpoints.c.signed_at, String)
        if conn.dialect.name == "sqlite"
        else _checkpoints.c.signed_at
    )
    c = _checkpoints.c
    return select(
        c.id, c.entry_seq, c.head_hash, signed_at.label("signed_at"), c.key_id, c.signature
    )


def _checkpoint_rows(conn: Connection, chunk: int) -> Iterator[_RawCheckpoint]:
    c = _checkpoints.c
    base = _checkpoint_select(conn).order_by(c.entry_seq, c.id).limit(chunk)
    last: tuple[Any, Any] | None = None
    while True:
        query = base
        if last is not None:
            query = base.where(
                or_(c.entry_seq > last[0], and_(c.entry_seq == last[0], c.id > last[1]))
            )
        rows = conn.execute(query).all()
        for row in rows:
            yield _RawCheckpoint(*row)
        if len(rows) < chunk:
            return
        last = (rows[-1].entry_seq, rows[-1].id)


def _latest_checkpoint(conn: Connection) -> Checkpoint | None:
    """The newest checkpoint row (highest seq), parsed but not verified."""
    c = _checkpoints.c
    row = conn.execute(
        _checkpoint_select(conn).order_by(c.entry_seq.desc(), c.id.desc()).limit(1)
    ).first()
    if row is None:
        return None
    try:
        return _RawCheckpoint(*row).parse()
    except (TypeError, ValueError):
        raise AuditIntegrityError(
            "the newest audit checkpoint is malformed",
            field="audit_checkpoints.id",
            value=row[0],
            fix="run `cdp-fl audit verify` and investigate",
        ) from None


def _signature_ok(key: AuditPublicKey, checkpoint: Checkpoint) -> bool:
    try:
        signature = bytes.fromhex(checkpoint.signature)
    except ValueError:
        return False
    try:
        message = checkpoint.message()
    except (TypeError, ValueError):
        return False
    return key.verify(message, signature)


def _checkpoint_problem(
    key: AuditPublicKey, checkpoint: Checkpoint, *, what: str | None = None
) -> str | None:
    name = what or f"checkpoint #{checkpoint.id}"
    if checkpoint.key_id != key.key_id:
        return (
            f"{name} (seq {checkpoint.entry_seq}) is signed by key {checkpoint.key_id!r}, "
            f"not by the audit key {key.key_id}"
        )
    if not _signature_ok(key, checkpoint):
        return f"{name} (seq {checkpoint.entry_seq}) has a bad signature (forged or edited)"
    return None


def _entry_from_row(row: Any) -> AuditEntry:
    try:
        payload = orjson.loads(row.payload)
        timestamp = _stored_time(row.timestamp)
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise AuditIntegrityError(
            "audit entry is malformed",
            field="seq",
            value=row.seq,
            fix="run `cdp-fl audit verify` and investigate",
        ) from exc
    return AuditEntry(row.seq, timestamp, row.kind, payload, row.prev_hash, row.hash)
