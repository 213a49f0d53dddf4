"""Segment JSONL connector: features straight from an event log."""

from __future__ import annotations

import orjson
import pytest

from cdp_federated.connector import ConnectorRegistry
from cdp_federated.errors import ConfigError, EventValidationError, SourceUnavailableError


def write(path, events, extra=b""):
    path.write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n" + extra)
    return path


EVENTS = [
    {
        "type": "page",
        "messageId": "1",
        "anonymousId": "a1",
        "timestamp": "2026-05-01T00:00:00Z",
        "context": {"location": {"country": "DE"}},
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
        "properties": {"revenue": 12},
    },
    {
        "type": "track",
        "event": "Order Completed",
        "messageId": "4",
        "userId": "u2",
        "timestamp": "2026-06-05T00:00:00Z",
        "properties": {"revenue": 12},
        "context": {"location": {"country": "US", "region": "NY"}},
    },
    {
        "type": "page",
        "messageId": "5",
        "userId": "u2",
        "timestamp": "2026-05-03T00:00:00Z",
        "context": {"location": {"country": "US", "region": "NJ"}},
    },
]


def open_segment(pm, path, **options):
    cfg = {
        "type": "segment",
        "name": "log",
        "path": str(path),
        "label": "purchased",
        "jurisdiction_column": "jurisdiction",
        "options": {"as_of": "2026-06-01T00:00:00Z", **options},
    }
    return ConnectorRegistry(pm).open(cfg)


def test_features_labels_and_jurisdiction_from_events(pm, tmp_path):
    conn = open_segment(pm, write(tmp_path / "e.jsonl", EVENTS), label_window_days=30)
    frame = conn.scan().collect().sort("profile_id")
    assert frame["profile_id"].to_list() == ["u1", "u2"]  # a1's page view is credited to u1
    u1, u2 = frame.to_dicts()
    assert (
        u1["tenure_days"] == pytest.approx(31.0)
        and u1["monetary"] == 12.0
        and u1["purchased"] == 0.0
    )
    assert u2["purchased"] == 1.0 and u2["frequency"] == 0.0
    assert (
        u1["jurisdiction"] == "EU" and u2["jurisdiction"] == "US-NJ"
    )  # the NY order is after as_of


def test_invalid_line_stops_with_its_line_number_unless_skipped(pm, tmp_path):
    path = write(tmp_path / "e.jsonl", EVENTS, extra=b'{"type": "track"}\n')
    with pytest.raises(EventValidationError) as info:
        open_segment(pm, path, label_window_days=30).scan()
    assert "line 6" in str(info.value) and "on_invalid: skip" in str(info.value)
    conn = open_segment(pm, path, label_window_days=30, on_invalid="skip")
    assert conn.scan().collect().height == 2 and conn.invalid_lines == 1


def test_bad_options_and_missing_file(pm, tmp_path):
    with pytest.raises(ConfigError):
        open_segment(pm, tmp_path / "e.jsonl", colour="blue")
    with pytest.raises(ConfigError):
        open_segment(pm, tmp_path / "e.jsonl", as_of="last tuesday")
    with pytest.raises(SourceUnavailableError):
        open_segment(pm, tmp_path / "missing.jsonl").scan()
