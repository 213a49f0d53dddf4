"""A minimal IAB TCF v2 TC string encoder: the core segment, bitfield vendor sections.

For synthetic data (the demo's CMP) and fixtures; the decoder in :mod:`.tcf` is what reads real
strings. Field widths follow the core segment layout of the TCF v2 specification.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from datetime import UTC, datetime

__all__ = ["encode_tc_string"]


def _letters(code: str) -> int:
    if len(code) != 2 or not code.isascii() or not code.isalpha():
        raise ValueError(f"expected two letters, got {code!r}")
    a, b = (ord(c) - ord("A") for c in code.upper())
    return a << 6 | b


def _bitfield(ids: Iterable[int], width: int) -> int:
    value = 0
    for i in ids:
        if not 1 <= i <= width:
            raise ValueError(f"id {i} outside 1..{width}")
        value |= 1 << (width - i)
    return value


def _deciseconds(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("TC string times must be timezone-aware")
    return int(moment.astimezone(UTC).timestamp() * 10)


def encode_tc_string(
    *,
    created: datetime,
    last_updated: datetime | None = None,
    cmp_id: int = 2,
    cmp_version: int = 1,
    consent_screen: int = 1,
    consent_language: str = "EN",
    vendor_list_version: int = 1,
    tcf_policy_version: int = 4,
    is_service_specific: bool = True,
    purposes_consent: Iterable[int] = (),
    purposes_li: Iterable[int] = (),
    special_features: Iterable[int] = (),
    publisher_cc: str = "GB",
    vendor_consents: Iterable[int] = (),
    vendor_li: Iterable[int] = (),
) -> str:
    """The base64url (unpadded) core segment with the given choices and no publisher
    restrictions."""
    consents, interests = sorted(set(vendor_consents)), sorted(set(vendor_li))
    fields: list[tuple[int, int]] = [
        (2, 6),
        (_deciseconds(created), 36),
        (_deciseconds(last_updated or created), 36),
        (cmp_id, 12),
        (cmp_version, 12),
        (consent_screen, 6),
        (_letters(consent_language), 12),
        (vendor_list_version, 12),
        (tcf_policy_version, 6),
        (int(is_service_specific), 1),
        (0, 1),  # UseNonStandardTexts
        (_bitfield(special_features, 12), 12),
        (_bitfield(purposes_consent, 24), 24),
        (_bitfield(purposes_li, 24), 24),
        (0, 1),  # PurposeOneTreatment
        (_letters(publisher_cc), 12),
    ]
    for ids in (consents, interests):
        top = ids[-1] if ids else 0
        fields += [(top, 16), (0, 1), (_bitfield(ids, top), top)]  # bitfield encoding
    fields.append((0, 12))  # NumPubRestrictions
    value, bits = 0, 0
    for field, width in fields:
        if not 0 <= field < 1 << width:  # (a width of 0 admits only 0)
            raise ValueError(f"value {field} does not fit in {width} bits")
        value, bits = value << width | field, bits + width
    pad = -bits % 8
    raw = (value << pad).to_bytes((bits + pad) // 8, "big")
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")
