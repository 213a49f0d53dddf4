"""Per-profile features and labels from events, with polars (vectorised, linear in events).

Features as of time T use only events strictly before T: recency, tenure, frequency and monetary
value from ``Order Completed`` revenue, and event counts per type and window. Anonymous activity is
credited to the profile an identify/alias linked it to. Labels look forward from T (e.g. "placed an
order in the 30 days after T"), so training never sees the future through its features.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import polars as pl
from sqlalchemy import delete, select

from .errors import ConfigError
from .store import Store, schema

__all__ = [
    "FEATURE_COLUMNS",
    "ORDER_EVENT",
    "features_from_events",
    "labels_from_events",
    "read_events",
    "resolve_profiles",
    "build_features",
    "build_labels",
]

ORDER_EVENT = "Order Completed"
FEATURE_COLUMNS: tuple[str, ...] = tuple(
    c.name for c in schema.profile_features.columns if c.name not in ("profile_id", "as_of")
)
EVENT_SCHEMA = {
    "profile_id": pl.String,
    "type": pl.String,
    "event": pl.String,
    "timestamp": pl.Datetime("us", "UTC"),
    "revenue": pl.Float64,
}


def _utc(as_of: datetime) -> datetime:
    if as_of.tzinfo is None:
        raise ConfigError(
            "as_of needs a timezone",
            field="as_of",
            value=as_of.isoformat(),
            fix="pass a UTC datetime",
        )
    return as_of


def _windowed(cond: pl.Expr, age: pl.Expr, days: int) -> pl.Expr:
    return (cond & (age < days)).sum().cast(pl.Float64)


def features_from_events(events: pl.LazyFrame, as_of: datetime) -> pl.LazyFrame:
    """One row per profile with :data:`FEATURE_COLUMNS`, from events before ``as_of``."""
    as_of = _utc(as_of)
    ev = events.filter(pl.col("timestamp") < as_of).with_columns(
        ((pl.lit(as_of) - pl.col("timestamp")).dt.total_seconds() / 86400.0).alias("_age"),
        (pl.col("event") == ORDER_EVENT).fill_null(False).alias("_order"),
    )
    age, order = pl.col("_age"), pl.col("_order")
    revenue = pl.when(order).then(pl.col("revenue").fill_null(0.0)).otherwise(0.0)
    out = ev.group_by("profile_id").agg(
        age.min().alias("recency_days"),
        age.max().alias("tenure_days"),
        order.sum().cast(pl.Float64).alias("frequency"),
        revenue.sum().alias("monetary"),
        pl.len().cast(pl.Float64).alias("_n"),
        _windowed(pl.lit(True), age, 7).alias("events_7d"),
        _windowed(pl.lit(True), age, 30).alias("events_30d"),
        _windowed(pl.lit(True), age, 90).alias("events_90d"),
        _windowed(order, age, 30).alias("orders_30d"),
        _windowed(order, age, 90).alias("orders_90d"),
        pl.when(age < 90).then(revenue).otherwise(0.0).sum().alias("revenue_90d"),
        _windowed(pl.col("type").is_in(["page", "screen"]), age, 30).alias("page_views_30d"),
        _windowed((pl.col("event") == "Product Viewed").fill_null(False), age, 30).alias(
            "product_views_30d"
        ),
        _windowed((pl.col("event") == "Product Added").fill_null(False), age, 30).alias(
            "cart_adds_30d"
        ),
        pl.col("event").drop_nulls().n_unique().cast(pl.Float64).alias("distinct_events"),
    )
    out = out.with_columns(
        (pl.col("monetary") / pl.max_horizontal(pl.col("frequency"), pl.lit(1.0))).alias(
            "avg_order_value"
        )
    )
    return out.select("profile_id", *FEATURE_COLUMNS)


def labels_from_events(
    events: pl.LazyFrame, as_of: datetime, *, window_days: int, event: str = ORDER_EVENT
) -> pl.LazyFrame:
    """``label`` = 1.0 when the profile has ``event`` in ``[as_of, as_of + window)``, for every
    profile active before ``as_of`` (others have no features to learn from)."""
    as_of = _utc(as_of)
    end = as_of + timedelta(days=window_days)
    known = events.filter(pl.col("timestamp") < as_of).select("profile_id").unique()
    positive = (
        events.filter(
            (pl.col("event") == event)
            & (pl.col("timestamp") >= as_of)
            & (pl.col("timestamp") < end)
        )
        .select("profile_id")
        .unique()
        .with_columns(pl.lit(1.0).alias("label"))
    )
    return known.join(positive, on="profile_id", how="left").with_columns(
        pl.col("label").fill_null(0.0)
    )


def read_events(store: Store) -> pl.LazyFrame:
    """The store's events with anonymous ids resolved to their linked profile."""
    ev, ids = schema.events, schema.identifiers
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(ev.c.profile_id, ev.c.type, ev.c.event, ev.c.timestamp, ev.c.revenue)
        ).all()
        links = conn.execute(
            select(ids.c.value, ids.c.profile_id).where(ids.c.kind == "anonymous_id")
        ).all()
    frame = pl.DataFrame(rows, schema=list(EVENT_SCHEMA), orient="row", infer_schema_length=None)
    ts = frame["timestamp"]
    if ts.dtype == pl.Datetime and ts.dtype.time_zone is None:  # type: ignore[union-attr]
        frame = frame.with_columns(
            pl.col("timestamp").dt.replace_time_zone("UTC")
        )  # SQLite: naive UTC
    frame = frame.cast(EVENT_SCHEMA)  # type: ignore[arg-type]
    return resolve_profiles(
        frame.lazy(), pl.DataFrame(links, schema=["anon", "linked"], orient="row")
    )


def resolve_profiles(events: pl.LazyFrame, links: pl.DataFrame) -> pl.LazyFrame:
    """Credit events keyed by an anonymous id to the profile it was linked to (``links``: columns
    ``anon``, ``linked``); an anonymous id linked to several profiles goes to the smallest id, so
    the result is deterministic."""
    link = links.cast(pl.String).group_by("anon").agg(pl.col("linked").min())
    return (
        events.join(link.lazy(), left_on="profile_id", right_on="anon", how="left")
        .with_columns(pl.coalesce("linked", "profile_id").alias("profile_id"))
        .drop("linked")
    )


def build_features(store: Store, as_of: datetime, *, events: pl.LazyFrame | None = None) -> int:
    """Recompute ``profile_features`` as of ``as_of`` in one transaction; returns profiles written."""
    frame = features_from_events(
        events if events is not None else read_events(store), as_of
    ).collect()
    rows = frame.with_columns(pl.lit(as_of).alias("as_of")).to_dicts()
    with store.begin() as conn:
        conn.execute(delete(schema.profile_features))
        if rows:
            conn.execute(schema.profile_features.insert(), rows)
    return len(rows)


def build_labels(
    store: Store,
    as_of: datetime,
    *,
    name: str,
    window_days: int,
    event: str = ORDER_EVENT,
    events: pl.LazyFrame | None = None,
) -> int:
    """Recompute the label ``name`` as of ``as_of``; returns profiles labelled."""
    frame = labels_from_events(
        events if events is not None else read_events(store),
        as_of,
        window_days=window_days,
        event=event,
    ).collect()
    rows = [
        {"profile_id": pid, "name": name, "as_of": as_of, "value": value}
        for pid, value in frame.select("profile_id", "label").iter_rows()
    ]
    table = schema.profile_labels
    with store.begin() as conn:
        conn.execute(delete(table).where(table.c.name == name))
        if rows:
            conn.execute(table.insert(), rows)
    return len(rows)
