"""The product's small TC string encoder round-trips through our decoder and the iab-tcf package."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_federated.consent.tcf import decode_tc_string
from cdp_federated.consent.tcf_encode import encode_tc_string

ids = st.sets(st.integers(1, 24), max_size=24)


@settings(max_examples=60)
@given(
    purposes=st.sets(st.integers(1, 24)),
    li=st.sets(st.sampled_from([2, 7, 8, 9, 10, 11])),
    vendors=st.sets(st.integers(1, 3000), max_size=40),
    vendor_li=st.sets(st.integers(1, 3000), max_size=10),
    day=st.integers(0, 3000),
)
def test_round_trip(purposes, li, vendors, vendor_li, day):
    created = datetime.fromtimestamp(1_600_000_000 + day * 86_400, UTC)
    text = encode_tc_string(
        created=created,
        purposes_consent=purposes,
        purposes_li=li,
        vendor_consents=vendors,
        vendor_li=vendor_li,
        publisher_cc="FR",
    )
    tc = decode_tc_string(text)
    assert tc.created == created and tc.last_updated == created
    assert tc.purposes_consent == purposes and tc.purposes_li_transparency == li
    assert tc.vendor_consents == vendors and tc.vendor_legitimate_interests == vendor_li
    assert (tc.publisher_cc, tc.tcf_policy_version, tc.version) == ("FR", 4, 2)
    iab_tcf = pytest.importorskip("iab_tcf")
    other = iab_tcf.decode_v2(text)
    assert {p for p, v in other.purposes_consent.items() if v} == purposes
    assert {v for v, ok in other.consented_vendors.items() if ok} == vendors


def test_out_of_range_values_are_refused():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError):
        encode_tc_string(created=now, purposes_consent={25})
    with pytest.raises(ValueError):
        encode_tc_string(created=now, cmp_id=5000)
    with pytest.raises(ValueError):
        encode_tc_string(created=datetime(2026, 1, 1))
