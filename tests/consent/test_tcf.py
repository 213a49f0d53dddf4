"""IAB TCF v2 TC-string decoder: published examples, round trips through a test-only encoder,
a cross-check against the ``iab-tcf`` package, the legal-basis rules and every validation error."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_federated.consent.tcf import (
    MAX_TC_STRING_CHARS,
    RestrictionType,
    TCString,
    decode_tc_string,
    ledger_signals,
)
from cdp_federated.errors import TCFError
from tests.consent.tcf_encoder import (
    b64url,
    bits,
    core_bits,
    oob_segment,
    publisher_tc_segment,
    range_entries,
    restriction_section,
    runs,
    vendor_section,
)

try:  # cross-check only: the product never imports iab-tcf
    import iab_tcf
except ImportError:  # pragma: no cover - dev extra not installed
    iab_tcf = None

needs_iab_tcf = pytest.mark.skipif(
    iab_tcf is None, reason="iab-tcf (dev extra) is not installed: no cross-check decoder"
)


def iso(deciseconds: int) -> str:
    moment = datetime.fromtimestamp(deciseconds // 10, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{deciseconds % 10}Z"


def decode_error(value) -> TCFError:
    with pytest.raises(TCFError) as info:
        decode_tc_string(value)
    err = info.value
    assert "\n" not in str(err) and err.fix, str(err)
    return err


# --- published examples -----------------------------------------------------------------------

JAVA_TESTS = (
    "https://github.com/InteractiveAdvertisingBureau/iabtcf-java/blob/master/"
    "iabtcf-decoder/src/test/java/com/iabtcf/decoder/TCStringV2Test.java"
)


def test_iabtcf_java_core_fields():
    # JAVA_TESTS testCanConstructTCModelFromBase64String
    tc = decode_tc_string("COtybn4PA_zT4KjACBENAPCIAEBAAECAAIAAAAAAAAAA")
    d = tc.to_dict()
    assert d["version"] == 2
    assert d["created"] == "2020-01-26T17:01:00.0Z"
    assert d["last_updated"] == "2021-02-02T17:01:00.0Z"
    assert (d["cmp_id"], d["cmp_version"], d["consent_screen"]) == (675, 2, 1)
    assert (d["vendor_list_version"], d["tcf_policy_version"]) == (15, 2)
    assert (d["consent_language"], d["publisher_cc"]) == ("EN", "AA")
    assert d["is_service_specific"] is False
    assert d["purpose_one_treatment"] is True
    assert d["use_non_standard_texts"] is False
    assert d["special_feature_optins"] == [1]
    assert d["purposes_consent"] == [2, 10]
    assert d["purposes_li_transparency"] == [2, 9]
    assert tc.created == datetime(2020, 1, 26, 17, 1, tzinfo=UTC)


def test_iabtcf_java_bitfield_vendors_and_oob_segments():
    # JAVA_TESTS testConstructConsentsFromBitFields and testCanParseDisclosedAndAllowedVendors
    core = "COrEAV4OrXx94ACABBENAHCIAD-AAAAAAACAAxAAAAgAIAwgAgAAAAEAgQAAAAAEAYQAQAAAACAAAABAAA"
    tc = decode_tc_string(core)
    assert tc.to_dict()["purposes_consent"] == [3, 4, 5, 6, 7, 8, 9]
    assert tc.to_dict()["vendor_consents"] == [23, 37, 47, 48, 53, 65, 98]
    assert tc.to_dict()["vendor_legitimate_interests"] == [37, 47, 48, 53, 65, 98, 129]
    assert tc.disclosed_vendors == frozenset() and tc.publisher_tc is None

    tc = decode_tc_string(core + ".IBAgAAAgAIAwgAgAAAAEAAAACA.QAagAQAgAIAwgA")
    assert tc.to_dict()["allowed_vendors"] == [12, 23, 37, 47, 48, 53]
    assert tc.to_dict()["disclosed_vendors"] == [23, 37, 47, 48, 53, 65, 98, 129]


def test_iabtcf_java_range_encoding():
    # JAVA_TESTS testCanParseRangeEncodedVendorLegitimateInterests and testRange
    tc = decode_tc_string("COv__-wOv__-wC2AAAENAPCgAAAAAAAAAAAAA_wAQA_gEBABAEAAAA")
    assert tc.vendor_legitimate_interests == {128}
    disclosed = (
        "IFoEUQQgAIQwgIwQABAEAAAAOIAACAIAAAAQAIAgEAACEAAAAAgAQBAAAAAAAGBAAgAAAAAAAFAAECAAAgAAQARAEQAA"
        "AAAJAAIAAgAAAYQEAAAQmAgBC3ZAYzUw"
    )
    two_ranges = "COwBOpCOwBOpCLqAAAENAPCAAAAAAAAAAAAAFfwAYFfAV-BVkAGBVYFWAAA." + disclosed
    one_range = "COwBOpCOwBOpCLqAAAENAPCAAAAAAAAAAAAAFfwAQFfgUbABAUaAAA." + disclosed
    assert decode_tc_string(two_ranges).vendor_consents == {702, 703}
    assert decode_tc_string(one_range).vendor_consents == {703}


def test_iabtcf_java_publisher_restrictions_with_empty_vendor_lists():
    # JAVA_TESTS testPublisherRestrictions: the bit string transcribed from the test
    bitstring = (
        "0000100011101011100"
        "1000000000000001010"
        "0000001110101110010"
        "0000000000000101000"
        "0000110011111000000"
        "0000000000000000100"
        "0011010000000011110"
        "0001000000000000000" + "0000000000000000000" * 5 + "000000000011"
        "000001" "01" "000000000000"
        "000010" "00" "000000000000"
        "000011" "10" "000000000000"
        "0"
    )  # fmt: skip
    restrictions = decode_tc_string(b64url(bitstring)).to_dict()["publisher_restrictions"]
    assert restrictions == [
        {"purpose": 1, "type": 1, "vendors": []},
        {"purpose": 2, "type": 0, "vendors": []},
        {"purpose": 3, "type": 2, "vendors": []},
    ]


def test_iabtcf_java_publisher_tc_segment():
    # JAVA_TESTS testPublisherPurposes: the segment bit string transcribed from the test
    segment = "011" + "1" + "0" * 23 + "0" * 23 + "1" + "000010" + "01" + "11" + "000"
    tc = decode_tc_string("COtybn4PA_zT4KjACBENAPCIAEBAAECAAIAAAAAAAAAA." + b64url(segment))
    assert tc.to_dict()["publisher_tc"] == {
        "purposes_consent": [1],
        "purposes_li_transparency": [24],
        "custom_purposes_consent": [2],
        "custom_purposes_li_transparency": [1, 2],
    }


def test_iabtcf_es_issue_201_repeated_restriction_entries():
    # https://github.com/InteractiveAdvertisingBureau/iabtcf-es/blob/master/modules/core/test/
    # ReportedIssues.test.ts ("201 unable to decode valid TCF2 String"): a vendor is encoded
    # several times under one restriction; purpose 1 / require consent lists these vendors.
    tc = decode_tc_string(
        "CO4VGswO4VGswAfZCBDEAzCsAP_AAH_AAAigGUNf_X9fb2vj-_599_t0eY1f9_63t-wzjheMs-8NyZ-X_J4Wv2MyvB"
        "34JqQKGRgkunLBAQdtHGncTQgBwIlViTLMY02MjzNKJrJEilsbe2dYGH9vn8XT_ZKZ70-_v__7v3___33_5Ayhr_6_"
        "r7e18f3_Pvv9ujzGr_v_W9v2GccLxln3huTPy_5PC1-xmV4O_BNSBQyMEl05YICDto407iaEAOBEqsSZZjGmxkeZpR"
        "NZIkUtjb2zrAw_t8_i6f7JTPen39___d-___--__ICgKAOAAcAA4AFAAjgB6AEYALcGACAW0AtoJAHAAOAAcACgARw"
        "A9ACMAFuFABALaAW0GgDgAHAAOABQAI4AegBGAC3DgAgFtALaEQBwADgAHAAoAEcAPQAjABbiQAQC2gFtCoA4ABwAD"
        "gAUACOAHoARgAtxYAIBbQC2hkAcAA4ABwAKABHAD0AIwAW40AEAtoBbQ6AOAAcAA4AFAAjgB6AEYALceACAW0Atoh"
        "AHAAOAAcACgARwA9ACMAFuRABALaAW0SgDgAHAAOABQAI4AegBGAC3JgAgFtALaKQBwADgAHAAoAEcAPQAjABblQAQ"
        "C2gFtA"
    )
    first = tc.publisher_restrictions[0]
    assert (first.purpose, first.type) == (1, RestrictionType.REQUIRE_CONSENT)
    assert sorted(first.vendors) == [7, 20, 71, 122, 140, 183]
    # entries come back merged per (purpose, type) and sorted
    keys = [(r.purpose, r.type) for r in tc.publisher_restrictions]
    assert keys == sorted(set(keys))


def test_gdpr_iab_tcfv2_perl_examples():
    # https://metacpan.org/pod/GDPR::IAB::TCFv2 (SYNOPSIS): created epoch 1228644257, last
    # updated 1326215413, CMP 21 version 7, screen 2, EN, GVL 23, consent for purposes 1, 3, 9, 10
    # (the string is also the spec's service-specific example).
    tc = decode_tc_string(
        "CLcVDxRMWfGmWAVAHCENAXCkAKDAADnAABRgA5mdfCKZuYJez-NQm0TBMYA4oCAAGQYIAAAAAAEAIAEgAA."
        "argAC0gAAAAAAAAAAAA"
    )
    assert int(tc.created.timestamp()) == 1228644257
    assert int(tc.last_updated.timestamp()) == 1326215413
    assert (tc.cmp_id, tc.cmp_version, tc.consent_screen) == (21, 7, 2)
    assert (tc.consent_language, tc.vendor_list_version) == ("EN", 23)
    assert all(tc.purpose_consent(n) for n in (1, 3, 9, 10))
    assert tc.publisher_tc is not None
    # https://metacpan.org/pod/GDPR::IAB::TCFv2::PublisherRestrictions: restrictions(32) of this
    # string is { 7 => { 1 => 1 } } (purpose 7, require consent).
    tc = decode_tc_string("COwAdDhOwAdDhN4ABAENAPCgAAQAAv___wAAAFP_AAp_4AI6ACACAA")
    assert tc.restriction_types(32, 7) == {RestrictionType.REQUIRE_CONSENT}
    assert [r.to_dict() for r in tc.publisher_restrictions] == [
        {"purpose": 7, "type": 1, "vendors": [32]}
    ]


SPEC = (
    "https://github.com/InteractiveAdvertisingBureau/GDPR-Transparency-and-Consent-Framework/blob/"
    "master/TCFv2/IAB%20Tech%20Lab%20-%20Consent%20string%20and%20vendor%20list%20formats%20v2.md"
)
SPEC_DISCLOSED = (
    "IFoEUQQgAIQwgIwQABAEAAAAOIAACAIAAAAQAIAgEAACEAAAAAgAQBAAAAAAAGBAAgAAAAAAAFAAECAAAgAAQARAEQAA"
    "AAAJAAIAAgAAAYQEAAAQmAgBC3ZAYzUw"
)


def test_spec_examples_segment_layout():
    # SPEC "TC String Format": a global string with all four segments, and OOB examples 1-2
    everything = decode_tc_string(
        "COw4XqLOw4XqLAAAAAENAXCAAAAAAAAAAAAAAAAAAAAA.IFukWSQgAIQwgI0QEByFAAAAeIAACAIgSAAQAIAgEQA"
        "CEABAAAgAQFAEAIAAAGBAAgAAAAQAIFAAMCQAAgAAQiRAEQAAAAANAAIAAggAIYQFAAARmggBC3ZCYzU2yIA.QFukW"
        "SQgAIQwgI0QEByFAAAAeIAACAIgSAAQAIAgEQACEABAAAgAQFAEAIAAAGBAAgAAAAQAIFAAMCQAAgAAQiRAEQAAAAAN"
        "AAIAAggAIYQFAAARmggBC3ZCYzU2yIA.YAAAAAAAAAAAAAAAAAA"
    )
    assert everything.disclosed_vendors and everything.allowed_vendors
    assert everything.publisher_tc is not None
    core = decode_tc_string("COvFyGBOvFyGBAbAAAENAPCAAOAAAAAAAAAAAEEUACCKAAA")
    with_oob = decode_tc_string("COvFyGBOvFyGBAbAAAENAPCAAOAAAAAAAAAAAEEUACCKAAA." + SPEC_DISCLOSED)
    assert with_oob.vendor_consents == core.vendor_consents and with_oob.disclosed_vendors
    assert core.disclosed_vendors == frozenset()


def test_spec_example_3_repeats_the_disclosed_vendors_segment():
    # SPEC "Example 3" appends "PVAfDObdrA" as if it were AllowedVendors, but 'P' is 001111: its
    # SegmentType is 1 (DisclosedVendors), the same as the segment before it.
    err = decode_error(
        "COvFyGBOvFyGBAbAAAENAPCAAOAAAAAAAAAAAEEUACCKAAA." + SPEC_DISCLOSED + ".PVAfDObdrA"
    )
    assert err.field == "segment_type" and err.value == 1 and "repeats" in err.message


# --- cross-check against iab-tcf on the same strings -------------------------------------------


def _iab_ids(flags_or_ranges) -> set[int]:
    if isinstance(flags_or_ranges, dict):
        return {k for k, v in flags_or_ranges.items() if v}
    return {i for start, end in flags_or_ranges for i in range(start, end + 1)}


def assert_matches_iab_tcf(value: str, tc: TCString) -> None:
    other = iab_tcf.decode_v2(value)
    seconds = lambda moment: moment.replace(microsecond=0, tzinfo=None)  # noqa: E731
    assert other.created == seconds(tc.created)
    assert other.last_updated == seconds(tc.last_updated)
    assert other.cmp_id == tc.cmp_id and other.cmp_version == tc.cmp_version
    assert other.consent_screen == tc.consent_screen
    assert other.consent_language.decode() == tc.consent_language
    assert other.vendor_list_version == tc.vendor_list_version
    assert other.tcf_policy_version == tc.tcf_policy_version
    assert other.is_service_specific == tc.is_service_specific
    assert other.use_non_standard_stacks == tc.use_non_standard_texts
    assert _iab_ids(other.special_features_optin) == tc.special_feature_optins
    assert _iab_ids(other.purposes_consent) == tc.purposes_consent
    assert _iab_ids(other.purposes_legitimate_interests) == tc.purposes_li_transparency
    assert other.purpose_one_treatment == tc.purpose_one_treatment
    assert other.publisher_cc.decode() == tc.publisher_cc
    consents = (
        other.consented_vendors_range
        if other.is_consent_range_encoding
        else other.consented_vendors
    )
    assert _iab_ids(consents) == tc.vendor_consents
    interests = (
        other.interests_vendors_range
        if other.is_interests_range_encoding
        else other.interests_vendors
    )
    assert _iab_ids(interests) == tc.vendor_legitimate_interests
    restrictions: dict[tuple[int, int], set[int]] = {}
    for entry in other.pub_restriction_entries:
        key = (entry.purpose_id, entry.restriction_type)
        restrictions.setdefault(key, set()).update(_iab_ids(entry.restrictions_range))
    assert restrictions == {(r.purpose, r.type): set(r.vendors) for r in tc.publisher_restrictions}
    assert _iab_ids(getattr(other, "oob_disclosed_vendors", {})) == tc.disclosed_vendors
    assert _iab_ids(getattr(other, "oob_allowed_vendors", {})) == tc.allowed_vendors
    pub = getattr(other, "publisher_tc", None)
    assert (pub is None) == (tc.publisher_tc is None)
    if pub is not None:
        assert _iab_ids(pub.purposes_consent) == tc.publisher_tc.purposes_consent
        assert _iab_ids(pub.purposes_lit_transparency) == tc.publisher_tc.purposes_li_transparency
        assert _iab_ids(pub.custom_purposes_consent) == tc.publisher_tc.custom_purposes_consent
        assert (
            _iab_ids(pub.custom_purposes_lit_transparency)
            == tc.publisher_tc.custom_purposes_li_transparency
        )


PUBLISHED = [
    "COtybn4PA_zT4KjACBENAPCIAEBAAECAAIAAAAAAAAAA",
    "COrEAV4OrXx94ACABBENAHCIAD-AAAAAAACAAxAAAAgAIAwgAgAAAAEAgQAAAAAEAYQAQAAAACAAAABAAA."
    "IBAgAAAgAIAwgAgAAAAEAAAACA.QAagAQAgAIAwgA",
    "COv__-wOv__-wC2AAAENAPCgAAAAAAAAAAAAA_wAQA_gEBABAEAAAA",
    "COwBOpCOwBOpCLqAAAENAPCAAAAAAAAAAAAAFfwAYFfAV-BVkAGBVYFWAAA." + SPEC_DISCLOSED,
    "CLcVDxRMWfGmWAVAHCENAXCkAKDAADnAABRgA5mdfCKZuYJez-NQm0TBMYA4oCAAGQYIAAAAAAEAIAEgAA."
    "argAC0gAAAAAAAAAAAA",
    "COwAdDhOwAdDhN4ABAENAPCgAAQAAv___wAAAFP_AAp_4AI6ACACAA",
    "COvFyGBOvFyGBAbAAAENAPCAAOAAAAAAAAAAAEEUACCKAAA." + SPEC_DISCLOSED,
]


@needs_iab_tcf
@pytest.mark.parametrize("value", PUBLISHED)
def test_published_strings_match_iab_tcf(value):
    assert_matches_iab_tcf(value, decode_tc_string(value))


# --- round trips through the test encoder (hypothesis) ------------------------------------------

ids_upto = lambda top, size=30: st.frozensets(st.integers(1, top), max_size=size)  # noqa: E731


@st.composite
def vendor_sections(draw, top=400):
    ids = draw(ids_upto(top))
    use_range = draw(st.booleans())
    slack = draw(st.integers(0, 3))
    spans = runs(ids)
    if use_range and spans and draw(st.booleans()):
        # also write runs as single entries and repeat an entry: both are legal
        spans = [(i, i) for a, b in spans for i in range(a, b + 1)] + [spans[0]]
    section = vendor_section(
        ids,
        use_range=use_range,
        max_id=max(ids, default=0) + slack,
        spans=spans if use_range else None,
    )
    return ids, section


@st.composite
def tc_cases(draw):
    policy = draw(st.integers(0, 63))
    li = draw(st.frozensets(st.integers(1, 24)))
    if policy >= 4:
        li -= {3, 4, 5, 6}
    created, updated = draw(st.integers(0, 2**36 - 1)), draw(st.integers(0, 2**36 - 1))
    language = draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=2, max_size=2))
    country = draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=2, max_size=2))
    fields = {
        "cmp_id": draw(st.integers(0, 4095)),
        "cmp_version": draw(st.integers(0, 4095)),
        "consent_screen": draw(st.integers(0, 63)),
        "vendor_list_version": draw(st.integers(0, 4095)),
        "is_service_specific": draw(st.booleans()),
        "use_non_standard_texts": draw(st.booleans()),
        "special_feature_optins": draw(st.frozensets(st.integers(1, 12))),
        "purposes_consent": draw(st.frozensets(st.integers(1, 24))),
        "purpose_one_treatment": draw(st.booleans()),
    }
    consents, consent_bits = draw(vendor_sections())
    interests, interest_bits = draw(vendor_sections())
    raw_restrictions = draw(
        st.lists(
            st.tuples(st.integers(1, 24), st.integers(0, 2), ids_upto(600, 8)),
            max_size=5,
        )
    )
    merged: dict[tuple[int, int], set[int]] = {}
    for purpose, kind, vendors in raw_restrictions:
        merged.setdefault((purpose, kind), set()).update(vendors)
    core = core_bits(
        created=created,
        last_updated=updated,
        cmp_id=fields["cmp_id"],
        cmp_version=fields["cmp_version"],
        consent_screen=fields["consent_screen"],
        language=language,
        vendor_list_version=fields["vendor_list_version"],
        policy=policy,
        service_specific=fields["is_service_specific"],
        non_standard_texts=fields["use_non_standard_texts"],
        special_features=fields["special_feature_optins"],
        purposes=fields["purposes_consent"],
        purposes_li=li,
        purpose_one_treatment=fields["purpose_one_treatment"],
        publisher_cc=country,
        vendor_consents=consent_bits,
        vendor_li=interest_bits,
        restrictions=restriction_section([(p, k, runs(v)) for p, k, v in raw_restrictions]),
    )
    segments = [b64url(core)]
    disclosed, allowed, publisher = frozenset(), frozenset(), None
    for kind in draw(st.permutations([1, 2, 3]))[: draw(st.integers(0, 3))]:
        if kind == 3:
            n_custom = draw(st.integers(0, 63))
            publisher = {
                "purposes_consent": draw(st.frozensets(st.integers(1, 24))),
                "purposes_li_transparency": draw(st.frozensets(st.integers(1, 24))),
                "custom_purposes_consent": draw(st.frozensets(st.integers(1, max(n_custom, 1))))
                if n_custom
                else frozenset(),
                "custom_purposes_li_transparency": draw(
                    st.frozensets(st.integers(1, max(n_custom, 1)))
                )
                if n_custom
                else frozenset(),
            }
            segments.append(
                publisher_tc_segment(
                    publisher["purposes_consent"],
                    publisher["purposes_li_transparency"],
                    n_custom,
                    publisher["custom_purposes_consent"],
                    publisher["custom_purposes_li_transparency"],
                )
            )
        else:
            ids, section = draw(vendor_sections())
            segments.append(oob_segment(kind, section))
            if kind == 1:
                disclosed = ids
            else:
                allowed = ids
    expected = {
        "version": 2,
        "created": iso(created),
        "last_updated": iso(updated),
        "cmp_id": fields["cmp_id"],
        "cmp_version": fields["cmp_version"],
        "consent_screen": fields["consent_screen"],
        "consent_language": language,
        "vendor_list_version": fields["vendor_list_version"],
        "tcf_policy_version": policy,
        "is_service_specific": fields["is_service_specific"],
        "use_non_standard_texts": fields["use_non_standard_texts"],
        "special_feature_optins": sorted(fields["special_feature_optins"]),
        "purposes_consent": sorted(fields["purposes_consent"]),
        "purposes_li_transparency": sorted(li),
        "purpose_one_treatment": fields["purpose_one_treatment"],
        "publisher_cc": country,
        "vendor_consents": sorted(consents),
        "vendor_legitimate_interests": sorted(interests),
        "publisher_restrictions": [
            {"purpose": p, "type": k, "vendors": sorted(v)} for (p, k), v in sorted(merged.items())
        ],
        "disclosed_vendors": sorted(disclosed),
        "allowed_vendors": sorted(allowed),
        "publisher_tc": None
        if publisher is None
        else {key: sorted(value) for key, value in publisher.items()},
    }
    return ".".join(segments), expected


@settings(max_examples=60)
@given(tc_cases())
def test_round_trip_through_the_test_encoder(case):
    value, expected = case
    tc = decode_tc_string(value)
    assert tc.to_dict() == expected
    assert list(tc.to_dict()) == list(expected)  # exactly these keys, in this order


@needs_iab_tcf
@settings(max_examples=40)
@given(tc_cases())
def test_random_strings_match_iab_tcf(case):
    value, _ = case
    assert_matches_iab_tcf(value, decode_tc_string(value))


@pytest.mark.slow
@needs_iab_tcf
@settings(max_examples=1000)
@given(tc_cases())
def test_many_random_strings_round_trip_and_match_iab_tcf(case):
    value, expected = case
    tc = decode_tc_string(value)
    assert tc.to_dict() == expected
    assert_matches_iab_tcf(value, tc)


def test_results_are_cached_and_immutable():
    value = "COtybn4PA_zT4KjACBENAPCIAEBAAECAAIAAAAAAAAAA"
    first = decode_tc_string(value)
    assert decode_tc_string(value) is first
    with pytest.raises(AttributeError):
        first.cmp_id = 1  # type: ignore[misc]
    assert isinstance(first.vendor_consents, frozenset)


# --- legal-basis rules and ledger signals -------------------------------------------------------


def restricted_string(policy: int = 4) -> TCString:
    vendors = {10, 20, 30, 40}
    return decode_tc_string(
        b64url(
            core_bits(
                policy=policy,
                purposes=range(1, 12),
                purposes_li={2, 7, 8, 9, 10, 11} | (set() if policy >= 4 else {3, 4}),
                vendor_consents=vendor_section(vendors),
                vendor_li=vendor_section(vendors, use_range=True),
                restrictions=restriction_section(
                    [
                        (2, 0, [(10, 10)]),  # vendor 10 may not use purpose 2 at all
                        (7, 1, [(20, 20)]),  # vendor 20 must use consent for purpose 7
                        (8, 2, [(30, 30)]),  # vendor 30 must use legitimate interest for 8
                    ]
                ),
            )
        )
    )


def test_type_0_restriction_denies_the_purpose_on_every_basis():
    tc = restricted_string()
    assert not tc.vendor_allowed_for_purpose(10, 2, "consent")
    assert not tc.vendor_allowed_for_purpose(10, 2, "legitimate_interest")
    assert tc.vendor_allowed_for_purpose(10, 7, "consent")
    assert tc.vendor_allowed_for_purpose(20, 2, "consent")  # the restriction names vendor 10 only


def test_type_1_require_consent_makes_legitimate_interest_fail():
    tc = restricted_string()
    assert tc.vendor_allowed_for_purpose(20, 7, "consent")
    assert not tc.vendor_allowed_for_purpose(20, 7, "legitimate_interest")
    assert tc.vendor_allowed_for_purpose(40, 7, "legitimate_interest")  # unrestricted vendor


def test_type_2_require_legitimate_interest_makes_consent_fail():
    tc = restricted_string()
    assert not tc.vendor_allowed_for_purpose(30, 8, "consent")
    assert tc.vendor_allowed_for_purpose(30, 8, "legitimate_interest")
    assert tc.vendor_allowed_for_purpose(40, 8, "consent")


def test_consent_needs_both_purpose_and_vendor_bits():
    tc = restricted_string()
    assert not tc.vendor_allowed_for_purpose(50, 1, "consent")  # no vendor consent
    assert not tc.vendor_allowed_for_purpose(40, 12, "consent")  # no purpose consent
    assert tc.vendor_allowed_for_purpose(40, 11, "consent")


def test_legitimate_interest_is_never_valid_for_purpose_1_nor_3_to_6_from_policy_4():
    old = restricted_string(policy=2)
    assert old.vendor_allowed_for_purpose(40, 3, "legitimate_interest")
    assert not old.vendor_allowed_for_purpose(40, 1, "legitimate_interest")
    tc = restricted_string(policy=4)
    assert not any(tc.vendor_allowed_for_purpose(40, n, "legitimate_interest") for n in (3, 4, 5))
    assert tc.vendor_allowed_for_purpose(40, 2, "legitimate_interest")


def test_li_rule_holds_even_for_a_model_built_without_the_decoder():
    # decode_tc_string rejects such bits for policy >= 4; the rule must not rely on that
    tc = replace(restricted_string(policy=4), purposes_li_transparency=frozenset(range(1, 12)))
    assert [
        n for n in range(1, 12) if tc.vendor_allowed_for_purpose(40, n, "legitimate_interest")
    ] == [
        2,
        7,
        8,
        9,
        10,
        11,
    ]
    values = dict(ledger_signals(tc, []))
    assert [n for n in range(1, 12) if values[f"tcf:li:{n}"]] == [2, 7, 8, 9, 10, 11]
    assert dict(ledger_signals(replace(tc, tcf_policy_version=3), []))["tcf:li:4"]


def test_unknown_basis_is_an_error():
    with pytest.raises(TCFError) as info:
        restricted_string().vendor_allowed_for_purpose(40, 2, "contract")  # type: ignore[arg-type]
    assert info.value.field == "basis"


def test_ledger_signals_names_and_values():
    tc = restricted_string(policy=2)
    signals = ledger_signals(tc, [20, 99, 20])
    names = [name for name, _ in signals]
    assert names[:11] == [f"tcf:purpose:{n}" for n in range(1, 12)]
    assert names[11:22] == [f"tcf:li:{n}" for n in range(1, 12)]
    assert names[22:] == (
        ["tcf:vendor:20", "tcf:vendor_li:20"]
        + [f"tcf:vendor:20:purpose:{n}" for n in range(1, 12)]
        + ["tcf:vendor:99", "tcf:vendor_li:99"]
        + [f"tcf:vendor:99:purpose:{n}" for n in range(1, 12)]
    )
    values = dict(signals)
    assert all(values[f"tcf:purpose:{n}"] for n in range(1, 12))
    assert [n for n in range(1, 12) if values[f"tcf:li:{n}"]] == [2, 3, 4, 7, 8, 9, 10, 11]
    assert values["tcf:vendor:20"] and values["tcf:vendor_li:20"]
    assert not values["tcf:vendor:99"] and not values["tcf:vendor_li:99"]
    assert all(values[f"tcf:vendor:20:purpose:{n}"] for n in range(1, 12))
    assert not any(values[f"tcf:vendor:99:purpose:{n}"] for n in range(1, 12))
    restricted = dict(ledger_signals(restricted_string(), [10, 30]))
    assert not restricted["tcf:vendor:10:purpose:2"] and restricted["tcf:vendor:10:purpose:3"]
    assert not restricted["tcf:vendor:30:purpose:8"]


def test_ledger_li_signals_are_false_for_purpose_1_even_when_the_bit_is_set():
    tc = decode_tc_string(b64url(core_bits(policy=2, purposes_li={1, 2})))
    values = dict(ledger_signals(tc, []))
    assert tc.purpose_li(1) and not values["tcf:li:1"] and values["tcf:li:2"]


# --- validation errors --------------------------------------------------------------------------

VALID = "COtybn4PA_zT4KjACBENAPCIAEBAAECAAIAAAAAAAAAA"


def test_empty_string():
    assert decode_error("").field == "tc_string"


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        (VALID + "==", "padding"),
        (VALID.replace("_", "/"), "base64url"),
        (VALID.replace("-", "+") + "+", "base64url"),
        (" " + VALID, "whitespace"),
        (VALID + "%3D", "URL encoding"),
    ],
)
def test_characters_outside_base64url(value, hint):
    err = decode_error(value)
    assert err.field == "tc_string" and hint in err.fix
    assert len(str(err.value)) < 50  # a prefix of the string, never the whole thing


def test_oversized_input():
    err = decode_error("C" * (MAX_TC_STRING_CHARS + 1))
    assert err.field == "tc_string" and len(err.value) < 50


def test_not_a_string():
    assert decode_error(None).field == "tc_string"


def test_empty_segment():
    assert decode_error(VALID + "..QAagAQAgAIAwgA").field == "tc_string"


def test_version_1_string_is_rejected():
    # a TCF v1.1 string from iabtcf-es ReportedIssues.test.ts ("156 it should auto detect 1 version")
    err = decode_error(
        "BOhwdphOxFC7tAHABBFRC--AAAAuhr_7__7-_9_-_f__9uj3Or_v_f__32ccL59v_h_7v-_7fi_20nV4u_1vft9yfk1"
        "-5ctDztp507iakivXmqdeb9v_nz3_5pxP78k89r7337Ew_v8_v-b7BCON_YxEiA"
    )
    assert (err.field, err.value) == ("core.version", 1)
    assert "only TCF v2" in err.message


def test_version_3_is_rejected():
    err = decode_error(b64url(core_bits(version=3)))
    assert (err.field, err.value) == ("core.version", 3)


def test_truncated_core_header_names_the_field_and_offset():
    err = decode_error(VALID[:21])  # 126 bits: cut inside VendorListVersion (bits 120..131)
    assert err.field == "core.vendor_list_version"
    assert "bit offset 120" in err.message and "only 126 bits" in err.message


def test_truncated_vendor_bitfield():
    # iabtcf-es ReportedIssues.test.ts "142 it should throw an error if the bitfield length does
    # not match the maxId"
    err = decode_error(
        "CLSYjTaOngnCIAOABBENAXCMAGOAABBAAA7IA5n-m7fP6_3fbqVv6E__PoA5Aqff3aJx8tv_1967rfnQEQoAIAAQCr"
        "wkAEABAcACABIMACAAuApEVABABUSABgBCAVSAtIoACACIArYQAHACgAFgAVwBJgDcAI7AWgMAAgBiKgAgBMgFfKQ"
        "AQBRkQAQA4AFiBAAoA-AEVAJlAVgAtYcACAJcAr4eABAK8OgBgFzAOmAqwgABAWyA.IFukWSQh"
    )
    # the DisclosedVendors segment "IFukWSQh" declares MaxVendorId 733 but carries 48 bits
    assert err.field == "disclosed_vendors" and "MaxVendorId=733" in err.message


def test_truncated_vendor_section_and_range_entry():
    cut_bitfield = core_bits(vendor_consents=vendor_section({5, 300}))[:-60]
    err = decode_error(b64url(cut_bitfield))
    assert err.field == "core.vendor_consents" and "BitField" in err.message
    no_end = core_bits(vendor_li=bits(50, 16) + "1" + bits(1, 12) + "1" + bits(4, 16))
    err = decode_error(b64url(no_end))
    assert err.field == "core.vendor_legitimate_interests"
    assert "RangeEntry 1 EndVendorId" in err.message


def test_truncated_optional_segments():
    err = decode_error(VALID + "." + b64url(bits(3, 3) + "1" * 30))
    assert err.field == "publisher_tc.purposes_li_transparency"
    err = decode_error(VALID + "." + b64url(bits(1, 3) + bits(900, 16) + "0" + "1" * 40))
    assert err.field == "disclosed_vendors" and "publisher_tc" not in err.message


@pytest.mark.parametrize("kind", [0, 4, 7])
def test_unknown_optional_segment_type(kind):
    err = decode_error(VALID + "." + b64url(bits(kind, 3) + vendor_section({1})))
    assert (err.field, err.value) == ("segment_type", kind)


def test_duplicated_optional_segment():
    pub = publisher_tc_segment({1})
    err = decode_error(VALID + "." + pub + "." + pub)
    assert (err.field, err.value) == ("segment_type", 3)


@pytest.mark.parametrize(
    ("spans", "max_id", "words"),
    [
        ([(9, 4)], 20, "ends before it starts"),
        ([(0, 3)], 20, "vendor id 0"),
        ([(5, 21)], 20, "above"),
    ],
)
def test_invalid_range_entries(spans, max_id, words):
    section = bits(max_id, 16) + "1" + range_entries(spans)
    err = decode_error(b64url(core_bits(vendor_consents=section)))
    assert err.field == "core.vendor_consents" and words in err.message
    assert err.value == spans[0]


def test_invalid_range_entry_in_a_restriction():
    err = decode_error(b64url(core_bits(restrictions=restriction_section([(2, 0, [(7, 3)])]))))
    assert err.field == "core.publisher_restrictions" and "ends before it starts" in err.message


def test_restriction_type_3_is_undefined():
    err = decode_error(b64url(core_bits(restrictions=restriction_section([(2, 3, [(7, 7)])]))))
    assert (err.field, err.value) == ("core.publisher_restrictions.restriction_type", 3)


@pytest.mark.parametrize("purpose", [0, 25, 63])
def test_restriction_purpose_out_of_range(purpose):
    entries = [(purpose, 0, [(7, 7)])]
    err = decode_error(b64url(core_bits(restrictions=restriction_section(entries))))
    assert (err.field, err.value) == ("core.publisher_restrictions.purpose_id", purpose)


def test_policy_4_rejects_legitimate_interest_for_purposes_3_to_6():
    err = decode_error(b64url(core_bits(policy=4, purposes_li={2, 3, 6})))
    assert (err.field, err.value) == ("core.purposes_li_transparency", [3, 6])
    assert "purposes 3-6" in err.message
    # the same bits were legal before TCF 2.2
    assert decode_tc_string(b64url(core_bits(policy=2, purposes_li={2, 3, 6}))).purpose_li(3)


def test_letters_out_of_range():
    bad = core_bits()
    at = 6 + 36 + 36 + 12 + 12 + 6  # ConsentLanguage
    bad = bad[:at] + bits(30, 6) + bad[at + 6 :]
    assert decode_error(b64url(bad)).field == "core.consent_language"
