"""Segment JSONL connector (``type: segment``): per-profile features straight from an event log.

For a CDP that only has events: each line is validated as the host validates it, anonymous activity
is credited to the identified profile, and features are computed as of ``options.as_of`` (ISO 8601;
default: now). With ``options.label_window_days`` the declared ``label`` column is 1.0 when the
profile has ``options.label_event`` (default ``Order Completed``) within that many days after
``as_of``. ``options.on_invalid``: ``error`` (default) stops at the first invalid line with its
line number; ``skip`` leaves invalid lines out and counts them in ``invalid_lines``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import polars as pl

from cdp_federated.connector import Connector, ConnectorConfig
from cdp_federated.consent.signals import jurisdiction_of
from cdp_federated.errors import ConfigError, EventValidationError, SourceUnavailableError
from cdp_federated.events import parse_event_line
from cdp_federated.features import (
    EVENT_SCHEMA,
    features_from_events,
    labels_from_events,
    resolve_profiles,
)
from cdp_federated.hookspecs import hookimpl

_OPTIONS = {"as_of", "label_window_days", "label_event", "on_invalid", "max_event_bytes"}


class SegmentConnector(Connector):
    type_name: ClassVar[str] = "segment"
    required: ClassVar[tuple[str, ...]] = ("path",)

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__(config)
        unknown = set(config.options) - _OPTIONS
        if unknown:
            raise ConfigError(
                "unknown segment connector option",
                field=f"{config.name}.options",
                value=sorted(unknown),
                fix=f"use only {', '.join(sorted(_OPTIONS))}",
            )
        opts = config.options
        try:
            self.as_of = (
                datetime.fromisoformat(opts["as_of"]) if "as_of" in opts else datetime.now(UTC)
            )
        except (TypeError, ValueError):
            raise ConfigError(
                "as_of is not ISO 8601",
                field=f"{config.name}.options.as_of",
                value=opts["as_of"],
                fix="e.g. 2026-09-01T00:00:00Z",
            ) from None
        if self.as_of.tzinfo is None:
            self.as_of = self.as_of.replace(tzinfo=UTC)
        self.on_invalid = opts.get("on_invalid", "error")
        if self.on_invalid not in ("error", "skip"):
            raise ConfigError(
                "on_invalid must be 'error' or 'skip'",
                field=f"{config.name}.options.on_invalid",
                value=self.on_invalid,
                fix="pick one",
            )
        self.invalid_lines = 0
        self._frame: pl.DataFrame | None = None

    def _read(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        rows: list[tuple[Any, ...]] = []
        links: list[tuple[str, str]] = []
        places: list[tuple[str, datetime, str]] = []
        max_bytes = int(self.config.options.get("max_event_bytes", 32768))
        now = self.as_of + timedelta(days=36500)  # a log may hold the label window: no skew check
        try:
            handle = open(self.config.path, "rb")  # type: ignore[arg-type]  # noqa: SIM115
        except OSError as exc:
            raise SourceUnavailableError(
                f"cannot open events file: {exc.strerror}",
                field=f"{self.config.name}.path",
                value=self.config.path,
                fix="check the path",
            ) from exc
        with handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    ev = parse_event_line(
                        line.strip(), now=now, max_skew=timedelta(0), max_bytes=max_bytes
                    )
                except EventValidationError as exc:
                    if self.on_invalid == "error":
                        raise EventValidationError(
                            f"line {line_no}: {exc.message}",
                            code=exc.code,
                            field=exc.field,
                            value=exc.value,
                            fix=(exc.fix or "") + "; or set options.on_invalid: skip",
                        ) from exc
                    self.invalid_lines += 1
                    continue
                rows.append((ev.profile_id, ev.type, ev.event, ev.timestamp, ev.revenue))
                if ev.user_id and ev.anonymous_id:
                    links.append((ev.anonymous_id, ev.user_id))
                if ev.previous_id and ev.user_id:
                    links.append((ev.previous_id, ev.user_id))
                where = jurisdiction_of(ev.context)
                if where and ev.timestamp < self.as_of:
                    places.append((ev.profile_id, ev.timestamp, where))
        events = pl.DataFrame(rows, schema=EVENT_SCHEMA, orient="row")
        link_frame = pl.DataFrame(links, schema=["anon", "linked"], orient="row")
        place_schema = {
            "profile_id": pl.String,
            "timestamp": EVENT_SCHEMA["timestamp"],
            "jurisdiction": pl.String,
        }
        # A profile's jurisdiction is the latest location seen, after identity resolution.
        place_frame = (
            resolve_profiles(
                pl.DataFrame(places, schema=place_schema, orient="row").lazy(), link_frame
            )
            .group_by("profile_id")
            .agg(pl.col("jurisdiction").sort_by("timestamp").last())
            .collect()
        )
        return resolve_profiles(events.lazy(), link_frame).collect(), place_frame

    def _source(self) -> pl.LazyFrame:
        if self._frame is None:
            events, places = self._read()
            lazy = events.lazy()
            frame = features_from_events(lazy, self.as_of)
            opts = self.config.options
            if "label_window_days" in opts and self.config.label:
                labels = labels_from_events(
                    lazy,
                    self.as_of,
                    window_days=int(opts["label_window_days"]),
                    event=opts.get("label_event", "Order Completed"),
                ).rename({"label": self.config.label})
                frame = frame.join(labels, on="profile_id", how="left")
            frame = frame.join(places.lazy(), on="profile_id", how="left")
            self._frame = frame.collect()
        return self._frame.lazy()


@hookimpl
def cdp_register_connectors() -> list[type[Connector]]:
    return [SegmentConnector]
