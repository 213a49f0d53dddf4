"""IAB TCF v2 (v2.2) TC-string decoder, written from the IAB Tech Lab specification.

Spec: "Transparency and Consent String with Global Vendor & CMP List Formats", IAB Tech Lab,
https://github.com/InteractiveAdvertisingBureau/GDPR-Transparency-and-Consent-Framework (TCFv2).

A TC string is dot-separated base64url segments: the core segment (mandatory, first), then
optional segments in any order, each starting with a 3-bit SegmentType: 1 disclosed vendors,
2 allowed vendors (dropped by TCF 2.2, still decoded), 3 publisher TC. :func:`decode_tc_string`
validates at the boundary and raises :class:`~cdp_federated.errors.TCFError` (``field``, ``value``,
``fix``, one-line message) for anything malformed, including strings longer than
``MAX_TC_STRING_CHARS`` (64 KiB; real strings are a few hundred characters to a few KiB). Results
are cached (LRU, 4096 strings) because CMPs resend the same string with every event. Timestamps
are UTC ``datetime`` values with the spec's decisecond resolution; publisher-restriction entries
with the same purpose and type are merged into one.

Consent-ledger signals (:func:`ledger_signals`), all ``(name, bool)``:

* ``tcf:purpose:N`` (N = 1..11): the PurposesConsent bit for purpose N.
* ``tcf:li:N`` (N = 1..11): the PurposesLITransparency bit for purpose N; always ``False`` for
  purpose 1 (never a legitimate-interest purpose) and, from TCF policy version 4 (TCF 2.2), for
  purposes 3, 4, 5 and 6.
* for each vendor id V passed in, in order, duplicates dropped:
  ``tcf:vendor:V`` (vendor consent bit), ``tcf:vendor_li:V`` (vendor legitimate-interest bit), then
  ``tcf:vendor:V:purpose:N`` for N = 1..11, equal to
  ``vendor_allowed_for_purpose(V, N, "consent")``.

Publisher restrictions are evaluated without the Global Vendor List, so the legal basis the
caller asks about stands in for the vendor's declared basis: type 0 denies the purpose for the
vendor on any basis; type 1 (require consent) makes the legitimate-interest basis fail, so the
vendor must rely on consent; type 2 (require legitimate interest) makes the consent basis fail.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from itertools import chain
from typing import Any, Literal

from ..errors import TCFError
from .tcf_bits import BitReader

__all__ = [
    "LEDGER_PURPOSES",
    "MAX_TC_STRING_CHARS",
    "PublisherRestriction",
    "PublisherTC",
    "RestrictionType",
    "TCString",
    "decode_tc_string",
    "ledger_signals",
]

LEDGER_PURPOSES = range(1, 12)
"""TCF purposes exported as ledger signals (the eleven purposes of TCF 2.2)."""

MAX_TC_STRING_CHARS = 65_536
"""Longer input is rejected before decoding (bounds the work and memory one string can cost)."""
_NO_LI_PURPOSES_FROM_POLICY_4 = frozenset({3, 4, 5, 6})
_EMPTY: frozenset[int] = frozenset()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NOT_BASE64URL = re.compile(r"[^A-Za-z0-9_\-.]")
_PREFIX_CHARS = 40

Basis = Literal["consent", "legitimate_interest"]


class RestrictionType(IntEnum):
    """Publisher restriction types (value 3 is undefined and rejected)."""

    NOT_ALLOWED = 0
    REQUIRE_CONSENT = 1
    REQUIRE_LEGITIMATE_INTEREST = 2


_RESTRICTION_TYPES = tuple(RestrictionType)  # index = wire value, faster than RestrictionType(n)


def _ids(values: frozenset[int]) -> list[int]:
    return sorted(values)


def _iso(moment: datetime) -> str:
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 100_000}Z"


@dataclass(frozen=True, slots=True)
class PublisherRestriction:
    """Vendors whose processing for ``purpose`` the publisher restricts with ``type``.

    Entries of the string with the same purpose and type are merged into one.
    """

    purpose: int
    type: RestrictionType
    vendors: frozenset[int]

    def to_dict(self) -> dict[str, Any]:
        return {"purpose": self.purpose, "type": int(self.type), "vendors": _ids(self.vendors)}


@dataclass(frozen=True, slots=True)
class PublisherTC:
    """The publisher's own purposes transparency and consent (segment type 3)."""

    purposes_consent: frozenset[int]
    purposes_li_transparency: frozenset[int]
    custom_purposes_consent: frozenset[int]
    custom_purposes_li_transparency: frozenset[int]

    def to_dict(self) -> dict[str, list[int]]:
        return {
            "purposes_consent": _ids(self.purposes_consent),
            "purposes_li_transparency": _ids(self.purposes_li_transparency),
            "custom_purposes_consent": _ids(self.custom_purposes_consent),
            "custom_purposes_li_transparency": _ids(self.custom_purposes_li_transparency),
        }


@dataclass(frozen=True, slots=True)
class TCString:
    """A decoded TC string. Id sets are frozensets; ``to_dict()`` gives the JSON form."""

    version: int
    created: datetime
    last_updated: datetime
    cmp_id: int
    cmp_version: int
    consent_screen: int
    consent_language: str
    vendor_list_version: int
    tcf_policy_version: int
    is_service_specific: bool
    use_non_standard_texts: bool
    special_feature_optins: frozenset[int]
    purposes_consent: frozenset[int]
    purposes_li_transparency: frozenset[int]
    purpose_one_treatment: bool
    publisher_cc: str
    vendor_consents: frozenset[int]
    vendor_legitimate_interests: frozenset[int]
    publisher_restrictions: tuple[PublisherRestriction, ...]
    disclosed_vendors: frozenset[int]
    allowed_vendors: frozenset[int]
    publisher_tc: PublisherTC | None

    def purpose_consent(self, n: int) -> bool:
        """The PurposesConsent bit for purpose ``n``."""
        return n in self.purposes_consent

    def purpose_li(self, n: int) -> bool:
        """The PurposesLITransparency bit for purpose ``n`` (as encoded)."""
        return n in self.purposes_li_transparency

    def vendor_consent(self, vendor_id: int) -> bool:
        return vendor_id in self.vendor_consents

    def vendor_li(self, vendor_id: int) -> bool:
        return vendor_id in self.vendor_legitimate_interests

    def li_basis_possible(self, purpose: int) -> bool:
        """Whether legitimate interest can be a legal basis for ``purpose`` under this policy.

        Never for purpose 1; never for purposes 3-6 from TCF policy version 4 (TCF 2.2).
        """
        if purpose == 1:
            return False
        return not (self.tcf_policy_version >= 4 and purpose in _NO_LI_PURPOSES_FROM_POLICY_4)

    def restriction_types(self, vendor_id: int, purpose: int) -> frozenset[RestrictionType]:
        """Publisher restriction types that apply to ``vendor_id`` for ``purpose``."""
        return frozenset(
            r.type
            for r in self.publisher_restrictions
            if r.purpose == purpose and vendor_id in r.vendors
        )

    def vendor_allowed_for_purpose(
        self, vendor_id: int, purpose: int, basis: Basis = "consent"
    ) -> bool:
        """Whether the string lets ``vendor_id`` process for ``purpose`` on ``basis``.

        Consent: purpose consent bit AND vendor consent bit. Legitimate interest: purpose LI bit
        AND vendor LI bit AND LI possible for the purpose (see :meth:`li_basis_possible`). Then
        publisher restrictions: type 0 denies; type 1 (require consent) denies the LI basis;
        type 2 (require LI) denies the consent basis.
        """
        types = self.restriction_types(vendor_id, purpose) if self.publisher_restrictions else ()
        if RestrictionType.NOT_ALLOWED in types:
            return False
        if basis == "consent":
            if RestrictionType.REQUIRE_LEGITIMATE_INTEREST in types:
                return False
            return purpose in self.purposes_consent and vendor_id in self.vendor_consents
        if basis == "legitimate_interest":
            if RestrictionType.REQUIRE_CONSENT in types:
                return False
            return (
                self.li_basis_possible(purpose)
                and purpose in self.purposes_li_transparency
                and vendor_id in self.vendor_legitimate_interests
            )
        raise TCFError(
            "unknown legal basis",
            field="basis",
            value=basis,
            fix='use "consent" or "legitimate_interest"',
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "created": _iso(self.created),
            "last_updated": _iso(self.last_updated),
            "cmp_id": self.cmp_id,
            "cmp_version": self.cmp_version,
            "consent_screen": self.consent_screen,
            "consent_language": self.consent_language,
            "vendor_list_version": self.vendor_list_version,
            "tcf_policy_version": self.tcf_policy_version,
            "is_service_specific": self.is_service_specific,
            "use_non_standard_texts": self.use_non_standard_texts,
            "special_feature_optins": _ids(self.special_feature_optins),
            "purposes_consent": _ids(self.purposes_consent),
            "purposes_li_transparency": _ids(self.purposes_li_transparency),
            "purpose_one_treatment": self.purpose_one_treatment,
            "publisher_cc": self.publisher_cc,
            "vendor_consents": _ids(self.vendor_consents),
            "vendor_legitimate_interests": _ids(self.vendor_legitimate_interests),
            "publisher_restrictions": [r.to_dict() for r in self.publisher_restrictions],
            "disclosed_vendors": _ids(self.disclosed_vendors),
            "allowed_vendors": _ids(self.allowed_vendors),
            "publisher_tc": self.publisher_tc.to_dict() if self.publisher_tc else None,
        }


def ledger_signals(tc: TCString, vendor_ids: Iterable[int]) -> list[tuple[str, bool]]:
    """Consent-ledger signals for ``tc`` (names documented in the module docstring)."""
    out = [(f"tcf:purpose:{n}", n in tc.purposes_consent) for n in LEDGER_PURPOSES]
    out += [
        (f"tcf:li:{n}", tc.li_basis_possible(n) and n in tc.purposes_li_transparency)
        for n in LEDGER_PURPOSES
    ]
    for vendor in dict.fromkeys(vendor_ids):
        out.append((f"tcf:vendor:{vendor}", vendor in tc.vendor_consents))
        out.append((f"tcf:vendor_li:{vendor}", vendor in tc.vendor_legitimate_interests))
        out += [
            (f"tcf:vendor:{vendor}:purpose:{n}", tc.vendor_allowed_for_purpose(vendor, n))
            for n in LEDGER_PURPOSES
        ]
    return out


# --- decoding -------------------------------------------------------------------------------

# Core fields after Version, in wire order: (field, spec name, bits).
_CORE_HEADER = (
    ("core.created", "Created", 36),
    ("core.last_updated", "LastUpdated", 36),
    ("core.cmp_id", "CmpId", 12),
    ("core.cmp_version", "CmpVersion", 12),
    ("core.consent_screen", "ConsentScreen", 6),
    ("core.consent_language", "ConsentLanguage", 12),
    ("core.vendor_list_version", "VendorListVersion", 12),
    ("core.tcf_policy_version", "TcfPolicyVersion", 6),
    ("core.is_service_specific", "IsServiceSpecific", 1),
    ("core.use_non_standard_texts", "UseNonStandardTexts", 1),
    ("core.special_feature_optins", "SpecialFeatureOptins", 12),
    ("core.purposes_consent", "PurposesConsent", 24),
    ("core.purposes_li_transparency", "PurposesLITransparency", 24),
    ("core.purpose_one_treatment", "PurposeOneTreatment", 1),
    ("core.publisher_cc", "PublisherCC", 12),
)
_CORE_HEADER_BITS = sum(width for _, _, width in _CORE_HEADER)


def _cuts(layout: tuple[tuple[str, str, int], ...]) -> tuple[tuple[int, int], ...]:
    shift, cuts = sum(width for _, _, width in layout), []
    for _, _, width in layout:
        shift -= width
        cuts.append((shift, (1 << width) - 1))
    return tuple(cuts)


_CORE_CUTS = _cuts(_CORE_HEADER)


def _prefix(text: str) -> str:
    return text if len(text) <= _PREFIX_CHARS else text[:_PREFIX_CHARS] + "..."


def _deciseconds(value: int) -> datetime:
    return _EPOCH + timedelta(seconds=value // 10, microseconds=value % 10 * 100_000)


def _letters(value: int, field: str, what: str) -> str:
    first, second = value >> 6, value & 0x3F
    if first > 25 or second > 25:
        raise TCFError(
            f"{what} is not two letters: 6-bit codes {first} and {second} (a=0 .. z=25)",
            field=field,
            value=value,
            fix="re-encode the string with a two-letter code",
        )
    return chr(65 + first) + chr(65 + second)


def _from_spans(spans: list[tuple[int, int]]) -> frozenset[int]:
    """Materialise range entries; overlapping spans are merged first so work stays bounded."""
    if not spans:
        return _EMPTY
    if len(spans) == 1:
        start, end = spans[0]
        return frozenset(range(start, end + 1))
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return frozenset(chain.from_iterable(range(s, e + 1) for s, e in merged))


def _read_spans(r: BitReader, field: str, max_id: int | None) -> list[tuple[int, int]]:
    """A range section: NumEntries(12) then RangeEntry{IsARange(1), Start(16)[, End(16)]}."""
    count = r.read(12, field, "NumEntries")
    spans = []
    for index in range(1, count + 1):
        is_range = r.read(1, field, "RangeEntry {} IsARange", index)
        start = r.read(16, field, "RangeEntry {} StartOrOnlyVendorId", index)
        end = r.read(16, field, "RangeEntry {} EndVendorId", index) if is_range else start
        if start == 0:
            raise TCFError(
                f"range entry {index} of {r.segment} starts at vendor id 0 (ids start at 1)",
                field=field,
                value=(start, end),
                fix="re-encode the range with vendor ids >= 1",
            )
        if end < start:
            raise TCFError(
                f"range entry {index} of {r.segment} ends before it starts ({start}-{end})",
                field=field,
                value=(start, end),
                fix="re-encode the range with EndVendorId >= StartOrOnlyVendorId",
            )
        if max_id is not None and end > max_id:
            raise TCFError(
                f"range entry {index} of {r.segment} reaches vendor id {end}, above MaxVendorId "
                f"{max_id}",
                field=field,
                value=(start, end),
                fix="re-encode the section with MaxVendorId >= every vendor id in its ranges",
            )
        spans.append((start, end))
    return spans


def _read_vendor_section(r: BitReader, field: str) -> frozenset[int]:
    """MaxVendorId(16), IsRangeEncoding(1), then a bitfield or a range section."""
    max_id = r.read(16, field, "MaxVendorId")
    if r.read(1, field, "IsRangeEncoding"):
        return _from_spans(_read_spans(r, field, max_id))
    return r.read_ids(max_id, field, "BitField of MaxVendorId={} bits", max_id)


def _read_restrictions(r: BitReader) -> tuple[PublisherRestriction, ...]:
    field = "core.publisher_restrictions"
    count = r.read(12, field, "NumPubRestrictions")
    if not count:
        return ()
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for index in range(1, count + 1):
        purpose = r.read(6, field, "PubRestrictionEntry {} PurposeId", index)
        kind = r.read(2, field, "PubRestrictionEntry {} RestrictionType", index)
        if not 1 <= purpose <= 24:
            raise TCFError(
                f"publisher restriction {index} names purpose {purpose}, outside 1..24",
                field=f"{field}.purpose_id",
                value=purpose,
                fix="re-encode the restriction with a TCF purpose id between 1 and 24",
            )
        if kind == 3:
            raise TCFError(
                f"publisher restriction {index} (purpose {purpose}) has restriction type 3, "
                "which the TCF leaves undefined",
                field=f"{field}.restriction_type",
                value=kind,
                fix="use 0 (not allowed), 1 (require consent) or 2 (require legitimate interest)",
            )
        groups.setdefault((purpose, kind), []).extend(_read_spans(r, field, None))
    return tuple(
        PublisherRestriction(purpose, _RESTRICTION_TYPES[kind], _from_spans(spans))
        for (purpose, kind), spans in sorted(groups.items())
    )


def _read_publisher_tc(r: BitReader) -> PublisherTC:
    consent = r.read_ids(24, "publisher_tc.purposes_consent", "PubPurposesConsent")
    li = r.read_ids(24, "publisher_tc.purposes_li_transparency", "PubPurposesLITransparency")
    count = r.read(6, "publisher_tc.num_custom_purposes", "NumCustomPurposes")
    custom_consent = r.read_ids(
        count, "publisher_tc.custom_purposes_consent", "CustomPurposesConsent"
    )
    custom_li = r.read_ids(
        count, "publisher_tc.custom_purposes_li_transparency", "CustomPurposesLITransparency"
    )
    return PublisherTC(consent, li, custom_consent, custom_li)


_SEGMENT_NAMES = {1: "disclosed_vendors", 2: "allowed_vendors", 3: "publisher_tc"}


def _check_text(value: object) -> str:
    if not isinstance(value, str):
        raise TCFError(
            f"a TC string must be text, not {type(value).__name__}",
            field="tc_string",
            value=type(value).__name__,
            fix="pass the TC string as a str",
        )
    if not value:
        raise TCFError(
            "the TC string is empty",
            field="tc_string",
            fix="pass the TC string from the CMP (__tcfapi getTCData tcString, or the "
            "euconsent-v2 cookie)",
        )
    if len(value) > MAX_TC_STRING_CHARS:
        raise TCFError(
            f"the TC string is {len(value)} characters long, more than {MAX_TC_STRING_CHARS}",
            field="tc_string",
            value=_prefix(value),
            fix="this is not a TC string; pass the value of the euconsent-v2 cookie or tcString",
        )
    bad = _NOT_BASE64URL.search(value)
    if bad is not None:
        char, at = bad.group(), bad.start()
        if char == "=":
            fix = "TC strings are unpadded base64url: remove the trailing '=' padding"
        elif char in "+/":
            fix = (
                "this looks like standard base64; TC strings use base64url: replace '+' with '-' "
                "and '/' with '_'"
            )
        else:
            fix = (
                "a TC string holds only base64url characters (A-Z a-z 0-9 - _) and '.' between "
                "segments; strip whitespace, quotes or URL encoding"
            )
        raise TCFError(
            f"the TC string has {char!r} at position {at}, which is not base64url",
            field="tc_string",
            value=_prefix(value),
            fix=fix,
        )
    return value


def _decode_core(text: str) -> dict[str, Any]:
    r = BitReader(text, "core")
    version = r.read(6, "core.version", "Version")
    if version != 2:
        hint = " (a TCF v1.1 consent string)" if version == 1 else ""
        raise TCFError(
            f"TC string version {version}{hint} is not supported; only TCF v2 is",
            field="core.version",
            value=version,
            fix="ask the CMP for a TCF v2 TC string (v2 strings start with 'C')",
        )
    if r.remaining < _CORE_HEADER_BITS:
        for field, what, width in _CORE_HEADER:  # raises at the first field that does not fit
            r.read(width, field, what)
    head = r.read(_CORE_HEADER_BITS, "core", "core fields")
    (
        created,
        last_updated,
        cmp_id,
        cmp_version,
        consent_screen,
        language,
        vendor_list_version,
        policy_version,
        service_specific,
        non_standard_texts,
        special_features,
        purposes,
        purposes_li,
        purpose_one,
        publisher_cc,
    ) = [(head >> shift) & mask for shift, mask in _CORE_CUTS]
    li_ids = _ids_of_24(purposes_li)
    if policy_version >= 4 and not li_ids.isdisjoint(_NO_LI_PURPOSES_FROM_POLICY_4):
        bad = sorted(li_ids & _NO_LI_PURPOSES_FROM_POLICY_4)
        raise TCFError(
            f"TCF policy version {policy_version} (TCF 2.2+) allows no legitimate interest for "
            f"purposes 3-6, but PurposesLITransparency is set for purposes {bad}",
            field="core.purposes_li_transparency",
            value=bad,
            fix="re-encode the string with the legitimate-interest bits of purposes 3, 4, 5 and "
            "6 at 0",
        )
    vendor_consents = _read_vendor_section(r, "core.vendor_consents")
    vendor_li = _read_vendor_section(r, "core.vendor_legitimate_interests")
    return {
        "version": version,
        "created": _deciseconds(created),
        "last_updated": _deciseconds(last_updated),
        "cmp_id": cmp_id,
        "cmp_version": cmp_version,
        "consent_screen": consent_screen,
        "consent_language": _letters(language, "core.consent_language", "ConsentLanguage"),
        "vendor_list_version": vendor_list_version,
        "tcf_policy_version": policy_version,
        "is_service_specific": bool(service_specific),
        "use_non_standard_texts": bool(non_standard_texts),
        "special_feature_optins": _ids_of_12(special_features),
        "purposes_consent": _ids_of_24(purposes),
        "purposes_li_transparency": li_ids,
        "purpose_one_treatment": bool(purpose_one),
        "publisher_cc": _letters(publisher_cc, "core.publisher_cc", "PublisherCC"),
        "vendor_consents": vendor_consents,
        "vendor_legitimate_interests": vendor_li,
        "publisher_restrictions": _read_restrictions(r),
    }


@functools.lru_cache(maxsize=4096)
def _ids_of_24(bits: int) -> frozenset[int]:
    return frozenset(i for i in range(1, 25) if bits >> (24 - i) & 1)


@functools.lru_cache(maxsize=1024)
def _ids_of_12(bits: int) -> frozenset[int]:
    return frozenset(i for i in range(1, 13) if bits >> (12 - i) & 1)


def decode_tc_string(value: str) -> TCString:
    """Decode and validate an IAB TCF v2 TC string (cached: the result is immutable).

    Raises :class:`~cdp_federated.errors.TCFError` with ``field``, ``value`` and ``fix`` when the
    string is empty, not base64url, not version 2, truncated, has an unknown or repeated optional
    segment, an invalid range entry or publisher restriction, or (TCF policy version >= 4)
    legitimate-interest bits for purposes 3-6.
    """
    if not isinstance(value, str):
        _check_text(value)
    return _decode_cached(value)


def _decode(value: str) -> TCString:
    """Uncached decode (``decode_tc_string`` wraps it in an LRU cache)."""
    segments = _check_text(value).split(".")
    for index, text in enumerate(segments):
        if not text:
            raise TCFError(
                f"segment {index} of the TC string is empty",
                field="tc_string",
                value=_prefix(value),
                fix="remove the stray '.'; segments are joined by single dots",
            )
    core = _decode_core(segments[0])
    optional: dict[int, Any] = {}
    for index, text in enumerate(segments[1:], start=1):
        r = BitReader(text, f"optional segment {index}")
        kind = r.read(3, "segment_type", "SegmentType")
        if kind not in _SEGMENT_NAMES:
            what = "0 (core) may only come first" if kind == 0 else f"{kind} is unknown"
            raise TCFError(
                f"segment {index} of the TC string has SegmentType {what}",
                field="segment_type",
                value=kind,
                fix="optional segments are 1 (disclosed vendors), 2 (allowed vendors) or "
                "3 (publisher TC); drop the unknown segment",
            )
        if kind in optional:
            raise TCFError(
                f"segment {index} repeats the {_SEGMENT_NAMES[kind]} segment (SegmentType {kind})",
                field="segment_type",
                value=kind,
                fix="a TC string holds each optional segment at most once; drop the duplicate",
            )
        r.segment = _SEGMENT_NAMES[kind]
        if kind == 3:
            optional[kind] = _read_publisher_tc(r)
        else:
            optional[kind] = _read_vendor_section(r, _SEGMENT_NAMES[kind])
    return TCString(
        **core,
        disclosed_vendors=optional.get(1, _EMPTY),
        allowed_vendors=optional.get(2, _EMPTY),
        publisher_tc=optional.get(3),
    )


# Small on purpose: a hostile string with full vendor ranges expands to megabytes of ids. The
# ingest path caches the (small) ledger records per string instead (consent/signals.py).
_decode_cached = functools.lru_cache(maxsize=32)(_decode)
