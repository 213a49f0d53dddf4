"""Segment-spec events: the validated model and the validator.

Validation follows the Segment spec's common fields: ``type`` (identify, track, page, screen, group,
alias), ``messageId``, ``timestamp`` (ISO 8601 with a UTC offset), and ``userId`` or
``anonymousId``; type-specific fields (``event`` for track, ``groupId`` for group, ``previousId``
and ``userId`` for alias). Each failure is an :class:`EventValidationError` with a stable ``code``
used as the dead-letter reason code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from .errors import EventValidationError

__all__ = [
    "EVENT_TYPES",
    "Event",
    "EventBatch",
    "decode_event_line",
    "parse_event_line",
    "validate_event",
]

EVENT_TYPES = frozenset({"identify", "track", "page", "screen", "group", "alias"})
_MAX_ID = 256


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event. ``profile_id`` is ``userId`` when present, else ``anonymousId``."""

    message_id: str
    type: str
    profile_id: str
    user_id: str | None
    anonymous_id: str | None
    timestamp: datetime
    event: str | None
    properties: dict[str, Any]
    traits: dict[str, Any]
    context: dict[str, Any]
    previous_id: str | None = None
    group_id: str | None = None
    revenue: float | None = None


def _event_factory() -> Callable[..., Event]:
    """A positional constructor for :class:`Event` about four times cheaper than ``Event(...)``.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``; the hot path
    builds the same slots through an identical mutable twin and then makes the object an ``Event``
    (allowed because both classes have exactly the same slot layout). The result is a genuine,
    frozen ``Event``; should the layouts ever differ, the plain constructor is used.
    """
    spec = [
        (f.name, f.type) if f.default is MISSING else (f.name, f.type, field(default=f.default))
        for f in fields(Event)
    ]
    twin = make_dataclass("_EventTwin", spec, slots=True)

    def build(*values: Any) -> Event:
        obj = twin(*values)
        obj.__class__ = Event
        return obj  # type: ignore[return-value]

    try:
        probe = build(*(None for _ in spec))
    except TypeError:  # pragma: no cover - layouts differ: fall back to the regular constructor
        return Event
    return build if type(probe) is Event else Event  # pragma: no branch


_new_event = _event_factory()


@dataclass(slots=True)
class EventBatch:
    """Events applied together in one transaction (already validated and de-duplicated)."""

    events: list[Event]
    received_at: datetime
    source: str = "-"
    # Filled by the built-in ingest plugin for later plugins: profile ids touched in this batch.
    touched_profiles: set[str] = field(default_factory=set)
    # Work a host did ahead of the transaction for a plugin (e.g. in its parsing thread), keyed by
    # the plugin's name. Only an optimisation: a plugin checks it matches this batch and otherwise
    # ignores it. The reference host fills it for the built-in ``cdp_federated.ingest`` plugin.
    prepared: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.events)


def _fail(code: str, message: str, field_name: str, value: Any, fix: str) -> EventValidationError:
    return EventValidationError(message, code=code, field=field_name, value=value, fix=fix)


def _opt_id(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _fail("invalid_id", f"{key} must be a string", key, value, f"send {key} as a string")
    value = str(value)
    if len(value) > _MAX_ID:
        raise _fail(
            "invalid_id", f"{key} is longer than {_MAX_ID} characters", key, value, "shorten the id"
        )
    return value


def _object(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(
            "invalid_object", f"{key} must be a JSON object", key, value, f"send {key} as an object"
        )
    return value


def _parse_timestamp(value: Any, now: datetime, max_skew: timedelta) -> datetime:
    if not isinstance(value, str) or not value:
        raise _fail(
            "invalid_timestamp",
            "timestamp is missing or not a string",
            "timestamp",
            value,
            "send an ISO 8601 timestamp such as 2026-05-01T12:00:00.000Z",
        )
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise _fail(
            "invalid_timestamp",
            "timestamp is not ISO 8601",
            "timestamp",
            value,
            "send an ISO 8601 timestamp such as 2026-05-01T12:00:00.000Z",
        ) from None
    if ts.tzinfo is None:
        raise _fail(
            "invalid_timestamp",
            "timestamp has no UTC offset",
            "timestamp",
            value,
            "append 'Z' or an offset such as +02:00",
        )
    ts = ts.astimezone(UTC)
    if ts - now > max_skew:
        raise _fail(
            "future_timestamp",
            "timestamp is in the future",
            "timestamp",
            value,
            "check the sender's clock (max skew is the max_clock_skew_days setting)",
        )
    return ts


def _revenue(event_name: str | None, properties: dict[str, Any]) -> float | None:
    if event_name != "Order Completed":
        return None
    for key in ("revenue", "total"):
        value = properties.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _fail(
                "invalid_revenue",
                f"properties.{key} must be a number",
                f"properties.{key}",
                value,
                "send revenue as a JSON number, e.g. 42.5",
            )
        if value != value or value in (float("inf"), float("-inf")):
            raise _fail(
                "invalid_revenue",
                "revenue is not finite",
                f"properties.{key}",
                value,
                "send a finite number",
            )
        return float(value)
    return None


def _slow_validate(raw: Any, now: datetime, max_skew: timedelta) -> Event:
    """Every rule, in order, with its error; :func:`validate_event` falls back to it."""
    if not isinstance(raw, dict):
        raise _fail(
            "not_an_object",
            "event must be a JSON object",
            "event",
            raw,
            "send one JSON object per line",
        )
    etype = raw.get("type")
    if not isinstance(etype, str) or etype not in EVENT_TYPES:
        raise _fail(
            "unknown_type",
            "unknown event type",
            "type",
            etype,
            f"use one of {', '.join(sorted(EVENT_TYPES))}",
        )
    message_id = _opt_id(raw, "messageId")
    if message_id is None:
        raise _fail(
            "missing_message_id",
            "messageId is required",
            "messageId",
            None,
            "send a unique messageId per event",
        )
    user_id = _opt_id(raw, "userId")
    anonymous_id = _opt_id(raw, "anonymousId")
    if user_id is None and anonymous_id is None:
        raise _fail(
            "missing_identity",
            "event has neither userId nor anonymousId",
            "userId",
            None,
            "send userId or anonymousId",
        )
    timestamp = _parse_timestamp(
        raw.get("timestamp") or raw.get("originalTimestamp"), now, max_skew
    )
    properties = _object(raw, "properties")
    traits = _object(raw, "traits")
    context = _object(raw, "context")
    event_name = None
    previous_id = group_id = None
    if etype == "track":
        event_name = raw.get("event")
        if not isinstance(event_name, str) or not event_name.strip():
            raise _fail(
                "missing_event_name",
                "track event has no event name",
                "event",
                event_name,
                "set 'event'",
            )
    elif etype in ("page", "screen"):
        name = raw.get("name")
        event_name = name if isinstance(name, str) else None
    elif etype == "alias":
        previous_id = _opt_id(raw, "previousId")
        if previous_id is None or user_id is None:
            raise _fail(
                "invalid_alias",
                "alias needs previousId and userId",
                "previousId",
                raw.get("previousId"),
                "send both previousId and userId",
            )
    elif etype == "group":
        group_id = _opt_id(raw, "groupId")
        if group_id is None:
            raise _fail(
                "missing_group_id", "group event has no groupId", "groupId", None, "set 'groupId'"
            )
    return _new_event(
        message_id,
        etype,
        user_id or anonymous_id,
        user_id,
        anonymous_id,
        timestamp,
        event_name,
        properties,
        traits,
        context,
        previous_id,
        group_id,
        _revenue(event_name, properties),
    )


def validate_event(raw: Any, *, now: datetime, max_skew: timedelta) -> Event:
    """Validate one decoded event; raise :class:`EventValidationError` with a reason code.

    This is the ingest hot path: the common, well-formed event is checked with exact type tests
    and built directly; anything unusual (a missing or odd field, any error) is handed to
    :func:`_slow_validate`, which applies every rule in order and gives the error.
    """
    if type(raw) is not dict:
        return _slow_validate(raw, now, max_skew)
    get = raw.get
    etype = get("type")
    message_id = get("messageId")
    user_id = get("userId")
    anonymous_id = get("anonymousId")
    value = get("timestamp") or get("originalTimestamp")
    properties = get("properties")
    traits = get("traits")
    context = get("context")
    if (
        type(etype) is not str
        or type(message_id) is not str
        or not 0 < len(message_id) <= _MAX_ID
        or type(value) is not str
        or (user_id is not None and (type(user_id) is not str or not 0 < len(user_id) <= _MAX_ID))
        or (
            anonymous_id is not None
            and (type(anonymous_id) is not str or not 0 < len(anonymous_id) <= _MAX_ID)
        )
        or (user_id is None and anonymous_id is None)
        or (properties is not None and type(properties) is not dict)
        or (traits is not None and type(traits) is not dict)
        or (context is not None and type(context) is not dict)
        or etype == "alias"
        or etype == "group"
    ):
        return _slow_validate(raw, now, max_skew)
    try:
        timestamp = datetime.fromisoformat(value)
    except ValueError:
        return _slow_validate(raw, now, max_skew)
    tz = timestamp.tzinfo
    if tz is not UTC:
        if tz is None:
            return _slow_validate(raw, now, max_skew)
        timestamp = timestamp.astimezone(UTC)
    if timestamp - now > max_skew:
        return _slow_validate(raw, now, max_skew)
    if etype == "track":
        event_name = get("event")
        if type(event_name) is not str or not event_name.strip():
            return _slow_validate(raw, now, max_skew)
    elif etype == "page" or etype == "screen":
        event_name = get("name")
        if not isinstance(event_name, str):
            event_name = None
    elif etype == "identify":
        event_name = None
    else:  # unknown type
        return _slow_validate(raw, now, max_skew)
    if properties is None:
        properties = {}
    return _new_event(
        message_id,
        etype,
        user_id or anonymous_id,
        user_id,
        anonymous_id,
        timestamp,
        event_name,
        properties,
        {} if traits is None else traits,
        {} if context is None else context,
        None,
        None,
        _revenue(event_name, properties) if event_name == "Order Completed" else None,
    )


def parse_event_line(line: bytes, *, now: datetime, max_skew: timedelta, max_bytes: int) -> Event:
    """Decode and validate one JSONL line."""
    return decode_event_line(line, now=now, max_skew=max_skew, max_bytes=max_bytes)[0]


def decode_event_line(
    line: bytes, *, now: datetime, max_skew: timedelta, max_bytes: int
) -> tuple[Event, dict[str, Any]]:
    """:func:`parse_event_line`, also returning the decoded JSON object the event came from."""
    if len(line) > max_bytes:
        raise _fail(
            "oversized",
            f"event is {len(line)} bytes, over the {max_bytes}-byte limit",
            "event",
            f"{len(line)} bytes",
            "trim properties/traits or raise the max_event_bytes setting",
        )
    try:
        raw = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise _fail(
            "malformed_json",
            f"line is not valid JSON ({exc.msg})",
            "line",
            line[:80],
            "send one JSON object per line",
        ) from None
    return validate_event(raw, now=now, max_skew=max_skew), raw
