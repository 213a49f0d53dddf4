"""Reference host: counts always balance, duplicates apply once, bad input is dead-lettered."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import orjson
import pytest
from sqlalchemy import func, select

from cdp_federated.errors import SourceUnavailableError, StoreError
from cdp_federated.host import Host
from cdp_federated.store import open_store, schema
from tests.plugins.every_hook import EveryHook

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def event(i, **over):
    ev = {
        "type": "track",
        "event": "Product Viewed",
        "messageId": f"m{i}",
        "userId": f"u{i % 7}",
        "timestamp": f"2026-05-{1 + i % 28:02d}T10:00:00Z",
        "properties": {"sku": f"s{i}"},
        "context": {"location": {"country": "DE"}},
    }
    ev.update(over)
    return ev


def lines(events):
    return [orjson.dumps(e) if isinstance(e, dict) else e for e in events]


def count(store, table):
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


@pytest.fixture
def store(db_url):
    s = open_store(db_url, create=True)
    yield s
    s.dispose()


def make_host(store, pm, **kw):
    return Host(store, pm, now=lambda: NOW, **kw)


def test_counts_balance_and_reingest_is_idempotent(store, pm):
    raw = lines([event(i) for i in range(50)])
    raw += [b"{broken", lines([event(999, type="purchase")])[0], raw[3], b"   "]
    host = make_host(store, pm, batch_size=8)
    first = host.ingest_stream(raw)
    assert first.received == 53  # the blank line is not an event
    assert (first.applied, first.duplicates, first.dead_lettered) == (50, 1, 2)
    assert first.received == first.applied + first.duplicates + first.dead_lettered
    assert count(store, schema.events) == 50

    second = host.ingest_stream(raw)
    assert (second.applied, second.duplicates, second.dead_lettered) == (0, 51, 2)
    assert count(store, schema.events) == 50
    assert count(store, schema.dead_letters) == 2  # the same bad lines are recorded once


def test_dead_letters_keep_reason_and_raw_line(store, pm):
    bad = orjson.dumps(event(1, timestamp="yesterday"))
    make_host(store, pm).ingest_stream([bad], source="events.jsonl")
    with store.engine.connect() as conn:
        row = conn.execute(select(schema.dead_letters)).mappings().one()
    assert row["code"] == "invalid_timestamp"
    assert "yesterday" in row["reason"] and "Fix:" in row["reason"]
    assert row["raw"] == bad.decode() and row["source"] == "events.jsonl" and row["line_no"] == 1


def test_profiles_identifiers_and_consent_are_written(store, pm):
    evs = [
        {
            "type": "page",
            "messageId": "p1",
            "anonymousId": "anon-1",
            "timestamp": "2026-05-01T09:00:00Z",
            "context": {"location": {"country": "US", "region": "ca"}, "gpc": True},
        },
        {
            "type": "identify",
            "messageId": "i1",
            "userId": "u-1",
            "anonymousId": "anon-1",
            "timestamp": "2026-05-01T09:05:00Z",
            "traits": {"email": "Jane@Example.com", "phone": "+1 212 555 0100"},
            "context": {
                "location": {"country": "US", "region": "CA"},
                "consent": {"categoryPreferences": {"Analytics": True, "Advertising": False}},
            },
        },
        {
            "type": "alias",
            "messageId": "a1",
            "userId": "u-1",
            "previousId": "device-9",
            "timestamp": "2026-05-01T09:06:00Z",
        },
    ]
    stats = make_host(store, pm).ingest_stream(lines(evs))
    assert stats.applied == 3
    with store.engine.connect() as conn:
        ids = set(
            conn.execute(
                select(
                    schema.identifiers.c.profile_id,
                    schema.identifiers.c.kind,
                    schema.identifiers.c.value,
                )
            ).all()
        )
        consent = set(
            conn.execute(
                select(
                    schema.consent_records.c.profile_id,
                    schema.consent_records.c.purpose,
                    schema.consent_records.c.granted,
                    schema.consent_records.c.jurisdiction,
                )
            ).all()
        )
        prof = (
            conn.execute(select(schema.profiles).where(schema.profiles.c.profile_id == "u-1"))
            .mappings()
            .one()
        )
    assert ("u-1", "anonymous_id", "anon-1") in ids
    assert ("u-1", "anonymous_id", "device-9") in ids
    assert ("u-1", "email", "Jane@Example.com") in ids
    assert ("anon-1", "gpc:sale_sharing", False, "US-CA") in consent
    assert ("u-1", "segment:Analytics", True, "US-CA") in consent
    assert ("u-1", "segment:Advertising", False, "US-CA") in consent
    assert prof["jurisdiction"] == "US-CA" and prof["traits"]["email"] == "Jane@Example.com"


def test_a_failing_plugin_dead_letters_only_the_failing_event(store, pm):
    fixture = EveryHook()
    pm.register(fixture)
    evs = [event(i) for i in range(10)]
    evs[4]["properties"] = {"explode": True}
    stats = make_host(store, pm, batch_size=100).ingest_stream(lines(evs))
    assert (stats.applied, stats.dead_lettered) == (9, 1)
    with store.engine.connect() as conn:
        codes = conn.execute(select(schema.dead_letters.c.code, schema.dead_letters.c.reason)).all()
        applied = {r[0] for r in conn.execute(select(schema.events.c.message_id))}
    assert codes[0][0] == "plugin_error" and "m4" in codes[0][1]
    assert "m4" not in applied and len(applied) == 9


def test_batches_call_the_hook_once_each_and_finish_once(store, pm):
    fixture = EveryHook()
    pm.register(fixture)
    make_host(store, pm, batch_size=4).ingest_stream(
        lines([event(i) for i in range(10)]), source="s"
    )
    names = fixture.names()
    assert names.count("cdp_process_events") == 3
    assert names[-1] == "cdp_ingest_finished"
    assert fixture.calls[-1][1] == {
        "received": 10,
        "applied": 10,
        "duplicates": 0,
        "dead_lettered": 0,
        "batches": 3,
    }


def test_unreadable_file_is_a_clear_error(store, pm, tmp_path):
    with pytest.raises(SourceUnavailableError) as info:
        make_host(store, pm).ingest_path(tmp_path / "missing.jsonl")
    assert "missing.jsonl" in str(info.value)


def test_stream_failing_midway_keeps_committed_batches(store, pm):
    class Flaky(io.RawIOBase):
        def __init__(self):
            self.rows = iter(lines([event(i) for i in range(6)]))

        def __iter__(self):
            for i, row in enumerate(self.rows):
                if i == 4:
                    raise OSError("disk went away")
                yield row

    with pytest.raises(SourceUnavailableError):
        make_host(store, pm, batch_size=2).ingest_stream(Flaky())
    assert count(store, schema.events) == 4  # two whole batches, nothing half-written


def test_database_down_is_a_store_error_and_nothing_is_half_written(store, pm, monkeypatch):
    host = make_host(store, pm, batch_size=5)
    host.ingest_stream(lines([event(i) for i in range(5)]))
    from sqlalchemy.exc import OperationalError

    real = store.bulk_insert
    state = {"calls": 0}

    def failing(conn, table, *a, **k):
        state["calls"] += 1
        if table is schema.identifiers or state["calls"] > 2:
            raise OperationalError("INSERT", {}, Exception("server closed the connection"))
        return real(conn, table, *a, **k)

    monkeypatch.setattr(store, "bulk_insert", failing)
    with pytest.raises(StoreError) as info:
        host.ingest_stream(lines([event(i) for i in range(100, 105)]))
    assert "rolled back" in str(info.value)
    assert count(store, schema.events) == 5


def test_schema_must_exist_unless_created(db_url):
    from cdp_federated.errors import SchemaVersionError

    with pytest.raises(SchemaVersionError) as info:
        open_store(db_url)
    assert "cdp-fl db init" in str(info.value)
    open_store(db_url, create=True).dispose()
    open_store(db_url).dispose()
