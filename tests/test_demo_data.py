"""The demo's synthetic retailer: deterministic, valid Segment events, the counts it reports,
customers linkable across regions only after normalising, consent in every format, and a label
that is learnable but not trivial."""

from __future__ import annotations

import re
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pytest

from cdp_federated.demo_data import DEFAULT_NOW, generate_scenario
from cdp_federated.errors import EventValidationError
from cdp_federated.events import parse_event_line

TYPES = {"identify", "track", "page", "screen", "group", "alias"}
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
BAD_KINDS = {"oversized", "malformed_json", "unknown_type", "missing_message_id",
             "missing_identity", "non_iso_timestamp", "track_without_event"}  # fmt: skip
CALLING_CODES = ("353", "44", "49", "33", "31", "34", "39", "1")


def problem(line: bytes) -> str | None:
    """Why a line is not a valid Segment event (this test's own checks), else None."""
    if len(line) > 32 * 1024:
        return "oversized"
    try:
        ev = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "malformed_json"
    if ev.get("type") not in TYPES:
        return "unknown_type"
    if not ev.get("messageId"):
        return "missing_message_id"
    if not (ev.get("userId") or ev.get("anonymousId")):
        return "missing_identity"
    if not ISO_Z.match(str(ev.get("timestamp"))):
        return "non_iso_timestamp"
    if ev["type"] == "track" and not ev.get("event"):
        return "track_without_event"
    return None


def read(path: Path) -> dict[str, Any]:
    """Valid distinct events, problems by kind, and exact re-sends of a valid line."""
    events, problems, duplicates, seen = [], Counter[str](), 0, {}
    for line in path.read_bytes().splitlines():
        if kind := problem(line):
            problems[kind] += 1
            continue
        ev = orjson.loads(line)
        if ev["messageId"] in seen:
            assert seen[ev["messageId"]] == line  # a re-send, never a clash of ids
            duplicates += 1
            continue
        seen[ev["messageId"]] = line
        events.append(ev)
    return {"events": events, "problems": problems, "duplicates": duplicates}


def norm_email(raw: str) -> str:
    local, _, domain = raw.strip().lower().partition("@")
    local = local.split("+", 1)[0]
    return f"{local.replace('.', '') if domain == 'gmail.com' else local}@{domain}"


def norm_phone(raw: str) -> str:
    digits = re.sub(r"\D", "", raw)
    if raw.strip().startswith(("+", "00")):
        digits = digits.removeprefix("00")
        digits = digits[len(next(cc for cc in CALLING_CODES if digits.startswith(cc))) :]
    return digits.removeprefix("0")  # the trunk prefix


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    scenario = generate_scenario(tmp_path_factory.mktemp("small"), customers=300)
    return scenario, {region: read(path) for region, path in scenario.region_files.items()}


def test_same_seed_same_bytes_other_seed_other_bytes(small, tmp_path):
    scenario, _ = small
    again = generate_scenario(tmp_path / "again", customers=300)
    other = generate_scenario(tmp_path / "other", customers=300, seed=8)
    for region, path in scenario.region_files.items():
        assert again.region_files[region].read_bytes() == path.read_bytes()
        assert other.region_files[region].read_bytes() != path.read_bytes()
    manifest = (scenario.out_dir / "manifest.json").read_bytes()
    assert (again.out_dir / "manifest.json").read_bytes() == manifest


def test_size_scales_with_customers(small, tmp_path):
    scenario, _ = small
    double = generate_scenario(tmp_path, customers=600)
    ratio = sum(double.events_per_region.values()) / sum(scenario.events_per_region.values())
    assert 1.6 < ratio < 2.4
    assert sum(double.customers_per_region.values()) == 600 + double.shared_customers


def test_valid_lines_are_segment_events_in_time_order(small):
    scenario, parsed = small
    assert scenario.cutoff == DEFAULT_NOW - timedelta(days=30) and scenario.label_window_days == 30
    start = (scenario.cutoff - timedelta(days=180)).isoformat()[:19]
    now = DEFAULT_NOW.isoformat()[:19]
    names, types = Counter[str](), Counter[str]()
    for region, data in parsed.items():
        stamps = [ev["timestamp"] for ev in data["events"]]
        assert stamps == sorted(stamps) and start <= stamps[0] and stamps[-1] < now
        for ev in data["events"]:
            types[ev["type"]] += 1
            names[ev.get("event")] += 1
            ctx = ev["context"]
            assert {"library", "ip", "userAgent", "locale", "location"} <= set(ctx)
            assert ctx["ip"].startswith(("192.0.2.", "198.51.100.", "203.0.113."))
            country = ctx["location"]["country"]
            assert country in {"eu-west": {"DE", "FR", "NL", "ES", "IT", "IE"},
                               "us-east": {"US"}, "uk": {"GB"}}[region]  # fmt: skip
            if ev["type"] == "alias":
                assert ev["previousId"] and ev["userId"]
            if ev["type"] == "group":
                assert ev["groupId"] and {"name", "industry"} <= set(ev["traits"])
            if ev.get("event") == "Order Completed":
                props = ev["properties"]
                assert (
                    props["currency"] == {"eu-west": "EUR", "us-east": "USD", "uk": "GBP"}[region]
                )
                assert props["revenue"] > 0 and props["total"] >= props["revenue"] * 0.9
                assert all(
                    {"product_id", "sku", "price", "quantity"} <= set(p) for p in props["products"]
                )
    assert {"identify", "track", "page", "group", "alias"} <= set(types)
    for name in ("Products Searched", "Product Viewed", "Product Added", "Checkout Started",
                 "Order Completed", "Order Refunded"):  # fmt: skip
        assert names[name] > 0, name
    anonymous_pages = sum(
        1 for data in parsed.values() for ev in data["events"]
        if ev["type"] in ("page", "screen") and "userId" not in ev
    )  # fmt: skip
    assert anonymous_pages > 0  # browsing before sign-up carries only anonymousId


def test_reported_counts_match_the_files(small):
    scenario, parsed = small
    manifest = orjson.loads((scenario.out_dir / "manifest.json").read_bytes())
    for region, data in parsed.items():
        assert len(data["events"]) == scenario.events_per_region[region]
        assert sum(data["problems"].values()) == scenario.invalid_events_per_region[region]
        assert set(data["problems"]) == BAD_KINDS  # every kind of bad line, in every region
        assert data["duplicates"] == scenario.duplicate_events_per_region[region] > 0
        users = {ev["userId"] for ev in data["events"] if ev["type"] == "identify"}
        assert len(users) == scenario.customers_per_region[region]
        assert manifest["events_per_region"][region] == scenario.events_per_region[region]
        assert scenario.out_dir / manifest["region_files"][region] == scenario.region_files[region]
    counts = scenario.customers_per_region
    assert counts["uk"] < min(counts["eu-west"], counts["us-east"])  # 45% / 35% / 20% of people
    assert sum(counts.values()) == 300 + scenario.shared_customers


def test_ingest_validator_rejects_exactly_the_injected_lines(small):
    scenario, _ = small
    for path in scenario.region_files.values():
        for line in path.read_bytes().splitlines():
            try:
                parse_event_line(line, now=DEFAULT_NOW, max_skew=timedelta(days=1), max_bytes=32768)
                rejected = False
            except EventValidationError:
                rejected = True
            assert rejected == (problem(line) is not None), line[:200]


def test_shared_customers_match_only_after_normalising(small):
    scenario, parsed = small
    people: dict[str, dict[str, dict[str, Any]]] = {}  # normalised email -> region -> traits
    for region, data in parsed.items():
        for ev in data["events"]:
            if ev["type"] == "identify":
                people.setdefault(norm_email(ev["traits"]["email"]), {})[region] = ev["traits"] | {
                    "userId": ev["userId"]
                }
    assert 0.08 <= scenario.shared_customers / 300 <= 0.12
    shared = [regions for regions in people.values() if len(regions) == 2]
    assert len(shared) == scenario.shared_customers
    assert sum(len(regions) for regions in people.values()) == sum(
        scenario.customers_per_region.values()
    )
    phone_pairs = 0
    for regions in shared:
        a, b = regions.values()
        assert a["email"] != b["email"] and a["userId"] != b["userId"]
        if "phone" in a and "phone" in b:
            phone_pairs += 1
            assert a["phone"] != b["phone"] and norm_phone(a["phone"]) == norm_phone(b["phone"])
    assert phone_pairs >= len(shared) // 3
    raw = [t["email"] for regions in people.values() for t in regions.values()]
    assert any(e != e.strip() or e != e.lower() for e in raw)  # messy spellings exist
    assert any("+" in e and "gmail" in e.lower() for e in raw)


def test_consent_arrives_in_every_format(small):
    _, parsed = small
    seen: dict[str, set[str]] = {}
    analytics: dict[str, list[bool]] = {}
    for region, data in parsed.items():
        for ev in data["events"]:
            ctx = ev["context"]
            consent = ctx.get("consent", {})
            formats = seen.setdefault(region, set())
            if "categoryPreferences" in consent:
                formats.add("segment")
                analytics.setdefault(ev["userId"], []).append(
                    consent["categoryPreferences"]["Analytics"]
                )
            if "googleConsentMode" in consent:
                formats.add("consent_mode")
                assert set(consent["googleConsentMode"].values()) <= {"granted", "denied"}
            if "consentManagement" in ctx:
                formats.add("rudderstack")
                managed = ctx["consentManagement"]
                assert managed["provider"] == "oneTrust" and "C0001" in managed["allowedConsentIds"]
            if ctx.get("gpc") is True:
                formats.add("gpc")
            if ev.get("event") == "Segment Consent Preference Updated":
                formats.add("preference_updated")
    assert {"segment", "consent_mode", "preference_updated"} <= seen["eu-west"]
    assert {"segment", "consent_mode"} <= seen["uk"]
    assert {"rudderstack", "gpc"} <= seen["us-east"]
    assert not {"segment", "consent_mode"} & seen["us-east"]  # opt-out regime: no banner
    first = [values[0] for values in analytics.values()]
    assert 0.5 < sum(first) / len(first) < 0.9  # most, not all, grant analytics
    assert any(len(set(values)) == 2 for values in analytics.values())  # someone changed their mind


def test_label_is_learnable_but_not_trivial(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    scenario = generate_scenario(tmp_path, customers=1500)
    rows = []
    for region, path in scenario.region_files.items():
        for ev in read(path)["events"]:
            if "userId" in ev:
                revenue = (
                    ev["properties"]["revenue"] if ev.get("event") == "Order Completed" else None
                )
                rows.append((f"{region}/{ev['userId']}", ev.get("event"), ev["timestamp"], revenue))
    schema = {"user": pl.String, "event": pl.String, "ts": pl.String, "revenue": pl.Float64}
    events = pl.DataFrame(rows, schema=schema, orient="row")
    events = events.with_columns(pl.col("ts").str.to_datetime(time_zone="UTC"))
    cutoff, end = scenario.cutoff, scenario.cutoff + timedelta(days=scenario.label_window_days)
    order = pl.col("event") == "Order Completed"
    age = (pl.lit(cutoff) - pl.col("ts")).dt.total_seconds() / 86400
    features = (
        events.filter(pl.col("ts") < cutoff)
        .group_by("user")
        .agg(
            order.sum().alias("orders"),
            pl.col("revenue").sum().alias("revenue"),
            age.min().alias("recency_days"),
            (age < 30).sum().alias("events_30d"),
        )
    )
    buyers = events.filter(order & (pl.col("ts") >= cutoff) & (pl.col("ts") < end))["user"]
    frame = features.with_columns(pl.col("user").is_in(buyers.implode()).alias("label")).sort(
        "user"
    )
    x = frame.select("orders", "revenue", "recency_days", "events_30d").to_numpy().astype(float)
    y = frame["label"].to_numpy()
    assert 0.05 < y.mean() < 0.4
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, stratify=y, random_state=0
    )
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(max_iter=1000).fit(scaler.transform(x_train), y_train)
    auc = roc_auc_score(y_test, model.predict_proba(scaler.transform(x_test))[:, 1])
    assert 0.65 < auc < 0.95, auc


def test_rejects_naive_now(tmp_path):
    with pytest.raises(ValueError, match="timezone"):
        generate_scenario(tmp_path, customers=10, now=DEFAULT_NOW.replace(tzinfo=None))
