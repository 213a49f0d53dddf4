"""The ingest fast paths give exactly what the plain paths give.

Validation's fast path against the full rules, the cheap Event constructor, the JSON bulk insert
against bound parameters, the timestamp-text shortcut against formatting the datetime; and the
host's commit groups, savepoints, de-duplication shortcut and identifier cache keep every
guarantee (counts balance, batches whole, duplicates applied once, nothing lost after a failure).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Boolean, Column, Float, Integer, MetaData, Table, Text, func, select

from cdp_federated.demo_data import generate_scenario
from cdp_federated.errors import EventValidationError
from cdp_federated.events import Event, _new_event, _slow_validate, validate_event
from cdp_federated.host import Host
from cdp_federated.store import _sqlite_ts, _sqlite_ts_from_iso, open_store, schema
from tests.plugins.every_hook import EveryHook

NOW = datetime(2026, 6, 1, tzinfo=UTC)
SKEW = timedelta(days=1)


def outcome(fn, raw):
    try:
        return fn(raw)
    except EventValidationError as exc:
        return ("error", exc.code, exc.field)


def both_ways(raw):
    fast = outcome(lambda r: validate_event(r, now=NOW, max_skew=SKEW), raw)
    slow = outcome(lambda r: _slow_validate(r, NOW, SKEW), raw)
    return fast, slow


@pytest.fixture(scope="module")
def demo_lines(tmp_path_factory):
    scenario = generate_scenario(tmp_path_factory.mktemp("demo"), customers=60, seed=3)
    lines = []
    for path in scenario.region_files.values():
        lines += [line for line in path.read_bytes().splitlines() if line.strip()]
    return lines


def test_fast_validation_equals_the_full_rules_on_demo_events(demo_lines):
    now = datetime(2027, 1, 1, tzinfo=UTC)  # after the demo's events
    checked = 0
    for line in demo_lines:
        try:
            raw = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        fast = outcome(lambda r: validate_event(r, now=now, max_skew=SKEW), raw)
        slow = outcome(lambda r: _slow_validate(r, now, SKEW), raw)
        assert fast == slow
        checked += 1
    assert checked > 1000


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.sampled_from(["", " ", "x" * 257, "Order Completed", "u1"]),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=2),
    st.dictionaries(st.text(max_size=3), scalars, max_size=2),
)
timestamps = st.one_of(
    values,
    st.sampled_from(
        [
            "2026-05-01T10:00:00.123Z",
            "2026-05-01T10:00:00Z",
            "2026-05-01T12:00:00+02:00",
            "2026-05-01T10:00:00",
            "2026-W18-5T10:00:00.000Z",
            "2026-07-01T00:00:00.000Z",
            "01/05/2026",
        ]
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    etype=st.one_of(
        st.sampled_from(["identify", "track", "page", "screen", "group", "alias"]), values
    ),
    fields=st.fixed_dictionaries(
        {},
        optional={
            "messageId": st.one_of(st.sampled_from(["m-1", 7]), values),
            "userId": st.one_of(st.just("u-1"), values),
            "anonymousId": st.one_of(st.just("a-1"), values),
            "timestamp": timestamps,
            "originalTimestamp": timestamps,
            "event": st.one_of(st.sampled_from(["Order Completed", "Viewed"]), values),
            "name": values,
            "previousId": values,
            "groupId": values,
            "properties": st.one_of(
                values, st.fixed_dictionaries({"revenue": values}), st.just({"total": 3})
            ),
            "traits": values,
            "context": values,
        },
    ),
)
def test_fast_validation_equals_the_full_rules_on_odd_events(etype, fields):
    fast, slow = both_ways({"type": etype, **fields})
    assert fast == slow


def test_the_cheap_constructor_builds_real_frozen_events():
    args = ("m", "track", "u", "u", None, NOW, "E", {"a": 1}, {}, {}, None, None, 2.5)
    ev = _new_event(*args)
    assert type(ev) is Event
    assert ev == Event(*args)
    assert dataclasses.astuple(ev) == args
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.type = "page"  # type: ignore[misc]


@given(
    st.datetimes(
        min_value=datetime(1000, 1, 1),
        max_value=datetime(9999, 12, 30),
        timezones=st.just(UTC),
    ).map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))
)
def test_timestamp_text_shortcut_equals_formatting(ts):
    text = ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"
    assert _sqlite_ts_from_iso(text) == _sqlite_ts(datetime.fromisoformat(text))


@pytest.mark.parametrize(
    "text",
    [
        "2026-W18-5T10:00:00.000Z",  # a week date: fromisoformat takes it, the shortcut must not
        "2026-05-01T10:00:00Z",
        "2026-05-01T12:00:00.000+02:00",
        "2026-05-01T10:00:00.000000Z",
        None,
        17,
    ],
)
def test_timestamp_text_shortcut_declines_other_forms(text):
    assert _sqlite_ts_from_iso(text) is None


# --- bulk inserts ------------------------------------------------------------------------------

scratch_meta = MetaData()
scratch = Table(
    "scratch",
    scratch_meta,
    Column("id", Integer, primary_key=True),
    Column("t", Text),
    Column("n", Integer),
    Column("b", Boolean),
    Column("r", Float),
    Column("c", Text),
)
texts = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20
)
rows_strategy = st.lists(
    st.tuples(
        texts | st.none() | st.sampled_from(['{"a": "\\"q\\""}', "\\", '"', "é☃𝄞"]),
        st.integers(-(2**63), 2**63 - 1) | st.none(),
        st.booleans() | st.none(),
        st.floats(allow_nan=False, allow_infinity=False) | st.none(),
    ),
    max_size=30,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=rows_strategy)
def test_bulk_insert_stores_exactly_the_given_values(tmp_path, rows):
    store = open_store(f"sqlite:///{tmp_path / 'bulk.sqlite'}", create=True)
    try:
        scratch_meta.create_all(store.engine)
        numbered = [(i, *row) for i, row in enumerate(rows)]
        encoded = store.encode_rows(("id", "t", "n", "b", "r"), numbered)
        with store.begin() as conn:
            conn.execute(scratch.delete())
            store.bulk_insert(
                conn, scratch, ("id", "t", "n", "b", "r"), encoded, same={"c": "const"}
            )
        with store.engine.connect() as conn:
            got = conn.execute(select(scratch).order_by(scratch.c.id)).all()
        assert [tuple(r) for r in got] == [(*row, "const") for row in numbered]
    finally:
        store.dispose()


def test_bulk_insert_on_both_databases(db_url):
    store = open_store(db_url, create=True)
    try:
        scratch_meta.create_all(store.engine)
        rows = [(1, "a'b", 2, True, None), (2, None, None, False, 0.1), (3, "é", -7, None, 1e300)]
        with store.begin() as conn:
            store.bulk_insert(conn, scratch, ("id", "t", "n", "b", "r"), rows, same={"c": "x"})
            store.bulk_insert(
                conn,
                scratch,
                ("id", "t", "n", "b", "r"),
                [(1, "new", 0, False, None)],
                on_conflict="ON CONFLICT (id) DO UPDATE SET t = excluded.t",
                same={"c": "y"},
            )
        with store.engine.connect() as conn:
            got = [tuple(r) for r in conn.execute(select(scratch).order_by(scratch.c.id))]
            found = store.existing_keys(conn, scratch, "t", ["é", "zz", "new"])
        assert got == [(1, "new", 2, True, None, "x"), (2, None, None, False, 0.1, "x"),
                       (3, "é", -7, None, 1e300, "x")]  # fmt: skip
        assert found == {"é", "new"}
    finally:
        store.dispose()


# --- the host ----------------------------------------------------------------------------------


@pytest.fixture
def store(db_url):
    s = open_store(db_url, create=True)
    yield s
    s.dispose()


def event(i, **over):
    ev = {
        "type": "track",
        "event": "Product Viewed",
        "messageId": f"m{i}",
        "userId": f"u{i % 5}",
        "anonymousId": f"a{i % 5}",
        "timestamp": f"2026-05-{1 + i % 28:02d}T10:00:00.{i % 1000:03d}Z",
        "properties": {"sku": f"s{i}"},
        "context": {"location": {"country": "DE"}},
    }
    ev.update(over)
    return orjson.dumps(ev)


def count(store, table):
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_a_failing_batch_amid_a_commit_group_loses_nothing_else(store, pm):
    pm.register(EveryHook())
    lines = [event(i, properties={"explode": True} if i == 7 else {"sku": i}) for i in range(20)]
    stats = Host(store, pm, batch_size=3, now=lambda: NOW).ingest_stream(lines)
    assert (stats.received, stats.applied, stats.dead_lettered) == (20, 19, 1)
    assert stats.received == stats.applied + stats.duplicates + stats.dead_lettered
    assert count(store, schema.events) == 19
    assert count(store, schema.dead_letters) == 1


def test_duplicates_across_batches_and_runs_are_applied_once(store, pm):
    lines = [event(i % 12) for i in range(30)]  # each id 2-3 times, in different batches
    host = Host(store, pm, batch_size=4, now=lambda: NOW)
    first = host.ingest_stream(lines)
    assert (first.applied, first.duplicates, first.dead_lettered) == (12, 18, 0)
    second = host.ingest_stream(lines + [event(99)])
    assert (second.applied, second.duplicates) == (1, 30)
    assert count(store, schema.events) == 13


def test_events_another_writer_adds_mid_run_count_as_duplicates(tmp_path, pm):
    path = tmp_path / "cdp.sqlite"
    store = open_store(f"sqlite:///{path}", create=True)

    def stream():
        for i in range(6):
            yield event(i)
        other = sqlite3.connect(path, timeout=30)  # waits for the ingest's commit
        with other:
            other.execute(
                "INSERT INTO events (message_id, type, profile_id, timestamp, received_at) "
                "VALUES ('m100', 'track', 'u0', '2026-05-01 10:00:00.000000', "
                "'2026-05-01 10:00:00.000000')"
            )
        other.close()
        for i in range(100, 106):
            yield event(i)

    try:
        stats = Host(store, pm, batch_size=3, now=lambda: NOW).ingest_stream(stream())
        assert (stats.applied, stats.duplicates, stats.dead_lettered) == (11, 1, 0)
        assert count(store, schema.events) == 12
    finally:
        store.dispose()


def test_identifiers_of_a_batch_after_a_failed_one_are_written(store, pm):
    """The parsing thread leaves out identifiers earlier batches wrote; when an earlier batch
    fails, what it would have written must not be left out of later ones."""
    pm.register(EveryHook())
    lines = [
        event(1, userId="u1", anonymousId="a1", properties={"explode": True}),
        event(2, userId="u2", anonymousId="a2"),
        event(3, userId="u1", anonymousId="a1"),
    ] + [event(i, userId="u3", anonymousId="a3") for i in range(10, 30)]
    stats = Host(store, pm, batch_size=2, now=lambda: NOW).ingest_stream(lines)
    assert (stats.applied, stats.dead_lettered) == (22, 1)
    with store.engine.connect() as conn:
        ids = set(
            conn.execute(
                select(schema.identifiers.c.profile_id, schema.identifiers.c.value).where(
                    schema.identifiers.c.kind == "anonymous_id"
                )
            ).all()
        )
    assert ids == {("u1", "a1"), ("u2", "a2"), ("u3", "a3")}


def test_rows_match_whether_prepared_ahead_or_not(tmp_path, pm, demo_lines, monkeypatch):
    """The same input gives the same tables with the parsing thread's rows and without them."""
    tables = (schema.events, schema.profiles, schema.identifiers, schema.consent_records)
    dumps = []
    for ahead in (True, False):
        monkeypatch.setattr(Host, "prepare_ahead", ahead)
        store = open_store(f"sqlite:///{tmp_path / f'p{ahead}.sqlite'}", create=True)
        host = Host(store, pm, batch_size=97, now=lambda: datetime(2027, 1, 1, tzinfo=UTC))
        host.ingest_stream(demo_lines)
        with store.engine.connect() as conn:
            dump = {}
            for table in tables:
                cols = [c for c in table.c if c.name not in ("id", "received_at")]
                rows = conn.execute(select(*cols)).all()
                dump[table.name] = sorted((tuple(r) for r in rows), key=repr)
        dumps.append(dump)
        store.dispose()
    assert dumps[0] == dumps[1]
    assert len(dumps[0]["events"]) > 1000
