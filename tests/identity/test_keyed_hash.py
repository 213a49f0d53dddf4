"""Keyed salted hashing: HKDF derivation, rotation, vectorised HMAC tokens, exact intersection, and
the weakness it does not hide: a key holder's dictionary attack."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cdp_federated.errors import ConfigError, IdentifierError, ProtocolError
from cdp_federated.identity.keyed_hash import (
    HKDF_INFO_PREFIX,
    TOKEN_BYTES,
    DerivedKey,
    KeyedTokens,
    derive_key,
    hmac_token,
    hmac_tokens,
    intersect_tokens,
    keyed_tokens,
    new_federation_secret,
)
from cdp_federated.identity.normalize import normalize_ids

SECRET = bytes(range(32))
DOCS = Path(__file__).resolve().parents[2] / "docs" / "identity.md"


def rfc5869_hkdf_sha256(ikm: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF written out from RFC 5869 with the standard library (no salt: HashLen zero bytes)."""
    prk = hmac.new(b"\x00" * 32, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


# --- key derivation --------------------------------------------------------------------------


def test_derivation_is_hkdf_sha256_bound_to_the_job():
    key = derive_key(SECRET, "job-42")
    expected = rfc5869_hkdf_sha256(SECRET, b"cdp-fl salted-hash v1|job-42")
    assert key.key == expected
    assert key.key_id == hashlib.sha256(expected).digest()[:8].hex()
    assert len(key.key_id) == 16


def test_derivation_is_deterministic_and_separated_per_job():
    assert derive_key(SECRET, "job-1") == derive_key(bytearray(SECRET), "job-1")
    one, two = derive_key(SECRET, "job-1"), derive_key(SECRET, "job-2")
    assert one.key != two.key and one.key_id != two.key_id
    values = pl.Series(["a@example.com", "b@example.com"])
    assert not np.array_equal(hmac_tokens(values, one), hmac_tokens(values, two))


def test_the_key_never_appears_in_repr():
    key = derive_key(SECRET, "job-1")
    assert key.key.hex() not in repr(key) and str(key.key) not in repr(key)
    assert key.key_id in repr(key)


def test_federation_secrets_come_from_the_os_csprng():
    a, b = new_federation_secret(), new_federation_secret()
    assert len(a) == len(b) == 32 and a != b


@pytest.mark.parametrize("secret", [b"", b"short", "a string secret of 32 characters!"])
def test_weak_or_mistyped_secrets_are_refused(secret):
    with pytest.raises(ConfigError, match="federation secret"):
        derive_key(secret, "job-1")  # type: ignore[arg-type]


def test_a_job_id_is_required():
    with pytest.raises(ConfigError, match="job id"):
        derive_key(SECRET, "")
    with pytest.raises(ConfigError):
        DerivedKey(key=b"too short", key_id="x")


# --- rotation --------------------------------------------------------------------------------


def test_rotation_gives_a_new_key_id_and_new_tokens_that_refuse_to_mix():
    values = pl.Series([f"user{i}@example.com" for i in range(500)])
    old = derive_key(SECRET, "job-1")
    new = derive_key(new_federation_secret(), "job-1")
    assert old.key_id != new.key_id
    old_tokens, new_tokens = keyed_tokens(values, old), keyed_tokens(values, new)
    assert old_tokens.key_id == old.key_id and new_tokens.key_id == new.key_id
    # Every row's token changes, so an old token reveals nothing about a new one.
    assert not (old_tokens.tokens == new_tokens.tokens).all(axis=1).any()
    with pytest.raises(ProtocolError, match="different keys") as info:
        intersect_tokens(old_tokens, new_tokens)
    assert info.value.field == "key_id"
    # Same key on both sides: every row matches itself.
    li, ri = intersect_tokens(new_tokens, keyed_tokens(values, new))
    assert li.tolist() == ri.tolist() == list(range(500))


# --- vectorised tokens -----------------------------------------------------------------------


def test_tokens_equal_the_standard_library_hmac_row_by_row():
    key = derive_key(SECRET, "job-1")
    values = [
        "a@example.com",
        "",
        "jöhn.smïth@exämple.de",
        "+16505551212",
        "x" * 200,
        "漢字@例え.jp",
    ]
    tokens = hmac_tokens(pl.Series(values), key)
    assert tokens.shape == (len(values), TOKEN_BYTES) and tokens.dtype == np.uint8
    for row, value in zip(tokens, values, strict=True):
        assert row.tobytes() == hmac_token(value, key)
        assert (
            row.tobytes()
            == hmac.new(key.key.hex().encode(), value.encode(), hashlib.sha256).digest()
        )


def test_tokens_keep_row_order_across_chunks_and_parallel_parts():
    key = derive_key(SECRET, "job-1")
    chunks = [pl.Series([f"p{c}-{i}@example.com" for i in range(70_000)]) for c in range(3)]
    values = pl.concat(chunks, rechunk=False)
    assert values.n_chunks() == 3
    tokens = hmac_tokens(values, key)
    for i in (0, 69_999, 70_000, 139_999, 140_000, 209_999, 123_456):
        assert tokens[i].tobytes() == hmac_token(values[i], key)
    assert np.unique(tokens, axis=0).shape[0] == len(values)


def test_empty_input_gives_an_empty_token_array():
    tokens = hmac_tokens(pl.Series([], dtype=pl.String), derive_key(SECRET, "j"))
    assert tokens.shape == (0, TOKEN_BYTES) and tokens.dtype == np.uint8


def test_nulls_and_non_strings_are_refused():
    key = derive_key(SECRET, "j")
    with pytest.raises(IdentifierError, match="missing or invalid"):
        hmac_tokens(pl.Series(["a@b.co", None]), key)
    with pytest.raises(IdentifierError, match="normalised strings"):
        hmac_tokens(pl.Series([1, 2]), key)


# --- intersection ----------------------------------------------------------------------------


def test_intersection_is_exact_even_when_the_first_eight_bytes_collide():
    base = np.arange(5 * TOKEN_BYTES, dtype=np.uint8).reshape(5, TOKEN_BYTES)
    twin = base[2].copy()
    twin[-1] ^= 0xFF  # same first 8 bytes as row 2, different token
    right = np.stack([base[4], twin, base[2], base[2]])
    li, ri = intersect_tokens(KeyedTokens("k", base), KeyedTokens("k", right))
    assert list(zip(li.tolist(), ri.tolist(), strict=True)) == [(2, 2), (2, 3), (4, 0)]


def test_intersection_refuses_malformed_token_arrays():
    good = KeyedTokens("k", np.zeros((2, TOKEN_BYTES), np.uint8))
    for bad in (np.zeros((2, 16), np.uint8), np.zeros((2, TOKEN_BYTES), np.int32), np.zeros(32)):
        with pytest.raises(ProtocolError, match="uint8"):
            intersect_tokens(good, KeyedTokens("k", bad))


# --- the weakness: a key holder can run a dictionary attack -----------------------------------

FIRST = ["james", "mary", "john", "patricia", "robert", "jennifer", "michael", "linda", "david",
         "elizabeth", "chloe", "noah", "amelie", "lukas", "sofia", "mateo", "yuki", "wei", "aarav",
         "fatima"]  # fmt: skip
LAST = ["smith", "johnson", "brown", "garcia", "miller", "davis", "martinez", "wilson", "taylor",
        "dubois", "muller", "rossi", "tanaka", "wang", "singh", "khan", "silva", "novak"]  # fmt: skip
DOMAINS = ["gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com", "web.de",
           "orange.fr", "example.org"]  # fmt: skip


def realistic_emails(rng: np.random.Generator, n: int) -> list[str]:
    """Distinct first/last-name emails with the usual separators, digits and providers."""
    out: dict[str, None] = {}
    while len(out) < n:
        first, last = rng.choice(FIRST), rng.choice(LAST)
        sep = rng.choice(["", ".", "_"])
        digits = str(rng.integers(1, 2000)) if rng.random() < 0.7 else ""
        style = rng.integers(0, 3)
        local = [f"{first}{sep}{last}", f"{first[0]}{sep}{last}", f"{last}{sep}{first}"][style]
        out[f"{local}{digits}@{rng.choice(DOMAINS)}"] = None
    return list(out)


def messy(email: str, rng: np.random.Generator) -> str:
    """How the same address arrives in a CRM export: case, padding, gmail dots and +tags."""
    local, domain = email.split("@")
    if domain == "gmail.com" and rng.random() < 0.5:
        local = ".".join(local) if rng.random() < 0.2 else local + "+newsletter"
    text = f"{local}@{domain}"
    text = [text, text.upper(), text.title()][rng.integers(0, 3)]
    return f"  {text} " if rng.random() < 0.3 else text


def test_a_partner_holding_the_key_recovers_the_emails_by_dictionary_attack():
    rng = np.random.default_rng(20260917)
    victims = realistic_emails(rng, 2000)
    key = derive_key(new_federation_secret(), "job-attack")
    victim_ids = normalize_ids(
        pl.Series([messy(e, rng) for e in victims]), kind="email", scheme="uid2"
    )
    assert victim_ids.invalid == 0
    observed = KeyedTokens(key.key_id, hmac_tokens(victim_ids.values, key))  # what travels

    # The attacker enumerates plausible addresses (a superset of the victims', written cleanly,
    # plus decoys), normalises them the same public way and tokenises them with the key it holds.
    dictionary = list(dict.fromkeys(realistic_emails(np.random.default_rng(1), 6000) + victims))
    rng.shuffle(dictionary)
    guesses = normalize_ids(pl.Series(dictionary), kind="email", scheme="uid2").values
    attack = KeyedTokens(key.key_id, hmac_tokens(guesses, key))
    observed_rows, guess_rows = intersect_tokens(observed, attack)

    recovered = dict(zip(observed_rows.tolist(), guesses.gather(guess_rows).to_list(), strict=True))
    truth = victim_ids.values.to_list()
    correct = sum(recovered.get(i) == truth[i] for i in range(len(truth)))
    assert correct / len(truth) >= 0.99  # in fact every single one
    assert correct == len(truth)

    # The same dictionary without the key (a guessed secret) recovers nothing.
    wrong = derive_key(new_federation_secret(), "job-attack")
    blind = KeyedTokens(key.key_id, hmac_tokens(guesses, wrong))
    assert len(intersect_tokens(observed, blind)[0]) == 0


def test_docs_state_the_construction_and_the_weakness():
    text = DOCS.read_text()
    assert "## Keyed salted hashing" in text
    assert HKDF_INFO_PREFIX.decode() in text
    assert "dictionary attack" in text
