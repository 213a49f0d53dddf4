"""ECDH PSI on the wire: no id leaves a party in any recognisable form, every tampered or
out-of-order message is refused, and the transcript resists a dictionary attack."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from cdp_federated.errors import ProtocolError
from cdp_federated.federation.codec import Codec
from cdp_federated.federation.transport import InProcessTransport, Transport
from cdp_federated.identity.psi import PsiConfig, PsiParty, State, _mac, run_psi
from cdp_federated.identity.psi_crypto import X25519Group, hash_to_group
from cdp_federated.identity.psi_messages import (
    PsiAck,
    PsiDone,
    PsiHello,
    PsiPoints,
    PsiSelection,
    PsiStart,
)

TEST_KEY = b"a known test key for HMAC-SHA256"
LEFT = [f"alice.{i}@example.com" for i in range(40)]
RIGHT = [f"alice.{i}@example.com" for i in range(20, 55)]
CODEC = Codec()


def recording_factory(frames: list[bytes]):
    def factory(handlers, recorder):
        def record(direction: str, participant: str, frame: bytes) -> None:
            frames.append(frame)
            recorder(direction, participant, frame)

        return InProcessTransport(handlers, recorder=record)

    return factory


def id_forms(identifier: str) -> dict[str, bytes]:
    raw = identifier.encode("utf-8")
    sha = hashlib.sha256(raw).digest()
    mac = hmac.new(TEST_KEY, raw, hashlib.sha256).digest()
    domain = hashlib.sha256(b"cdp-fl psi v1\x00" + raw).digest()
    return {
        "plain": raw,
        "sha256": sha,
        "sha256-hex": sha.hex().encode(),
        "sha256-HEX": sha.hex().upper().encode(),
        "hmac": mac,
        "hmac-hex": mac.hex().encode(),
        "domain-sha256": domain,
        "u-coordinate": hash_to_group([identifier])[0].tobytes(),
    }


@pytest.mark.parametrize(
    ("mode", "reveal"),
    [("intersection", ("left", "right")), ("intersection", ("left",)), ("cardinality", ("left",))],
)
def test_no_id_leaves_a_party_in_plain_hashed_or_keyed_form(mode, reveal):
    frames: list[bytes] = []
    result = run_psi(
        LEFT,
        RIGHT,
        mode=mode,
        reveal_to=reveal,
        workers=1,
        batch_size=16,
        transport_factory=recording_factory(frames),
    )
    assert result.intersection_size == 20 and frames
    for identifier in set(LEFT) | set(RIGHT):
        for form, needle in id_forms(identifier).items():
            for frame in frames:
                assert needle not in frame, f"{form} of an id is on the wire"
    # Sanity: the search does find a needle that is there.
    assert any(b"psi_points" in frame for frame in frames)


# --- a manual relay that can intercept any message ------------------------------------------------


def make_pair(mode: str = "intersection", reveal=("receiver", "sender"), batch: int = 8):
    config = PsiConfig(session="wire-test", mode=mode, reveal=reveal, batch_size=batch)
    receiver = PsiParty(LEFT, role="receiver", config=config)
    sender = PsiParty(RIGHT, role="sender", config=config)
    return receiver, sender


def relay_until(receiver: PsiParty, sender: PsiParty, stop):
    """Relay through the codec; return ``(party, message)`` for the first delivery that ``stop``
    matches, undelivered. ``None`` when the session ends first."""
    parties = {"receiver": receiver, "sender": sender}
    message, target = PsiStart(session=receiver.config.session), "receiver"
    while True:
        message = CODEC.decode(CODEC.encode(message))
        if stop(target, message):
            return parties[target], message
        reply = parties[target].handle(message)
        if isinstance(reply, PsiDone) and isinstance(message, PsiDone):
            return None
        message, target = reply, ("sender" if target == "receiver" else "receiver")


def at(party: str, kind: type, stage: str | None = None, index: int = 0):
    def stop(target, message):
        return (
            target == party
            and isinstance(message, kind)
            and (stage is None or getattr(message, "stage", None) == stage)
            and getattr(message, "index", 0) == index
        )

    return stop


def reseal(author: PsiParty, message, **changes):
    """What a peer that *holds the session key* (a malicious party) could send."""
    changed = dataclasses.replace(message, **changes)
    return dataclasses.replace(changed, mac=_mac(author._send_key, changed))


def refused(party: PsiParty, message, field: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        party.handle(message)
    assert info.value.field == field, str(info.value)
    assert party.state is State.FAILED
    return info.value


def test_untampered_relay_finishes():
    receiver, sender = make_pair()
    assert relay_until(receiver, sender, lambda *_: False) is None
    assert receiver.outcome().size == sender.outcome().size == 20


def test_flipped_byte_in_a_point_is_rejected_and_the_session_dies():
    receiver, sender = make_pair()
    party, message = relay_until(receiver, sender, at("sender", PsiPoints, "receiver_blinded"))
    points = np.array(message.points)
    points[3, 5] ^= 0x01
    refused(party, dataclasses.replace(message, points=points), "mac")
    refused(party, message, "state")  # even the genuine message is refused afterwards


@pytest.mark.parametrize(
    ("stage", "to"),
    [("receiver_blinded", "sender"), ("receiver_tags", "receiver"), ("sender_blinded", "receiver")],
)
def test_flipped_byte_at_every_points_stage(stage, to):
    receiver, sender = make_pair()
    party, message = relay_until(receiver, sender, at(to, PsiPoints, stage, index=1))
    points = np.array(message.points)
    points[0, 0] ^= 0x80
    refused(party, dataclasses.replace(message, points=points), "mac")


def test_replayed_batch_is_rejected():
    receiver, sender = make_pair()
    party, message = relay_until(receiver, sender, at("sender", PsiPoints, "receiver_blinded"))
    party.handle(message)
    refused(party, message, "seq")


def test_out_of_order_stage_is_rejected():
    receiver, sender = make_pair()
    party, message = relay_until(receiver, sender, at("receiver", PsiPoints, "receiver_tags"))
    refused(party, reseal(sender, message, stage="sender_blinded"), "stage")


def test_message_of_the_wrong_type_for_the_state_is_rejected():
    receiver, sender = make_pair()
    party, message = relay_until(receiver, sender, at("sender", PsiPoints, "receiver_blinded"))
    ack = PsiAck(
        session="wire-test", sender="receiver", seq=0, stage="receiver_tags", index=0, mac=""
    )
    refused(party, ack, "type")


def test_wrong_session_id_is_rejected():
    receiver, sender = make_pair()
    party, message = relay_until(receiver, sender, at("sender", PsiPoints, "receiver_blinded"))
    refused(party, reseal(receiver, message, session="another-job"), "session")
    other, start = make_pair()[0], PsiStart(session="another-job")
    refused(other, start, "session")


def test_wrong_sender_role_is_rejected():
    receiver, sender = make_pair()
    party, message = relay_until(receiver, sender, at("sender", PsiPoints, "receiver_blinded"))
    refused(party, reseal(receiver, message, sender="sender"), "sender")


def test_wrong_count_in_a_batch_is_rejected():
    receiver, sender = make_pair()
    party, message = relay_until(receiver, sender, at("receiver", PsiPoints, "sender_blinded"))
    refused(party, reseal(sender, message, points=np.array(message.points[:-1])), "points")


def test_wrong_batch_index_and_total_are_rejected():
    receiver, sender = make_pair()
    party, message = relay_until(receiver, sender, at("receiver", PsiPoints, "sender_blinded"))
    refused(party, reseal(sender, message, index=1), "index")
    receiver, sender = make_pair()
    party, message = relay_until(receiver, sender, at("receiver", PsiPoints, "sender_blinded"))
    refused(party, reseal(sender, message, total=message.total + 1), "total")


def test_points_of_another_dtype_are_rejected():
    receiver, sender = make_pair()
    party, message = relay_until(receiver, sender, at("sender", PsiPoints, "receiver_blinded"))
    refused(party, reseal(receiver, message, points=message.points.astype(np.uint32)), "points")


def test_tampered_hello_breaks_every_later_message():
    receiver, sender = make_pair()
    party, hello = relay_until(
        receiver, sender, lambda t, m: isinstance(m, PsiHello) and t == "receiver"
    )
    # The relay shrinks the sender's announced count: the two parties now derive different keys.
    reply = party.handle(dataclasses.replace(hello, count=hello.count - 1))
    refused(sender, CODEC.decode(CODEC.encode(reply)), "mac")


@pytest.mark.parametrize(
    ("field", "value"),
    [("mode", "cardinality"), ("reveal", ["receiver"]), ("fpr", 0.5), ("batch_size", 0)],
)
def test_hello_that_disagrees_with_the_policy_is_rejected(field, value):
    receiver, sender = make_pair()
    party, hello = relay_until(receiver, sender, lambda t, m: isinstance(m, PsiHello))
    refused(party, dataclasses.replace(hello, **{field: value}), field)


SMALL_ORDER = [
    0,
    1,
    # The two points of order 8 on Curve25519 (libsodium's blocklist).
    int.from_bytes(
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"), "little"
    ),
    int.from_bytes(
        bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"), "little"
    ),
    2**255 - 20,  # p - 1
]


@pytest.mark.parametrize("u", SMALL_ORDER)
@pytest.mark.parametrize("to", ["sender", "receiver"])
def test_small_order_point_from_a_malicious_peer_is_rejected(u, to):
    receiver, sender = make_pair()
    stage, author = ("receiver_blinded", receiver) if to == "sender" else ("sender_blinded", sender)
    party, message = relay_until(receiver, sender, at(to, PsiPoints, stage))
    points = np.array(message.points)
    points[2] = np.frombuffer(u.to_bytes(32, "little"), dtype=np.uint8)
    error = refused(party, reseal(author, message, points=points), "points")
    assert "small order" in str(error) and error.value == 2


def test_non_canonical_point_is_rejected():
    receiver, sender = make_pair()
    party, message = relay_until(receiver, sender, at("receiver", PsiPoints, "sender_blinded"))
    points = np.array(message.points)
    points[1, 31] |= 0x80  # same point for X25519 (top bit masked), but never an X25519 output
    error = refused(party, reseal(sender, message, points=points), "points")
    assert "canonical" in str(error)


def test_duplicate_points_are_rejected():
    receiver, sender = make_pair(batch=64)
    party, message = relay_until(receiver, sender, at("receiver", PsiPoints, "sender_blinded"))
    points = np.array(message.points)
    points[5] = points[4]
    refused(party, reseal(sender, message, points=points), "points")


def test_selection_past_the_senders_count_is_rejected():
    receiver, sender = make_pair()
    party, message = relay_until(receiver, sender, at("sender", PsiSelection))
    positions = np.array(message.positions)
    positions[-1] |= 0x80  # 35 ids: bit 39 is past the end
    refused(party, reseal(receiver, message, positions=positions), "positions")


def test_done_with_a_size_other_than_the_selection_is_rejected():
    receiver, sender = make_pair()
    party, message = relay_until(receiver, sender, at("sender", PsiDone))
    refused(party, reseal(receiver, message, size=message.size + 1), "size")


class TamperingTransport(Transport):
    """Delivers through an in-process transport but flips one byte of the first points batch."""

    def __init__(self, handlers, recorder) -> None:
        self.inner = InProcessTransport(handlers, recorder=recorder)
        self.done = False

    def participants(self) -> list[str]:
        return self.inner.participants()

    def request(self, participant, message):
        if isinstance(message, PsiPoints) and not self.done:
            points = np.array(message.points)
            points[0, 0] ^= 1
            message, self.done = dataclasses.replace(message, points=points), True
        return self.inner.request(participant, message)


def test_driver_reports_a_refusal_as_a_protocol_error_naming_the_party():
    with pytest.raises(ProtocolError) as info:
        run_psi(LEFT, RIGHT, workers=1, transport_factory=TamperingTransport)
    assert info.value.value == "right" and "authentication" in str(info.value)


# --- dictionary attack -------------------------------------------------------------------------


def _x25519(scalar: bytes, u: bytes) -> bytes | None:
    try:
        return X25519PrivateKey.from_private_bytes(scalar).exchange(
            X25519PublicKey.from_public_bytes(u)
        )
    except ValueError:
        return None


def dictionary_attack(points: list[bytes], known: str, dictionary: list[str]) -> dict[bytes, str]:
    """Label transcript points with dictionary ids, knowing that ``known`` is among them.

    The attack that breaks "hash as scalar" constructions: if a blinded value is
    ``[a][h(id)]B``, then for the known id x and a candidate ``c = blind(x)``,
    ``X25519(h(d), c) == X25519(h(x), blind(d))`` for every d. Try every transcript point as c,
    keep the candidate that explains most points, and also look each dictionary entry's hashed
    point and hash-as-scalar point up directly.
    """
    digest = {d: hashlib.sha256(b"cdp-fl psi v1\x00" + d.encode()).digest() for d in dictionary}
    u_of = {d: hash_to_group([d])[0].tobytes() for d in dictionary}
    recovered: dict[bytes, str] = {}
    on_wire = set(points)
    basepoint = (9).to_bytes(32, "little")
    for d in dictionary:
        for guess in (u_of[d], digest[d], _x25519(digest[d], basepoint)):
            if guess in on_wire:
                recovered[guess] = d
    shifted = {_x25519(digest[known], p): p for p in points}
    best: dict[bytes, str] = {}
    for candidate in points:
        found = {}
        for d in dictionary:
            probe = _x25519(digest[d], candidate)
            if d != known and probe is not None and probe in shifted:
                found[shifted[probe]] = d
        if len(found) > len(best):
            best = {**found, candidate: known}
    recovered.update(best)
    return recovered


def transcript_points(frames: list[bytes]) -> list[bytes]:
    """Every full blinded point in the frames, once (each message crosses the relay twice)."""
    points: dict[bytes, None] = {}
    for frame in frames:
        message = CODEC.decode(frame)
        if isinstance(message, PsiPoints) and message.stage != "receiver_tags":
            points.update(dict.fromkeys(row.tobytes() for row in message.points))
    return list(points)


def test_dictionary_attack_on_the_transcript_recovers_nothing():
    # The attacker sees every frame, knows that `known` is a shared id (and its normalised form)
    # and holds a dictionary with every id of both parties and more. It still recovers nothing:
    # each party's points are H(id)^a or H(id)^b for secret scalars a, b, and without a or b the
    # blinded values of different ids are unlinkable (DDH on the curve and its twist): knowing
    # H(x)^a for one x says nothing about H(d)^a, because H(d) is not a known multiple of H(x).
    receiver, sender = make_pair()
    frames: list[bytes] = []
    transport = recording_factory(frames)(
        {"r": receiver.handle, "s": sender.handle}, lambda *_: None
    )
    message, target = PsiStart(session=receiver.config.session), "r"
    while not (isinstance(message, PsiDone) and target == "r"):
        message, target = transport.request(target, message), "s" if target == "r" else "r"
    points = transcript_points(frames)
    # The truth, which only the two secrets give: which point stands for which id.
    truth = {}
    for party, ids in ((receiver, LEFT), (sender, RIGHT)):
        blinded = X25519Group(workers=1).blind_ids(party._scalar, ids)
        truth.update(
            {row.tobytes(): identifier for row, identifier in zip(blinded, ids, strict=True)}
        )
    assert set(points) == set(truth)

    dictionary = sorted(set(LEFT) | set(RIGHT) | {f"bob.{i}@example.com" for i in range(30)})
    for known in (RIGHT[0], RIGHT[10]):
        recovered = dictionary_attack(points, known=known, dictionary=dictionary)
        correct = {p: d for p, d in recovered.items() if truth[p] == d}
        assert correct == {} and recovered == {}


def test_the_same_attack_breaks_a_hash_as_scalar_construction():
    # Teeth: when the id's hash is the scalar, X25519(H(id), basepoint), blinded with a secret a,
    # one known shared id lets the attacker label every blinded value.
    secret = os.urandom(32)
    basepoint = (9).to_bytes(32, "little")
    weak = {}
    for identifier in LEFT:
        scalar = hashlib.sha256(b"cdp-fl psi v1\x00" + identifier.encode()).digest()
        weak[_x25519(secret, _x25519(scalar, basepoint))] = identifier
    dictionary = sorted(set(LEFT) | {f"bob.{i}@example.com" for i in range(30)})
    recovered = dictionary_attack(list(weak), known=LEFT[25], dictionary=dictionary)
    assert recovered == weak  # every id of the set, each correctly
