"""Importing consent signals exported by a CMP or a CDP (CSV), all or nothing.

A consent import is evidence, so a file with one bad row is refused whole, with the row numbers
and the fix, rather than half-imported. Re-importing the same file adds nothing: each record's
``message_id`` is a digest of its content.

CSV columns (header required; extra columns are ignored):

==============  =================================================================================
profile_id      the CDP's profile id (userId)
signal          ``source:name`` as the ledger names it (``segment:Analytics``,
                ``consent_mode:analytics_storage``, ``gpc:sale_sharing``...), or ``tcf`` with the TC
                string in ``tc_string``: it is decoded into ``tcf:*`` signals
granted         true/false, 1/0, yes/no, granted/denied (ignored for ``tcf``)
timestamp       ISO 8601 with offset (``2026-05-01T10:00:00Z``); naive times are refused
jurisdiction    optional: ``EU``, ``UK``, ``US-CA``... (updates the profile's jurisdiction)
tc_string       optional; required for ``tcf`` rows
==============  =================================================================================
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl
from sqlalchemy import bindparam

from ..errors import ConfigError, MissingColumnError, SourceUnavailableError, TCFError
from ..store import Store, schema

__all__ = ["ImportStats", "import_signals_csv", "REQUIRED_COLUMNS"]

REQUIRED_COLUMNS = ("profile_id", "signal", "granted", "timestamp")
_SIGNAL = re.compile(r"^[a-z][a-z0-9_]*:[A-Za-z0-9_.:\-]+$")
_TRUE = {"true", "1", "yes", "granted", "y", "t"}
_FALSE = {"false", "0", "no", "denied", "n", "f"}
_MAX_REPORTED = 5


@dataclass(frozen=True)
class ImportStats:
    rows: int  # data rows in the file
    records: int  # ledger records the rows expand to (a TC string gives several)
    inserted: int  # records new to the ledger (the rest were imported before)
    profiles: int

    def to_dict(self) -> dict[str, int]:
        return {
            "rows": self.rows,
            "records": self.records,
            "inserted": self.inserted,
            "profiles": self.profiles,
        }


def _parse_time(text: str) -> datetime | None:
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return value if value.tzinfo is not None else None


def _record_id(*parts: object) -> str:
    return "import:" + hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()[:40]


def _expand(frame: pl.DataFrame, vendor_ids: Iterable[int]) -> tuple[list[dict], list[str]]:
    """Ledger records for every row, and the problems found (``row N: ...``)."""
    from .tcf import decode_tc_string, ledger_signals

    vendors = tuple(vendor_ids)
    records: list[dict] = []
    problems: list[str] = []
    has_tc = "tc_string" in frame.columns
    has_j = "jurisdiction" in frame.columns
    for n, row in enumerate(frame.iter_rows(named=True), start=2):  # line 1 is the header
        pid, signal = (row["profile_id"] or "").strip(), (row["signal"] or "").strip()
        when = _parse_time(row["timestamp"] or "")
        where = ((row["jurisdiction"] or "").strip().upper() or None) if has_j else None
        if not pid:
            problems.append(f"row {n}: profile_id is empty")
            continue
        if when is None:
            problems.append(
                f"row {n}: timestamp {row['timestamp']!r} is not ISO 8601 with a UTC offset"
            )
            continue
        base = {"profile_id": pid, "timestamp": when, "jurisdiction": where}
        if signal == "tcf":
            text = (row.get("tc_string") or "").strip() if has_tc else ""
            try:
                tc = decode_tc_string(text)
            except TCFError as exc:
                problems.append(f"row {n}: {exc}")
                continue
            for name, granted in ledger_signals(tc, vendors):
                records.append(
                    base
                    | {
                        "source": "tcf",
                        "purpose": name,
                        "granted": granted,
                        "raw": text,
                        "message_id": _record_id(pid, text, when.isoformat()),
                    }
                )
            continue
        if not _SIGNAL.match(signal):
            problems.append(
                f"row {n}: signal {signal!r} is not 'source:name' (e.g. segment:Analytics) or 'tcf'"
            )
            continue
        flag = (row["granted"] or "").strip().lower()
        if flag not in _TRUE | _FALSE:
            problems.append(f"row {n}: granted {row['granted']!r} is not true/false")
            continue
        granted = flag in _TRUE
        records.append(
            base
            | {
                "source": signal.split(":", 1)[0],
                "purpose": signal,
                "granted": granted,
                "raw": f"csv:{signal}={flag}",
                "message_id": _record_id(pid, signal, granted, when.isoformat()),
            }
        )
    return records, problems


def import_signals_csv(
    store: Store, path: str | Path, *, vendor_ids: Iterable[int] = ()
) -> ImportStats:
    """Validate every row of ``path``, then write all its records in one transaction."""
    path = Path(path)
    try:
        frame = pl.read_csv(path, infer_schema=False)  # every column as text: we validate
    except (OSError, pl.exceptions.ComputeError) as exc:
        raise SourceUnavailableError(
            f"cannot read consent CSV: {exc}", field="path", value=str(path), fix="check the file"
        ) from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise MissingColumnError(
            f"consent CSV lacks columns {missing} (it has {frame.columns})",
            field="columns",
            value=missing,
            fix=f"add a header with {', '.join(REQUIRED_COLUMNS)} (and optionally jurisdiction, tc_string)",
        )
    records, problems = _expand(frame, vendor_ids)
    if problems:
        shown = "; ".join(problems[:_MAX_REPORTED])
        more = (
            f" (and {len(problems) - _MAX_REPORTED} more)" if len(problems) > _MAX_REPORTED else ""
        )
        raise ConfigError(
            f"consent CSV refused, nothing imported: {len(problems)} bad rows: {shown}{more}",
            field=str(path),
            value=len(problems),
            fix="correct those rows and import the file again",
        )
    profiles: dict[str, tuple[datetime, datetime, str | None]] = {}
    for r in records:
        first, last, where = profiles.get(r["profile_id"], (r["timestamp"], r["timestamp"], None))
        profiles[r["profile_id"]] = (
            min(first, r["timestamp"]),
            max(last, r["timestamp"]),
            r["jurisdiction"] or where,
        )
    with store.begin() as conn:
        ids = list({r["message_id"] for r in records})
        seen = store.existing_keys(conn, schema.consent_records, "message_id", ids)
        fresh = [r for r in records if r["message_id"] not in seen]
        if fresh:
            conn.execute(schema.consent_records.insert(), fresh)
        known = store.existing_keys(conn, schema.profiles, "profile_id", list(profiles))
        new_profiles = [
            {"profile_id": pid, "first_seen": f, "last_seen": la, "jurisdiction": j}
            for pid, (f, la, j) in profiles.items()
            if pid not in known
        ]
        if new_profiles:
            conn.execute(schema.profiles.insert(), new_profiles)
        moved = [
            {"pid": pid, "j": j} for pid, (_f, _la, j) in profiles.items() if pid in known and j
        ]
        if moved:
            table = schema.profiles
            conn.execute(
                table.update()
                .where(table.c.profile_id == bindparam("pid"))
                .values(jurisdiction=bindparam("j")),
                moved,
            )
    return ImportStats(
        rows=frame.height, records=len(records), inserted=len(fresh), profiles=len(profiles)
    )
