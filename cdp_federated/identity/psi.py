"""ECDH private set intersection over Curve25519, as an explicit two-party stage machine.

Two parties hold sets of normalised ids. The *receiver* learns the intersection (its own rows) or
only its size; the *sender* learns its rows only when the policy reveals the result to it too.
Neither learns anything about the other's non-matching ids beyond the other set's size.

Protocol (``H`` hashes an id to a Curve25519/twist u-coordinate, ``x^k`` is ``X25519(k, x)``;
``a`` and ``b`` are fresh secret scalars; every set is shuffled by its owner before it is sent)::

    receiver                                         sender
    PsiHello(count, batch_size, kex)        ->
                                            <-       PsiHello(count, batch_size, kex)
    PsiPoints(receiver_blinded: H(x)^a)     ->       (batches; each acked)
                                            <-       PsiPoints(receiver_tags: tag(H(x)^ab))
                                                     same order, or reshuffled (cardinality)
    (acks)                                  ->
                                            <-       PsiPoints(sender_blinded: H(y)^b)
    computes tag(H(y)^ba), intersects       ->       (acks)
                                            <-       PsiAck(awaiting_result)
    PsiSelection(bitmap | indices)          ->       only if the sender may learn its rows
    PsiDone(size or -1)                     ->
                                            <-       PsiDone

``tag`` truncates a double-blinded point to ``t`` bytes, the fewest that keep the chance of any
false match below ``fpr`` (``t = ceil(log2(n_r * n_s / fpr) / 8)``, 8 to 32). The common order of
the aligned rows is the sender's shuffled order, which is uniformly random and known to both.

Each party is a :class:`PsiParty` whose :meth:`~PsiParty.handle` takes one message and returns the
next, so a driver relays replies between the two over any transport (:func:`run_psi` uses
:class:`~cdp_federated.federation.transport.InProcessTransport`). Every incoming message is
checked against the party's state: session, sender role, message type and stage, sequence number,
batch index and total, array shape and dtype, the HMAC under the session key, then the content
(canonical, non-small-order points; no duplicates). Anything else raises
:class:`~cdp_federated.errors.ProtocolError` naming the field, and the party refuses every later
message of that session. The security argument is in ``docs/identity.md``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import json
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from typing import Any

import numpy as np
import polars as pl
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ConfigError, ProtocolError
from ..federation.messages import Failure, Message
from ..federation.transport import InProcessTransport, Recorder, Transport
from .psi_crypto import (
    POINT_BYTES,
    Rng,
    SmallOrderPoint,
    X25519Group,
    canonical_rows,
    new_scalar,
    secure_permutation,
)
from .psi_messages import PsiAck, PsiDone, PsiHello, PsiPoints, PsiSelection, PsiStart

__all__ = [
    "AlignmentResult",
    "PartyOutcome",
    "PsiConfig",
    "PsiParty",
    "PsiResult",
    "State",
    "align_many",
    "match_report",
    "run_psi",
    "tag_bytes",
    "DEFAULT_BATCH",
    "DEFAULT_FPR",
    "MAX_BATCH",
]

RECEIVER, SENDER = "receiver", "sender"
MODES = ("intersection", "cardinality")
DEFAULT_BATCH = 100_000
# 200k points of 32 bytes: 6.4 MB and 6.4M array elements, inside the codec's default limits.
MAX_BATCH = 200_000
MAX_COUNT = 2**31 - 1
DEFAULT_FPR = 1e-9

# Stages (the ``stage`` field of PsiPoints / PsiAck).
RECEIVER_BLINDED = "receiver_blinded"
RECEIVER_TAGS = "receiver_tags"
SENDER_BLINDED = "sender_blinded"
AWAITING_RESULT = "awaiting_result"
SELECTION = "selection"

_KDF_SALT = b"cdp-fl psi v1 session keys"


class State(enum.StrEnum):
    """Where a party is in the protocol. The receiver walks ``INIT -> HELLO_SENT ->
    SENDING_BLINDED -> RECEIVING_TAGS -> RECEIVING_PEER -> INTERSECTED [-> SENDING_SELECTION] ->
    DONE``; the sender ``INIT -> RECEIVING_BLINDED -> SENDING_TAGS -> SENDING_OWN ->
    AWAITING_RESULT [-> RECEIVING_SELECTION] -> DONE``. Any refused message leads to ``FAILED``."""

    INIT = "init"
    HELLO_SENT = "hello_sent"
    SENDING_BLINDED = "sending_blinded"
    RECEIVING_TAGS = "receiving_tags"
    RECEIVING_PEER = "receiving_peer"
    INTERSECTED = "intersected"
    SENDING_SELECTION = "sending_selection"
    RECEIVING_BLINDED = "receiving_blinded"
    SENDING_TAGS = "sending_tags"
    SENDING_OWN = "sending_own"
    AWAITING_RESULT = "awaiting_result"
    RECEIVING_SELECTION = "receiving_selection"
    DONE = "done"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class PsiConfig:
    """What both parties of a session must agree on (each checks the other's hello against it).

    ``reveal`` names the roles that learn the result: always ``"receiver"``, plus ``"sender"`` when
    the policy lets both learn it. ``batch_size`` is this party's own batch size (the peer
    announces its own); ``fpr`` bounds the probability of any false match in the whole run.
    """

    session: str
    mode: str = "intersection"
    reveal: tuple[str, ...] = (RECEIVER,)
    batch_size: int = DEFAULT_BATCH
    fpr: float = DEFAULT_FPR

    def __post_init__(self) -> None:
        if not self.session or len(self.session) > 200:
            raise ConfigError("session id must be 1-200 characters", field="session")
        if self.mode not in MODES:
            raise ConfigError(
                "unknown PSI mode", field="mode", value=self.mode, fix=f"use one of {MODES}"
            )
        if self.reveal not in ((RECEIVER,), (RECEIVER, SENDER)):
            raise ConfigError(
                "reveal must be ('receiver',) or ('receiver', 'sender')",
                field="reveal",
                value=self.reveal,
            )
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ConfigError(
                "batch size out of range",
                field="batch_size",
                value=self.batch_size,
                fix=f"use 1..{MAX_BATCH}",
            )
        if not 0.0 < self.fpr < 1.0:
            raise ConfigError("fpr must be in (0, 1)", field="fpr", value=self.fpr)


@dataclasses.dataclass(frozen=True, eq=False)
class PartyOutcome:
    """What one party learned: ``size`` of the result (None: not revealed to it) and ``rows``,
    indices into its own input, one per matched id (its first row), in the common order (None:
    not revealed, or cardinality mode)."""

    size: int | None
    rows: np.ndarray | None


@dataclasses.dataclass(frozen=True, eq=False)
class AlignmentResult:
    """A party's row order of the intersection on its own data: ``rows[k]`` of every party refers to
    the same id. ``size == len(rows)``."""

    rows: np.ndarray
    size: int


@dataclasses.dataclass(frozen=True, eq=False)
class PsiResult:
    """Outcome of :func:`run_psi`.

    ``left_rows``/``right_rows`` are row indices into each side's input in the common order (None
    where the policy does not reveal the rows to that side, and in cardinality mode).
    ``bytes_exchanged`` counts every protocol message once, as the producing party framed it;
    ``frames`` is the number of those messages; ``seconds`` the wall time of the whole run.
    """

    intersection_size: int
    left_rows: np.ndarray | None
    right_rows: np.ndarray | None
    bytes_exchanged: int
    seconds: float
    frames: int
    mode: str
    reveal_to: tuple[str, ...]

    def alignment(self, side: str) -> AlignmentResult:
        """``side``'s (``"left"`` or ``"right"``) rows as an :class:`AlignmentResult`."""
        rows = {"left": self.left_rows, "right": self.right_rows}.get(side)
        if side not in ("left", "right"):
            raise ConfigError("side must be 'left' or 'right'", field="side", value=side)
        if rows is None:
            raise ConfigError(
                "the policy did not reveal the intersection rows to this side",
                field="reveal_to",
                value=side,
                fix="run with reveal_to=('left', 'right') and mode='intersection'",
            )
        return AlignmentResult(rows=rows, size=len(rows))


def tag_bytes(receiver_count: int, sender_count: int, fpr: float) -> int:
    """Bytes of double-blinded point each comparison uses: the fewest that keep the chance of any
    false match among ``receiver_count * sender_count`` pairs below ``fpr`` (8 to 32)."""
    pairs = max(1, receiver_count * sender_count)
    bits = math.log2(pairs) - math.log2(fpr)
    return min(POINT_BYTES, max(8, math.ceil(bits / 8)))


def match_report(size: int, minimum: int) -> int | str:
    """A match count fit to report: ``size`` itself, or ``"<minimum"`` when it is below the policy's
    minimum cohort size (so small overlaps are never disclosed, zero included)."""
    if minimum < 1:
        raise ConfigError("minimum cohort size must be at least 1", field="minimum", value=minimum)
    return size if size >= minimum else f"<{minimum}"


# --- helpers -----------------------------------------------------------------------------------


def _prepare(ids: Sequence[str] | pl.Series | np.ndarray) -> tuple[pl.Series, np.ndarray]:
    """Distinct non-empty ids in first-seen order and the input row of each one's first occurrence."""
    if isinstance(ids, pl.Series):
        if ids.dtype not in (pl.String, pl.Categorical, pl.Null):
            raise ConfigError(
                "PSI inputs must be normalised id strings",
                field="ids",
                value=str(ids.dtype),
                fix="normalise the identifiers first (cdp_federated.identity)",
            )
        series = ids.cast(pl.String).rename("id")
    else:
        values = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
        bad = next((type(v).__name__ for v in values if not isinstance(v, str | None)), None)
        if bad is not None:
            raise ConfigError(
                "PSI inputs must be normalised id strings",
                field="ids",
                value=bad,
                fix="normalise the identifiers first (cdp_federated.identity)",
            )
        series = pl.Series("id", values, dtype=pl.String)
    frame = (
        series.to_frame()
        .with_row_index("row")
        # is_first_distinct keeps the first row of each id; it needs a quarter of the memory of
        # unique(maintain_order=True) at a million ids.
        .filter(
            pl.col("id").is_not_null() & (pl.col("id") != "") & pl.col("id").is_first_distinct()
        )
    )
    return frame["id"], frame["row"].to_numpy().astype(np.int64)


def _batches(count: int, batch_size: int) -> int:
    return max(1, math.ceil(count / batch_size))


def _span(index: int, count: int, batch_size: int) -> tuple[int, int]:
    start = index * batch_size
    return start, min(count, start + batch_size)


def _prefix_keys(tags: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(tags[:, :8]).view("<u8").ravel()


def _row_view(tags: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(tags).view(np.dtype((np.void, tags.shape[1]))).ravel()


def _unique_prefixes(keys: np.ndarray) -> bool:
    ordered = np.sort(keys)
    return not bool((ordered[1:] == ordered[:-1]).any())


def _has_duplicates(tags: np.ndarray) -> bool:
    if len(tags) < 2 or _unique_prefixes(_prefix_keys(tags)):
        return False
    return bool(np.unique(_row_view(tags)).size != len(tags))


def _match(mine: np.ndarray, theirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(i, j)`` with ``mine[i] == theirs[j]``; both hold distinct rows."""
    if not len(mine) or not len(theirs):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    ka, kb = _prefix_keys(mine), _prefix_keys(theirs)
    if _unique_prefixes(ka) and _unique_prefixes(kb):
        _, i, j = np.intersect1d(ka, kb, assume_unique=True, return_indices=True)
        same = (mine[i] == theirs[j]).all(axis=1)
        return i[same].astype(np.int64), j[same].astype(np.int64)
    _, i, j = np.intersect1d(_row_view(mine), _row_view(theirs), return_indices=True)
    return i.astype(np.int64), j.astype(np.int64)


def _hello_bytes(hello: PsiHello) -> bytes:
    fields = {
        "session": hello.session,
        "sender": hello.sender,
        "mode": hello.mode,
        "reveal": hello.reveal,
        "fpr": hello.fpr,
        "count": hello.count,
        "batch_size": hello.batch_size,
    }
    head = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return len(head).to_bytes(4, "little") + head + np.asarray(hello.kex, dtype=np.uint8).tobytes()


def _mac(key: bytes, message: Message) -> str:
    """HMAC-SHA256 over the message type and every field but ``mac`` (arrays with dtype and shape)."""
    digest = hmac.new(key, message.TYPE.encode() + b"\x00", hashlib.sha256)
    for field in dataclasses.fields(message):  # type: ignore[arg-type]
        if field.name == "mac":
            continue
        value = getattr(message, field.name)
        if field.name in message.ARRAYS:
            array = np.ascontiguousarray(value)
            digest.update(f"{field.name}:{array.dtype.name}:{list(array.shape)}:".encode())
            digest.update(array.tobytes())
        else:
            digest.update(json.dumps([field.name, value], separators=(",", ":")).encode() + b";")
    return digest.hexdigest()


def _fail(message: str, field: str, value: Any = None, fix: str | None = None) -> ProtocolError:
    return ProtocolError(
        message, field=field, value=value, fix=fix or "abort the session and start a new one"
    )


# --- the party ---------------------------------------------------------------------------------


class PsiParty:
    """One side of a PSI session: a stage machine whose :meth:`handle` consumes the peer's (or the
    driver's) message and returns the next message to relay to the peer.

    ``ids`` are normalised id strings (duplicates allowed: the first row of each distinct id
    represents it; nulls and empty strings never match). ``group`` does the X25519 work (share one
    between the two parties of a simulation); ``rng`` supplies the secret scalars, the shuffles'
    random keys and the session key material (``os.urandom``, injectable for tests).
    """

    def __init__(
        self,
        ids: Sequence[str] | pl.Series | np.ndarray,
        *,
        role: str,
        config: PsiConfig,
        group: X25519Group | None = None,
        rng: Rng = os.urandom,
    ) -> None:
        if role not in (RECEIVER, SENDER):
            raise ConfigError("role must be 'receiver' or 'sender'", field="role", value=role)
        self.role = role
        self.peer = SENDER if role == RECEIVER else RECEIVER
        self.config = config
        self.state = State.INIT
        self._group = group or X25519Group(workers=1)
        self._rng = rng
        self._ids, self._first_rows = _prepare(ids)
        self.count = len(self._ids)
        # Secrets: the blinding scalar, the shuffle of this party's own set, the kex key.
        self._scalar = new_scalar(rng)
        self._order = secure_permutation(self.count, rng)
        self._kex = X25519PrivateKey.from_private_bytes(new_scalar(rng))
        self._hello: PsiHello | None = None
        self._peer_hello: PsiHello | None = None
        self._send_key = self._recv_key = b""
        self._seq = 0
        self._peer_seq = 0
        self._tag = POINT_BYTES
        self._sent = 0  # batches sent in the current sending stage
        self._received = 0  # batches received in the current receiving stage
        self._own_tags = np.zeros((0, POINT_BYTES), dtype=np.uint8)
        self._peer_tags = np.zeros((0, POINT_BYTES), dtype=np.uint8)
        self._matched_rows: np.ndarray | None = None  # receiver: own rows, by sender position
        self._matched_positions: np.ndarray | None = None  # receiver: sender positions (sorted)
        self._selection: np.ndarray | None = None  # receiver: own rows to reveal, in order
        self._positions = np.zeros(0, dtype=np.uint8)  # receiver: selection payload
        self._selection_count = 0
        self._encoding = "bitmap"
        self._selected: list[np.ndarray] = []  # sender: received selection batches
        self._selection_total = 0
        self._selection_encoding = ""
        self._size: int | None = None
        self._rows: np.ndarray | None = None

    # --- public -----------------------------------------------------------------------------

    @property
    def tag_bytes(self) -> int:
        """Length of the compared tags (known once both hellos are in)."""
        return self._tag

    def outcome(self) -> PartyOutcome:
        """What this party learned; only once the session is :attr:`State.DONE`."""
        if self.state is not State.DONE:
            raise _fail("the PSI session has not finished", "state", self.state.value)
        return PartyOutcome(size=self._size, rows=self._rows)

    def matched_rows(self) -> np.ndarray:
        """Receiver only, once intersected: own rows of every matched id (sorted)."""
        if self.role != RECEIVER or self._matched_rows is None:
            raise _fail("no intersection computed yet", "state", self.state.value)
        return np.sort(self._matched_rows)

    def reveal_only(self, rows: np.ndarray) -> None:
        """Receiver only, before the result goes out: reveal to the sender just the ids at these own
        ``rows`` (a subset of :meth:`matched_rows`), in this order. Used to align several parties
        on one common intersection (:func:`align_many`)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.state is not State.INTERSECTED:
            raise _fail("reveal_only needs a computed intersection", "state", self.state.value)
        if not np.isin(rows, self.matched_rows()).all() or len(np.unique(rows)) != len(rows):
            raise ConfigError(
                "reveal_only rows must be distinct matched rows", field="rows", value=len(rows)
            )
        self._selection = rows

    def handle(self, message: Message) -> Message:
        """Consume one message; return the next one for the peer. Raises :class:`ProtocolError`."""
        if self.state is State.FAILED:
            raise _fail("this PSI session was aborted after an invalid message", "state", "failed")
        try:
            return self._dispatch(message)
        except SmallOrderPoint as exc:
            self.state = State.FAILED
            raise _fail(
                "point of small order (the peer is misbehaving)", "points", exc.index
            ) from None
        except BaseException:
            self.state = State.FAILED
            raise

    # --- dispatch ---------------------------------------------------------------------------

    def _dispatch(self, message: Message) -> Message:
        state = self.state
        if isinstance(message, PsiStart) and self.role == RECEIVER and state is State.INIT:
            self._check_session(message.session)
            self._hello = self._make_hello()
            self.state = State.HELLO_SENT
            return self._hello
        if isinstance(message, PsiHello):
            if (self.role, state) == (RECEIVER, State.HELLO_SENT):
                self._accept_hello(message)
                return self._send_blinded()
            if (self.role, state) == (SENDER, State.INIT):
                self._hello = self._make_hello()
                self._accept_hello(message)
                self._peer_tags = np.empty((message.count, self._tag), dtype=np.uint8)
                self.state = State.RECEIVING_BLINDED
                return self._hello
        expected = _EXPECTED.get((self.role, state))
        if expected is None or not isinstance(message, expected[0]):
            raise _fail(
                f"unexpected {message.TYPE} in state {state.value}",
                "type",
                message.TYPE,
            )
        self._check_envelope(message)
        stage = getattr(message, "stage", None)
        if expected[1] is not None and stage != expected[1]:
            raise _fail(
                f"stage {stage!r} is out of order (expected {expected[1]!r})", "stage", stage
            )
        return getattr(self, expected[2])(message)

    # --- hellos and keys --------------------------------------------------------------------

    def _check_session(self, session: str) -> None:
        if session != self.config.session:
            raise _fail("message belongs to another session", "session", session)

    def _make_hello(self) -> PsiHello:
        kex = np.frombuffer(self._kex.public_key().public_bytes_raw(), dtype=np.uint8)
        return PsiHello(
            session=self.config.session,
            sender=self.role,
            mode=self.config.mode,
            reveal=list(self.config.reveal),
            fpr=self.config.fpr,
            count=self.count,
            batch_size=self.config.batch_size,
            kex=kex.copy(),
        )

    def _accept_hello(self, hello: PsiHello) -> None:
        self._check_session(hello.session)
        if hello.sender != self.peer:
            raise _fail("hello from the wrong role", "sender", hello.sender)
        for name, mine in (
            ("mode", self.config.mode),
            ("reveal", list(self.config.reveal)),
            ("fpr", self.config.fpr),
        ):
            if getattr(hello, name) != mine:
                raise _fail(
                    f"the peer's {name} differs from this party's",
                    name,
                    getattr(hello, name),
                    "both parties must run the same PSI policy",
                )
        if not 0 <= hello.count <= MAX_COUNT:
            raise _fail("announced count out of range", "count", hello.count)
        if not 1 <= hello.batch_size <= MAX_BATCH:
            raise _fail("announced batch size out of range", "batch_size", hello.batch_size)
        kex = np.asarray(hello.kex)
        if kex.dtype != np.uint8 or kex.shape != (POINT_BYTES,):
            raise _fail("kex must be 32 uint8", "kex", list(kex.shape))
        try:
            shared = self._kex.exchange(X25519PublicKey.from_public_bytes(kex.tobytes()))
        except ValueError:
            raise _fail("kex is a point of small order", "kex") from None
        self._peer_hello = hello
        assert self._hello is not None
        first, second = (self._hello, hello) if self.role == RECEIVER else (hello, self._hello)
        transcript = hashlib.sha256(_hello_bytes(first) + _hello_bytes(second)).digest()
        keys = HKDF(algorithm=hashes.SHA256(), length=64, salt=_KDF_SALT, info=transcript).derive(
            shared
        )
        receiver_key, sender_key = keys[:32], keys[32:]
        self._send_key, self._recv_key = (
            (receiver_key, sender_key) if self.role == RECEIVER else (sender_key, receiver_key)
        )
        n_receiver, n_sender = (
            (self.count, hello.count) if self.role == RECEIVER else (hello.count, self.count)
        )
        self._tag = tag_bytes(n_receiver, n_sender, self.config.fpr)

    # --- envelope checks and sealing --------------------------------------------------------

    def _check_envelope(self, message: Any) -> None:
        self._check_session(message.session)
        if message.sender != self.peer:
            raise _fail("message from the wrong role", "sender", message.sender)
        if message.seq != self._peer_seq:
            raise _fail(
                f"sequence number out of order (expected {self._peer_seq})", "seq", message.seq
            )

    def _verify(self, message: Any) -> None:
        if not hmac.compare_digest(_mac(self._recv_key, message), message.mac):
            raise _fail("message authentication failed (altered in transit?)", "mac")
        self._peer_seq += 1

    def _seal(self, message: Any) -> Any:
        sealed = dataclasses.replace(message, mac=_mac(self._send_key, message))
        self._seq += 1
        return sealed

    def _ack(self, stage: str, index: int) -> PsiAck:
        return self._seal(
            PsiAck(
                session=self.config.session,
                sender=self.role,
                seq=self._seq,
                stage=stage,
                index=index,
                mac="",
            )
        )

    def _points(self, stage: str, index: int, total: int, points: np.ndarray) -> PsiPoints:
        return self._seal(
            PsiPoints(
                session=self.config.session,
                sender=self.role,
                seq=self._seq,
                stage=stage,
                index=index,
                total=total,
                points=points,
                mac="",
            )
        )

    def _check_batch(
        self, message: PsiPoints, count: int, batch_size: int, width: int
    ) -> tuple[int, int]:
        total = _batches(count, batch_size)
        if message.index != self._received:
            raise _fail(
                f"batch index out of order (expected {self._received})", "index", message.index
            )
        if message.total != total:
            raise _fail(f"batch total differs from the announced {total}", "total", message.total)
        start, stop = _span(message.index, count, batch_size)
        points = np.asarray(message.points)
        if points.dtype != np.uint8 or points.shape != (stop - start, width):
            raise _fail(
                f"batch must be uint8 of shape ({stop - start}, {width})",
                "points",
                {"dtype": points.dtype.name, "shape": list(points.shape)},
            )
        self._verify(message)
        if width == POINT_BYTES and not canonical_rows(points).all():
            bad = int(np.flatnonzero(~canonical_rows(points))[0])
            raise _fail("point is not a canonical X25519 u-coordinate", "points", start + bad)
        self._received += 1
        return start, stop

    def _blind_peer(self, points: np.ndarray, offset: int) -> np.ndarray:
        try:
            return self._group.blind_points(self._scalar, points)
        except SmallOrderPoint as exc:
            raise SmallOrderPoint(offset + exc.index) from None

    def _own_batch(self, index: int) -> np.ndarray:
        start, stop = _span(index, self.count, self.config.batch_size)
        ids = self._ids.gather(self._order[start:stop]).to_list()
        return self._group.blind_ids(self._scalar, ids)

    # --- receiver ---------------------------------------------------------------------------

    def _send_blinded(self) -> PsiPoints:
        total = _batches(self.count, self.config.batch_size)
        index = self._sent
        self._sent += 1
        if self._sent == total:
            assert self._peer_hello is not None
            self._received = 0
            self._own_tags = np.empty((self.count, self._tag), dtype=np.uint8)
            self.state = State.RECEIVING_TAGS
        else:
            self.state = State.SENDING_BLINDED
        return self._points(RECEIVER_BLINDED, index, total, self._own_batch(index))

    def _on_blinded_ack(self, ack: PsiAck) -> PsiPoints:
        if ack.index != self._sent - 1:
            raise _fail(f"ack for batch {ack.index}, expected {self._sent - 1}", "index", ack.index)
        self._verify(ack)
        return self._send_blinded()

    def _on_receiver_tags(self, message: PsiPoints) -> PsiAck:
        assert self._peer_hello is not None
        start, stop = self._check_batch(message, self.count, self._peer_hello.batch_size, self._tag)
        self._own_tags[start:stop] = message.points
        if stop == self.count or self.count == 0:
            if _has_duplicates(self._own_tags):
                raise _fail("double-blinded set holds duplicates", "points")
            self._received = 0
            self._peer_tags = np.empty((self._peer_hello.count, self._tag), dtype=np.uint8)
            self.state = State.RECEIVING_PEER
        return self._ack(RECEIVER_TAGS, message.index)

    def _on_sender_blinded(self, message: PsiPoints) -> PsiAck:
        assert self._peer_hello is not None
        peer = self._peer_hello
        start, stop = self._check_batch(message, peer.count, peer.batch_size, POINT_BYTES)
        doubled = self._blind_peer(np.asarray(message.points), start)
        self._peer_tags[start:stop] = doubled[:, : self._tag]
        if stop == peer.count or peer.count == 0:
            if _has_duplicates(self._peer_tags):
                raise _fail("the sender's blinded set holds duplicates", "points")
            self._intersect()
        return self._ack(SENDER_BLINDED, message.index)

    def _intersect(self) -> None:
        mine, theirs = _match(self._own_tags, self._peer_tags)
        self._size = len(mine)
        if self.config.mode == "intersection":
            by_position = np.argsort(theirs, kind="stable")
            self._matched_positions = theirs[by_position]
            self._matched_rows = self._first_rows[self._order[mine[by_position]]]
            self._rows = self._matched_rows
        # The tags are no longer needed; drop them.
        self._own_tags = self._peer_tags = np.zeros((0, self._tag), dtype=np.uint8)
        self.state = State.INTERSECTED

    def _on_awaiting_result(self, ack: PsiAck) -> Message:
        if ack.index != 0:
            raise _fail("awaiting_result must have index 0", "index", ack.index)
        self._verify(ack)
        if self.config.mode == "intersection" and SENDER in self.config.reveal:
            self._build_selection()
            self._sent = 0
            return self._send_selection()
        shared = self.config.mode == "cardinality" and SENDER in self.config.reveal
        return self._done(self._size if shared else -1)

    def _build_selection(self) -> None:
        assert self._peer_hello is not None and self._matched_positions is not None
        if self._selection is None:
            mask = np.zeros(self._peer_hello.count, dtype=bool)
            mask[self._matched_positions] = True
            self._positions = np.packbits(mask, bitorder="little")
            self._selection_count = len(self._matched_positions)
            self._encoding = "bitmap"
        else:
            assert self._matched_rows is not None
            lookup = np.argsort(self._matched_rows)
            where = lookup[np.searchsorted(self._matched_rows[lookup], self._selection)]
            self._positions = self._matched_positions[where].astype(np.uint32)
            self._selection_count = len(self._selection)
            self._encoding = "indices"
            self._rows = self._selection
            self._size = len(self._selection)

    def _send_selection(self) -> PsiSelection:
        total = _batches(len(self._positions), self.config.batch_size)
        index = self._sent
        start, stop = _span(index, len(self._positions), self.config.batch_size)
        self._sent += 1
        self.state = State.SENDING_SELECTION
        return self._seal(
            PsiSelection(
                session=self.config.session,
                sender=self.role,
                seq=self._seq,
                encoding=self._encoding,
                index=index,
                total=total,
                count=self._selection_count,
                positions=self._positions[start:stop],
                mac="",
            )
        )

    def _on_selection_ack(self, ack: PsiAck) -> Message:
        if ack.index != self._sent - 1:
            raise _fail(f"ack for batch {ack.index}, expected {self._sent - 1}", "index", ack.index)
        self._verify(ack)
        if self._sent < _batches(len(self._positions), self.config.batch_size):
            return self._send_selection()
        return self._done(self._selection_count)

    def _done(self, size: int) -> PsiDone:
        self.state = State.DONE
        return self._seal(
            PsiDone(session=self.config.session, sender=self.role, seq=self._seq, size=size, mac="")
        )

    # --- sender -----------------------------------------------------------------------------

    def _on_receiver_blinded(self, message: PsiPoints) -> Message:
        assert self._peer_hello is not None
        peer = self._peer_hello
        start, stop = self._check_batch(message, peer.count, peer.batch_size, POINT_BYTES)
        doubled = self._blind_peer(np.asarray(message.points), start)
        self._peer_tags[start:stop] = doubled[:, : self._tag]
        if stop < peer.count:
            return self._ack(RECEIVER_BLINDED, message.index)
        if _has_duplicates(self._peer_tags):
            raise _fail("the receiver's blinded set holds duplicates", "points")
        if self.config.mode == "cardinality":
            # Reshuffled: the receiver can count matches but not tell which of its ids matched.
            self._peer_tags = self._peer_tags[secure_permutation(peer.count, self._rng)]
        self._sent = 0
        self.state = State.SENDING_TAGS
        return self._send_tags()

    def _send_tags(self) -> PsiPoints:
        count = len(self._peer_tags)
        total = _batches(count, self.config.batch_size)
        index = self._sent
        start, stop = _span(index, count, self.config.batch_size)
        self._sent += 1
        return self._points(RECEIVER_TAGS, index, total, self._peer_tags[start:stop])

    def _on_tags_ack(self, ack: PsiAck) -> PsiPoints:
        if ack.index != self._sent - 1:
            raise _fail(f"ack for batch {ack.index}, expected {self._sent - 1}", "index", ack.index)
        self._verify(ack)
        if self._sent < _batches(len(self._peer_tags), self.config.batch_size):
            return self._send_tags()
        self._peer_tags = np.zeros((0, self._tag), dtype=np.uint8)
        self._sent = 0
        self.state = State.SENDING_OWN
        return self._send_own()

    def _send_own(self) -> PsiPoints:
        total = _batches(self.count, self.config.batch_size)
        index = self._sent
        self._sent += 1
        return self._points(SENDER_BLINDED, index, total, self._own_batch(index))

    def _on_own_ack(self, ack: PsiAck) -> PsiAck | PsiPoints:
        if ack.index != self._sent - 1:
            raise _fail(f"ack for batch {ack.index}, expected {self._sent - 1}", "index", ack.index)
        self._verify(ack)
        if self._sent < _batches(self.count, self.config.batch_size):
            return self._send_own()
        self.state = State.AWAITING_RESULT
        self._received = 0
        return self._ack(AWAITING_RESULT, 0)

    def _on_selection(self, message: PsiSelection) -> PsiAck:
        if self.config.mode != "intersection" or SENDER not in self.config.reveal:
            raise _fail("the policy reveals no rows to the sender", "type", message.TYPE)
        if message.encoding not in ("bitmap", "indices"):
            raise _fail("unknown selection encoding", "encoding", message.encoding)
        if message.index != self._received:
            raise _fail(
                f"batch index out of order (expected {self._received})", "index", message.index
            )
        first = self._selected[0] if self._selected else None
        positions = np.asarray(message.positions)
        dtype = np.uint8 if message.encoding == "bitmap" else np.uint32
        if positions.dtype != dtype or positions.ndim != 1:
            raise _fail(f"positions must be a 1-d {np.dtype(dtype).name} array", "positions")
        if first is not None and (
            message.total != self._selection_total or message.encoding != self._selection_encoding
        ):
            raise _fail("selection batches disagree on total or encoding", "total", message.total)
        if not 1 <= message.total <= MAX_COUNT or message.index >= message.total:
            raise _fail("selection total out of range", "total", message.total)
        self._verify(message)
        self._selection_total = message.total
        self._selection_encoding = message.encoding
        self._selection_count = message.count
        self._selected.append(positions.copy())
        self._received += 1
        self.state = State.RECEIVING_SELECTION
        if self._received == message.total:
            self._finish_selection()
        return self._ack(SELECTION, message.index)

    def _finish_selection(self) -> None:
        positions = np.concatenate(self._selected)
        if self._selection_encoding == "bitmap":
            if len(positions) != math.ceil(self.count / 8):
                raise _fail("bitmap length does not match this party's count", "positions")
            bits = np.unpackbits(positions, bitorder="little")
            if bits[self.count :].any():
                raise _fail("bitmap sets bits past this party's count", "positions")
            chosen = np.flatnonzero(bits[: self.count])
        else:
            chosen = positions.astype(np.int64)
            if len(chosen) and (
                chosen.max() >= self.count or len(np.unique(chosen)) != len(chosen)
            ):
                raise _fail("selection indices are out of range or repeated", "positions")
        if len(chosen) != self._selection_count:
            raise _fail(
                "selection count differs from its positions", "count", self._selection_count
            )
        self._rows = self._first_rows[self._order[chosen]]
        self._size = len(chosen)
        self._selected = []

    def _on_result(self, message: PsiSelection | PsiDone) -> Message:
        if isinstance(message, PsiSelection):
            return self._on_selection(message)
        return self._on_done(message)

    def _on_done(self, message: PsiDone) -> PsiDone:
        revealed_rows = self.config.mode == "intersection" and SENDER in self.config.reveal
        if revealed_rows and self._rows is None:
            raise _fail("done before the selection arrived", "type", message.TYPE)
        self._verify(message)
        if revealed_rows:
            if message.size != self._size:
                raise _fail("done size differs from the selection", "size", message.size)
        elif SENDER in self.config.reveal:
            if message.size < 0:
                raise _fail("the policy reveals the size but none came", "size", message.size)
            self._size = message.size
        elif message.size != -1:
            raise _fail("the policy reveals nothing to the sender", "size", message.size)
        return self._done(-1)


# (role, state) -> (accepted message classes, expected stage, handler method)
_EXPECTED: dict[tuple[str, State], tuple[tuple[type[Message], ...], str | None, str]] = {
    (RECEIVER, State.SENDING_BLINDED): ((PsiAck,), RECEIVER_BLINDED, "_on_blinded_ack"),
    (RECEIVER, State.RECEIVING_TAGS): ((PsiPoints,), RECEIVER_TAGS, "_on_receiver_tags"),
    (RECEIVER, State.RECEIVING_PEER): ((PsiPoints,), SENDER_BLINDED, "_on_sender_blinded"),
    (RECEIVER, State.INTERSECTED): ((PsiAck,), AWAITING_RESULT, "_on_awaiting_result"),
    (RECEIVER, State.SENDING_SELECTION): ((PsiAck,), SELECTION, "_on_selection_ack"),
    (SENDER, State.RECEIVING_BLINDED): ((PsiPoints,), RECEIVER_BLINDED, "_on_receiver_blinded"),
    (SENDER, State.SENDING_TAGS): ((PsiAck,), RECEIVER_TAGS, "_on_tags_ack"),
    (SENDER, State.SENDING_OWN): ((PsiAck,), SENDER_BLINDED, "_on_own_ack"),
    (SENDER, State.AWAITING_RESULT): ((PsiSelection, PsiDone), None, "_on_result"),
    (SENDER, State.RECEIVING_SELECTION): ((PsiSelection, PsiDone), None, "_on_result"),
}


# --- drivers -----------------------------------------------------------------------------------

TransportFactory = Callable[[Mapping[str, Callable[[Message], Message]], Recorder], Transport]


class _Meter:
    """Recorder counting each protocol message once (as its producer framed it)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.frames = 0

    def __call__(self, direction: str, participant: str, frame: bytes) -> None:
        if direction == "reply":
            self.bytes += len(frame)
            self.frames += 1


def _in_process(
    handlers: Mapping[str, Callable[[Message], Message]], recorder: Recorder
) -> Transport:
    return InProcessTransport(handlers, recorder=recorder)


def _relay(
    transport: Transport,
    first: str,
    second: str,
    message: Message,
    *,
    pause: Callable[[Message], bool] | None = None,
) -> tuple[str, Message] | None:
    """Deliver ``message`` to ``first``, its reply to ``second``, and so on, until a party answers
    a done with a done. With ``pause``, stop before delivering a message it matches and return
    ``(recipient, message)`` so the caller can resume later."""
    names = (first, second)
    turn = 0
    while True:
        target = names[turn]
        reply = transport.request(target, message)
        if isinstance(reply, Failure):
            raise ProtocolError(
                f"{target} refused the PSI protocol: {reply.error_type}: {reply.message}",
                field="participant",
                value=target,
                fix="check both parties run the same policy and release; start a new session",
            )
        if isinstance(message, PsiDone) and isinstance(reply, PsiDone):
            return None
        message, turn = reply, 1 - turn
        if pause is not None and pause(message):
            return names[turn], message


def _check_reveal(reveal_to: Sequence[str]) -> tuple[str, ...]:
    reveal = tuple(sorted(set(reveal_to)))
    if not reveal or not set(reveal) <= {"left", "right"}:
        raise ConfigError(
            "reveal_to must name 'left', 'right' or both",
            field="reveal_to",
            value=tuple(reveal_to),
        )
    return reveal


def run_psi(
    left_ids: Sequence[str] | pl.Series | np.ndarray,
    right_ids: Sequence[str] | pl.Series | np.ndarray,
    *,
    mode: str = "intersection",
    reveal_to: Sequence[str] = ("left",),
    transport_factory: TransportFactory | None = None,
    workers: int = 2,
    batch_size: int = DEFAULT_BATCH,
    fpr: float = DEFAULT_FPR,
    session: str | None = None,
    executor: Executor | None = None,
    rng: Rng = os.urandom,
) -> PsiResult:
    """Run both parties of a PSI session through a transport and return what each learned.

    The party named first in ``reveal_to`` order (``left`` when it is named) is the receiver; the
    other side learns its rows (``mode="intersection"``) or the size (``mode="cardinality"``) only
    when ``reveal_to`` names it too. ``transport_factory(handlers, recorder)`` builds the
    transport (default: :class:`InProcessTransport`); ``workers`` processes do the scalar
    multiplications (shared by both parties, which run in this process); ``executor`` injects
    the pool instead.
    """
    started = time.perf_counter()
    reveal = _check_reveal(reveal_to)
    session = session or secrets.token_hex(16)
    receiver, sender = ("left", "right") if "left" in reveal else ("right", "left")
    roles = (RECEIVER, SENDER) if len(reveal) == 2 else (RECEIVER,)
    config = PsiConfig(session=session, mode=mode, reveal=roles, batch_size=batch_size, fpr=fpr)
    inputs = {"left": left_ids, "right": right_ids}
    meter = _Meter()
    with X25519Group(workers=workers, executor=executor) as group:
        parties = {
            receiver: PsiParty(
                inputs[receiver], role=RECEIVER, config=config, group=group, rng=rng
            ),
            sender: PsiParty(inputs[sender], role=SENDER, config=config, group=group, rng=rng),
        }
        transport = (transport_factory or _in_process)(
            {name: party.handle for name, party in parties.items()}, meter
        )
        _relay(transport, receiver, sender, PsiStart(session=session))
    outcomes = {name: party.outcome() for name, party in parties.items()}
    size = outcomes[receiver].size
    assert size is not None
    return PsiResult(
        intersection_size=size,
        left_rows=outcomes["left"].rows,
        right_rows=outcomes["right"].rows,
        bytes_exchanged=meter.bytes,
        seconds=time.perf_counter() - started,
        frames=meter.frames,
        mode=mode,
        reveal_to=reveal,
    )


def align_many(
    label_ids: Sequence[str] | pl.Series | np.ndarray,
    parties: Mapping[str, Sequence[str] | pl.Series | np.ndarray],
    *,
    label_name: str = "label",
    transport_factory: TransportFactory | None = None,
    workers: int = 2,
    batch_size: int = DEFAULT_BATCH,
    fpr: float = DEFAULT_FPR,
    executor: Executor | None = None,
    rng: Rng = os.urandom,
) -> dict[str, AlignmentResult]:
    """Align several passive parties with the label party on the ids *all* of them hold.

    The label party runs one PSI session (fresh scalars) as receiver with each passive party and
    learns each pairwise intersection; it then keeps the rows common to every pair, shuffles them
    into a random common order, and reveals to each passive party only its own rows of that
    common set, in that order. Returns ``{name: AlignmentResult}`` with ``label_name`` included.
    """
    if not parties:
        raise ConfigError("align_many needs at least one passive party", field="parties")
    if label_name in parties:
        raise ConfigError("a passive party has the label party's name", field="label_name")
    config_of = {
        name: PsiConfig(
            session=secrets.token_hex(16),
            reveal=(RECEIVER, SENDER),
            batch_size=batch_size,
            fpr=fpr,
        )
        for name in parties
    }
    paused: dict[str, tuple[PsiParty, PsiParty, Transport, tuple[str, Message]]] = {}
    with X25519Group(workers=workers, executor=executor) as group:
        for name, ids in parties.items():
            config = config_of[name]
            label = PsiParty(label_ids, role=RECEIVER, config=config, group=group, rng=rng)
            passive = PsiParty(ids, role=SENDER, config=config, group=group, rng=rng)
            transport = (transport_factory or _in_process)(
                {label_name: label.handle, name: passive.handle}, lambda *_: None
            )
            stop = _relay(
                transport,
                label_name,
                name,
                PsiStart(session=config.session),
                pause=lambda m: isinstance(m, PsiAck) and m.stage == AWAITING_RESULT,
            )
            assert stop is not None
            paused[name] = (label, passive, transport, stop)
        common: np.ndarray | None = None
        for label, *_ in paused.values():
            rows = label.matched_rows()
            common = rows if common is None else np.intersect1d(common, rows, assume_unique=True)
        assert common is not None
        order = common[secure_permutation(len(common), rng)]
        results = {label_name: AlignmentResult(rows=order, size=len(order))}
        for name, (label, passive, transport, (recipient, message)) in paused.items():
            label.reveal_only(order)
            _relay(transport, recipient, name, message)
            rows = passive.outcome().rows
            assert rows is not None
            results[name] = AlignmentResult(rows=rows, size=len(rows))
    return results
