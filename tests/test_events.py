"""Segment-spec validation: every rule gives a typed error with a stable code."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from cdp_federated.errors import EventValidationError
from cdp_federated.events import parse_event_line

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def parse(obj, max_bytes=32768):
    line = obj if isinstance(obj, bytes) else orjson.dumps(obj)
    return parse_event_line(line, now=NOW, max_skew=timedelta(days=1), max_bytes=max_bytes)


def base(**over):
    ev = {
        "type": "track",
        "event": "Order Completed",
        "messageId": "m-1",
        "userId": "u1",
        "timestamp": "2026-05-01T10:00:00.123Z",
        "properties": {"revenue": 19.99},
    }
    ev.update(over)
    return {k: v for k, v in ev.items() if v is not None}


def test_valid_track_event_is_normalised_to_utc():
    ev = parse(base(timestamp="2026-05-01T12:00:00+02:00"))
    assert ev.timestamp == datetime(2026, 5, 1, 10, 0, tzinfo=UTC)
    assert ev.profile_id == "u1" and ev.revenue == 19.99 and ev.event == "Order Completed"


def test_anonymous_only_event_uses_anonymous_id_as_profile():
    ev = parse(base(type="page", userId=None, anonymousId="anon-7", event=None, name="Home"))
    assert ev.profile_id == "anon-7" and ev.user_id is None and ev.event == "Home"


@pytest.mark.parametrize(
    ("obj", "code", "field"),
    [
        (b"{not json", "malformed_json", "line"),
        (b"[1, 2]", "not_an_object", "event"),
        (base(type="purchase"), "unknown_type", "type"),
        (base(type=None), "unknown_type", "type"),
        (base(messageId=None), "missing_message_id", "messageId"),
        (base(userId=None), "missing_identity", "userId"),
        (base(userId=True), "invalid_id", "userId"),
        (base(userId="x" * 300), "invalid_id", "userId"),
        (base(timestamp="12/03/2026 10:00"), "invalid_timestamp", "timestamp"),
        (base(timestamp="2026-05-01T10:00:00"), "invalid_timestamp", "timestamp"),
        (base(timestamp=None), "invalid_timestamp", "timestamp"),
        (base(timestamp="2026-07-01T00:00:00Z"), "future_timestamp", "timestamp"),
        (base(event=""), "missing_event_name", "event"),
        (base(properties=[1]), "invalid_object", "properties"),
        (base(properties={"revenue": "19.99"}), "invalid_revenue", "properties.revenue"),
        (base(type="alias", event=None, previousId=None), "invalid_alias", "previousId"),
        (base(type="group", event=None), "missing_group_id", "groupId"),
    ],
)
def test_invalid_events_have_code_field_and_fix(obj, code, field):
    with pytest.raises(EventValidationError) as info:
        parse(obj)
    err = info.value
    assert err.code == code
    assert err.field == field
    assert err.fix  # every refusal says how to fix it
    assert "Fix:" in str(err)


def test_oversized_event_is_refused_before_parsing():
    big = orjson.dumps(base(properties={"blob": "x" * 40_000}))
    with pytest.raises(EventValidationError) as info:
        parse(big)
    assert info.value.code == "oversized"
    assert str(len(big)) in str(info.value)


def test_original_timestamp_is_accepted_when_timestamp_missing():
    ev = parse(base(timestamp=None, originalTimestamp="2026-05-01T10:00:00Z"))
    assert ev.timestamp.isoformat() == "2026-05-01T10:00:00+00:00"
