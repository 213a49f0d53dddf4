"""Reading what the audit chain stored: the raw rows of ``audit_entries`` and
``audit_checkpoints`` (read as text, so a tampered row is reported rather than failing the read),
chunked scans in ``seq`` order, checkpoint signature checks, and the anchor file.

The anchor file (``<key dir>/audit-head-<db fingerprint>.json``) holds the newest signed head,
written after each checkpoint commits and never moved backwards; see :mod:`.audit`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Connection, String, Text, and_, cast, or_, select, type_coerce
from sqlalchemy.exc import DBAPIError

from ..errors import AuditIntegrityError
from ..store import Store, schema
from .audit_format import AuditEntry, Checkpoint, db_fingerprint, entry_hash, stored_time
from .audit_keys import AuditPublicKey

__all__ = [
    "ANCHOR_FORMAT",
    "DEFAULT_CHUNK",
    "RawCheckpoint",
    "check_entry",
    "checkpoint_problem",
    "checkpoint_rows",
    "entry_from_row",
    "entry_rows",
    "entry_select",
    "latest_checkpoint",
    "read_anchor",
    "signature_ok",
    "snapshot",
    "store_errors",
    "write_anchor",
]

ANCHOR_FORMAT = "cdp-fl audit anchor v1"
DEFAULT_CHUNK = 5000

_entries = schema.audit_entries
_checkpoints = schema.audit_checkpoints


# -- raw rows --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawCheckpoint:
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
            stored_time(self.signed_at),
            self.key_id,
            self.signature,
        )


# -- connections --------------------------------------------------------------------------------


@contextmanager
def store_errors(store: Store) -> Iterator[None]:
    """Raise the store's own error for a database error it recognises (e.g. no schema yet)."""
    try:
        yield
    except DBAPIError as exc:
        error = store.store_error(exc)
        if error is not None:
            raise error from exc
        raise


@contextmanager
def snapshot(store: Store) -> Iterator[Connection]:
    """One read transaction: a consistent view however long the scan takes."""
    with store.engine.connect() as conn:
        if store.dialect == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ")
        with conn.begin():
            yield conn


# -- reading over a connection ---------------------------------------------------------------------


def entry_select(conn: Connection) -> Any:
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


def entry_rows(conn: Connection, after: int | None, chunk: int) -> Iterator[Any]:
    """Entries in seq order, ``chunk`` rows per query (keyset pagination on the primary key)."""
    base = entry_select(conn).order_by(_entries.c.seq).limit(chunk)
    last = after
    while True:
        query = base if last is None else base.where(_entries.c.seq > last)
        rows = conn.execute(query).all()
        yield from rows
        if len(rows) < chunk:
            return
        last = rows[-1].seq


def check_entry(row: Any, expected: int, prev: str | None) -> tuple[str | None, int, str | None]:
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
        digest = entry_hash(seq, stored_time(row.timestamp), row.kind, payload, row.prev_hash)
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


def checkpoint_rows(conn: Connection, chunk: int) -> Iterator[RawCheckpoint]:
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
            yield RawCheckpoint(*row)
        if len(rows) < chunk:
            return
        last = (rows[-1].entry_seq, rows[-1].id)


def latest_checkpoint(conn: Connection) -> Checkpoint | None:
    """The newest checkpoint row (highest seq), parsed but not verified."""
    c = _checkpoints.c
    row = conn.execute(
        _checkpoint_select(conn).order_by(c.entry_seq.desc(), c.id.desc()).limit(1)
    ).first()
    if row is None:
        return None
    try:
        return RawCheckpoint(*row).parse()
    except (TypeError, ValueError):
        raise AuditIntegrityError(
            "the newest audit checkpoint is malformed",
            field="audit_checkpoints.id",
            value=row[0],
            fix="run `cdp-fl audit verify` and investigate",
        ) from None


def signature_ok(key: AuditPublicKey, checkpoint: Checkpoint) -> bool:
    try:
        signature = bytes.fromhex(checkpoint.signature)
    except ValueError:
        return False
    try:
        message = checkpoint.message()
    except (TypeError, ValueError):
        return False
    return key.verify(message, signature)


def checkpoint_problem(
    key: AuditPublicKey, checkpoint: Checkpoint, *, what: str | None = None
) -> str | None:
    name = what or f"checkpoint #{checkpoint.id}"
    if checkpoint.key_id != key.key_id:
        return (
            f"{name} (seq {checkpoint.entry_seq}) is signed by key {checkpoint.key_id!r}, "
            f"not by the audit key {key.key_id}"
        )
    if not signature_ok(key, checkpoint):
        return f"{name} (seq {checkpoint.entry_seq}) has a bad signature (forged or edited)"
    return None


def entry_from_row(row: Any) -> AuditEntry:
    try:
        payload = orjson.loads(row.payload)
        timestamp = stored_time(row.timestamp)
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise AuditIntegrityError(
            "audit entry is malformed",
            field="seq",
            value=row.seq,
            fix="run `cdp-fl audit verify` and investigate",
        ) from exc
    return AuditEntry(row.seq, timestamp, row.kind, payload, row.prev_hash, row.hash)


# -- anchor file --------------------------------------------------------------------------------


def read_anchor(
    path: Path | None, key: AuditPublicKey | None
) -> tuple[Checkpoint | None, str, str | None]:
    """(anchor, status, problem): status is none (no path), missing, present or bad; with ``key``
    the anchor's signature is checked too."""
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
        anchor = RawCheckpoint(
            doc.get("checkpoint_id"),
            doc["seq"],
            doc["head_hash"],
            doc["signed_at"],
            doc["key_id"],
            doc["signature"],
        ).parse()
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
        return None, "bad", f"anchor file {path} is malformed"
    if key is not None:
        reason = checkpoint_problem(key, anchor, what="anchor file")
        if reason:
            return None, "bad", reason
    return anchor, "present", None


def write_anchor(
    path: Path | None, key: AuditPublicKey | None, store: Store, checkpoint: Checkpoint
) -> None:
    """Write ``checkpoint`` as ``store``'s anchor at ``path``, atomically (temp file, fsync,
    rename)."""
    if path is None:
        return
    current, status, _ = read_anchor(path, key)
    if status == "present" and current is not None and current.entry_seq > checkpoint.entry_seq:
        return  # never move the anchor backwards (a concurrent checkpoint signed more)
    doc = {
        "format": ANCHOR_FORMAT,
        "db": store.display_url,
        "db_fingerprint": db_fingerprint(store.url),
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
