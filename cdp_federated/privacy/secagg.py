"""Secure aggregation that survives dropouts (Bonawitz et al. 2017, full graph), as two explicit
stage machines: :class:`SecAggClient` (one per participant) and :class:`SecAggServer` (the
coordinator). The server learns the ring sum of the surviving clients' inputs and nothing else.

Stages (each machine refuses a call out of order, and the server aborts with
:class:`SecureAggregationAborted` as soon as fewer than ``threshold`` clients are left):

0. **Advertise keys.** Each client draws a fresh X25519 key pair (pairwise masks) and a 32-byte
   self-mask seed ``b``; it sends its public key. The server's roster U1 is who answered.
1. **Share keys.** Each client Shamir-shares ``b`` and its private key among all of U1
   (threshold ``t``), sends each peer its two shares, sealed (through the relay), and sends the
   server the dealer's commitments to every share (:mod:`cdp_federated.crypto.shamir`). U2 is
   who did both.
2. **Masked input.** Each client in U2, holding shares from all of U2, sends
   ``y_u = x_u + PRG(b_u) + sum_{v in U2, v > u} PRG(s_uv) - sum_{v in U2, v < u} PRG(s_uv)``
   over Z_(2**bits), ``s_uv`` the X25519+HKDF seed of the pair bound to the session. U3 is who
   sent one.
3. **Unmasking.** Each client in U3 sends, for every ``v`` in U2, the share of ``b_v`` when ``v``
   is in U3, else the share of ``v``'s private key; never both for one client (a client
   answers one unmasking request per session). The server checks every share against its
   dealer's commitment (a tampered one is left out and its holder named in ``rejected``),
   rebuilds the self-mask seeds of U3 and the private keys of U2 minus U3, and removes their
   masks: ``sum_{u in U3} x_u``.

What the inputs are is the caller's business: :class:`~.secagg_ring.RingEncoder` turns floats
(or integer codes of a quantiser, with ``frac_bits=0``) into ring elements and back, and refuses
values whose sum could wrap. DP noise and compression apply before encoding. An input can also
be a product of rings (``SecAggConfig.segments``: e.g. 16-bit quantiser codes next to a few
64-bit fixed-point values), sent as its little-endian bytes: each segment is masked and summed in
its own ring, from one keystream per seed, so compressed codes travel at their ring's width.

Threat model: clients and the coordinator follow the protocol but the coordinator is curious
(it sees every message it routes). It does not cover a coordinator that lies about dropouts to
different clients (Bonawitz's consistency round with signatures is not implemented) or that
substitutes public keys (pin relay keys), nor clients that deal inconsistent shares.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..crypto import kex, shamir
from ..crypto.prg import RING_DTYPES, keystream
from ..errors import ConfigError, ProtocolError, TrainingError

__all__ = [
    "SecureAggregationAborted",
    "SecAggConfig",
    "SEGMENT_BITS",
    "SharePacket",
    "Reveal",
    "SecAggClient",
    "SecAggServer",
    "SELF",
    "PAIRWISE",
]

SELF, PAIRWISE = "self", "pairwise"  # which secret a share or reveal belongs to
SEGMENT_BITS = (8, 16, 32, 64)  # ring widths a segment of a product-of-rings input may have


class SecureAggregationAborted(TrainingError):
    """Fewer than ``threshold`` clients were left at some stage: no sum, nothing revealed."""


@dataclass(frozen=True)
class SecAggConfig:
    """One aggregation: ``threshold`` clients must survive every stage; ``session`` (unique per
    job and round) binds every seed and commitment; the ring has ``bits`` (32 or 64) bits.
    ``segments`` ((bits, count) pairs), when given, make the input a product of rings instead:
    a uint8 vector holding ``count`` little-endian elements of each segment's ring in turn."""

    threshold: int
    session: str
    bits: int = 32
    segments: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.bits not in RING_DTYPES:
            raise ConfigError("the ring is 32 or 64 bits", field="bits", value=self.bits)
        for bits, count in self.segments:
            if bits not in SEGMENT_BITS or not isinstance(count, int) or count < 0:
                raise ConfigError(
                    "a segment is (bits, count) with bits 8, 16, 32 or 64 and count >= 0",
                    field="segments",
                    value=(bits, count),
                )
        if not isinstance(self.threshold, int) or self.threshold < 2:
            raise ConfigError(
                "the secure-aggregation threshold must be at least 2",
                field="threshold",
                value=self.threshold,
                fix="a threshold of 1 would let one share reveal a client's masks",
            )
        if not self.session:
            raise ConfigError("the session must be named", field="session", value=self.session)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of an input (and of the sum): uint8 bytes for a product of rings."""
        return np.dtype(np.uint8) if self.segments else RING_DTYPES[self.bits].newbyteorder("=")

    def input_length(self, elements: int) -> int:
        """The length of an input: ``elements`` ring elements, or a product of rings' bytes."""
        return sum(b // 8 * c for b, c in self.segments) if self.segments else elements

    def rings(self, length: int) -> _Rings:
        """How to mask an input of ``length`` (in :attr:`dtype` units)."""
        if self.segments:  # bytes on the wire: each segment little-endian
            return _Rings(self.segments, "<")
        return _Rings(((self.bits, length),), "=")  # one ring: the input's own (native) words

    def check_participants(self, count: int) -> None:
        """A threshold over half the participants: two disjoint groups of survivors cannot
        both reach it, which is what stops one client's two secrets being rebuilt together."""
        if not count // 2 < self.threshold <= count:
            raise ConfigError(
                f"threshold {self.threshold} for {count} participants must be a majority",
                field="threshold",
                value=self.threshold,
                fix=f"choose {count // 2 + 1}..{count}",
            )

    def context(self, owner: str, kind: str) -> bytes:
        return f"{self.session}\x00{owner}\x00{kind}".encode()


@dataclass(frozen=True)
class SharePacket:
    """What ``owner`` deals to ``holder`` (sealed end to end): its shares, at ``holder``'s point
    ``x``, of its self-mask seed and of its pairwise private key."""

    owner: str
    holder: str
    x: int
    self_share: shamir.Share
    key_share: shamir.Share


@dataclass(frozen=True)
class Reveal:
    """A survivor's answer about ``owner`` at unmasking: one share, of the ``kind`` secret."""

    owner: str
    kind: str
    share: shamir.Share


def _abort(stage: str, got: int, threshold: int, who: str) -> SecureAggregationAborted:
    return SecureAggregationAborted(
        f"secure aggregation aborted at {stage}: {got} {who} left, the threshold is {threshold}",
        field="threshold",
        value=got,
        fix="nothing was revealed; retry the round when more participants are online, or "
        "lower the threshold (still a majority) for the next job",
    )


def _stage_error(machine: str, expected: str, got: str) -> ProtocolError:
    return ProtocolError(
        f"{machine} is at stage {expected!r}, not {got!r}",
        field="stage",
        value=got,
        fix="run the stages in order, once each",
    )


class _Rings:
    """Masks an input, segment by segment in each segment's ring, from one keystream per seed
    (a single ring is one segment). The scratch buffer is reused for every seed: masking with
    n - 1 pairwise seeds allocates nothing per seed."""

    def __init__(self, parts: tuple[tuple[int, int], ...], order: str) -> None:
        """``order``: the byte order of the input's words ("<" for wire bytes, "=" native);
        masks are the keystream read little-endian everywhere, so the pair's two ends agree
        whatever machines they run on."""
        self.views: list[tuple[np.dtype, int, int]] = []
        self._masks: list[np.dtype] = []
        start = 0
        for bits, count in parts:
            stop = start + bits // 8 * count
            self.views.append((np.dtype(f"{order}u{bits // 8}"), start, stop))
            self._masks.append(np.dtype(f"<u{bits // 8}"))  # the stream reads little-endian
            start = stop
        self.nbytes = start
        self._scratch = np.empty(self.nbytes + 64, dtype=np.uint8)

    def apply(self, total: np.ndarray, seed: bytes, sign: int) -> None:
        """``total`` (the input's bytes, modified in place) plus or minus ``seed``'s mask."""
        mask = keystream(seed, self.nbytes, out=self._scratch)
        op = np.add if sign > 0 else np.subtract
        for (dtype, start, stop), word in zip(self.views, self._masks, strict=True):
            target = total[start:stop].view(dtype)
            op(target, mask[start:stop].view(word), out=target, casting="unsafe")


def _bytes_of(vector: np.ndarray) -> np.ndarray:
    """A uint8 view of a contiguous vector's memory (writable when the vector is), which the
    ring views of :class:`_Rings` read back in the vector's own byte order."""
    return vector.view(np.uint8)


def _pairwise_sign(me: str, peer: str) -> int:
    """The lower-named end of a pair adds the pair's mask, the higher subtracts it: the two
    cancel in the sum."""
    return 1 if me < peer else -1


# --- the client ------------------------------------------------------------------------------------


class SecAggClient:
    """One participant's side for one aggregation of ``vector`` (ring elements of the config's
    dtype). ``mask_key``, ``self_seed`` and ``randbelow``/``token_bytes`` are injectable for
    tests; production draws them from the operating system."""

    def __init__(
        self,
        name: str,
        vector: np.ndarray,
        config: SecAggConfig,
        *,
        mask_key: bytes | None = None,
        self_seed: bytes | None = None,
        randbelow: Callable[[int], int] = secrets.randbelow,
        token_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        array = np.asarray(vector)
        expected = config.input_length(array.size)
        if array.ndim != 1 or array.dtype != config.dtype or array.size != expected:
            what = "the bytes of its rings" if config.segments else f"{config.bits}-bit elements"
            raise ConfigError(
                f"the input must be a vector of {what} ({expected} of them)",
                field="vector",
                value=f"{array.dtype}{list(array.shape)}",
                fix="encode it with RingEncoder (or QuantisedRing) first",
            )
        self.name = name
        self.config = config
        self.stage = "advertise"
        self._vector = array
        self._key = kex.private_from_bytes(mask_key) if mask_key else kex.generate_private()
        self._seed = self_seed if self_seed is not None else token_bytes(shamir.SECRET_BYTES)
        self._randbelow, self._token_bytes = randbelow, token_bytes
        self._roster: dict[str, bytes] = {}
        self._survivors: list[str] = []
        self._held: dict[str, SharePacket] = {}  # owner -> the shares it dealt to this client

    def advertise(self) -> bytes:
        """Stage 0: the public key the peers' masks will be agreed with."""
        self._advance("advertise", "share")
        return kex.public_bytes(self._key)

    def share_keys(
        self, roster: Mapping[str, bytes]
    ) -> tuple[dict[str, SharePacket], dict[str, dict[int, bytes]]]:
        """Stage 1: given U1's public keys, the packet to seal for each peer and the dealer's
        commitments for the server (``{SELF: {x: digest}, PAIRWISE: {x: digest}}``)."""
        self._advance("share", "mask")
        t = self.config.threshold
        if roster.get(self.name) != kex.public_bytes(self._key):
            raise ProtocolError(
                "the roster does not hold this client's own public key",
                field="roster",
                value=self.name,
                fix="the coordinator altered the keys: stop",
            )
        if len(roster) < t:
            raise _abort("share keys", len(roster), t, "clients")
        self.config.check_participants(len(roster))  # never share under a minority threshold
        if len({bytes(k) for k in roster.values()}) != len(roster):
            raise ProtocolError("two clients advertised the same key", field="roster")
        self._roster = {name: bytes(key) for name, key in roster.items()}
        names = sorted(self._roster)
        xs = [i + 1 for i in range(len(names))]
        self_shares, self_commit = shamir.deal(
            self._seed,
            t,
            xs,
            context=self.config.context(self.name, SELF),
            randbelow=self._randbelow,
            token_bytes=self._token_bytes,
        )
        key_shares, key_commit = shamir.deal(
            kex.private_bytes(self._key),
            t,
            xs,
            context=self.config.context(self.name, PAIRWISE),
            randbelow=self._randbelow,
            token_bytes=self._token_bytes,
        )
        packets = {
            holder: SharePacket(self.name, holder, x, s, k)
            for holder, x, s, k in zip(names, xs, self_shares, key_shares, strict=True)
        }
        self._held[self.name] = packets.pop(self.name)
        commitments = {
            SELF: dict(zip(xs, self_commit, strict=True)),
            PAIRWISE: dict(zip(xs, key_commit, strict=True)),
        }
        return packets, commitments

    def masked_input(
        self, survivors: Sequence[str], packets: Mapping[str, SharePacket]
    ) -> np.ndarray:
        """Stage 2: given U2 and the packets its members dealt this client, the masked input."""
        self._advance("mask", "unmask")
        survivors = self._subset(survivors, set(self._roster), "share keys")
        mine = self._held[self.name].x
        for owner in survivors:
            if owner == self.name:
                continue
            packet = packets.get(owner)
            if packet is None or (packet.owner, packet.holder, packet.x) != (
                owner,
                self.name,
                mine,
            ):
                raise ProtocolError(
                    "no valid share packet from a client that shared keys",
                    field="packets",
                    value=owner,
                    fix="the relay lost or misrouted it: this client cannot take part",
                )
            self._held[owner] = packet
        self._survivors = survivors
        rings = self.config.rings(self._vector.size)
        total = np.ascontiguousarray(self._vector).copy()
        raw = _bytes_of(total)
        rings.apply(raw, self._seed, +1)
        context, mine = self.config.session.encode(), self._roster[self.name]
        for peer in survivors:
            if peer != self.name:
                seed = kex.pairwise_seed(self._key, self._roster[peer], context, my_public=mine)
                rings.apply(raw, seed, _pairwise_sign(self.name, peer))
        return total

    def unmask(self, survivors: Sequence[str]) -> list[Reveal]:
        """Stage 3: given U3, a share of each survivor's self-mask seed and of each dropped
        client's private key; answered once, so no client has both its secrets revealed."""
        self._advance("unmask", "done")
        alive = set(self._subset(survivors, set(self._survivors), "masked input"))
        reveals = []
        for owner in self._survivors:
            packet = self._held[owner]
            if owner in alive:
                reveals.append(Reveal(owner, SELF, packet.self_share))
            else:
                reveals.append(Reveal(owner, PAIRWISE, packet.key_share))
        return reveals

    def _subset(self, names: Sequence[str], allowed: set[str], stage: str) -> list[str]:
        chosen = sorted(set(names))
        if self.name not in chosen or not set(chosen) <= allowed or len(chosen) != len(names):
            raise ProtocolError(
                f"the survivors of {stage} must be distinct earlier participants, this one "
                "included",
                field="survivors",
                value=sorted(set(names) - allowed)[:5],
                fix="the coordinator is inconsistent: stop",
            )
        if len(chosen) < self.config.threshold:
            raise _abort(stage, len(chosen), self.config.threshold, "clients")
        return chosen

    def _advance(self, expected: str, following: str) -> None:
        if self.stage != expected:
            raise _stage_error(f"client {self.name!r}", self.stage, expected)
        self.stage = following


# --- the server ------------------------------------------------------------------------------------


@dataclass
class _ServerState:
    roster: dict[str, bytes] = field(default_factory=dict)  # U1
    commitments: dict[str, dict[str, dict[int, bytes]]] = field(default_factory=dict)  # U2
    masked: dict[str, np.ndarray] = field(default_factory=dict)  # U3
    rejected: dict[str, str] = field(default_factory=dict)  # holder -> why its share was refused


class SecAggServer:
    """The coordinator's side: collects each stage's answers from ``participants`` (dropouts
    are whoever does not answer), aborts below threshold, and unmasks the sum of U3's inputs of
    ``length`` ring elements."""

    def __init__(self, participants: Sequence[str], config: SecAggConfig, length: int) -> None:
        config.check_participants(len(set(participants)))
        self.participants = sorted(set(participants))
        self.config = config
        self.length = config.input_length(length)  # bytes, for a product of rings
        self.stage = "advertise"
        self.state = _ServerState()

    @property
    def survivors(self) -> list[str]:
        """U3: whose inputs the sum holds."""
        return sorted(self.state.masked)

    @property
    def dropped(self) -> list[str]:
        return [p for p in self.participants if p not in self.state.masked]

    def receive_keys(self, keys: Mapping[str, bytes]) -> dict[str, bytes]:
        """Stage 0 answers -> the roster U1 to send every member."""
        self._advance("advertise", "share")
        roster = {n: bytes(k) for n, k in keys.items() if n in self.participants}
        self._check("advertise keys", len(roster))
        self.state.roster = dict(sorted(roster.items()))
        return dict(self.state.roster)

    def receive_commitments(
        self, commitments: Mapping[str, Mapping[str, Mapping[int, bytes]]]
    ) -> list[str]:
        """Stage 1 answers (each dealer's commitments, one per U1 member and secret) -> U2."""
        self._advance("share", "mask")
        points = set(range(1, len(self.state.roster) + 1))
        kept = {}
        for name, table in commitments.items():
            if name in self.state.roster and all(
                set(table.get(kind, {})) == points for kind in (SELF, PAIRWISE)
            ):
                kept[name] = {kind: dict(table[kind]) for kind in (SELF, PAIRWISE)}
        self._check("share keys", len(kept))
        self.state.commitments = dict(sorted(kept.items()))
        return list(self.state.commitments)

    def receive_masked(self, vectors: Mapping[str, np.ndarray]) -> list[str]:
        """Stage 2 answers -> U3 (a vector of the wrong shape or type is a dropout)."""
        self._advance("mask", "unmask")
        dtype = self.config.dtype
        kept = {
            name: np.asarray(vector)
            for name, vector in vectors.items()
            if name in self.state.commitments
            and np.asarray(vector).shape == (self.length,)
            and np.asarray(vector).dtype == dtype
        }
        self._check("masked input", len(kept))
        self.state.masked = dict(sorted(kept.items()))
        return list(self.state.masked)

    def receive_reveals(self, reveals: Mapping[str, Sequence[Reveal]]) -> np.ndarray:
        """Stage 3 answers (from members of U3) -> the ring sum of U3's inputs."""
        self._advance("unmask", "done")
        answered = {n: r for n, r in reveals.items() if n in self.state.masked}
        self._check("unmasking", len(answered))
        alive = set(self.state.masked)
        x_of = {name: i + 1 for i, name in enumerate(self.state.roster)}
        shares: dict[tuple[str, str], list[shamir.Share]] = {}
        for holder, items in sorted(answered.items()):
            for reveal in items:
                expected_kind = SELF if reveal.owner in alive else PAIRWISE
                table = self.state.commitments.get(reveal.owner, {}).get(expected_kind, {})
                digest = table.get(reveal.share.x)
                context = self.config.context(reveal.owner, expected_kind)
                if (
                    reveal.kind != expected_kind
                    or reveal.share.x != x_of[holder]
                    or digest is None
                    or shamir.commitment(reveal.share, context) != digest
                ):
                    self.state.rejected[holder] = f"bad share of {reveal.owner}'s {reveal.kind}"
                    continue
                shares.setdefault((reveal.owner, expected_kind), []).append(reveal.share)
        rings = self.config.rings(self.length)
        total = np.zeros(self.length, dtype=self.config.dtype)
        raw = _bytes_of(total)
        for vector in self.state.masked.values():
            for dtype, start, stop in rings.views:  # each segment wraps in its own ring
                target = raw[start:stop].view(dtype)
                np.add(
                    target,
                    _bytes_of(np.ascontiguousarray(vector))[start:stop].view(dtype),
                    out=target,
                )
        context = self.config.session.encode()
        for owner in self.state.commitments:
            kind = SELF if owner in alive else PAIRWISE
            secret = self._rebuild(owner, kind, shares.get((owner, kind), []))
            if kind == SELF:
                rings.apply(raw, secret, -1)
                continue
            key = kex.private_from_bytes(secret)
            if kex.public_bytes(key) != self.state.roster[owner]:
                raise ProtocolError(
                    "a rebuilt private key does not match its advertised public key",
                    field="shares",
                    value=owner,
                    fix="its dealer sent inconsistent shares: the round cannot be unmasked",
                )
            for survivor in alive:  # take back the mask each survivor shares with ``owner``
                seed = kex.pairwise_seed(
                    key, self.state.roster[survivor], context, my_public=self.state.roster[owner]
                )
                rings.apply(raw, seed, -_pairwise_sign(survivor, owner))
        return total

    def _rebuild(self, owner: str, kind: str, shares: list[shamir.Share]) -> bytes:
        t = self.config.threshold
        if len(shares) < t:
            raise _abort(f"unmasking ({owner}'s {kind} secret)", len(shares), t, "valid shares")
        return shamir.combine(
            shares,
            t,
            self.state.commitments[owner][kind],
            context=self.config.context(owner, kind),
        )

    def _check(self, stage: str, count: int) -> None:
        if count < self.config.threshold:
            self.stage = "aborted"
            raise _abort(stage, count, self.config.threshold, "participants")

    def _advance(self, expected: str, following: str) -> None:
        if self.stage != expected:
            raise _stage_error("the secure-aggregation server", self.stage, expected)
        self.stage = following
