"""Consent ledger: the SQL answer equals a naive oracle written over the raw event signals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp_federated.consent import allowed_ids, consent_records, jurisdiction_of
from cdp_federated.events import parse_event_line
from cdp_federated.host import Host
from cdp_federated.store import open_store

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 12, 1, tzinfo=UTC)
COUNTRIES = [
    ("DE", None),
    ("FR", None),
    ("GB", None),
    ("US", "CA"),
    ("US", "NY"),
    ("BR", None),
    (None, None),
]

# The oracle's own reading of each format (independent of cdp_federated.consent).
ANALYTICS = {
    ("segment", "Analytics"),
    ("rudderstack", "C0002"),
    ("consent_mode", "analytics_storage"),
}


def oracle_allowed(events, at):
    latest = {}  # (profile, signal) -> (timestamp, seq, granted)
    place = {}
    for seq, e in enumerate(events):
        pid = e.get("userId") or e["anonymousId"]
        ts = datetime.fromisoformat(e["timestamp"])
        loc = e["context"].get("location", {})
        if loc.get("country"):
            prev = place.get(pid)
            if prev is None or ts >= prev[0]:
                place[pid] = (ts, loc["country"], loc.get("region"))
        if ts > at:
            continue
        signals = []
        consent = e["context"].get("consent", {})
        for cat, val in consent.get("categoryPreferences", {}).items():
            signals.append((("segment", cat), val))
        for key, val in consent.get("googleConsentMode", {}).items():
            signals.append((("consent_mode", key), val == "granted"))
        managed = e["context"].get("consentManagement", {})
        signals += [(("rudderstack", c), True) for c in managed.get("allowedConsentIds", [])]
        signals += [(("rudderstack", c), False) for c in managed.get("deniedConsentIds", [])]
        for signal, granted in signals:
            key = (pid, signal)
            if signal in ANALYTICS and (key not in latest or (ts, seq) >= latest[key][:2]):
                latest[key] = (ts, seq, granted)
    allowed = set()
    for pid in place.keys() | {(e.get("userId") or e["anonymousId"]) for e in events}:
        values = [v[2] for (p, _), v in latest.items() if p == pid]
        if False in values:
            continue
        if True in values:
            allowed.add(pid)
            continue
        country = place.get(pid, (None, None, None))[1]
        if country == "US":
            allowed.add(pid)  # opt-out regime: allowed unless opted out
    return allowed


def consent_context(draw):
    kind = draw(st.sampled_from(["segment", "mode", "rudder", "none", "gpc"]))
    granted = draw(st.booleans())
    if kind == "segment":
        return {
            "consent": {
                "categoryPreferences": {"Analytics": granted, "Advertising": draw(st.booleans())}
            }
        }
    if kind == "mode":
        return {
            "consent": {
                "googleConsentMode": {
                    "analytics_storage": "granted" if granted else "denied",
                    "ad_storage": "denied",
                }
            }
        }
    if kind == "rudder":
        ids = {
            "allowedConsentIds": ["C0001", "C0002"] if granted else ["C0001"],
            "deniedConsentIds": [] if granted else ["C0002"],
        }
        return {"consentManagement": {"provider": "oneTrust", **ids, "resolutionStrategy": "and"}}
    if kind == "gpc":
        return {"gpc": True}
    return {}


@st.composite
def histories(draw):
    n = draw(st.integers(1, 40))
    events = []
    for i in range(n):
        pid = f"p{draw(st.integers(0, 6))}"
        country, region = draw(st.sampled_from(COUNTRIES))
        ctx = consent_context(draw)
        if country:
            ctx["location"] = {"country": country, **({"region": region} if region else {})}
        ts = T0 + timedelta(hours=draw(st.integers(0, 24 * 300)))
        events.append(
            {
                "type": "track",
                "event": "x",
                "messageId": f"m{i}",
                "userId": pid,
                "timestamp": ts.isoformat().replace("+00:00", "Z"),
                "context": ctx,
            }
        )
    at = T0 + timedelta(hours=draw(st.integers(0, 24 * 300)))
    return events, at


@settings(
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(histories())
def test_allowed_ids_equal_the_naive_oracle(tmp_path_factory, pm, history):
    events, at = history
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('c') / 'c.sqlite'}", create=True)
    Host(store, pm, now=lambda: NOW).ingest_stream([orjson.dumps(e) for e in events])
    got = set(allowed_ids(store, "model_training", at).as_frame().collect()["profile_id"])
    assert got == oracle_allowed(events, at)
    store.dispose()


def test_revocation_applies_from_its_timestamp(db_url, pm):
    store = open_store(db_url, create=True)
    grant = {
        "type": "identify",
        "messageId": "g",
        "userId": "eu-1",
        "timestamp": "2026-02-01T00:00:00Z",
        "context": {
            "location": {"country": "DE"},
            "consent": {"categoryPreferences": {"Analytics": True}},
        },
    }
    revoke = {
        **grant,
        "messageId": "r",
        "timestamp": "2026-03-01T00:00:00Z",
        "context": {"consent": {"categoryPreferences": {"Analytics": False}}},
    }
    silent_us = {
        "type": "page",
        "messageId": "u",
        "userId": "us-1",
        "timestamp": "2026-02-01T00:00:00Z",
        "context": {"location": {"country": "US", "region": "TX"}},
    }
    silent_eu = {
        **silent_us,
        "messageId": "e",
        "userId": "eu-2",
        "context": {"location": {"country": "FR"}},
    }
    unknown = {**silent_us, "messageId": "x", "userId": "nowhere", "context": {}}
    Host(store, pm, now=lambda: NOW).ingest_stream(
        [orjson.dumps(e) for e in (grant, revoke, silent_us, silent_eu, unknown)]
    )

    def allowed(at):
        return set(allowed_ids(store, "model_training", at).as_frame().collect()["profile_id"])

    assert allowed(datetime(2026, 2, 15, tzinfo=UTC)) == {"eu-1", "us-1"}
    assert allowed(datetime(2026, 3, 15, tzinfo=UTC)) == {"us-1"}  # revoked; EU default is deny
    store.dispose()


def test_signal_extraction_formats():
    line = orjson.dumps(
        {
            "type": "identify",
            "messageId": "m",
            "userId": "u",
            "timestamp": "2026-02-01T00:00:00Z",
            "context": {
                "location": {"country": "us", "region": "ca"},
                "headers": {"Sec-GPC": "1"},
                "consent": {"tcfString": "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA"},
            },
        }
    )
    ev = parse_event_line(line, now=NOW, max_skew=timedelta(days=1), max_bytes=10_000)
    assert jurisdiction_of(ev.context) == "US-CA"
    recs = {(r["purpose"], r["granted"]) for r in consent_records(ev, "US-CA")}
    # This TC string (CMP 31, policy version 2) carries no purpose consent: every TCF purpose is
    # recorded as an explicit deny, so it can never grant.
    tcf_denies = {(f"tcf:{kind}:{n}", False) for kind in ("purpose", "li") for n in range(1, 12)}
    assert recs == {("gpc:sale_sharing", False)} | tcf_denies


def test_undecodable_tc_string_is_kept_as_evidence_and_grants_nothing():
    line = orjson.dumps(
        {
            "type": "track",
            "event": "Page Viewed",
            "messageId": "m2",
            "userId": "u",
            "timestamp": "2026-02-01T00:00:00Z",
            "context": {"consent": {"tcfString": "CPXxRfAPXx"}},
        }
    )
    ev = parse_event_line(line, now=NOW, max_skew=timedelta(days=1), max_bytes=10_000)
    recs = consent_records(ev, "EU")
    assert [(r["purpose"], r["granted"], r["raw"]) for r in recs] == [
        ("tcf:invalid", False, "CPXxRfAPXx")
    ]
