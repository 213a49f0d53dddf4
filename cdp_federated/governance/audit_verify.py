"""Verifying the audit chain (:meth:`.audit.AuditLog.verify`) and re-checking it before a
checkpoint signs a new head.

Verification
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
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from ..errors import AuditIntegrityError
from ..store import Store, schema
from .audit_format import GENESIS_HASH, Checkpoint
from .audit_keys import AuditPublicKey
from .audit_store import (
    DEFAULT_CHUNK,
    RawCheckpoint,
    check_entry,
    checkpoint_problem,
    checkpoint_rows,
    entry_rows,
    entry_select,
    latest_checkpoint,
    read_anchor,
    snapshot,
    store_errors,
)

__all__ = ["VerifyReport", "signable_head", "verify_chain"]

_entries = schema.audit_entries


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


def _int_or(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def verify_chain(
    store: Store,
    key: AuditPublicKey | None,
    anchor_path: Path | None,
    *,
    strict: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
) -> VerifyReport:
    """Recompute the chain, check every checkpoint and the anchor; see the module docstring."""
    anchor, anchor_status, anchor_problem = read_anchor(anchor_path, key)
    warnings: list[str] = []
    failure: _Failure | None = None
    count, prev, head_seq = 0, GENESIS_HASH, 0
    latest: Checkpoint | None = None
    n_checkpoints = 0
    anchor_seen_hash: str | None = GENESIS_HASH if anchor and anchor.entry_seq == 0 else None

    def check_checkpoint(raw: RawCheckpoint, actual: str | None, end: int) -> Checkpoint:
        try:
            checkpoint = raw.parse()
        except (TypeError, ValueError):
            raise _Failure(
                min(end + 1, _int_or(raw.entry_seq, end + 1)),
                f"checkpoint #{raw.id} is malformed",
            ) from None
        if key is not None:
            reason = checkpoint_problem(key, checkpoint)
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

    with store_errors(store), snapshot(store) as conn:
        cps = _Peek(checkpoint_rows(conn, chunk_size))
        try:
            while cps.peek() is not None and _seq_key(cps.peek().entry_seq) <= 0:
                raw = cps.pop()
                actual = GENESIS_HASH if raw.entry_seq == 0 else None
                latest = check_checkpoint(raw, actual, 0)
                n_checkpoints += 1
            expected = 1
            for row in entry_rows(conn, None, chunk_size):
                digest, bad_seq, reason = check_entry(row, expected, prev)
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
                    f"anchor file {anchor_path} is missing: truncation of the log back to "
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
        anchor_path=str(anchor_path) if anchor_path is not None else None,
        anchor_status=anchor_status,
        anchor_seq=anchor.entry_seq if anchor is not None else None,
        warnings=tuple(warnings),
        strict=strict,
    )


def signable_head(
    conn: Connection, signer: AuditPublicKey, anchor_path: Path | None
) -> tuple[int, str]:
    """The head, after checking the entries since the newest signed head (in the database
    or the anchor) link up to it."""

    def refuse(reason: str, seq: int | None) -> AuditIntegrityError:
        return AuditIntegrityError(
            f"refusing to sign the audit head: {reason}",
            field="seq",
            value=seq,
            fix="run `cdp-fl audit verify` and investigate; if the database was deliberately "
            f"recreated, move the anchor file {anchor_path} away",
        )

    anchor, status, problem = read_anchor(anchor_path, signer)
    if status == "bad":
        raise refuse(problem or "anchor file is invalid", None)
    base_seq, base_hash = 0, GENESIS_HASH
    latest = latest_checkpoint(conn)
    if latest is not None:
        reason = checkpoint_problem(signer, latest)
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
        row = conn.execute(entry_select(conn).where(_entries.c.seq == base_seq)).first()
        if row is None:
            raise refuse(f"entry {base_seq}, signed by a checkpoint, is missing", base_seq)
        digest, bad_seq, reason = check_entry(row, base_seq, None)
        if reason is None and digest != base_hash:
            bad_seq, reason = base_seq, f"entry {base_seq} does not match its signed head"
        if reason is not None:
            raise refuse(reason, bad_seq)
    for row in entry_rows(conn, base_seq, DEFAULT_CHUNK):
        digest, bad_seq, reason = check_entry(row, expected, prev)
        if reason is not None:
            raise refuse(reason, bad_seq)
        prev, expected = digest, expected + 1
    return expected - 1, prev
