"""Features as of T use only the past; labels look only forward; anonymous activity is credited."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from cdp_federated.errors import ConfigError
from cdp_federated.features import (
    EVENT_SCHEMA,
    FEATURE_COLUMNS,
    build_features,
    build_labels,
    features_from_events,
    labels_from_events,
    resolve_profiles,
)

AS_OF = datetime(2026, 6, 1, tzinfo=UTC)


def ev(pid, days_before, type_="track", name=None, revenue=None):
    return (pid, type_, name, AS_OF - timedelta(days=days_before), revenue)


def frame(rows):
    return pl.DataFrame(rows, schema=EVENT_SCHEMA, orient="row").lazy()


EVENTS = [
    ev("u1", 100, "track", "Order Completed", 50.0),
    ev("u1", 20, "track", "Order Completed", 30.0),
    ev("u1", 5, "page"),
    ev("u1", 3, "track", "Product Viewed"),
    ev("u1", 2, "track", "Product Added"),
    ev("u1", -3, "track", "Order Completed", 99.0),  # after as_of: label only
    ev("u2", 60, "page"),
    ev("u2", 45, "track", "Product Viewed"),
]


def test_rfm_and_window_counts_hand_computed():
    out = features_from_events(frame(EVENTS), AS_OF).collect().sort("profile_id")
    assert list(out.columns) == ["profile_id", *FEATURE_COLUMNS]
    u1 = out.row(0, named=True)
    assert u1["recency_days"] == pytest.approx(2.0)
    assert u1["tenure_days"] == pytest.approx(100.0)
    assert (u1["frequency"], u1["monetary"], u1["avg_order_value"]) == (2.0, 80.0, 40.0)
    assert (u1["events_7d"], u1["events_30d"], u1["events_90d"]) == (3.0, 4.0, 4.0)
    assert (u1["orders_30d"], u1["orders_90d"], u1["revenue_90d"]) == (1.0, 1.0, 30.0)
    assert (u1["page_views_30d"], u1["product_views_30d"], u1["cart_adds_30d"]) == (1.0, 1.0, 1.0)
    assert u1["distinct_events"] == 3.0
    u2 = out.row(1, named=True)
    assert (u2["frequency"], u2["avg_order_value"], u2["events_30d"]) == (0.0, 0.0, 0.0)


def test_features_ignore_the_future_and_labels_ignore_the_past():
    past_only = features_from_events(frame(EVENTS[:-3] + EVENTS[-2:]), AS_OF).collect()
    with_future = features_from_events(frame(EVENTS), AS_OF).collect()
    assert past_only.sort("profile_id").equals(with_future.sort("profile_id"))
    labels = labels_from_events(frame(EVENTS), AS_OF, window_days=30).collect().sort("profile_id")
    assert labels.to_dicts() == [
        {"profile_id": "u1", "label": 1.0},
        {"profile_id": "u2", "label": 0.0},
    ]
    short = labels_from_events(frame(EVENTS), AS_OF, window_days=2).collect()
    assert short["label"].sum() == 0.0  # the order is 3 days after as_of


def test_anonymous_events_are_credited_to_the_linked_profile():
    rows = [
        ev("anon-1", 10, "page"),
        ev("u1", 1, "track", "Product Viewed"),
        ev("anon-2", 3, "page"),
    ]
    links = pl.DataFrame({"anon": ["anon-1"], "linked": ["u1"]})
    out = features_from_events(resolve_profiles(frame(rows), links), AS_OF).collect()
    assert sorted(out["profile_id"]) == ["anon-2", "u1"]
    assert out.filter(pl.col("profile_id") == "u1")["tenure_days"][0] == pytest.approx(10.0)


def test_as_of_must_be_timezone_aware():
    with pytest.raises(ConfigError):
        features_from_events(frame(EVENTS), datetime(2026, 6, 1))


def test_build_features_and_labels_in_the_store(db_url, pm):
    import orjson

    from cdp_federated.host import Host
    from cdp_federated.store import open_store, schema

    store = open_store(db_url, create=True)
    raw = [
        {
            "type": "page",
            "messageId": "1",
            "anonymousId": "a1",
            "timestamp": "2026-05-01T00:00:00Z",
        },
        {
            "type": "identify",
            "messageId": "2",
            "userId": "u1",
            "anonymousId": "a1",
            "timestamp": "2026-05-02T00:00:00Z",
        },
        {
            "type": "track",
            "event": "Order Completed",
            "messageId": "3",
            "userId": "u1",
            "timestamp": "2026-05-20T00:00:00Z",
            "properties": {"revenue": 10},
        },
        {
            "type": "track",
            "event": "Order Completed",
            "messageId": "4",
            "userId": "u1",
            "timestamp": "2026-06-10T00:00:00Z",
            "properties": {"revenue": 10},
        },
    ]
    Host(store, pm, now=lambda: datetime(2026, 7, 1, tzinfo=UTC)).ingest_stream(
        [orjson.dumps(r) for r in raw]
    )
    assert build_features(store, AS_OF) == 1
    assert build_labels(store, AS_OF, name="purchased_30d", window_days=30) == 1
    with store.engine.connect() as conn:
        row = conn.execute(schema.profile_features.select()).mappings().one()
        label = conn.execute(schema.profile_labels.select()).mappings().one()
    assert row["profile_id"] == "u1" and row["tenure_days"] == pytest.approx(31.0)
    assert row["monetary"] == 10.0
    assert label["value"] == 1.0 and label["name"] == "purchased_30d"
    store.dispose()
