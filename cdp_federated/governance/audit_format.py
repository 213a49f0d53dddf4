"""The audit chain's formats: canonical JSON, payload normalisation, the hashes and signed
messages, and the records (:class:`AuditEntry`, :class:`Checkpoint`). Pure: no database.

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

A checkpoint signs ``HEAD_DOMAIN + canonical JSON of [seq, head_hash, signed_at, key_id]``
(:func:`head_message`); see :mod:`.audit` for how heads are signed and anchored.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from ..errors import AuditPayloadError
from ..settings import normalize_db_url

__all__ = [
    "AuditEntry",
    "Checkpoint",
    "CONSENT_FILTER_COUNTS",
    "ENTRY_DOMAIN",
    "GENESIS_HASH",
    "HEAD_DOMAIN",
    "MAX_PAYLOAD_BYTES",
    "as_utc",
    "canonical_json",
    "check_consent_filter",
    "db_fingerprint",
    "entry_hash",
    "head_message",
    "normalise_json",
    "stored_time",
]

# consent_filter payloads carry the funnel; counts are non-increasing along it (None: step skipped).
CONSENT_FILTER_COUNTS = ("rows_in", "consented", "aligned", "trained")

GENESIS_HASH = "0" * 64
MAX_PAYLOAD_BYTES = 64 * 1024
ENTRY_DOMAIN = "cdp-fl audit entry v1"
HEAD_DOMAIN = b"cdp-fl audit head v1\x00"

_MAX_DEPTH = 32
_INT_LIMIT = 1 << 63  # what orjson (the store's JSON codec) writes and reads back exactly


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


def check_consent_filter(payload: dict[str, Any]) -> None:
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


def normalise_json(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``payload`` as JSON within the size limit and return it as it will be stored and
    hashed (kind-specific checks: :func:`.audit.normalise_payload`)."""
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
    return body


def as_utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is None:
        raise AuditPayloadError(
            "audit timestamps must be timezone-aware", field=name, value=value, fix="use UTC"
        )
    return value.astimezone(UTC)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def stored_time(value: Any) -> datetime:
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
