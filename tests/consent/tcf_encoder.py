"""A test-only TC string encoder.

Works on "0101" strings and the base64 module, deliberately unlike the decoder (int shifts,
binascii), so the two do not share mistakes. Shared by the decoder tests and the consent
property tests.
"""

from __future__ import annotations

import base64


def bits(value: int, width: int) -> str:
    assert 0 <= value < 1 << width, (value, width)
    return format(value, f"0{width}b")


def bitfield(ids, width: int) -> str:
    return "".join("1" if i in ids else "0" for i in range(1, width + 1))


def letters(code: str) -> str:
    return "".join(bits(ord(c) - ord("A"), 6) for c in code)


def b64url(bitstring: str) -> str:
    bitstring += "0" * (-len(bitstring) % 8)
    data = int(bitstring, 2).to_bytes(len(bitstring) // 8, "big") if bitstring else b""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def runs(ids) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for i in sorted(ids):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return [(a, b) for a, b in out]


def range_entries(spans) -> str:
    """NumEntries then RangeEntry items; spans are written as given, valid or not."""
    out = bits(len(spans), 12)
    for start, end in spans:
        out += "0" + bits(start, 16) if start == end else "1" + bits(start, 16) + bits(end, 16)
    return out


def vendor_section(ids=(), *, use_range=False, max_id=None, spans=None) -> str:
    ids = set(ids)
    max_id = max(ids, default=0) if max_id is None else max_id
    if use_range or spans is not None:
        return bits(max_id, 16) + "1" + range_entries(runs(ids) if spans is None else spans)
    return bits(max_id, 16) + "0" + bitfield(ids, max_id)


def restriction_section(entries) -> str:
    """entries: (purpose, type, spans) written in order, valid or not."""
    out = bits(len(entries), 12)
    for purpose, kind, spans in entries:
        out += bits(purpose, 6) + bits(kind, 2) + range_entries(spans)
    return out


def core_bits(
    *,
    version=2,
    created=15_800_000_000,
    last_updated=15_800_000_000,
    cmp_id=300,
    cmp_version=5,
    consent_screen=1,
    language="EN",
    vendor_list_version=250,
    policy=4,
    service_specific=False,
    non_standard_texts=False,
    special_features=(),
    purposes=(),
    purposes_li=(),
    purpose_one_treatment=False,
    publisher_cc="DE",
    vendor_consents=None,
    vendor_li=None,
    restrictions=None,
) -> str:
    return (
        bits(version, 6)
        + bits(created, 36)
        + bits(last_updated, 36)
        + bits(cmp_id, 12)
        + bits(cmp_version, 12)
        + bits(consent_screen, 6)
        + letters(language)
        + bits(vendor_list_version, 12)
        + bits(policy, 6)
        + str(int(service_specific))
        + str(int(non_standard_texts))
        + bitfield(special_features, 12)
        + bitfield(purposes, 24)
        + bitfield(purposes_li, 24)
        + str(int(purpose_one_treatment))
        + letters(publisher_cc)
        + (vendor_section() if vendor_consents is None else vendor_consents)
        + (vendor_section() if vendor_li is None else vendor_li)
        + (restriction_section([]) if restrictions is None else restrictions)
    )


def oob_segment(kind: int, section: str) -> str:
    return b64url(bits(kind, 3) + section)


def publisher_tc_segment(consent=(), li=(), n_custom=0, custom_consent=(), custom_li=()) -> str:
    return b64url(
        bits(3, 3)
        + bitfield(consent, 24)
        + bitfield(li, 24)
        + bits(n_custom, 6)
        + bitfield(custom_consent, n_custom)
        + bitfield(custom_li, n_custom)
    )
