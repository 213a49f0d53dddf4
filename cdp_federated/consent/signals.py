"""Consent signals carried by Segment-spec events, turned into ledger records.

Each record's ``purpose`` is namespaced by its source, exactly as the signal named it
(``segment:Analytics``, ``rudderstack:C0002``, ``consent_mode:analytics_storage``, ``gpc:sale_sharing``);
purposes.py maps a job's purpose onto these. Where signals live in an event:

* Segment: ``context.consent.categoryPreferences`` ``{category: bool}`` (also on the
  ``Segment Consent Preference Updated`` track event);
* RudderStack: ``context.consentManagement`` ``{allowedConsentIds, deniedConsentIds, provider, ...}``;
* Google Consent Mode v2: ``context.consent.googleConsentMode`` ``{ad_storage: granted|denied, ...}``;
* Global Privacy Control: ``context.gpc`` true, or header ``context.headers["Sec-GPC"] == "1"``;
* IAB TCF v2.2: ``context.consent.tcfString`` is decoded into ``tcf:purpose:N``, ``tcf:li:N`` and,
  for the vendor ids in the ``tcf_vendor_ids`` setting, ``tcf:vendor:V...`` records (see
  consent/tcf.py), each keeping the string as evidence. A string that does not decode grants
  nothing: it is kept as a ``tcf:invalid`` record and the event itself is still applied (its
  behavioural data is valid; only its consent evidence is not).
"""

from __future__ import annotations

import functools
from typing import Any

import orjson

from ..errors import TCFError
from ..events import Event
from ..settings import get_setting, parse_int_list
from .tcf import decode_tc_string, ledger_signals

__all__ = ["consent_records", "jurisdiction_of", "EU_EEA"]

EU_EEA = frozenset(
    "AT BE BG HR CY CZ DK EE FI FR DE GR HU IE IT LV LT LU MT NL PL PT RO SK SI ES SE IS LI NO".split()
)
CONSENT_MODE_KEYS = ("ad_storage", "analytics_storage", "ad_user_data", "ad_personalization")


_BY_COUNTRY: dict[str, str] = {}  # country code as sent -> jurisdiction, for codes without regions


def jurisdiction_of(context: dict[str, Any]) -> str | None:
    """``EU``, ``UK``, ``US-<state>`` (or ``US``), or the ISO country code; None when unknown."""
    location = context.get("location")
    if not isinstance(location, dict):
        return None
    country = location.get("country")
    if not isinstance(country, str) or len(country) != 2:
        return None
    known = _BY_COUNTRY.get(country)  # per-event hot path: most events come from a few countries
    if known is not None:
        return known
    code = country.upper()
    if code == "US":
        region = location.get("region")
        if isinstance(region, str) and 2 <= len(region) <= 3:
            return f"US-{region.upper()}"
        return "US"
    place = "EU" if code in EU_EEA else "UK" if code in ("GB", "UK") else code
    if len(_BY_COUNTRY) < 4096 and type(country) is str:
        _BY_COUNTRY[country] = place
    return place


@functools.lru_cache(maxsize=8)
def _setting_vendor_ids(text: str) -> tuple[int, ...]:
    return parse_int_list(text, field="CDP_FL_TCF_VENDOR_IDS")


@functools.lru_cache(maxsize=4096)
def _tcf_signals(text: str, vendor_ids: tuple[int, ...]) -> tuple[tuple[str, bool], ...]:
    """Ledger signals (without the ``tcf:`` prefix) of a TC string; ``invalid`` when it does not
    decode. Cached per string: CMPs resend the same string with every event."""
    try:
        decoded = decode_tc_string(text)
    except TCFError:
        return (("invalid", False),)
    return tuple((n.removeprefix("tcf:"), g) for n, g in ledger_signals(decoded, vendor_ids))


def _raw(value: Any) -> str:
    return orjson.dumps(value).decode()


def consent_records(
    event: Event, jurisdiction: str | None, vendor_ids: tuple[int, ...] | None = None
) -> list[dict[str, Any]]:
    """Ledger rows for every consent signal the event carries (empty list when none).
    ``vendor_ids``: whose TCF consent to record (default: the ``tcf_vendor_ids`` setting; ingest
    passes the store's :attr:`~cdp_federated.store.Store.tcf_vendor_ids`)."""
    if vendor_ids is None:
        vendor_ids = _setting_vendor_ids(str(get_setting("tcf_vendor_ids") or ""))
    ctx = event.context
    out: list[dict[str, Any]] = []

    def add(source: str, purpose: str, granted: bool, raw: Any) -> None:
        out.append(
            {
                "profile_id": event.profile_id,
                "source": source,
                "purpose": f"{source}:{purpose}",
                "granted": granted,
                "timestamp": event.timestamp,
                "jurisdiction": jurisdiction,
                "message_id": event.message_id,
                "raw": raw,
            }
        )

    consent = ctx.get("consent")
    if isinstance(consent, dict):
        prefs = consent.get("categoryPreferences")
        if isinstance(prefs, dict):
            raw = _raw(prefs)
            for category, value in prefs.items():
                if isinstance(value, bool):
                    add("segment", str(category), value, raw)
        mode = consent.get("googleConsentMode")
        if isinstance(mode, dict):
            raw = _raw(mode)
            for key in CONSENT_MODE_KEYS:
                value = mode.get(key)
                if value in ("granted", "denied"):
                    add("consent_mode", key, value == "granted", raw)
        tcf = consent.get("tcfString")
        if isinstance(tcf, str) and tcf:
            for name, granted in _tcf_signals(tcf, vendor_ids):
                add("tcf", name, granted, tcf if name != "invalid" else tcf[:2048])
    managed = ctx.get("consentManagement")
    if isinstance(managed, dict):
        raw = _raw(managed)
        for key, granted in (("allowedConsentIds", True), ("deniedConsentIds", False)):
            ids = managed.get(key)
            if isinstance(ids, list):
                for cid in ids:
                    if isinstance(cid, str | int):
                        add("rudderstack", str(cid), granted, raw)
    headers = ctx.get("headers")
    gpc = ctx.get("gpc") is True or (
        isinstance(headers, dict) and str(headers.get("Sec-GPC")) == "1"
    )
    if gpc:
        # GPC is an opt-out of sale/sharing (CCPA/CPRA); it never grants anything.
        add("gpc", "sale_sharing", False, "Sec-GPC: 1")
    return out
