"""Relay channels over the in-process relay: ordered, exactly-once messages between participants
through a relay that sees only sealed frames, with lost posts, lost deliveries, lost
acknowledgements, reordering and a hostile relay."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from cdp_federated.errors import (
    CodecError,
    ConfigError,
    ConflictError,
    ForbiddenError,
    PayloadTooLargeError,
    ProtocolError,
    TransportError,
)
from cdp_federated.federation import FitRes, encode
from cdp_federated.federation.envelope import RELAY_CODEC, RelayKeyPair, seal
from cdp_federated.federation.relay import (
    Delivery,
    InProcessRelay,
    RelayChannel,
    RelayLink,
    fingerprint,
    pack_deliveries,
    unpack_deliveries,
)

SESSION = "job-7/secagg/round-1"
MARKER = 1234.5678125  # exactly representable: its float64 bytes are recognisable
NOTE = "PLAINTEXT-MARKER-vip-segment"


def message(i: int) -> FitRes:
    return FitRes(
        parameters=np.array([MARKER, float(i)]), num_examples=i, metrics={"note": f"{NOTE}-{i}"}
    )


def no_sleep(_seconds: float) -> None:
    pass


@pytest.fixture
def keys() -> dict[str, RelayKeyPair]:
    return {name: RelayKeyPair.generate() for name in ("alice", "bob", "carol")}


@pytest.fixture
def relay() -> InProcessRelay:
    return InProcessRelay(["alice", "bob", "carol"])


def channels(relay, keys, **options) -> dict[str, RelayChannel]:
    return {name: relay.channel(name, key, sleep=no_sleep, **options) for name, key in keys.items()}


@dataclasses.dataclass
class Flaky(RelayLink):
    """Wraps a link: fails chosen calls (before or after they reached the relay) and can reverse
    the order of what it fetches."""

    inner: RelayLink
    participant: str = ""
    lose_post_answer: int = 0  # posts that reach the relay but whose answer is lost
    refuse_posts: int = 0  # posts that never reach the relay
    lose_fetch_answer: int = 0
    lose_ack: int = 0
    reverse: bool = False
    ignore_after: bool = False  # a relay that sends everything unacknowledged again
    posts: int = 0
    acks: list[list[int]] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.participant = self.inner.participant

    def post(self, recipient: str, frame: bytes) -> None:
        self.posts += 1
        if self.refuse_posts:
            self.refuse_posts -= 1
            raise TransportError("connection refused")
        self.inner.post(recipient, frame)
        if self.lose_post_answer:
            self.lose_post_answer -= 1
            raise TransportError("connection dropped after the request")

    def fetch(self, *, sender, session, after, wait):
        after = 0 if self.ignore_after else after
        found = self.inner.fetch(sender=sender, session=session, after=after, wait=wait)
        if self.lose_fetch_answer and found:
            self.lose_fetch_answer -= 1
            raise TransportError("connection dropped during the answer")
        return found[::-1] if self.reverse else found

    def ack(self, ids):
        if self.lose_ack:
            self.lose_ack -= 1
            raise TransportError("connection dropped")
        self.acks.append(list(ids))
        self.inner.ack(ids)

    def public_keys(self):
        return self.inner.public_keys()


def flaky_channel(relay, name, key, retries=4, **failures) -> tuple[RelayChannel, Flaky]:
    relay.publish(name, key.public_bytes())
    link = Flaky(relay.link(name), **failures)
    return RelayChannel(link, key, sleep=no_sleep, retries=retries), link


# --- ordered, exactly once -----------------------------------------------------------------------


def test_messages_arrive_in_order_once_per_stream_and_nothing_stays_on_the_relay(relay, keys):
    ch = channels(relay, keys)
    for i in range(3):
        assert ch["alice"].send("bob", message(i), SESSION) == i
        ch["carol"].send("bob", message(10 + i), SESSION)
        ch["alice"].send("bob", message(20 + i), "other-session")

    got_carol = [ch["bob"].receive("carol", SESSION, timeout=1).num_examples for _ in range(3)]
    got_other = [ch["bob"].receive("alice", "other-session", 1).num_examples for _ in range(3)]
    got_alice = [ch["bob"].receive("alice", SESSION, timeout=1).num_examples for _ in range(3)]

    assert (got_alice, got_carol, got_other) == ([0, 1, 2], [10, 11, 12], [20, 21, 22])
    reply = ch["bob"].receive
    with pytest.raises(TransportError, match="no relay message from alice"):
        reply("alice", SESSION, timeout=0.05)
    assert relay.pending("bob") == 0
    np.testing.assert_array_equal(message(0).parameters, [MARKER, 0.0])


def test_a_two_way_conversation_between_threads(relay, keys):
    ch = channels(relay, keys)
    errors: list[BaseException] = []

    def bob() -> None:
        try:
            for _ in range(20):
                got = ch["bob"].receive("alice", SESSION, timeout=5)
                ch["bob"].send("alice", message(got.num_examples + 1), SESSION)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    worker = threading.Thread(target=bob)
    worker.start()
    value = 0
    for _ in range(20):
        ch["alice"].send("bob", message(value), SESSION)
        value = ch["alice"].receive("bob", SESSION, timeout=5).num_examples + 1
    worker.join(5)
    assert not errors and value == 40


def test_envelopes_fetched_out_of_order_are_held_until_their_turn(relay, keys):
    ch = channels(relay, keys)
    for i in range(5):
        ch["alice"].send("bob", message(i), SESSION)
    bob, link = flaky_channel(relay, "bob", keys["bob"], reverse=True)

    assert [bob.receive("alice", SESSION, 1).num_examples for i in range(5)] == [0, 1, 2, 3, 4]
    assert relay.pending("bob") == 0
    assert sorted(i for batch in link.acks for i in batch) == sorted(set(range(1, 6)))


# --- lost requests and answers -------------------------------------------------------------------


def test_a_post_whose_answer_was_lost_is_retried_and_stored_once(relay, keys):
    alice, link = flaky_channel(relay, "alice", keys["alice"], lose_post_answer=2)
    bob = relay.channel("bob", keys["bob"], sleep=no_sleep)

    alice.send("bob", message(7), SESSION)

    assert link.posts == 3 and relay.pending("bob") == 1
    assert bob.receive("alice", SESSION, 1).num_examples == 7
    with pytest.raises(TransportError):
        bob.receive("alice", SESSION, 0.05)


def test_a_post_that_failed_is_sent_again_before_the_next_message(relay, keys):
    alice, link = flaky_channel(relay, "alice", keys["alice"], refuse_posts=3, retries=2)
    bob = relay.channel("bob", keys["bob"], sleep=no_sleep)

    with pytest.raises(TransportError):
        alice.send("bob", message(0), SESSION)  # three attempts, all refused
    assert relay.pending("bob") == 0
    assert alice.send("bob", message(1), SESSION) == 1  # message 0 goes first, same seq

    assert [bob.receive("alice", SESSION, 1).num_examples for _ in range(2)] == [0, 1]


def test_lost_deliveries_and_lost_acknowledgements_never_duplicate_a_message(relay, keys):
    alice = relay.channel("alice", keys["alice"], sleep=no_sleep)
    bob, link = flaky_channel(relay, "bob", keys["bob"], lose_fetch_answer=1, lose_ack=5)
    for i in range(3):
        alice.send("bob", message(i), SESSION)

    first = bob.receive("alice", SESSION, 1)  # the first answer was lost, then acks fail
    assert relay.pending("bob") == 3  # nothing acknowledged yet: all still on the relay
    rest = [bob.receive("alice", SESSION, 1) for _ in range(2)]
    assert [m.num_examples for m in [first, *rest]] == [0, 1, 2]
    assert relay.pending("bob") == 0  # the ids whose acknowledgement failed were sent again

    fresh_bob = relay.channel("bob", keys["bob"], sleep=no_sleep)  # a restarted recipient
    with pytest.raises(TransportError):
        fresh_bob.receive("alice", SESSION, 0.05)


def test_an_envelope_delivered_again_after_its_ack_was_lost_is_dropped(relay, keys):
    alice = relay.channel("alice", keys["alice"], sleep=no_sleep)
    bob, link = flaky_channel(relay, "bob", keys["bob"], lose_ack=1, retries=0, ignore_after=True)
    alice.send("bob", message(0), SESSION)
    assert bob.receive("alice", SESSION, 1).num_examples == 0  # its ack is lost
    alice.send("bob", message(1), SESSION)
    assert bob.receive("alice", SESSION, 1).num_examples == 1  # envelope 0 came back: dropped
    assert link.acks == [[1], [2]]  # 0 acknowledged again when it came back, then 1
    with pytest.raises(TransportError):
        bob.receive("alice", SESSION, 0.05)


# --- what the relay refuses ----------------------------------------------------------------------


def test_a_reused_sequence_number_is_a_conflict_and_the_same_bytes_a_no_op(relay, keys):
    ch = channels(relay, keys)
    ch["alice"].send("bob", message(0), SESSION)
    again = relay.channel("alice", keys["alice"])  # a restarted sender counts from 0 again
    with pytest.raises(ConflictError, match="already used"):
        again.send("bob", message(99), SESSION)

    frame = RELAY_CODEC.encode(
        seal(
            message(5),
            sender="alice",
            recipient="bob",
            recipient_public=keys["bob"].public_bytes(),
            sender_keys=keys["alice"],
            session="s2",
            seq=0,
        )
    )
    link = relay.link("alice")
    link.post("bob", frame)
    link.post("bob", frame)
    assert relay.pending("bob") == 2
    assert again.send("bob", message(1), "fresh-session") == 0


def test_the_relay_checks_sender_recipient_membership_and_size(keys):
    relay = InProcessRelay(["alice", "bob"], max_bytes=4096)
    for name in ("alice", "bob"):
        relay.publish(name, keys[name].public_bytes())

    def frame(sender="alice", recipient="bob", size=2, session=SESSION) -> bytes:
        inner = FitRes(parameters=np.arange(size, dtype=np.float64), num_examples=1)
        return RELAY_CODEC.encode(
            seal(
                inner,
                sender=sender,
                recipient=recipient,
                recipient_public=keys[recipient].public_bytes(),
                sender_keys=keys[sender],
                session=session,
                seq=0,
            )
        )

    with pytest.raises(ForbiddenError) as spoof:
        relay.link("bob").post("alice", frame(sender="carol", recipient="alice"))
    assert spoof.value.code == "sender_mismatch"
    with pytest.raises(ForbiddenError) as outsider:
        relay.link("alice").post("carol", frame(recipient="carol"))
    assert outsider.value.code == "recipient_not_in_job"
    with pytest.raises(ForbiddenError):
        relay.link("carol")
    with pytest.raises(ConfigError, match="addressed to another"):
        relay.link("alice").post("alice", frame())
    with pytest.raises(ConfigError, match="itself"):
        relay.link("alice").post("alice", frame(recipient="alice"))
    with pytest.raises(CodecError, match="NUL"):
        relay.link("alice").post("bob", frame(session="a\x00b"))
    with pytest.raises(PayloadTooLargeError, match="too large") as big:
        relay.link("alice").post("bob", frame(size=1000))
    assert "4096" in big.value.fix
    with pytest.raises(CodecError):
        relay.link("alice").post("bob", encode(message(0)))  # not an envelope
    assert relay.pending("bob") == relay.pending("alice") == 0


def test_a_published_key_is_never_replaced(relay, keys):
    relay.publish("alice", keys["alice"].public_bytes())
    relay.publish("alice", keys["alice"].public_bytes())
    with pytest.raises(ConflictError):
        relay.publish("alice", keys["carol"].public_bytes())


# --- a hostile relay -----------------------------------------------------------------------------


def test_a_tampered_envelope_is_dropped_and_refused(relay, keys):
    ch = channels(relay, keys)
    ch["alice"].send("bob", message(0), SESSION)
    (ident,) = relay._boxes["bob"]
    sender, session, frame = relay._boxes["bob"][ident]
    tampered = bytearray(frame)
    tampered[-1] ^= 1  # the last ciphertext byte
    relay._boxes["bob"][ident] = (sender, session, bytes(tampered))

    with pytest.raises(ProtocolError, match="failed authentication"):
        ch["bob"].receive("alice", SESSION, 1)
    assert relay.pending("bob") == 0


def test_a_relay_that_swaps_keys_is_caught_by_the_owner_and_by_pinning(relay, keys):
    mallory = RelayKeyPair.generate()
    relay.publish("alice", keys["alice"].public_bytes())
    relay.publish("bob", mallory.public_bytes())  # the relay (or an impostor) publishes for bob

    bob = RelayChannel(relay.link("bob"), keys["bob"])
    with pytest.raises(ProtocolError, match="another key for this participant"):
        bob.send("alice", message(0), SESSION)

    pinned = {"bob": keys["bob"].public_bytes()}
    alice = RelayChannel(relay.link("alice"), keys["alice"], pinned=pinned)
    with pytest.raises(ProtocolError, match="differs from the pinned") as info:
        alice.send("bob", message(0), SESSION)
    assert fingerprint(mallory.public_bytes()) in info.value.fix


def test_the_relay_sees_only_ciphertext(keys):
    frames: list[tuple[str, str, bytes]] = []
    relay = InProcessRelay(keys, recorder=lambda *seen: frames.append(seen))
    ch = channels(relay, keys)
    ch["alice"].send("bob", message(3), SESSION)
    assert ch["bob"].receive("alice", SESSION, 1).metrics == {"note": f"{NOTE}-3"}

    plaintext = encode(message(3))
    marker_bytes = np.float64(MARKER).tobytes()
    assert marker_bytes in plaintext and NOTE.encode() in plaintext  # the search can find them
    assert [(d, p) for d, p, _ in frames] == [("post", "alice"), ("deliver", "bob")]
    for _, _, frame in frames:
        assert marker_bytes not in frame and NOTE.encode() not in frame


# --- the inbox batch format ----------------------------------------------------------------------


def test_delivery_batches_round_trip_and_refuse_malformed_input():
    batch = [Delivery(1, b"abc"), Delivery(2**63 - 1, b""), Delivery(7, bytes(1000))]
    packed = pack_deliveries(batch)
    assert unpack_deliveries(packed) == batch
    assert unpack_deliveries(pack_deliveries([])) == []
    for bad in (
        packed[:-1],
        packed + b"x",
        b"XXXX" + packed[4:],
        packed[:9],
        packed[:20],
        b"",
    ):
        with pytest.raises(CodecError):
            unpack_deliveries(bad)
    with pytest.raises(CodecError, match="too many"):
        unpack_deliveries(packed, max_items=2)
