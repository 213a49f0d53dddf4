"""A synthetic CDP scenario for the demo: one retailer, three regional data centres.

Writes one Segment-spec JSONL log per region (``<region>/events.jsonl``) plus ``manifest.json``.
About 10% of the people shop in two regions; each regional system gave them its own ``userId``
and stored their email/phone in its own format, so only normalised identifiers link them.

Every person has latent traits (visit rate, conversion, basket size, churn); both the pre-cutoff
behaviour and the label (an order in ``[cutoff, cutoff + label_window_days)``) derive from them
with noise (a change of pace after the cutoff, win-backs, Poisson sessions), so RFM features
predict the label well but not perfectly. Events span ``[cutoff - history_days, now)``. The
output depends only on the arguments: all randomness comes from ``np.random.default_rng(seed)``.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .consent.tcf_encode import encode_tc_string

__all__ = ["Scenario", "generate_scenario", "DEFAULT_NOW", "REGIONS"]

DEFAULT_NOW = datetime(2026, 10, 1, tzinfo=UTC)
DAY_MS = 86_400_000
SHARED_FRACTION = 0.10
OVERSIZED_BYTES = 33_500  # over Segment's (and the host's default) 32 KB limit
CONSENT_EVENT = "Segment Consent Preference Updated"
ONETRUST = {"Analytics": "C0002", "Functional": "C0003", "Advertising": "C0004"}
# The retailer's IAB vendor id in its own CMP (policies/internal-regions.yaml names the same id).
RETAILER_TCF_VENDOR = 1234
# TCF v2.2 purposes per consent category: measurement, audiences and product development for
# analytics; ad selection and ad profiles for advertising; content personalisation for functional.
_TCF_PURPOSES = {"Analytics": (1, 7, 8, 9, 10), "Advertising": (2, 3, 4), "Functional": (5, 6, 11)}
Rand = Callable[[], float]


@dataclass(frozen=True)
class Region:
    name: str
    weight: float  # share of the people who live there
    currency: str
    fx: float  # multiplier on the EUR list price
    vat: float
    utc_offset: int  # hours; shapes the time of day of sessions
    grant: float  # share granting analytics; 0 = opt-out regime without a consent banner
    places: tuple[tuple[str, ...], ...]  # (country, region, city, locale)


def _table(text: str) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(row.split(",")) for row in text.split(";"))


_EU = _table(
    "DE,BE,Berlin,de-DE;DE,BY,Munich,de-DE;DE,HH,Hamburg,de-DE;FR,IDF,Paris,fr-FR;FR,ARA,Lyon,fr-FR;"
    "NL,NH,Amsterdam,nl-NL;NL,ZH,Rotterdam,nl-NL;ES,MD,Madrid,es-ES;ES,CT,Barcelona,es-ES;"
    "IT,MI,Milan,it-IT;IT,RM,Rome,it-IT;IE,D,Dublin,en-IE"
)
_US = _table(
    "US,NY,New York,en-US;US,NJ,Newark,en-US;US,MA,Boston,en-US;US,CA,Los Angeles,en-US;"
    "US,VA,Arlington,en-US;US,FL,Miami,en-US;US,TX,Austin,en-US"
)
_UK = _table(
    "GB,ENG,London,en-GB;GB,ENG,Manchester,en-GB;GB,SCT,Edinburgh,en-GB;GB,WLS,Cardiff,en-GB"
)
REGIONS = (
    Region("eu-west", 0.45, "EUR", 1.0, 0.19, 1, 0.70, _EU),
    Region("us-east", 0.35, "USD", 1.08, 0.07, -5, 0.0, _US),
    Region("uk", 0.20, "GBP", 0.86, 0.20, 0, 0.75, _UK),
)
# Phones: calling code, trunk prefix, national patterns (x = a random digit; UK/US: drama ranges).
_PHONES = {
    "GB": ("44", "0", ("20 7946 0xxx", "7700 900xxx", "113 496 0xxx", "161 496 0xxx")),
    "US": ("1", "", ("212 555 xxxx", "718 555 xxxx", "617 555 xxxx", "415 555 xxxx")),
    "DE": ("49", "0", ("30 xxxx xxxx", "89 xxxx xxxx")),
    "FR": ("33", "0", ("1 xx xx xx xx", "6 xx xx xx xx")),
    "NL": ("31", "0", ("20 xxx xxxx", "10 xxx xxxx")),
    "ES": ("34", "", ("91x xxx xxx", "93x xxx xxx")),
    "IT": ("39", "", ("02 xxxx xxxx", "06 xxxx xxxx")),
    "IE": ("353", "0", ("1 xxx xxxx",)),
}
_FIRST = (
    "Jane,John,Anna,Lukas,Marie,Pierre,Sofia,Luca,Emma,Noah,Olivia,Liam,Mia,Ben,Chloé,Hugo,Lena,"
    "Mateo,Isla,Jack,Aoife,Seán,Giulia,Pablo,Fleur,Daan,Ava,Ethan,Grace,Omar"
).split(",")
_LAST = (
    "Doe,Smith,Müller,Martin,Rossi,García,Jansen,Murphy,Johnson,Brown,Schmidt,Dubois,Bianchi,"
    "López,de Vries,Kelly,Williams,Taylor,Fischer,Bernard,Romano,Fernández,Bakker,Byrne,Weber"
).split(",")
_DOMAINS = ("gmail.com",) * 3 + ("example.com", "example.net", "example.org", "mail.example")
_CATEGORIES = _table(
    "Shoes,Runner,Loafer,Chelsea Boot,Sneaker;Outerwear,Parka,Rain Jacket,Gilet;"
    "Tops,Linen Shirt,Merino Jumper,Tee;Trousers,Chino,Jeans,Cargo Trouser;"
    "Accessories,Tote Bag,Scarf,Belt,Beanie;Home,Throw,Mug Set,Candle;"
    "Beauty,Face Cream,Hand Balm,Serum;Sport,Yoga Mat,Water Bottle,Track Top"
)
_ADJ = ("Classic", "Organic", "Everyday", "Coastal", "Alpine", "Studio", "Urban", "Heritage")
_CATALOGUE = [
    {"product_id": f"p_{i:05d}", "sku": f"{cat[:3].upper()}-{1000 + i}", "category": cat,
     "name": f"{adj} {noun}", "price": 12 + (i * 53) % 140}
    for i, (cat, noun, adj) in enumerate(
        (row[0], noun, adj) for row in _CATEGORIES for noun in row[1:] for adj in _ADJ
    )
]  # fmt: skip
_PAGES = _table(
    "Home,/;Category,/c/{c};Product,/p/{p};Search Results,/search;Cart,/cart;Account,/account;"
    "Stores,/stores;Sale,/sale"
)
_REFERRERS = ("", "", "https://www.google.com/", "https://www.bing.com/",
              "https://www.instagram.com/", "https://newsletter.example/")  # fmt: skip
_QUERIES = ("rain jacket", "linen", "gift", "running shoes", "sale", "candle", "merino", "tote")
_INDUSTRIES = ("Hospitality", "Retail", "Software", "Architecture", "Healthcare", "Education")
_WEB_LIB = {"name": "analytics.js", "version": "next-1.72.0"}
_APP_LIB = {"name": "com.rudderstack.android.sdk.core", "version": "1.22.0"}
_AGENTS = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/128.0 Safari/537.36",
           "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
           "Mozilla/5.0 (X11; Linux x86_64; rv:130.0) Gecko/20100101 Firefox/130.0")  # fmt: skip
_APP_AGENT = "Dalvik/2.1.0 (Linux; U; Android 14; Pixel 8 Build/AP2A)"
_HOURS = np.array([10, 6, 4, 3, 3, 4, 8, 15, 20, 23, 25, 26, 28, 26, 25, 25, 27, 30, 34, 38, 40,
                   36, 28, 18])  # fmt: skip
_BAD_KINDS = ("malformed_json", "missing_message_id", "missing_identity", "non_iso_timestamp",
              "unknown_type", "track_without_event", "oversized")  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    out_dir: Path
    cutoff: datetime  # tz-aware UTC; features as of cutoff, label window [cutoff, cutoff + window)
    label_window_days: int
    region_files: dict[str, Path]  # region -> events.jsonl
    customers_per_region: dict[str, int]  # regional profiles (a shared person counts in both)
    shared_customers: int  # people with a profile in two regions
    events_per_region: dict[str, int]  # valid, distinct events
    invalid_events_per_region: dict[str, int]  # deliberately bad lines injected
    duplicate_events_per_region: dict[str, int]  # exact re-sends of a valid line (same messageId)


@dataclass
class _Profile:
    user_id: str
    sessions: list[int]  # session start times (ms), sorted
    conv: float  # P(order | session)
    spend: float  # basket size multiplier
    existing: bool  # an account from before the log starts (no anonymous sign-up)
    traits: dict[str, Any]
    fav: int  # favourite category index


def _stream(draw: Callable[[], list[Any]]) -> Callable[[], Any]:
    """One value at a time from numpy draws made in blocks (per-call numpy overhead is ~1 µs)."""
    return (x for _ in iter(int, 1) for x in draw()).__next__


def _uuid(h: str) -> str:  # uuid4 layout from 128 random bits
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _pick(u: Rand, seq: Any) -> Any:
    return seq[int(u() * len(seq))]


def _email(u: Rand, first: str, last: str, taken: set[str]) -> list[str]:
    """Spellings of one address that normalise to the same, person-unique value."""
    ascii_ = unicodedata.normalize("NFKD", f"{first}.{last}").encode("ascii", "ignore").decode()
    base, domain, n = ascii_.replace(" ", "").lower(), _pick(u, _DOMAINS), 10 + int(u() * 90)
    gmail = domain == "gmail.com"
    while (key := f"{base.replace('.', '') if gmail else base}{n}@{domain}") in taken:
        n += 1 + int(u() * 50)
    taken.add(key)
    local = f"{base}{n}"
    title = ".".join(part.capitalize() for part in local.split("."))
    out = [f"{local}@{domain}", f"{title}@{domain.capitalize()}", f" {local}@{domain.upper()} "]
    if gmail:  # Gmail ignores dots and +suffixes, so people use them freely
        out += [f"{local.replace('.', '')}@gmail.com", f"{local}+shop@gmail.com"]
        out += [f"{title}+news@Gmail.com "]
    return out


def _phone(u: Rand, country: str, taken: set[str]) -> list[str] | None:
    """Spellings of one number (international, national, E.164, ...); None when none is free."""
    cc, trunk, patterns = _PHONES[country]
    for _ in range(20):  # drama ranges are small: give up and leave the person without a phone
        number = "".join(str(int(u() * 10)) if c == "x" else c for c in _pick(u, patterns))
        if (key := cc + number.replace(" ", "")) not in taken:
            taken.add(key)
            g, nsn = number.split(), number.replace(" ", "")
            if cc == "1":
                return [f"({g[0]}) {g[1]}-{g[2]}", f"+1 {'-'.join(g)}", ".".join(g), f"+1{nsn}"]
            return [f"+{cc} {number}", f"{trunk}{number}", f"+{cc}{nsn}", f"00{cc} {number}"]
    return None


def _prefs(u: Rand, grant: float) -> dict[str, bool]:
    analytics = u() < grant
    ads = u() < (0.6 if analytics else 0.15)
    functional = u() < 0.85
    return {"Analytics": analytics, "Advertising": ads, "Functional": functional,
            "DataSharing": ads and u() < 0.4}  # fmt: skip


def _tc_string(prefs: dict[str, bool], at_ms: int, country: str) -> str:
    """What an IAB TCF v2.2 CMP stores for ``prefs`` (times rounded to the day, as CMPs do)."""
    day = datetime.fromtimestamp(at_ms // 86_400_000 * 86_400, UTC)
    purposes = {n for cat, ns in _TCF_PURPOSES.items() if prefs[cat] for n in ns}
    return encode_tc_string(
        created=day,
        cmp_id=31,
        vendor_list_version=120,
        purposes_consent=purposes,
        publisher_cc=country,
        vendor_consents={RETAILER_TCF_VENDOR} if prefs["Analytics"] else set(),
    )


def _consent(
    fmt: str, prefs: dict[str, bool], at_ms: int = 0, country: str = "DE"
) -> dict[str, Any]:
    """The context fields carrying ``prefs`` in one of the four consent formats."""
    if fmt == "tcf":
        return {"consent": {"tcfString": _tc_string(prefs, at_ms, country)}}
    if fmt == "segment":
        return {"consent": {"categoryPreferences": dict(prefs)}}
    if fmt == "consent_mode":  # Google Consent Mode v2
        ads = "granted" if prefs["Advertising"] else "denied"
        mode = {"ad_storage": ads, "analytics_storage": "granted" if prefs["Analytics"] else "denied",
                "ad_user_data": ads, "ad_personalization": ads}  # fmt: skip
        return {"consent": {"googleConsentMode": mode}}
    allowed = ["C0001"] + [cid for cat, cid in ONETRUST.items() if prefs[cat]]
    denied = [cid for cat, cid in ONETRUST.items() if not prefs[cat]]
    return {"consentManagement": {"provider": "oneTrust", "allowedConsentIds": allowed,
                                  "deniedConsentIds": denied, "resolutionStrategy": "and"}}  # fmt: skip


class _Writer:
    """Turns one regional profile's sessions into Segment events: (time in ms, event dict)."""

    def __init__(self, r: Region, u: Rand, hexid: Callable[[], str], now_ms: int, n: int) -> None:
        self.r, self.u, self.hexid, self.now_ms = r, u, hexid, now_ms
        price = lambda p: round(math.ceil(p["price"] * r.fx) - 0.01, 2)  # noqa: E731
        self.products = [p | {"price": price(p), "currency": r.currency} for p in _CATALOGUE]
        self.by_cat = [[p for p in self.products if p["category"] == c[0]] for c in _CATEGORIES]
        kinds = ("Studio", "Partners", "Labs", "Trading", "Hotels")
        self.companies = [
            ("g_" + hexid()[:10], {"name": f"{_pick(u, _ADJ)} {_pick(u, kinds)}",
                                   "industry": _pick(u, _INDUSTRIES), "employees": 5 + int(u() * 500)})
            for _ in range(max(2, n // 60))
        ]  # fmt: skip

    def product(self, fav: int) -> dict[str, Any]:
        return _pick(self.u, self.by_cat[fav] if self.u() < 0.6 else self.products)

    def events(self, p: _Profile) -> list[tuple[int, dict[str, Any]]]:
        u, hexid, r, out = self.u, self.hexid, self.r, []
        app = r.name == "us-east" and u() < 0.3  # the US app's SDK sends OneTrust via RudderStack
        fmt = "rudderstack" if app else None
        if r.grant and u() < 0.95:  # opt-in regions show a banner; a few never answer it
            v = u()
            fmt = "segment" if v < 0.45 else "consent_mode" if v < 0.8 else "tcf"
        prefs = _prefs(u, 0.9 if app else r.grant)
        first, last = p.sessions[0], p.sessions[-1]
        change = int(first + u() * (last - first)) if fmt and u() < 0.12 else None
        country, region, city, locale = _pick(u, r.places)
        base: dict[str, Any] = {
            "library": _APP_LIB if app else _WEB_LIB,
            "ip": f"{_pick(u, ('192.0.2', '198.51.100', '203.0.113'))}.{1 + int(u() * 254)}",
            "userAgent": _APP_AGENT if app else _pick(u, _AGENTS),
            "locale": locale,
            "location": {"country": country, "region": region, "city": city},
        }
        if fmt is None and r.name == "us-east" and u() < 0.11:
            base["gpc"] = True  # a Sec-GPC browser: the signal rides on every request
        ctx = base | _consent(fmt, prefs, first, country) if fmt else base
        created = first - (int((30 + u() * 900) * DAY_MS) if p.existing else 0)
        address = {"country": country, "state": region, "city": city}
        traits = p.traits | {"address": address, "created_at": _iso(created)}
        company = _pick(u, self.companies) if u() < 0.06 else None  # B2B buyers
        anon, uid = _uuid(hexid()), p.user_id
        switch = 1 + int(u() * (len(p.sessions) - 1)) if len(p.sessions) > 3 and u() < 0.25 else -1

        def emit(t: int, kind: str, known: bool = True, c: dict | None = None, **f: Any) -> int:
            ev = {"type": kind, **f} | ({"userId": uid} if known else {})
            ev |= {"anonymousId": anon, "context": c or base, "messageId": _uuid(hexid())}
            out.append((t, ev))
            return t + 2000 + int(-math.log(1.0 - u()) * 40_000)

        def track(t: int, name: str, props: dict[str, Any], c: dict | None = None) -> int:
            return emit(t, "track", c=c, event=name, properties=props)

        def page(t: int, known: bool, ref: str) -> int:
            name, path = _pick(u, _PAGES)
            path = path.format(c=_CATEGORIES[p.fav][0].lower(), p=self.product(p.fav)["product_id"])
            if app:
                return emit(t, "screen", known, name=name, properties={"path": path})
            url, title = f"https://shop.example.com/{r.name}{path}", f"{name} | Example Shop"
            props = {"path": path, "url": url, "referrer": ref, "title": title}
            return emit(t, "page", known, name=name, properties=props)

        for i, t in enumerate(p.sessions):
            ref = _pick(u, _REFERRERS)
            if i == switch:  # a second device: anonymous at first, then linked by an alias
                anon = _uuid(hexid())
                t = emit(page(t, False, ref), "alias", previousId=anon)
            if change is not None and i and t >= change:
                prefs["Analytics"] = not prefs["Analytics"]
                prefs["Advertising"] &= prefs["Analytics"]
                ctx, change = base | _consent(fmt or "", prefs, t, country), None
                t = track(t, CONSENT_EVENT, {}, ctx)
            if i == 0 and not p.existing:  # a new customer browses anonymously, then signs up
                for _ in range(1 + int(u() * 2)):
                    t = page(t, False, ref)
            if i == 0 or u() < 0.04:
                t = emit(t, "identify", c=ctx, traits=traits)
                if i == 0 and not p.existing and u() < 0.35:
                    t = emit(t, "alias", previousId=anon)
            if company and (i == 0 or u() < 0.03):
                t = emit(t, "group", groupId=company[0], traits=company[1])
            for _ in range(1 + int(-math.log(1.0 - u()) * 1.3)):
                t, ref = page(t, True, ref), ""
            if u() < 0.3:
                t = track(t, "Products Searched", {"query": _pick(u, _QUERIES)})
            views = int(-math.log(1.0 - u()) * (0.6 + 6 * p.conv))
            viewed = [self.product(p.fav) for _ in range(views)]
            buy = u() < p.conv
            if buy and not viewed:
                viewed.append(self.product(p.fav))
            for item in viewed:
                t = track(t, "Product Viewed", item)
            if buy:
                cart = viewed[: 1 + int(u() * min(3, len(viewed)))]
            else:  # abandoned carts: more likely from people who often buy
                cart = viewed[:1] if viewed and u() < 0.1 + 1.5 * p.conv else []
            items = [x | {"quantity": 1 + int(-math.log(1.0 - u()) * 0.4 * p.spend)} for x in cart]
            for item in items:
                t = track(t, "Product Added", item)
            if not items or not (buy or u() < 0.3):
                continue
            revenue = round(sum(x["price"] * x["quantity"] for x in items), 2)
            cur = r.currency
            t = track(t, "Checkout Started", {"value": revenue, "currency": cur, "products": items})
            if not buy:
                continue
            shipping = 0.0 if revenue >= 50 * r.fx else round(4.95 * r.fx, 2)
            tax, order_id = round(revenue * r.vat, 2), "o_" + hexid()[:14]
            total = round(revenue + shipping + tax, 2)
            order = {"order_id": order_id, "revenue": revenue, "shipping": shipping, "tax": tax,
                     "total": total, "currency": cur, "products": items}  # fmt: skip
            t = track(t, "Order Completed", order)
            refund_at = t + int((1 + u() * 20) * DAY_MS)
            if u() < 0.03 and refund_at < self.now_ms:
                track(
                    refund_at,
                    "Order Refunded",
                    {"order_id": order_id, "total": total, "currency": cur},
                )
        return out


def _corrupt(kind: str, line: bytes, ts: int, new_id: str) -> bytes:
    """One deliberately bad line made from a valid one; ingest dead-letters every kind."""
    if kind == "malformed_json":
        return line[: len(line) // 2] + b"\n" if len(line) % 2 else line.replace(b'"', b"'", 4)
    ev = orjson.loads(line) | {"messageId": new_id}
    if kind == "missing_message_id":
        del ev["messageId"]
    elif kind == "missing_identity":
        ev = {k: v for k, v in ev.items() if k not in ("userId", "anonymousId")}
    elif kind == "non_iso_timestamp":
        ev["timestamp"] = datetime.fromtimestamp(ts / 1000, UTC).strftime("%d/%m/%Y %H:%M")
    elif kind == "unknown_type":
        ev["type"] = "purchase"
    elif kind == "track_without_event":
        ev = {k: v for k, v in ev.items() if k not in ("event", "name")} | {"type": "track"}
    else:  # oversized: a client that dumped a whole DOM snapshot into properties
        ev["properties"] = ev.get("properties", {}) | {"dom": "<div>" * (OVERSIZED_BYTES // 5)}
    return orjson.dumps(ev, option=orjson.OPT_APPEND_NEWLINE)


def _simulate(
    rng: np.random.Generator, n: int, history_days: int, span: int, start_ms: int, now_ms: int
) -> dict[str, Any]:
    """Latent traits per person and the session start times of every regional profile."""
    home = rng.choice(len(REGIONS), size=n, p=[r.weight for r in REGIONS])
    rate = rng.lognormal(math.log(0.075), 0.8, n)  # sessions per day
    conv = rng.beta(1.5, 7.0, n)
    spend = rng.lognormal(0.0, 0.4, n)
    churn = rng.exponential(1.0 / rng.lognormal(math.log(1 / 150), 0.9, n))  # days until lapsing
    drift = rng.lognormal(-0.2, 0.8, n)  # change of pace after the cutoff, invisible before it
    winback = rng.random(n) < 0.10  # lapsed people a campaign brings back after the cutoff
    existing = rng.random(n) < 0.55
    first = np.minimum(np.where(existing, rng.exponential(7.0, n), rng.random(n) * span), span - 3)
    end = np.minimum(first + churn, span)
    # Shared people get a second profile in another region, with part of their activity there.
    shared = np.sort(rng.choice(n, size=round(SHARED_FRACTION * n), replace=False))
    w = np.tile([r.weight for r in REGIONS], (len(shared), 1))
    w[np.arange(len(shared)), home[shared]] = 0
    cdf = np.cumsum(w / w.sum(1, keepdims=True), 1)
    second = (rng.random(len(shared))[:, None] > cdf).sum(1)
    part = rng.uniform(0.2, 0.5, len(shared))
    share = np.ones(n)
    share[shared] -= part
    person = np.concatenate([np.arange(n), shared])
    share = np.concatenate([share, part])
    gap = rng.random(len(shared)) * 0.8 * np.maximum(end[shared] - first[shared], 1)
    begin = np.concatenate([first, first[shared] + gap])
    stop = np.maximum(end[person], begin)
    # Sessions are Poisson before and after the cutoff; the first one is always at `begin`.
    cut = float(history_days)
    pre = np.clip(np.minimum(stop, cut) - begin, 0, None)
    post = np.clip(np.where(winback[person], span, stop) - np.maximum(begin, cut), 0, None)
    n_pre = rng.poisson(rate[person] * share * pre)
    n_post = rng.poisson(rate[person] * share * drift[person] * post)
    counts = 1 + n_pre + n_post
    owner = np.repeat(np.arange(len(person)), counts)
    k = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)  # index in profile
    is_post = k > n_pre[owner]
    lo = np.where(is_post, np.maximum(begin, cut)[owner], begin[owner])
    width = np.where(k == 0, 0.0, np.where(is_post, post[owner], pre[owner]))
    day = np.floor(lo + rng.random(len(owner)) * width)
    region = np.concatenate([home, second])
    hour = rng.choice(24, size=len(owner), p=_HOURS / _HOURS.sum())
    hour = hour - np.array([r.utc_offset for r in REGIONS])[region[owner]]
    ms = start_ms + ((day * 24 + hour + rng.random(len(owner))) * 3_600_000).astype(np.int64)
    ms = np.where(ms < start_ms, ms + DAY_MS, ms)  # the time of day must not leave the span
    ms = np.clip(np.where(ms > now_ms - 7_200_000, ms - DAY_MS, ms), start_ms, now_ms - 7_200_000)
    ms = ms[np.lexsort((ms, owner))]
    bounds = np.concatenate([[0], np.cumsum(counts)]).tolist()
    sessions = [ms[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return {"person": person.tolist(), "region": region.tolist(), "home": home.tolist(),
            "sessions": sessions, "conv": conv.tolist(), "spend": spend.tolist(),
            "existing": existing.tolist(), "shared": len(shared)}  # fmt: skip


def _profiles(
    u: Rand, hexid: Callable[[], str], sim: dict[str, Any], n: int
) -> list[list[_Profile]]:
    """Regional profiles; a shared person's second profile spells email and phone differently."""
    emails, phones, ids, people = set[str](), set[str](), set[str](), []
    for i in range(n):
        first, last = _pick(u, _FIRST), _pick(u, _LAST)
        email = _email(u, first, last, emails)
        phone = (
            _phone(u, _pick(u, REGIONS[sim["home"][i]].places)[0], phones) if u() < 0.85 else None
        )
        e = 0 if u() < 0.6 else int(u() * len(email))
        e2, f = (e + 1 + int(u() * (len(email) - 1))) % len(email), int(u() * 2)
        people.append((first, last, email, phone, (e, e2), (f, f + 2)))
    out: list[list[_Profile]] = [[] for _ in REGIONS]
    for k, (i, reg) in enumerate(zip(sim["person"], sim["region"], strict=True)):
        first, last, email, phone, es, fs = people[i]
        again = int(k >= n)
        traits = {"email": email[es[again]], "first_name": first, "last_name": last}
        if phone and (not again or u() < 0.7):
            traits["phone"] = phone[fs[again]]
        while (uid := "u_" + hexid()[:10]) in ids:
            pass
        ids.add(uid)
        existing = sim["existing"][i] and not again
        fav = int(u() * len(_CATEGORIES))
        out[reg].append(
            _Profile(
                uid, sim["sessions"][k], sim["conv"][i], sim["spend"][i], existing, traits, fav
            )
        )
    return out


def _write_region(path: Path, writer: _Writer, profiles: list[_Profile], rng: np.random.Generator,
                  invalid_fraction: float) -> tuple[int, int, int]:  # fmt: skip
    """Events sorted by time, bad lines and re-sends included; returns (valid, invalid, duplicates)."""
    stamps: list[int] = []
    lines: list[bytes] = []
    for prof in profiles:
        evs = writer.events(prof)
        when = [t for t, _ in evs]
        iso = np.datetime_as_string(np.array(when, dtype="datetime64[ms]"), unit="ms").tolist()
        for (_, ev), text in zip(evs, iso, strict=True):
            ev["timestamp"] = text + "Z"
            lines.append(orjson.dumps(ev, option=orjson.OPT_APPEND_NEWLINE))
        stamps += when
    valid = len(lines)
    n_bad = max(len(_BAD_KINDS), round(invalid_fraction * valid)) if invalid_fraction else 0
    n_dup = max(1, round(invalid_fraction * valid)) if invalid_fraction else 0
    chosen = rng.choice(valid, size=min(valid, n_bad + n_dup), replace=False).tolist()
    seq = list(range(valid))
    for j, idx in enumerate(chosen):
        bad = j < n_bad
        kind = _BAD_KINDS[j % len(_BAD_KINDS)]
        lines.append(
            _corrupt(kind, lines[idx], stamps[idx], _uuid(writer.hexid())) if bad else lines[idx]
        )
        stamps.append(stamps[idx])
        seq.append(idx)  # sorts right after its original, so the file stays in time order
    path.parent.mkdir(parents=True, exist_ok=True)
    order = np.lexsort((np.array(seq), np.array(stamps, dtype=np.int64))).tolist()
    with path.open("wb") as fh:
        fh.writelines(lines[i] for i in order)
    return valid, min(n_bad, len(chosen)), max(0, len(chosen) - n_bad)


def generate_scenario(
    out_dir: Path,
    *,
    seed: int = 7,
    customers: int = 6000,
    history_days: int = 180,
    label_window_days: int = 30,
    now: datetime | None = None,
    invalid_fraction: float = 0.002,
) -> Scenario:
    """Write the three regional event logs and ``manifest.json`` under ``out_dir``."""
    if customers < 1 or history_days < 1 or label_window_days < 1:
        raise ValueError("customers, history_days and label_window_days must be positive")
    if not 0.0 <= invalid_fraction < 0.5:
        raise ValueError("invalid_fraction must be in [0, 0.5)")
    now = DEFAULT_NOW if now is None else now
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now, out_dir = now.astimezone(UTC), Path(out_dir)
    cutoff = now - timedelta(days=label_window_days)
    start_ms = int((cutoff - timedelta(days=history_days)).timestamp() * 1000)
    now_ms, span = int(now.timestamp() * 1000), history_days + label_window_days
    rng = np.random.default_rng(seed)
    rng_u, rng_h, rng_bad = rng.spawn(3)
    u = _stream(lambda: rng_u.random(1 << 16).tolist())
    hexid = _stream(
        lambda: [h[i : i + 32] for h in [rng_h.bytes(1 << 16).hex()] for i in range(0, len(h), 32)]
    )
    sim = _simulate(rng, customers, history_days, span, start_ms, now_ms)
    profiles = _profiles(u, hexid, sim, customers)
    files = {r.name: out_dir / r.name / "events.jsonl" for r in REGIONS}
    stats = [
        _write_region(
            files[r.name], _Writer(r, u, hexid, now_ms, len(p)), p, rng_bad, invalid_fraction
        )
        for r, p in zip(REGIONS, profiles, strict=True)
    ]
    per_region = {r.name: len(p) for r, p in zip(REGIONS, profiles, strict=True)}
    valid, bad, dups = (
        {r.name: s[j] for r, s in zip(REGIONS, stats, strict=True)} for j in range(3)
    )
    scenario = Scenario(
        out_dir, cutoff, label_window_days, files, per_region, sim["shared"], valid, bad, dups
    )
    manifest = {k: v for k, v in asdict(scenario).items() if k not in ("out_dir", "cutoff")}
    manifest |= {"region_files": {k: f"{k}/events.jsonl" for k in files}, "seed": seed,
                 "customers": customers, "history_days": history_days, "now": _iso(now_ms),
                 "cutoff": _iso(int(cutoff.timestamp() * 1000)), "invalid_fraction": invalid_fraction,
                 "label": f"Order Completed in [cutoff, cutoff + {label_window_days} days)",
                 "bytes_per_region": {k: p.stat().st_size for k, p in files.items()}}  # fmt: skip
    (out_dir / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return scenario
