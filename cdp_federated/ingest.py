"""Built-in plugin: writes a batch of events to the store (events, profiles, identifiers, consent).

Registered through DEFAULT_PLUGINS exactly like a third-party plugin. Everything is written with
one executemany per table inside the host's batch transaction; each event's timestamp is converted
to the driver's form once and shared by every row derived from it (this is the ingest hot path).
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import Connection

from .consent.signals import consent_records, jurisdiction_of
from .events import EventBatch
from .hookspecs import hookimpl
from .store import Store, schema

# Identify traits recorded as identifiers (raw here; normalised at alignment time).
_TRAIT_IDENTIFIERS = ("email", "phone")
_EVENT_COLUMNS = ("message_id", "type", "event", "profile_id", "timestamp", "received_at", "revenue", "properties")
_CONSENT_COLUMNS = ("profile_id", "source", "purpose", "granted", "timestamp", "jurisdiction", "message_id", "raw")
_PROFILE_COLUMNS = ("profile_id", "first_seen", "last_seen", "jurisdiction", "traits")
_IDENTIFIER_COLUMNS = ("profile_id", "kind", "value", "first_seen")
_CONSENT_KEYS = ("consent", "consentManagement", "gpc", "headers")


class _Profile:
    __slots__ = ("first", "last", "jurisdiction", "jts", "traits")

    def __init__(self, i: int, jurisdiction: str | None) -> None:
        self.first = self.last = self.jts = i  # indexes into the batch's events
        self.jurisdiction = jurisdiction
        self.traits: dict[str, Any] | None = None


def _profiles(batch: EventBatch, places: list[str | None]) -> dict[str, _Profile]:
    """Per touched profile: earliest/latest event, latest known jurisdiction, merged traits."""
    events = batch.events
    profiles: dict[str, _Profile] = {}
    for i, ev in enumerate(events):
        where = places[i]
        p = profiles.get(ev.profile_id)
        if p is None:
            p = profiles[ev.profile_id] = _Profile(i, where)
        else:
            ts = ev.timestamp
            if ts < events[p.first].timestamp:
                p.first = i
            if ts > events[p.last].timestamp:
                p.last = i
            if where is not None and (p.jurisdiction is None or ts >= events[p.jts].timestamp):
                p.jurisdiction, p.jts = where, i
        if ev.type == "identify" and ev.traits:
            p.traits = {**(p.traits or {}), **ev.traits}
    return profiles


def _identifier_rows(batch: EventBatch, ts: list[Any]) -> list[tuple[Any, ...]]:
    rows: dict[tuple[str, str, str], tuple[Any, ...]] = {}
    for i, ev in enumerate(batch.events):
        found: list[tuple[str, Any]] = []
        # The profile id is the userId itself; only the anonymous ids linked to it are recorded.
        if ev.user_id is not None and ev.anonymous_id is not None:
            found.append(("anonymous_id", ev.anonymous_id))
        if ev.type == "identify":
            found.extend((kind, ev.traits.get(kind)) for kind in _TRAIT_IDENTIFIERS)
        elif ev.type == "alias":
            found.append(("anonymous_id", ev.previous_id))
        for kind, value in found:
            if value is None or value == "" or isinstance(value, bool) or not isinstance(value, str | int):
                continue
            key = (kind, str(value)[:512], ev.profile_id)
            if key not in rows:
                rows[key] = (ev.profile_id, kind, key[1], ts[i])
    return list(rows.values())


def _upsert_profiles(store: Store, conn: Connection, profiles: dict[str, _Profile], ts: list[Any]) -> None:
    lo, hi = ("least", "greatest") if store.dialect == "postgresql" else ("min", "max")
    rows = [
        (
            pid,
            ts[p.first],
            ts[p.last],
            p.jurisdiction,
            orjson.dumps(p.traits).decode() if p.traits else None,
        )
        for pid, p in profiles.items()
    ]
    store.bulk_insert(
        conn,
        schema.profiles,
        _PROFILE_COLUMNS,
        rows,
        on_conflict=(
            "ON CONFLICT (profile_id) DO UPDATE SET "
            f"first_seen = {lo}(profiles.first_seen, excluded.first_seen), "
            f"last_seen = {hi}(profiles.last_seen, excluded.last_seen), "
            "jurisdiction = COALESCE(excluded.jurisdiction, profiles.jurisdiction), "
            "traits = COALESCE(excluded.traits, profiles.traits)"
        ),
    )


@hookimpl
def cdp_process_events(batch: EventBatch, conn: Connection, store: Store) -> None:
    events = batch.events
    to_param = store.ts_param
    ts = [to_param(ev.timestamp) for ev in events]
    places = [jurisdiction_of(ev.context) for ev in events]
    profiles = _profiles(batch, places)
    received = to_param(batch.received_at)
    event_rows = [
        (
            ev.message_id,
            ev.type,
            ev.event,
            ev.profile_id,
            ts[i],
            received,
            ev.revenue,
            orjson.dumps(ev.properties).decode() if ev.properties else None,
        )
        for i, ev in enumerate(events)
    ]
    consent_rows: list[tuple[Any, ...]] = []
    for i, ev in enumerate(events):
        ctx = ev.context
        if any(key in ctx for key in _CONSENT_KEYS):
            where = places[i] or profiles[ev.profile_id].jurisdiction
            for rec in consent_records(ev, where):
                rec["timestamp"] = ts[i]
                consent_rows.append(tuple(rec[c] for c in _CONSENT_COLUMNS))
    store.bulk_insert(conn, schema.events, _EVENT_COLUMNS, event_rows)
    store.bulk_insert(conn, schema.consent_records, _CONSENT_COLUMNS, consent_rows)
    _upsert_profiles(store, conn, profiles, ts)
    store.bulk_insert(
        conn,
        schema.identifiers,
        _IDENTIFIER_COLUMNS,
        _identifier_rows(batch, ts),
        on_conflict="ON CONFLICT (kind, value, profile_id) DO NOTHING",
    )
    batch.touched_profiles.update(profiles)
