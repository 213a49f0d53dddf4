"""Relay envelopes: sealed end to end between participants, opaque and tamper-evident in transit."""

from __future__ import annotations

import dataclasses
import os
import struct

import numpy as np
import pytest

from cdp_federated.errors import CodecError, ConfigError, ProtocolError
from cdp_federated.federation import Codec, FitRes, StatsIns, encode
from cdp_federated.federation.codec import DEFAULT_MAX_ELEMENTS
from cdp_federated.federation.envelope import (
    RELAY_CODEC,
    RelayEnvelope,
    RelayKeyPair,
    open_envelope,
    seal,
)

SESSION = "job-7/secagg/round-3"
SECRET_METRIC = "loss_of_the_secret_segment"
P = 2**255 - 19
SMALL_ORDER = {
    "zero": bytes(32),
    "one": (1).to_bytes(32, "little"),
    "minus_one": (P - 1).to_bytes(32, "little"),
    "order_eight": (
        325606250916557431795983626356110631294008115727848805560023387167927233504
    ).to_bytes(32, "little"),
}


@pytest.fixture(scope="module")
def keys() -> dict[str, RelayKeyPair]:
    return {name: RelayKeyPair.generate() for name in ("alice", "bob", "carol", "mallory")}


@pytest.fixture(scope="module")
def directory(keys) -> dict[str, bytes]:
    """What the coordinator publishes: participant -> relay public key (no mallory)."""
    return {name: keys[name].public_bytes() for name in ("alice", "bob", "carol")}


def fit_res() -> FitRes:
    return FitRes(
        parameters=np.array([0.123456789, -2.5e-3, 31.4159, 7.77e5]),
        num_examples=4321,
        metrics={SECRET_METRIC: 0.6931, "note": "segment-vip-customers"},
    )


def seal_ab(keys, message=None, **overrides) -> RelayEnvelope:
    args = dict(
        sender="alice",
        recipient="bob",
        recipient_public=keys["bob"].public_bytes(),
        sender_keys=keys["alice"],
        session=SESSION,
        seq=0,
    )
    args.update(overrides)
    return seal(message or fit_res(), **args)


def open_at_bob(keys, envelope, **overrides):
    args = dict(
        recipient_keys=keys["bob"],
        sender_public=keys["alice"].public_bytes(),
        expected_sender="alice",
        expected_recipient="bob",
        session=SESSION,
        expect_seq=0,
    )
    args.update(overrides)
    return open_envelope(envelope, **args)


def flip(array: np.ndarray, index: int = 0, bit: int = 0) -> np.ndarray:
    out = array.copy()
    out[index] ^= 1 << bit
    return out


def rejected(field: str, call, *args, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        call(*args, **kwargs)
    assert info.value.field == field, info.value
    return info.value


# --- round trip and opacity -------------------------------------------------------------------


def test_a_fit_res_round_trips_through_the_coordinators_codec(keys):
    sent = fit_res()
    envelope = seal_ab(keys, sent)

    relayed = RELAY_CODEC.decode(
        RELAY_CODEC.encode(envelope)
    )  # what the coordinator stores and forwards
    got = open_at_bob(keys, relayed)

    assert isinstance(relayed, RelayEnvelope)
    assert isinstance(got, FitRes)
    np.testing.assert_array_equal(got.parameters, sent.parameters)
    assert got.num_examples == sent.num_examples
    assert got.metrics == sent.metrics


def test_the_coordinator_sees_routing_only_never_the_inner_message(keys):
    sent = fit_res()
    frame = RELAY_CODEC.encode(seal_ab(keys, sent))

    assert b"alice" in frame and b"bob" in frame and SESSION.encode() in frame
    assert sent.parameters.tobytes() not in frame
    for value in sent.parameters:  # not even one float's 8 bytes
        assert np.float64(value).tobytes() not in frame
    for text in (SECRET_METRIC, "segment-vip-customers", "fit_res", "num_examples", "4321"):
        assert text.encode() not in frame
    assert encode(sent) not in frame


def test_the_envelope_is_registered_with_uint8_arrays(keys):
    envelope = seal_ab(keys)

    assert RelayEnvelope.TYPE == "relay_envelope" and RelayEnvelope.VERSION == 1
    assert set(RelayEnvelope.ARRAYS) == {"ephemeral", "nonce", "ciphertext"}
    assert set(RelayEnvelope.SCALARS) == {"sender", "recipient", "session", "seq"}
    assert envelope.ephemeral.dtype == np.uint8 and envelope.ephemeral.size == 32
    assert envelope.nonce.size == 12
    assert envelope.ciphertext.size == len(encode(fit_res())) + 16


def test_the_relay_codec_carries_envelopes_only(keys):
    with pytest.raises(CodecError):
        RELAY_CODEC.encode(fit_res())
    with pytest.raises(CodecError):
        RELAY_CODEC.decode(encode(fit_res()))


def test_the_largest_message_the_default_codec_allows_still_fits_once_sealed(keys):
    # Just under the default element limit: ~64 MB of float64, i.e. ~64M ciphertext bytes.
    biggest = FitRes(parameters=np.zeros(DEFAULT_MAX_ELEMENTS - 1), num_examples=1)
    inner = encode(biggest)

    frame = RELAY_CODEC.encode(seal_ab(keys, biggest))

    assert len(frame) > len(inner) > DEFAULT_MAX_ELEMENTS
    assert open_at_bob(keys, RELAY_CODEC.decode(frame)).parameters.size == biggest.parameters.size


def test_sealing_twice_gives_fresh_ephemeral_nonce_and_ciphertext(keys):
    first, second = seal_ab(keys), seal_ab(keys)

    assert first.ephemeral.tobytes() != second.ephemeral.tobytes()
    assert first.nonce.tobytes() != second.nonce.tobytes()
    assert first.ciphertext.tobytes() != second.ciphertext.tobytes()
    assert open_at_bob(keys, first).num_examples == open_at_bob(keys, second).num_examples


def test_sequence_numbers_are_accepted_in_order(keys):
    envelopes = [seal_ab(keys, StatsIns(job={"n": n}), seq=n) for n in range(3)]

    got = [open_at_bob(keys, e, expect_seq=n).job["n"] for n, e in enumerate(envelopes)]

    assert got == [0, 1, 2]


def test_the_sender_key_can_come_from_the_published_directory(keys, directory):
    assert open_at_bob(keys, seal_ab(keys), sender_public=directory).num_examples == 4321


# --- tampering --------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["ephemeral", "nonce", "ciphertext"])
@pytest.mark.parametrize("where", ["first", "last"])
def test_a_flipped_bit_in_any_byte_array_is_rejected(keys, field, where):
    envelope = seal_ab(keys)
    array = getattr(envelope, field)
    index = 0 if where == "first" else array.size - 1
    # bit 1 of the last ephemeral byte is a real key bit (X25519 ignores only the top bit)
    tampered = dataclasses.replace(envelope, **{field: flip(array, index, bit=1)})

    rejected("envelope", open_at_bob, keys, RELAY_CODEC.decode(RELAY_CODEC.encode(tampered)))


@pytest.mark.parametrize(
    "field, value",
    [("sender", "carol"), ("recipient", "carol"), ("session", "job-8/secagg/round-3"), ("seq", 1)],
)
def test_a_changed_header_field_is_refused_by_name(keys, field, value):
    tampered = dataclasses.replace(seal_ab(keys), **{field: value})

    rejected(field, open_at_bob, keys, tampered)


@pytest.mark.parametrize(
    "field, value, expectation",
    [
        ("recipient", "bob2", {"expected_recipient": "bob2"}),
        ("session", "other-session", {"session": "other-session"}),
        ("seq", 5, {"expect_seq": 5}),
    ],
)
def test_a_changed_header_is_caught_by_the_aead_even_if_the_recipient_expects_it(
    keys, field, value, expectation
):
    tampered = dataclasses.replace(seal_ab(keys), **{field: value})

    rejected("envelope", open_at_bob, keys, tampered, **expectation)


def test_a_swapped_sender_fails_authentication_under_the_claimed_senders_key(keys, directory):
    tampered = dataclasses.replace(seal_ab(keys), sender="carol")

    rejected(
        "envelope", open_at_bob, keys, tampered, sender_public=directory, expected_sender="carol"
    )


def test_a_replayed_envelope_is_refused(keys):
    first = seal_ab(keys, seq=0)
    open_at_bob(keys, first, expect_seq=0)

    err = rejected("seq", open_at_bob, keys, first, expect_seq=1)

    assert "replayed" in err.message


def test_an_envelope_from_the_future_is_refused_as_out_of_order(keys):
    err = rejected("seq", open_at_bob, keys, seal_ab(keys, seq=2), expect_seq=1)

    assert "out of order" in err.message


def test_an_envelope_for_another_session_is_refused(keys):
    rejected("session", open_at_bob, keys, seal_ab(keys), session="another")


def test_an_envelope_for_another_recipient_is_refused(keys):
    rejected("recipient", open_at_bob, keys, seal_ab(keys), expected_recipient="carol")


# --- wrong keys -------------------------------------------------------------------------------


def test_a_third_participant_cannot_open_it(keys):
    envelope = seal_ab(keys)

    rejected("envelope", open_at_bob, keys, envelope, recipient_keys=keys["carol"])


def test_sealed_to_the_wrong_recipient_key_bob_cannot_open_it(keys):
    envelope = seal_ab(keys, recipient_public=keys["carol"].public_bytes())

    rejected("envelope", open_at_bob, keys, envelope)


def test_opening_with_the_wrong_sender_key_fails(keys):
    rejected(
        "envelope", open_at_bob, keys, seal_ab(keys), sender_public=keys["carol"].public_bytes()
    )


def test_an_impostor_without_alices_static_key_is_rejected(keys):
    forged = seal(
        fit_res(),
        sender="alice",
        recipient="bob",
        recipient_public=keys["bob"].public_bytes(),
        sender_keys=keys["mallory"],  # knows everything public, but not alice's private key
        session=SESSION,
        seq=0,
    )

    rejected("envelope", open_at_bob, keys, forged)


def test_an_unknown_sender_has_no_key(keys, directory):
    forged = seal_ab(keys, sender="mallory", sender_keys=keys["mallory"])

    rejected(
        "sender_public",
        open_at_bob,
        keys,
        forged,
        sender_public=directory,
        expected_sender="mallory",
    )


@pytest.mark.parametrize("point", sorted(SMALL_ORDER))
def test_small_order_keys_are_refused_everywhere(keys, point):
    bad = SMALL_ORDER[point]
    envelope = seal_ab(keys)

    rejected("recipient_public", seal_ab, keys, recipient_public=bad)
    rejected("sender_public", open_at_bob, keys, envelope, sender_public=bad)
    with_bad_ephemeral = dataclasses.replace(envelope, ephemeral=np.frombuffer(bad, np.uint8))
    rejected("ephemeral", open_at_bob, keys, with_bad_ephemeral)


# --- malformed envelopes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("ephemeral", np.zeros(31, np.uint8)),
        ("ephemeral", np.zeros(33, np.uint8)),
        ("nonce", np.zeros(11, np.uint8)),
        ("nonce", np.zeros(24, np.uint8)),
        ("ciphertext", np.zeros(15, np.uint8)),
        ("nonce", np.zeros(12, np.uint32)),
        ("ephemeral", np.zeros((2, 16), np.uint8)),
    ],
)
def test_malformed_sizes_and_dtypes_are_refused(keys, field, value):
    tampered = dataclasses.replace(seal_ab(keys), **{field: value})

    rejected(field, open_at_bob, keys, tampered)


@pytest.mark.parametrize("raw", [b"", b"\x01" * 31, b"\x01" * 33, "not bytes"])
def test_public_keys_of_the_wrong_size_are_refused(keys, raw):
    rejected("recipient_public", seal_ab, keys, recipient_public=raw)
    rejected("sender_public", open_at_bob, keys, seal_ab(keys), sender_public=raw)


@pytest.mark.parametrize(
    "field, value", [("sender", ""), ("session", ""), ("recipient", "x" * 257), ("seq", -1)]
)
def test_bad_routing_values_are_refused_when_sealing(keys, field, value):
    rejected(field, seal_ab, keys, **{field: value})


def test_an_envelope_cannot_carry_an_envelope(keys):
    rejected("message", seal_ab, keys, seal_ab(keys))


def test_an_inner_message_the_recipients_codec_refuses_is_a_protocol_error(keys):
    only_stats = Codec(types={"stats_ins": StatsIns})

    err = rejected("message", open_at_bob, keys, seal_ab(keys), codec=only_stats)

    assert err.value == "type"


def test_the_header_is_length_prefixed_so_fields_cannot_slide(keys):
    # "ab" + "c" and "a" + "bc" must not authenticate as each other.
    envelope = seal_ab(
        keys, sender="ab", recipient="c", recipient_public=keys["bob"].public_bytes()
    )
    slid = dataclasses.replace(envelope, sender="a", recipient="bc")

    rejected(
        "envelope",
        open_at_bob,
        keys,
        slid,
        expected_sender="a",
        expected_recipient="bc",
    )


# --- key files --------------------------------------------------------------------------------


def test_a_key_pair_saves_with_mode_0600_and_loads_back(tmp_path):
    pair = RelayKeyPair.generate()

    path = pair.save(tmp_path / "keys" / "relay.key")
    loaded = RelayKeyPair.load(path)

    assert os.stat(path).st_mode & 0o777 == 0o600
    assert loaded.public_bytes() == pair.public_bytes()
    assert len(pair.public_bytes()) == 32
    assert "private" not in repr(pair).lower().replace("relaykeypair", "")


def test_saving_never_overwrites_a_key(tmp_path):
    path = RelayKeyPair.generate().save(tmp_path / "relay.key")

    with pytest.raises(ConfigError, match="already exists"):
        RelayKeyPair.generate().save(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_loading_refuses_a_key_others_can_access(tmp_path, mode):
    path = RelayKeyPair.generate().save(tmp_path / "relay.key")
    os.chmod(path, mode)

    with pytest.raises(ConfigError) as info:
        RelayKeyPair.load(path)

    assert info.value.field == "relay_key" and "chmod 600" in (info.value.fix or "")


def test_loading_refuses_missing_symlinked_and_foreign_files(tmp_path):
    real = RelayKeyPair.generate().save(tmp_path / "relay.key")
    link = tmp_path / "link.key"
    link.symlink_to(real)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(struct.pack("<I", 7))
    garbage.chmod(0o600)

    for path in (tmp_path / "missing.key", link, garbage):
        with pytest.raises(ConfigError):
            RelayKeyPair.load(path)
