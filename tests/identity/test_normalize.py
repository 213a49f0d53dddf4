"""Identifier normalisation: the vendors' published examples, provider rules, invalid inputs,
phones, opaque ids, and the vectorised API agreeing with the scalar one."""

from __future__ import annotations

import logging

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdp_federated.errors import ConfigError, IdentifierError
from cdp_federated.identity import normalize as norm
from cdp_federated.identity.normalize import (
    SCHEMES,
    hash_normalized,
    normalize_ids,
    normalize_one,
)

UID2_DOC = "https://unifiedid.com/docs/getting-started/gs-normalization-encoding"
GOOGLE_QUICKSTART = (
    "https://developers.google.com/data-manager/api/devguides/audiences/send-audience-members"
)
GOOGLE_FORMATTING = "https://developers.google.com/data-manager/api/devguides/concepts/formatting"
META_DOC = (
    "https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/"
    "customer-information-parameters"
)


def one_by_series(value, **kwargs):
    return normalize_ids(pl.Series([value]), **kwargs).values[0]


# --- published worked examples: (input, normalised, hash) -------------------------------------

# UID2 "Normalization and Encoding", tables "Email Address Hash Encoding" and
# "Normalization Examples for Email": https://unifiedid.com/docs/getting-started/gs-normalization-encoding
# (source: IABTechLab/uid2docs docs/getting-started/gs-normalization-encoding.md)
UID2_EMAILS = [
    ("user@example.com", "user@example.com",
     "b4c9a289323b21a01c3e940f150eb9b8c542587f1abfd8f0e1cc1ffc5e475514",
     "tMmiiTI7IaAcPpQPFQ65uMVCWH8av9jw4cwf/F5HVRQ="),
    ("MyEmail@example.com", "myemail@example.com",
     "16c18d336f0b250f0e2d907452ceb9658a74ecdae8bc94864c23122a72cc27a5",
     "FsGNM28LJQ8OLZB0Us65ZYp07NrovJSGTCMSKnLMJ6U="),
    ("MYEMAIL@example.com", "myemail@example.com",
     "16c18d336f0b250f0e2d907452ceb9658a74ecdae8bc94864c23122a72cc27a5",
     "FsGNM28LJQ8OLZB0Us65ZYp07NrovJSGTCMSKnLMJ6U="),
    ("My.Email@example.com", "my.email@example.com",
     "e22b53bc6f871274f3a62ab37a3caed7214fc14d676215a96a242fcfada1c81f",
     "4itTvG+HEnTzpiqzejyu1yFPwU1nYhWpaiQvz62hyB8="),
    ("JANESAOIRSE@example.com", "janesaoirse@example.com",
     "d6670e7a92007f1b5ff785f1fc81e53aa6d3d7bd06bdf5c473cdc7286c284b6d",
     "1mcOepIAfxtf94Xx/IHlOqbT170GvfXEc83HKGwoS20="),
    ("JaneSaoirse@example.com", "janesaoirse@example.com",
     "d6670e7a92007f1b5ff785f1fc81e53aa6d3d7bd06bdf5c473cdc7286c284b6d",
     "1mcOepIAfxtf94Xx/IHlOqbT170GvfXEc83HKGwoS20="),
    ("jane.saoirse@example.com", "jane.saoirse@example.com",
     "b196432c7b989a2ca91c83799957c515da53e6c13abf20b78fea94f117e90bf8",
     "sZZDLHuYmiypHIN5mVfFFdpT5sE6vyC3j+qU8RfpC/g="),
    ("Jane.Saoirse@example.com", "jane.saoirse@example.com",
     "b196432c7b989a2ca91c83799957c515da53e6c13abf20b78fea94f117e90bf8",
     "sZZDLHuYmiypHIN5mVfFFdpT5sE6vyC3j+qU8RfpC/g="),
    ("JaneSaoirse+Work@example.com", "janesaoirse+work@example.com",
     "28aaee4815230cd3b4ebd88c515226550666e91ac019929e3adac3f66c288180",
     "KKruSBUjDNO069iMUVImVQZm6RrAGZKeOtrD9mwogYA="),
    ("JANE.SAOIRSE@gmail.com", "janesaoirse@gmail.com",
     "92ee26057ed9dea2535d6c8b141d48373932476599196e00352254896db5888f",
     "ku4mBX7Z3qJTXWyLFB1INzkyR2WZGW4ANSJUiW21iI8="),
    ("Jane.Saoirse@gmail.com", "janesaoirse@gmail.com",
     "92ee26057ed9dea2535d6c8b141d48373932476599196e00352254896db5888f",
     "ku4mBX7Z3qJTXWyLFB1INzkyR2WZGW4ANSJUiW21iI8="),
    ("JaneSaoirse+Work@gmail.com", "janesaoirse@gmail.com",
     "92ee26057ed9dea2535d6c8b141d48373932476599196e00352254896db5888f",
     "ku4mBX7Z3qJTXWyLFB1INzkyR2WZGW4ANSJUiW21iI8="),
    # The page's introduction: JANESaoirse@gmail.com normalises to janesaoirse@gmail.com.
    ("JANESaoirse@gmail.com", "janesaoirse@gmail.com",
     "92ee26057ed9dea2535d6c8b141d48373932476599196e00352254896db5888f",
     "ku4mBX7Z3qJTXWyLFB1INzkyR2WZGW4ANSJUiW21iI8="),
]  # fmt: skip

# Google Data Manager API quickstart "Send audience members" (sample data, formatted, then
# hashed as hex): https://developers.google.com/data-manager/api/devguides/audiences/send-audience-members
# The formatting guide's own example (cloudy.sanfrancisco+shopping@gmail.com ->
# cloudysanfrancisco@gmail.com) lands on the quickstart's hash for the same mailbox:
# https://developers.google.com/data-manager/api/devguides/concepts/formatting
GOOGLE_EMAILS = [
    ("dana@example.com", "dana@example.com",
     "07e2f1394b0ea80e2adca010ea8318df697001a005ba7452720edda4b0ce57b3"),
    ("DanaM@example.com", "danam@example.com",
     "1df6b43bc68dd38eca94e6a65b4f466ae537b796c81a526918b40ac4a7b906c7"),
    ("ALEXF@example.com", "alexf@example.com",
     "19de0a9906ebee29fe82087be5ec44f3c01e40730bc808b663c71f19dd6b12f2"),
    ("AlexF@cymbalgroup.com", "alexf@cymbalgroup.com",
     "7d2d80e240594dcee2e57f57885ee286c4b232dd142234d7a0af6d31cc86679b"),
    ("alexF@altostrat.com", "alexf@altostrat.com",
     "063c45291827d4994f98357b72862b25885834fd53cf8f0e4af359916fc03c62"),
    ("quinn@CYMBALGROUP.com", "quinn@cymbalgroup.com",
     "05bb62526f091b45d20e243d194766cca8869137421047dc53fa4876d111a6f0"),
    ("baklavainthebalkans@gmail.com", "baklavainthebalkans@gmail.com",
     "f1fcde379f31f4d446b76ee8f34860eca2288adc6b6d6c0fdc56d9eee75a2fa5"),
    ("rosario@example.org", "rosario@example.org",
     "83a834cc5327bc4dee7c5408988040dc5813c7662611cd93b707aff72bf7d33f"),
    ("cloudySanFrancisco@GMAIL.com", "cloudysanfrancisco@gmail.com",
     "223ebda6f6889b1494551ba902d9d381daf2f642bae055888e96343d53e9f9c4"),
    ("cloudy.sanfrancisco+shopping@gmail.com", "cloudysanfrancisco@gmail.com",
     "223ebda6f6889b1494551ba902d9d381daf2f642bae055888e96343d53e9f9c4"),
]  # fmt: skip
GOOGLE_PHONES = [
    ("+1-800-555-0100", "+18005550100",
     "fb4f73a6ec5fdb7077d564cdd22c3554b43ce49168550c3b12c547b78c517b30"),
    ("+1 800-555-0101", "+18005550101",
     "61d6c2976b5d92b1ad63073a12fddd26040cd980067d03a93dd1cc50f1a3ac68"),
    ("+1 800-555-0102", "+18005550102",
     "c5383c2eeada28210d27f011bc127d4f9562cf38ff0c9bba33dd45ae79b9fe7c"),
    ("+1-800-555-0110", "+18005550110",
     "525c2390a4e2a9766fa8ddc341dd10414603baebefa401f5a5e29f55e176525d"),
]  # fmt: skip

# Meta Conversions API "Customer Information Parameters", rows em and ph:
# https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/customer-information-parameters
META_EXAMPLES = [
    ("email", "John_Smith@gmail.com", None, "john_smith@gmail.com",
     "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"),
    ("phone", "(650)555-1212", "US", "16505551212",
     "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "normalized", "sha_hex", "sha_b64"), UID2_EMAILS)
def test_uid2_published_email_examples(raw, normalized, sha_hex, sha_b64):
    # Source: https://unifiedid.com/docs/getting-started/gs-normalization-encoding
    assert normalize_one(raw, kind="email", scheme="uid2") == normalized
    assert one_by_series(raw, kind="email", scheme="uid2") == normalized
    assert hash_normalized(normalized, "uid2") == {
        "normalized": normalized,
        "sha256_hex": sha_hex,
        "sha256_b64": sha_b64,
    }


def test_uid2_published_gmail_rule_examples():
    # Source: https://unifiedid.com/docs/getting-started/gs-normalization-encoding (steps 3.1, 3.2)
    assert normalize_one("jane.doe@gmail.com", kind="email", scheme="uid2") == "janedoe@gmail.com"
    assert (
        normalize_one("janedoe+home@gmail.com", kind="email", scheme="uid2") == "janedoe@gmail.com"
    )


@pytest.mark.parametrize(
    ("raw", "region", "normalized", "sha_hex", "sha_b64"),
    [
        # Source: https://unifiedid.com/docs/getting-started/gs-normalization-encoding
        # ("Phone Number Hash Encoding"; the raw form is the page's US example).
        ("1 (234) 567-8901", "US", "+12345678901",
         "10e6f0b47054a83359477dcb35231db6de5c69fb1816e1a6b98e192de9e5b9ee",
         "EObwtHBUqDNZR33LNSMdtt5cafsYFuGmuY4ZLenlue4="),
        ("+12345678901", None, "+12345678901",
         "10e6f0b47054a83359477dcb35231db6de5c69fb1816e1a6b98e192de9e5b9ee",
         "EObwtHBUqDNZR33LNSMdtt5cafsYFuGmuY4ZLenlue4="),
    ],
)  # fmt: skip
def test_uid2_published_phone_example(raw, region, normalized, sha_hex, sha_b64):
    got = normalize_one(raw, kind="phone", scheme="uid2", default_region=region)
    assert got == normalized
    assert one_by_series(raw, kind="phone", scheme="uid2", default_region=region) == normalized
    digest = hash_normalized(got, "uid2")
    assert (digest["sha256_hex"], digest["sha256_b64"]) == (sha_hex, sha_b64)


def test_uid2_published_sydney_phone_example():
    # Source: https://unifiedid.com/docs/getting-started/gs-normalization-encoding
    # "(02) 1234 5678 is normalized to ... +61212345678".
    assert normalize_one("(02) 1234 5678", kind="phone", scheme="uid2", default_region="AU") == (
        "+61212345678"
    )


def test_uid2_singapore_example_is_rejected_as_not_a_valid_number():
    # The same page normalises "65 1243 5678" to "+6512345678" (digits that do not match the input);
    # neither is a valid Singapore number for libphonenumber, so both are reported invalid rather
    # than hashed into something no partner will ever match.
    for raw in ("+6512345678", "+65 1243 5678"):
        with pytest.raises(IdentifierError, match="not a valid number"):
            normalize_one(raw, kind="phone", scheme="uid2")


@pytest.mark.parametrize(("raw", "normalized", "sha_hex"), GOOGLE_EMAILS)
def test_google_published_email_examples(raw, normalized, sha_hex):
    # Sources: GOOGLE_QUICKSTART and GOOGLE_FORMATTING (see the table's comment).
    assert normalize_one(raw, kind="email", scheme="google") == normalized
    assert one_by_series(raw, kind="email", scheme="google") == normalized
    assert hash_normalized(normalized, "google")["sha256_hex"] == sha_hex


@pytest.mark.parametrize(("raw", "normalized", "sha_hex"), GOOGLE_PHONES)
def test_google_published_phone_examples(raw, normalized, sha_hex):
    # Source: https://developers.google.com/data-manager/api/devguides/audiences/send-audience-members
    assert normalize_one(raw, kind="phone", scheme="google") == normalized
    assert hash_normalized(normalized, "google")["sha256_hex"] == sha_hex


def test_google_formatting_guide_examples():
    # Source: https://developers.google.com/data-manager/api/devguides/concepts/formatting
    assert normalize_one("user.name+NYC@Example.com", kind="email", scheme="google") == (
        "user.name+nyc@example.com"
    )
    assert normalize_one("(800)555-0100", kind="phone", scheme="google", default_region="US") == (
        "+18005550100"
    )


@pytest.mark.parametrize(("kind", "raw", "region", "normalized", "sha_hex"), META_EXAMPLES)
def test_meta_published_examples(kind, raw, region, normalized, sha_hex):
    # Source: https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/customer-information-parameters
    assert normalize_one(raw, kind=kind, scheme="meta", default_region=region) == normalized
    assert one_by_series(raw, kind=kind, scheme="meta", default_region=region) == normalized
    assert hash_normalized(normalized, "meta")["sha256_hex"] == sha_hex


# --- provider rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "uid2", "google", "meta"),
    [
        ("Jane.Doe+Work@gmail.com", "janedoe@gmail.com", "janedoe@gmail.com",
         "jane.doe+work@gmail.com"),
        ("Jane.Doe+Work@googlemail.com", "jane.doe+work@googlemail.com",
         "janedoe@googlemail.com", "jane.doe+work@googlemail.com"),
        ("Jane.Doe+Work@example.com", "jane.doe+work@example.com",
         "jane.doe+work@example.com", "jane.doe+work@example.com"),
        # Only the exact consumer domains: Workspace domains and look-alikes keep their dots.
        ("jane.doe@mail.gmail.com", "jane.doe@mail.gmail.com", "jane.doe@mail.gmail.com",
         "jane.doe@mail.gmail.com"),
        ("jane.doe@notgmail.com", "jane.doe@notgmail.com", "jane.doe@notgmail.com",
         "jane.doe@notgmail.com"),
        ("  j.a.n.e+a+b@GMAIL.COM\t", "jane@gmail.com", "jane@gmail.com", "j.a.n.e+a+b@gmail.com"),
        ("jane+@gmail.com", "jane@gmail.com", "jane@gmail.com", "jane+@gmail.com"),
    ],
)  # fmt: skip
def test_gmail_and_googlemail_rules_per_scheme(raw, uid2, google, meta):
    expected = {"uid2": uid2, "google": google, "meta": meta}
    for scheme in SCHEMES:
        assert normalize_one(raw, kind="email", scheme=scheme) == expected[scheme]
        assert one_by_series(raw, kind="email", scheme=scheme) == expected[scheme]


def test_a_gmail_local_part_reduced_to_nothing_is_invalid_but_meta_keeps_it():
    for raw in ("+promo@gmail.com", "...@gmail.com"):
        for scheme in ("uid2", "google"):
            with pytest.raises(IdentifierError, match="nothing is left"):
                normalize_one(raw, kind="email", scheme=scheme)
            assert one_by_series(raw, kind="email", scheme=scheme) is None
    assert normalize_one("+promo@gmail.com", kind="email", scheme="meta") == "+promo@gmail.com"


# --- invalid inputs --------------------------------------------------------------------------

INVALID_EMAILS = [
    "",
    "   ",
    "no-at-sign.example.com",
    "two@@example.com",
    "a@b@example.com",
    "@example.com",
    "jane@",
    "jane@localhost",
    "jane@.example.com",
    "jane@example.com.",
    "jane@example..com",
    "jane doe@example.com",
    "jane@exa mple.com",
    "jane\x00@example.com",
    "jane\u00a0doe@example.com",
]


@pytest.mark.parametrize("raw", INVALID_EMAILS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_invalid_emails_raise_with_field_value_and_fix(raw, scheme):
    with pytest.raises(IdentifierError) as info:
        normalize_one(raw, kind="email", scheme=scheme)
    assert info.value.field == "email"
    assert info.value.value == raw
    assert info.value.fix


def test_invalid_inputs_are_counted_nulled_and_exampled_in_order():
    raw = pl.Series(
        "email",
        ["ok@example.com", "bad", None, "bad", "x@y", "OK@example.com", "a b@c.de", "1@@2.com",
         "@no.pe", "late@", "also bad"],
    )  # fmt: skip
    result = normalize_ids(raw, kind="email", scheme="uid2")
    assert result.values.to_list() == [
        "ok@example.com", None, None, None, None, "ok@example.com", None, None, None, None, None,
    ]  # fmt: skip
    assert result.values.name == "email" and result.values.dtype == pl.String
    assert (result.invalid, result.missing, result.duplicates, result.valid) == (8, 1, 1, 2)
    # Distinct, in first-seen order, at most five.
    assert result.invalid_examples == ("bad", "x@y", "a b@c.de", "1@@2.com", "@no.pe")


def test_invalid_identifiers_never_match_each_other():
    from cdp_federated.identity.keyed_hash import (
        KeyedTokens,
        derive_key,
        hmac_tokens,
        intersect_tokens,
    )

    key = derive_key(b"s" * 32, "job")
    left = normalize_ids(
        pl.Series(["not-an-email", "a@example.com", "  "]), kind="email", scheme="uid2"
    )
    right = normalize_ids(
        pl.Series(["not-an-email", "  ", "b@example.com"]), kind="email", scheme="uid2"
    )
    tokens = [
        KeyedTokens(key.key_id, hmac_tokens(side.values.drop_nulls(), key))
        for side in (left, right)
    ]
    li, ri = intersect_tokens(*tokens)
    assert len(li) == len(ri) == 0
    with pytest.raises(IdentifierError, match="missing or invalid"):
        hmac_tokens(left.values, key)


def test_examples_stay_out_of_repr_and_info_logs(caplog):
    raw = pl.Series(["secret.person@nowhere", "fine@example.com"])
    with caplog.at_level(logging.INFO, logger=norm.__name__):
        result = normalize_ids(raw, kind="email", scheme="google")
    assert "secret.person" not in repr(result)
    assert "1 invalid" in caplog.text and "secret.person" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=norm.__name__):
        normalize_ids(raw, kind="email", scheme="google")
    debug = [r for r in caplog.records if "secret.person" in r.getMessage()]
    assert debug and all(r.levelno == logging.DEBUG for r in debug)


def test_emails_are_normalised_without_a_python_call_per_row(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the scalar path ran inside normalize_ids")

    monkeypatch.setattr(norm, "_email_reason", boom)
    result = normalize_ids(pl.Series(["A@Example.com"] * 1000), kind="email", scheme="uid2")
    assert result.valid == 1000 and result.duplicates == 999


# --- phones ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "region", "uid2", "meta"),
    [
        ("+1 650 555 1212", None, "+16505551212", "16505551212"),
        ("+1 650 555 1212", "GB", "+16505551212", "16505551212"),  # the + wins over the region
        ("(650) 555-1212", "US", "+16505551212", "16505551212"),
        ("650.555.1212", "us", "+16505551212", "16505551212"),
        ("020 7946 0958", "GB", "+442079460958", "442079460958"),  # national trunk prefix 0
        ("0044 20 7946 0958", "GB", "+442079460958", "442079460958"),  # international prefix
        ("+44 (0)20 7946 0958", None, "+442079460958", "442079460958"),
        ("030 123456789", "DE", "+4930123456789", "4930123456789"),
        (" +33 6 12 34 56 78 ", None, "+33612345678", "33612345678"),
    ],
)
def test_phones_with_and_without_default_region(raw, region, uid2, meta):
    assert normalize_one(raw, kind="phone", scheme="uid2", default_region=region) == uid2
    assert normalize_one(raw, kind="phone", scheme="google", default_region=region) == uid2
    assert normalize_one(raw, kind="phone", scheme="meta", default_region=region) == meta
    assert one_by_series(raw, kind="phone", scheme="meta", default_region=region) == meta


@pytest.mark.parametrize(
    ("raw", "region", "reason"),
    [
        ("(650) 555-1212", None, "no country code"),
        ("16505551212", None, "no country code"),
        ("+1 555 0100", None, "not a valid number"),  # too short
        ("+1 123 456 7890", None, "not a valid number"),  # no US area code starts with 1
        ("+44 20 7946", None, "not a valid number"),
        ("call me maybe", "US", "not a"),
        ("", "US", "empty"),
    ],
)
def test_invalid_phones_are_reported(raw, region, reason):
    with pytest.raises(IdentifierError, match=reason) as info:
        normalize_one(raw, kind="phone", scheme="uid2", default_region=region)
    assert info.value.field == "phone" and info.value.value == raw
    assert one_by_series(raw, kind="phone", scheme="uid2", default_region=region) is None


def test_phones_are_parsed_once_per_distinct_value(monkeypatch):
    calls = []
    real_parse = norm.phonenumbers.parse

    def counting_parse(number, region=None, *args, **kwargs):
        calls.append(number)
        return real_parse(number, region, *args, **kwargs)

    monkeypatch.setattr(norm.phonenumbers, "parse", counting_parse)
    raw = pl.Series(["+1 650 555 1212", "+44 20 7946 0958", None, "junk"] * 2500)
    result = normalize_ids(raw, kind="phone", scheme="google")
    assert sorted(calls) == sorted(["+1 650 555 1212", "+44 20 7946 0958", "junk"])
    assert result.values[:4].to_list() == ["+16505551212", "+442079460958", None, None]
    assert (result.invalid, result.missing, result.duplicates) == (2500, 2500, 4998)


def test_unknown_region_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown phone region"):
        normalize_one("650 555 1212", kind="phone", scheme="uid2", default_region="XX")
    with pytest.raises(ConfigError):
        normalize_ids(pl.Series(["x"]), kind="phone", scheme="uid2", default_region="Narnia")


# --- device ids and customer ids -------------------------------------------------------------


def test_device_ids_are_trimmed_and_lowercased_and_the_zero_id_is_invalid():
    raw = pl.Series(
        [" 6D92078A-8246-4BA4-AE5B-76104861E7DC ", "97987bca-ae59-4c7d-94ba-ee4f19ab8c21",
         "00000000-0000-0000-0000-000000000000", "", "has space"],
    )  # fmt: skip
    result = normalize_ids(raw, kind="device_id", scheme="meta")
    assert result.values.to_list() == [
        "6d92078a-8246-4ba4-ae5b-76104861e7dc", "97987bca-ae59-4c7d-94ba-ee4f19ab8c21",
        None, None, None,
    ]  # fmt: skip
    assert result.invalid == 3
    with pytest.raises(IdentifierError, match="limited ad tracking"):
        normalize_one("00000000-0000-0000-0000-000000000000", kind="device_id", scheme="uid2")


def test_customer_ids_keep_their_case_and_integers_are_accepted():
    assert normalize_one("  AB-12 ", kind="customer_id", scheme="uid2") == "AB-12"
    result = normalize_ids(pl.Series([12, None, 12]), kind="customer_id", scheme="uid2")
    assert result.values.to_list() == ["12", None, "12"]
    assert (result.missing, result.duplicates, result.invalid) == (1, 1, 0)
    with pytest.raises(IdentifierError, match="empty"):
        normalize_one("   ", kind="customer_id", scheme="google")


def test_bad_arguments_are_typed_errors():
    with pytest.raises(ConfigError, match="unknown identifier kind"):
        normalize_one("x", kind="ssn", scheme="uid2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown normalisation scheme"):
        normalize_ids(pl.Series(["x"]), kind="email", scheme="tiktok")  # type: ignore[arg-type]
    with pytest.raises(IdentifierError, match="strings"):
        normalize_ids(pl.Series([1.6505551212e10]), kind="phone", scheme="meta")
    with pytest.raises(ConfigError):
        hash_normalized("a@b.co", "nope")  # type: ignore[arg-type]


# --- the Series API agrees with normalize_one ------------------------------------------------

_local_chars = st.sampled_from(list("abcXYZ019._-+ ") + ["é", "Ü", "\t"])
_emails = st.one_of(
    st.builds(
        lambda pad, local, at, domain, pad2: f"{pad}{local}{at}{domain}{pad2}",
        st.sampled_from(["", " ", "\u00a0", "\n"]),
        st.text(_local_chars, max_size=12),
        st.sampled_from(["@", "", "@@"]),
        st.sampled_from(
            ["gmail.com", "GMAIL.COM", "googlemail.com", "example.co.uk", "localhost",
             "a..b", "ex ample.com", ".com", "Ünï.de", "mail.gmail.com"]
        ),
        st.sampled_from(["", " ", "\t"]),
    ),
    st.text(st.sampled_from(list("a@.+ B")), max_size=10),
)  # fmt: skip
_phones = st.one_of(
    st.builds(
        lambda prefix, digits, sep: prefix + sep.join(digits[i : i + 3] for i in range(0, len(digits), 3)),
        st.sampled_from(["+1 ", "+44 ", "0", "", "+33", "00 49 "]),
        st.text(st.sampled_from("0123456789"), min_size=0, max_size=12),
        st.sampled_from(["", " ", "-", "."]),
    ),
    st.text(st.sampled_from("0123456789+()- x"), max_size=14),
)  # fmt: skip
_devices = st.one_of(
    st.uuids().map(str).map(str.upper),
    st.just("00000000-0000-0000-0000-000000000000"),
    st.text(st.sampled_from(list("abCD01- \t")), max_size=8),
)


def _scalar(value, **kwargs):
    if value is None:
        return None
    try:
        return normalize_one(value, **kwargs)
    except IdentifierError:
        return None


@settings(max_examples=30)
@given(
    data=st.data(),
    kind=st.sampled_from(["email", "phone", "device_id", "customer_id"]),
    scheme=st.sampled_from(SCHEMES),
    region=st.sampled_from([None, "US", "GB", "FR"]),
)
def test_series_api_equals_normalize_one(data, kind, scheme, region):
    strategy = {"email": _emails, "phone": _phones, "device_id": _devices, "customer_id": _emails}[
        kind
    ]
    values = data.draw(st.lists(st.one_of(st.none(), strategy), max_size=25))
    series = pl.Series("ids", values, dtype=pl.String)
    result = normalize_ids(series, kind=kind, scheme=scheme, default_region=region)
    expected = [_scalar(v, kind=kind, scheme=scheme, default_region=region) for v in values]
    assert result.values.to_list() == expected
    assert result.missing == sum(v is None for v in values)
    assert result.invalid == sum(
        v is not None and e is None for v, e in zip(values, expected, strict=True)
    )
    present = [e for e in expected if e is not None]
    assert result.duplicates == len(present) - len(set(present))
