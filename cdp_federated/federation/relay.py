"""Relay channels: ordered messages between participants, sealed end to end, carried by a relay
that cannot read them (the coordinator over HTTP, or :class:`InProcessRelay` inside one process).

A :class:`RelayChannel` is one participant's end in one job. ``send(recipient, message,
session)`` seals ``message`` (:func:`.envelope.seal`) with the next sequence number of the
(recipient, session) stream and posts it through a :class:`RelayLink`; ``receive(sender,
session, timeout)`` returns the next message of the (sender, session) stream, in order, once.
The link is only transport: post a frame, fetch pending frames, acknowledge them, read the
published public keys.

Delivery is at least once on the relay and exactly once through the channel: the relay keeps an
envelope until its recipient acknowledges it; the channel acknowledges an envelope only once it
has opened it, holds envelopes that arrive before their turn, and drops (acknowledging again)
any it already returned. Posting is idempotent: a post whose answer was lost is repeated with
the same bytes, which the relay acknowledges as a duplicate; a post that still fails is kept and
posted again before the stream's next message, so no sequence number is skipped.

Sequence numbers live in the channel's memory: a participant that restarts must use new session
names (the relay refuses a reused (sender, recipient, session, seq) as a conflict).

The relay publishes the participants' public keys, so a dishonest relay could publish its own key
for a peer and read what is sealed to it. Pass ``pinned`` keys (exchanged out of band, e.g. as
:func:`fingerprint` values compared by people) to close that gap; the channel always refuses a
directory that shows another key for its own participant.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..errors import (
    CodecError,
    ConfigError,
    ConflictError,
    ForbiddenError,
    PayloadTooLargeError,
    ProtocolError,
    TransportError,
)
from .codec import Codec
from .envelope import (
    MAX_NAME_BYTES,
    NONCE_BYTES,
    PUBLIC_KEY_BYTES,
    RELAY_CODEC,
    TAG_BYTES,
    RelayEnvelope,
    RelayKeyPair,
    open_envelope,
    seal,
)
from .messages import Message

__all__ = [
    "MAX_RELAY_SEQ",
    "Delivery",
    "RelayLink",
    "RelayChannel",
    "InProcessRelay",
    "check_routing",
    "fingerprint",
    "pack_deliveries",
    "unpack_deliveries",
]

# Sequence numbers the relay stores (a signed 64-bit column on every database).
MAX_RELAY_SEQ = 2**63 - 1
_BATCH_MAGIC = b"CDPR"
_BATCH_VERSION = 1
_BATCH_HEAD = struct.Struct("<4sHI")
_ITEM_HEAD = struct.Struct("<QI")
T = TypeVar("T")


def fingerprint(public_key: bytes) -> str:
    """The SHA-256 (hex) of a raw relay public key: what people compare to pin a peer's key."""
    return hashlib.sha256(bytes(public_key)).hexdigest()


@dataclass(frozen=True)
class Delivery:
    """One pending envelope as the relay hands it over: the relay's ``id`` (to acknowledge it)
    and the envelope's CDPF ``frame``."""

    id: int
    frame: bytes


# --- the routing checks every relay makes --------------------------------------------------------


def _name(value: object, field: str) -> None:
    ok = isinstance(value, str) and value != "" and "\x00" not in value  # no database stores NUL
    if ok:
        try:
            ok = len(value.encode("utf-8")) <= MAX_NAME_BYTES  # type: ignore[union-attr]
        except UnicodeEncodeError:
            ok = False
    if not ok:
        raise CodecError(
            f"envelope {field} must be non-empty UTF-8 text without NUL, at most "
            f"{MAX_NAME_BYTES} bytes",
            field=f"relay_envelope.{field}",
            value=value,
            fix="seal envelopes with cdp_federated.federation.envelope.seal",
        )


def check_routing(
    envelope: RelayEnvelope, *, caller: str, recipient: str, participants: Collection[str]
) -> None:
    """What a relay checks in the header it can read, before it stores an envelope: well-formed
    names, a storable ``seq`` and the envelope's fixed sizes (:class:`CodecError`); the ``sender``
    is the authenticated ``caller`` and the recipient takes part in the job
    (:class:`ForbiddenError`); the header's recipient is the addressed one and not the sender
    (:class:`ConfigError`)."""
    for field in ("sender", "recipient", "session"):
        _name(getattr(envelope, field), field)
    seq = envelope.seq
    if not 0 <= seq <= MAX_RELAY_SEQ:
        raise CodecError(
            "envelope seq is out of range",
            field="relay_envelope.seq",
            value=seq,
            fix="count from 0",
        )
    for field, size in (("ephemeral", PUBLIC_KEY_BYTES), ("nonce", NONCE_BYTES)):
        if getattr(envelope, field).shape != (size,):
            raise CodecError(
                f"envelope {field} must be {size} bytes",
                field=f"relay_envelope.{field}",
                value=list(getattr(envelope, field).shape),
            )
    if envelope.ciphertext.ndim != 1 or envelope.ciphertext.size < TAG_BYTES:
        raise CodecError(
            f"envelope ciphertext must be at least {TAG_BYTES} bytes",
            field="relay_envelope.ciphertext",
            value=list(envelope.ciphertext.shape),
        )
    if envelope.sender != caller:
        raise ForbiddenError(
            "an envelope's sender must be the participant that posts it",
            code="sender_mismatch",
            field="relay_envelope.sender",
            value=envelope.sender,
            fix="seal with sender set to your own participant id",
        )
    if envelope.recipient != recipient:
        raise ConfigError(
            "the envelope is addressed to another participant than the one posted to",
            field="relay_envelope.recipient",
            value=envelope.recipient,
            fix=f"post it to {envelope.recipient!r}, or seal it for {recipient!r}",
        )
    if recipient == caller:
        raise ConfigError(
            "a participant cannot relay to itself",
            field="recipient",
            value=recipient,
            fix="address another participant of the job",
        )
    if recipient not in participants:
        raise ForbiddenError(
            "the recipient is not a participant of this job",
            code="recipient_not_in_job",
            field="recipient",
            value=recipient,
            fix="relay only to participants of the same job",
        )


# --- batches of deliveries (the HTTP inbox body) -------------------------------------------------


def pack_deliveries(deliveries: Iterable[Delivery]) -> bytes:
    """``b"CDPR" | u16 version | u32 count`` then, per delivery, ``u64 id | u32 length | frame``."""
    items = list(deliveries)
    parts = [_BATCH_HEAD.pack(_BATCH_MAGIC, _BATCH_VERSION, len(items))]
    for item in items:
        parts.append(_ITEM_HEAD.pack(item.id, len(item.frame)))
        parts.append(item.frame)
    return b"".join(parts)


def unpack_deliveries(data: bytes, *, max_items: int = 100_000) -> list[Delivery]:
    """Parse :func:`pack_deliveries` output; any defect is a :class:`CodecError`."""

    def bad(message: str, value: object = None) -> CodecError:
        return CodecError(message, field="relay_batch", value=value, fix="send batches of CDPR")

    data = bytes(data)
    if len(data) < _BATCH_HEAD.size:
        raise bad("relay batch is truncated", len(data))
    magic, version, count = _BATCH_HEAD.unpack_from(data)
    if magic != _BATCH_MAGIC or version != _BATCH_VERSION:
        raise bad("not a relay batch of a version this release reads", (magic, version))
    if count > max_items:
        raise bad("relay batch holds too many envelopes", count)
    out: list[Delivery] = []
    offset = _BATCH_HEAD.size
    for _ in range(count):
        if offset + _ITEM_HEAD.size > len(data):
            raise bad("relay batch is truncated inside an entry header", offset)
        ident, length = _ITEM_HEAD.unpack_from(data, offset)
        offset += _ITEM_HEAD.size
        if offset + length > len(data):
            raise bad("relay batch is truncated inside a frame", offset)
        out.append(Delivery(ident, data[offset : offset + length]))
        offset += length
    if offset != len(data):
        raise bad("relay batch has trailing bytes", len(data) - offset)
    return out


# --- links and channels --------------------------------------------------------------------------


class RelayLink(ABC):
    """One participant's connection to a relay, within one job."""

    participant: str

    @abstractmethod
    def post(self, recipient: str, frame: bytes) -> None:
        """Hand an envelope frame to the relay. Posting the same bytes again is harmless.
        Raises :class:`TransportError` when the relay could not be reached (retryable)."""

    @abstractmethod
    def fetch(
        self, *, sender: str | None, session: str | None, after: int, wait: float
    ) -> list[Delivery]:
        """This participant's unacknowledged envelopes with an id above ``after`` (of ``sender``
        / ``session`` when given), oldest first, waiting up to ``wait`` seconds for one."""

    @abstractmethod
    def ack(self, ids: Sequence[int]) -> None:
        """Acknowledge deliveries: the relay deletes them."""

    @abstractmethod
    def public_keys(self) -> dict[str, bytes]:
        """The relay public keys the job's participants published."""


class RelayChannel:
    """A participant's ordered, sealed messages to and from the other participants of a job.

    ``keys`` is the participant's long-term :class:`RelayKeyPair` (its public half published on
    the relay). ``codec`` encodes and decodes the inner messages (default: every registered type).
    Transport errors are retried ``retries`` times with exponential backoff from ``backoff``
    seconds and jitter from :mod:`secrets`. Not thread-safe: one thread per channel.
    """

    def __init__(
        self,
        link: RelayLink,
        keys: RelayKeyPair,
        *,
        codec: Codec | None = None,
        pinned: Mapping[str, bytes] | None = None,
        retries: int = 4,
        backoff: float = 0.05,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.participant = link.participant
        self._link = link
        self._keys = keys
        self._codec = codec
        self._pinned = {name: bytes(key) for name, key in (pinned or {}).items()}
        self._retries = max(0, retries)
        self._backoff = backoff
        self._sleep = sleep
        self._monotonic = monotonic
        self._directory: dict[str, bytes] = {}
        self._next_send: dict[tuple[str, str], int] = {}
        self._unsent: dict[tuple[str, str], bytes] = {}
        self._next_receive: dict[tuple[str, str], int] = {}
        self._held: dict[tuple[str, str], dict[int, tuple[int, RelayEnvelope]]] = {}
        self._seen: dict[tuple[str, str], int] = {}  # highest delivery id fetched, per stream
        self._unacked: list[int] = []

    # --- sending ---------------------------------------------------------------------------------

    def send(self, recipient: str, message: Message, session: str) -> int:
        """Seal ``message`` for ``recipient`` in ``session`` and post it; returns its sequence
        number. A post that failed earlier on this stream is posted first (same bytes)."""
        stream = (recipient, session)
        if stream in self._unsent:
            self._retry(lambda: self._link.post(recipient, self._unsent[stream]))
            del self._unsent[stream]
            self._next_send[stream] += 1
        seq = self._next_send.setdefault(stream, 0)
        envelope = seal(
            message,
            sender=self.participant,
            recipient=recipient,
            recipient_public=self._public(recipient, "recipient_public"),
            sender_keys=self._keys,
            session=session,
            seq=seq,
            codec=self._codec,
        )
        frame = RELAY_CODEC.encode(envelope)
        self._unsent[stream] = frame  # until the relay acknowledged it
        self._retry(lambda: self._link.post(recipient, frame))
        del self._unsent[stream]
        self._next_send[stream] = seq + 1
        return seq

    # --- receiving -------------------------------------------------------------------------------

    def receive(self, sender: str, session: str, timeout: float) -> Message:
        """The next message from ``sender`` in ``session``, waiting up to ``timeout`` seconds;
        :class:`TransportError` when none came. A forged, tampered or malformed envelope is
        dropped and raises :class:`ProtocolError`."""
        stream = (sender, session)
        end = self._monotonic() + max(0.0, timeout)
        while True:
            expect = self._next_receive.get(stream, 0)
            held = self._held.get(stream, {})
            if expect in held:
                ident, envelope = held.pop(expect)
                return self._open(ident, envelope, expect)
            left = end - self._monotonic()
            # held envelopes are not acknowledged yet: fetch only what came after them
            after = self._seen.get(stream, 0)
            fetch = functools.partial(
                self._link.fetch, sender=sender, session=session, after=after, wait=max(0.0, left)
            )
            deliveries = self._retry(fetch)
            if deliveries:
                self._seen[stream] = max(after, *(d.id for d in deliveries))
            self._sort(deliveries)
            if left <= 0 and expect not in self._held.get(stream, {}):
                raise TransportError(
                    f"no relay message from {sender} in session {session!r} within {timeout:g} s",
                    field="timeout",
                    value=timeout,
                    fix="wait longer, or check that the sender is running and sending",
                )

    def _sort(self, deliveries: Sequence[Delivery]) -> None:
        for delivery in deliveries:
            try:
                envelope = RELAY_CODEC.decode(delivery.frame)
            except CodecError as exc:
                self._ack([delivery.id])
                raise ProtocolError(
                    "the relay delivered a malformed envelope",
                    field="envelope",
                    value=exc.field,
                    fix="it was dropped; the relay or the sender is broken",
                ) from exc
            assert isinstance(envelope, RelayEnvelope)
            if envelope.recipient != self.participant:
                self._ack([delivery.id])
                raise ProtocolError(
                    "the relay delivered an envelope addressed to another participant",
                    field="recipient",
                    value=envelope.recipient,
                    fix="it was dropped; the relay is misrouting",
                )
            stream = (envelope.sender, envelope.session)
            if envelope.seq < self._next_receive.get(stream, 0):
                self._ack([delivery.id])  # delivered again after an acknowledgement was lost
                continue
            self._held.setdefault(stream, {}).setdefault(envelope.seq, (delivery.id, envelope))

    def _open(self, ident: int, envelope: RelayEnvelope, expect: int) -> Message:
        sender, session = envelope.sender, envelope.session
        try:
            message = open_envelope(
                envelope,
                recipient_keys=self._keys,
                sender_public=self._public(sender, "sender_public"),
                expected_sender=sender,
                expected_recipient=self.participant,
                session=session,
                expect_seq=expect,
                codec=self._codec,
            )
        except ProtocolError:
            self._ack([ident])  # never deliverable: drop it rather than block the stream
            raise
        self._next_receive[(sender, session)] = expect + 1
        self._ack([ident])
        return message

    def _ack(self, ids: Sequence[int]) -> None:
        """Acknowledge, best effort: an acknowledgement lost now means a later redelivery, which
        :meth:`_sort` drops; the ids are sent again with the next acknowledgement."""
        pending = list(dict.fromkeys([*self._unacked, *ids]))
        try:
            self._retry(lambda: self._link.ack(pending))
        except TransportError:
            self._unacked = pending
        else:
            self._unacked = []

    # --- keys and retries ------------------------------------------------------------------------

    def _public(self, name: str, field: str) -> bytes:
        if name not in self._directory:
            self._refresh()
        key = self._directory.get(name)
        if key is None:
            raise ProtocolError(
                "no published relay key for this participant",
                field=field,
                value=name,
                fix="the participant must publish its relay key before peers can relay with it",
            )
        return key

    def _refresh(self) -> None:
        directory = {name: bytes(key) for name, key in self._retry(self._link.public_keys).items()}
        mine = directory.get(self.participant)
        if mine is not None and mine != self._keys.public_bytes():
            raise ProtocolError(
                "the relay publishes another key for this participant",
                field="public_key",
                value=fingerprint(mine),
                fix="publish this participant's key again, or stop: the relay may be hostile",
            )
        for name, key in self._pinned.items():
            if name in directory and directory[name] != key:
                raise ProtocolError(
                    "a published relay key differs from the pinned one",
                    field="public_key",
                    value=name,
                    fix=f"compare fingerprints out of band (published {fingerprint(directory[name])})",
                )
        self._directory = {**directory, **self._pinned}

    def _retry(self, call: Callable[[], T]) -> T:
        delay = self._backoff
        for attempt in range(self._retries + 1):
            try:
                return call()
            except TransportError:
                if attempt == self._retries:
                    raise
                self._sleep(delay * (1 + secrets.randbelow(1000) / 1000))
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover


# --- the in-process relay --------------------------------------------------------------------------


class InProcessRelay:
    """The relay inside one process (simulations, tests), with the checks the coordinator makes:
    envelopes only, at most ``max_bytes``, sender = the posting participant, recipient in
    ``participants``, a (sender, recipient, session, seq) stored once (the same bytes again are a
    no-op, other bytes a :class:`ConflictError`), and a key, once published, never replaced.
    ``recorder(direction, participant, frame)`` sees every frame posted and delivered."""

    def __init__(
        self,
        participants: Iterable[str],
        *,
        max_bytes: int = RELAY_CODEC.max_bytes,
        recorder: Callable[[str, str, bytes], None] | None = None,
    ) -> None:
        self.participants = frozenset(participants)
        self.max_bytes = max_bytes
        self._recorder = recorder
        self._codec = Codec(max_bytes=max_bytes, max_elements=max_bytes, types=RELAY_CODEC.types)
        self._changed = threading.Condition()
        self._keys: dict[str, bytes] = {}
        self._boxes: dict[str, dict[int, tuple[str, str, bytes]]] = {}
        self._stored: dict[tuple[str, str, str, int], str] = {}
        self._next_id = 1

    def publish(self, participant: str, public_key: bytes) -> None:
        with self._changed:
            known = self._keys.get(participant)
            if known is not None and known != public_key:
                raise ConflictError(
                    "this participant already published another relay key",
                    field="public_key",
                    value=participant,
                    fix="keep one key per participant for the relay's lifetime",
                )
            self._keys[participant] = bytes(public_key)

    def channel(self, participant: str, keys: RelayKeyPair, **options) -> RelayChannel:
        """Publish ``keys`` for ``participant`` and return its channel."""
        self.publish(participant, keys.public_bytes())
        return RelayChannel(self.link(participant), keys, **options)

    def link(self, participant: str) -> RelayLink:
        if participant not in self.participants:
            raise ForbiddenError(
                "not a participant of this relay", code="not_in_job", value=participant
            )
        return _InProcessLink(self, participant)

    def pending(self, participant: str) -> int:
        """How many envelopes wait for ``participant``'s acknowledgement."""
        with self._changed:
            return len(self._boxes.get(participant, {}))

    def _post(self, caller: str, recipient: str, frame: bytes) -> None:
        if len(frame) > self.max_bytes:
            raise PayloadTooLargeError(
                "relay envelope is too large",
                field="body",
                value=len(frame),
                fix=f"send at most {self.max_bytes} bytes: split the message",
            )
        envelope = self._codec.decode(frame)
        assert isinstance(envelope, RelayEnvelope)
        check_routing(envelope, caller=caller, recipient=recipient, participants=self.participants)
        key = (envelope.sender, recipient, envelope.session, envelope.seq)
        digest = hashlib.sha256(frame).hexdigest()
        with self._changed:
            stored = self._stored.get(key)
            if stored is not None:
                if stored != digest:
                    raise ConflictError(
                        "this sequence number was already used in this session",
                        field="relay_envelope.seq",
                        value=envelope.seq,
                        fix="number each (recipient, session) stream's envelopes 0, 1, 2...",
                    )
                return
            self._stored[key] = digest
            self._boxes.setdefault(recipient, {})[self._next_id] = (
                envelope.sender,
                envelope.session,
                bytes(frame),
            )
            self._next_id += 1
            self._changed.notify_all()
        if self._recorder is not None:
            self._recorder("post", caller, bytes(frame))

    def _fetch(
        self, participant: str, sender: str | None, session: str | None, after: int, wait: float
    ) -> list[Delivery]:
        def pending() -> list[Delivery]:
            box = self._boxes.get(participant, {})
            return [
                Delivery(ident, frame)
                for ident, (who, name, frame) in sorted(box.items())
                if ident > after
                and (sender is None or who == sender)
                and (session is None or name == session)
            ]

        with self._changed:
            found = self._changed.wait_for(pending, timeout=max(0.0, wait))
        if self._recorder is not None:
            for delivery in found:
                self._recorder("deliver", participant, delivery.frame)
        return found

    def _ack(self, participant: str, ids: Sequence[int]) -> None:
        with self._changed:
            box = self._boxes.get(participant, {})
            for ident in ids:
                box.pop(ident, None)  # only the caller's own box: other ids are ignored


@dataclass
class _InProcessLink(RelayLink):
    relay: InProcessRelay
    participant: str

    def post(self, recipient: str, frame: bytes) -> None:
        self.relay._post(self.participant, recipient, frame)

    def fetch(
        self, *, sender: str | None, session: str | None, after: int, wait: float
    ) -> list[Delivery]:
        return self.relay._fetch(self.participant, sender, session, after, wait)

    def ack(self, ids: Sequence[int]) -> None:
        self.relay._ack(self.participant, ids)

    def public_keys(self) -> dict[str, bytes]:
        with self.relay._changed:
            return dict(self.relay._keys)
