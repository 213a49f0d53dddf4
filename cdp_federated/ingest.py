"""Built-in plugin: writes a batch of events to the store (events, profiles, identifiers, consent).

Registered through DEFAULT_PLUGINS exactly like a third-party plugin. Everything is written with
one ``Store.bulk_insert`` per table inside the host's batch transaction; each event's timestamp is
converted to the driver's form once and shared by every row derived from it (this is the ingest
hot path).

Building the rows is pure Python and needs no database, so :func:`prepare_rows` can run ahead of
the transaction: the reference host calls it in its parsing thread and hands the result over in
``EventBatch.prepared``; the hook then only writes. Without it (or when it does not match the
batch) the hook builds the rows itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from itertools import repeat
from operator import is_
from typing import Any

import orjson
from sqlalchemy import Connection

from .consent.signals import consent_records, jurisdiction_of
from .events import Event, EventBatch
from .hookspecs import hookimpl
from .store import EncodedRows, Store, schema

__all__ = ["PreparedRows", "prepare_rows", "cdp_process_events"]

# Identify traits recorded as identifiers (raw here; normalised at alignment time).
_TRAIT_IDENTIFIERS = ("email", "phone")
# received_at is the same for the whole batch: bound once (Store.bulk_insert's ``same``).
_EVENT_COLUMNS = ("message_id", "type", "event", "profile_id", "timestamp", "revenue", "properties")
_CONSENT_COLUMNS = (
    "profile_id",
    "source",
    "purpose",
    "granted",
    "timestamp",
    "jurisdiction",
    "message_id",
    "raw",
)
_PROFILE_COLUMNS = ("profile_id", "first_seen", "last_seen", "jurisdiction", "traits")
_IDENTIFIER_COLUMNS = ("profile_id", "kind", "value", "first_seen")


class _Profile:
    """What a batch says about one profile. Times are driver values (``Store.ts_param``), which
    order like the datetimes they stand for (SQLite: fixed-width text)."""

    __slots__ = ("first", "last", "jurisdiction", "jts", "traits")

    def __init__(self, ts: Any, jurisdiction: str | None) -> None:
        self.first = self.last = self.jts = ts
        self.jurisdiction = jurisdiction
        self.traits: dict[str, Any] | None = None


@dataclass(slots=True)
class PreparedRows:
    """The rows :func:`cdp_process_events` writes for exactly ``events`` received at
    ``received_at`` on ``store`` (in the ``_*_COLUMNS`` orders, encoded for the store)."""

    events: list[Event]
    store: Store
    received_at: datetime
    received: Any  # received_at as the driver takes it
    event_rows: EncodedRows
    consent_rows: EncodedRows
    profile_rows: EncodedRows
    identifier_rows: EncodedRows
    profile_ids: list[str]

    def matches(self, batch: EventBatch, store: Store) -> bool:
        """Built for this very batch: same store, receive time and event objects, in order."""
        events = batch.events
        return (
            store is self.store
            and batch.received_at == self.received_at
            and len(events) == len(self.events)
            and all(map(is_, events, self.events))
        )


def _add_identifiers(rows: dict[tuple[str, str, str], tuple[Any, ...]], ev: Event, ts: Any) -> None:
    """Identifiers the event links to its profile (first sighting in the batch wins)."""
    found: list[tuple[str, Any]] = []
    # The profile id is the userId itself; only the anonymous ids linked to it are recorded.
    if ev.user_id is not None and ev.anonymous_id is not None:
        found.append(("anonymous_id", ev.anonymous_id))
    if ev.type == "identify":
        found.extend((kind, ev.traits.get(kind)) for kind in _TRAIT_IDENTIFIERS)
    elif ev.type == "alias":
        found.append(("anonymous_id", ev.previous_id))
    pid = ev.profile_id
    for kind, value in found:
        if (
            value is None
            or value == ""
            or isinstance(value, bool)
            or not isinstance(value, str | int)
        ):
            continue
        key = (kind, str(value)[:512], pid)
        if key not in rows:
            rows[key] = (pid, kind, key[1], ts)


def prepare_rows(
    events: list[Event],
    store: Store,
    received_at: datetime,
    *,
    iso_timestamps: list[Any] | None = None,
    known_identifiers: set[tuple[str, str, str]] | None = None,
) -> PreparedRows:
    """Every row the batch writes, from one pass over its events (no database access).

    Per touched profile: earliest/latest event, latest known jurisdiction (by event time) and the
    identify traits merged in event order. Consent records take the event's own jurisdiction, else
    the profile's latest known one in this batch.

    ``iso_timestamps``: each event's ``timestamp`` text as received (None if unknown), a shortcut
    to its driver form. ``known_identifiers``: identifier keys written earlier in the same
    transaction, left out (they would be no-ops); this batch's keys are added to it.
    """
    to_param = store.ts_converter()
    received = to_param(received_at)
    dumps = orjson.dumps
    event_rows: list[tuple[Any, ...]] = []
    add_event = event_rows.append
    profiles: dict[str, _Profile] = {}
    identifiers: dict[tuple[str, str, str], tuple[Any, ...]] = {}
    with_consent: list[tuple[Event, Any, str | None]] = []
    from_iso = None
    if iso_timestamps is not None:
        if len(iso_timestamps) != len(events):
            raise ValueError("iso_timestamps must have one entry per event")
        from_iso = store.iso_ts_converter()
    for ev, iso in zip(events, iso_timestamps or repeat(None), strict=False):
        ts = from_iso(iso) if from_iso is not None else None
        if ts is None:
            ts = to_param(ev.timestamp)
        ctx = ev.context
        where = jurisdiction_of(ctx) if ctx else None
        pid = ev.profile_id
        props = ev.properties
        add_event(
            (
                ev.message_id,
                ev.type,
                ev.event,
                pid,
                ts,
                ev.revenue,
                dumps(props).decode() if props else None,
            )
        )
        p = profiles.get(pid)
        if p is None:
            p = profiles[pid] = _Profile(ts, where)
        else:
            if ts < p.first:
                p.first = ts
            if ts > p.last:
                p.last = ts
            if where is not None and (p.jurisdiction is None or ts >= p.jts):
                p.jurisdiction, p.jts = where, ts
        etype = ev.type
        anon = ev.anonymous_id
        if etype == "identify" or etype == "alias":
            if ev.traits and etype == "identify":
                p.traits = {**(p.traits or {}), **ev.traits}
            _add_identifiers(identifiers, ev, ts)
        elif anon is not None and ev.user_id is not None:
            # The common case, inlined: the anonymous id linked to a user (what
            # _add_identifiers records for such an event).
            key = ("anonymous_id", anon, pid)
            if key not in identifiers and type(anon) is str and len(anon) <= 512:
                identifiers[key] = (pid, "anonymous_id", anon, ts)
            elif key not in identifiers:
                _add_identifiers(identifiers, ev, ts)
        if ctx and (
            "consent" in ctx or "consentManagement" in ctx or "gpc" in ctx or "headers" in ctx
        ):
            with_consent.append((ev, ts, where))
    consent_rows: list[tuple[Any, ...]] = []
    vendors = store.tcf_vendor_ids if with_consent else ()
    for ev, ts, where in with_consent:
        for rec in consent_records(ev, where or profiles[ev.profile_id].jurisdiction, vendors):
            consent_rows.append(
                (
                    rec["profile_id"],
                    rec["source"],
                    rec["purpose"],
                    rec["granted"],
                    ts,
                    rec["jurisdiction"],
                    rec["message_id"],
                    rec["raw"],
                )
            )
    profile_rows = [
        (pid, p.first, p.last, p.jurisdiction, dumps(p.traits).decode() if p.traits else None)
        for pid, p in profiles.items()
    ]
    if known_identifiers is None:
        identifier_rows = list(identifiers.values())
    else:
        identifier_rows = [row for key, row in identifiers.items() if key not in known_identifiers]
        known_identifiers.update(identifiers)
    encode = store.encode_rows
    return PreparedRows(
        events=events,
        store=store,
        received_at=received_at,
        received=received,
        event_rows=encode(_EVENT_COLUMNS, event_rows),
        consent_rows=encode(_CONSENT_COLUMNS, consent_rows),
        profile_rows=encode(_PROFILE_COLUMNS, profile_rows),
        identifier_rows=encode(_IDENTIFIER_COLUMNS, identifier_rows),
        profile_ids=list(profiles),
    )


@hookimpl
def cdp_process_events(batch: EventBatch, conn: Connection, store: Store) -> None:
    rows = batch.prepared.get(__name__)
    if not (isinstance(rows, PreparedRows) and rows.matches(batch, store)):
        rows = prepare_rows(batch.events, store, batch.received_at)
    lo, hi = ("least", "greatest") if store.dialect == "postgresql" else ("min", "max")
    store.bulk_insert(
        conn, schema.events, _EVENT_COLUMNS, rows.event_rows, same={"received_at": rows.received}
    )
    store.bulk_insert(conn, schema.consent_records, _CONSENT_COLUMNS, rows.consent_rows)
    store.bulk_insert(
        conn,
        schema.profiles,
        _PROFILE_COLUMNS,
        rows.profile_rows,
        on_conflict=(
            "ON CONFLICT (profile_id) DO UPDATE SET "
            f"first_seen = {lo}(profiles.first_seen, excluded.first_seen), "
            f"last_seen = {hi}(profiles.last_seen, excluded.last_seen), "
            "jurisdiction = COALESCE(excluded.jurisdiction, profiles.jurisdiction), "
            "traits = COALESCE(excluded.traits, profiles.traits)"
        ),
    )
    store.bulk_insert(
        conn,
        schema.identifiers,
        _IDENTIFIER_COLUMNS,
        rows.identifier_rows,
        on_conflict="ON CONFLICT (kind, value, profile_id) DO NOTHING",
    )
    batch.touched_profiles.update(rows.profile_ids)
