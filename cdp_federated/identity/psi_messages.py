"""Wire messages of the ECDH private set intersection (registered with the federation codec).

Points travel as ``uint8`` arrays of shape ``(k, 32)`` (blinded u-coordinates) or ``(k, t)``
(truncated double-blinded tags); positions as ``uint8`` bitmaps or ``uint32`` indices. Every
message after the two hellos carries ``seq`` (a per-sender counter from 0) and ``mac``, an
HMAC-SHA256 under a key that both hellos' ephemeral X25519 keys and contents fix, so a relay that
alters, replays or reorders anything after the hellos is caught. See ``identity/psi.py`` for the
stage machine that checks them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..federation.messages import INTEGER, Message, register

__all__ = [
    "PsiStart",
    "PsiHello",
    "PsiPoints",
    "PsiAck",
    "PsiSelection",
    "PsiDone",
    "PSI_MESSAGES",
]


@register("psi_start", version=1)
@dataclasses.dataclass(frozen=True, eq=False)
class PsiStart(Message):
    """From the driver to the receiving party: open ``session``."""

    session: str


@register("psi_hello", version=1, arrays={"kex": INTEGER})
@dataclasses.dataclass(frozen=True, eq=False)
class PsiHello(Message):
    """A party's announcement: how many distinct ids it will send (``count``) in batches of
    ``batch_size``, the session's ``mode`` and ``reveal`` (roles that learn the result) and
    ``fpr`` (false-positive budget), which both must agree on, and an ephemeral X25519 public key
    ``kex`` (32 uint8) for the session's message authentication key."""

    session: str
    sender: str
    mode: str
    reveal: list[str]
    fpr: float
    count: int
    batch_size: int
    kex: np.ndarray


@register("psi_points", version=1, arrays={"points": INTEGER})
@dataclasses.dataclass(frozen=True, eq=False)
class PsiPoints(Message):
    """Batch ``index`` of ``total`` of a stage's points: ``receiver_blinded`` (the receiver's
    blinded ids, shuffled), ``receiver_tags`` (those ids double-blinded and truncated, in the same
    order, or reshuffled in cardinality mode) or ``sender_blinded`` (the sender's, shuffled)."""

    session: str
    sender: str
    seq: int
    stage: str
    index: int
    total: int
    points: np.ndarray
    mac: str


@register("psi_ack", version=1)
@dataclasses.dataclass(frozen=True, eq=False)
class PsiAck(Message):
    """Batch ``index`` of ``stage`` was received and checked (``awaiting_result``: the sender has
    sent everything and waits for the receiver's result)."""

    session: str
    sender: str
    seq: int
    stage: str
    index: int
    mac: str


@register("psi_selection", version=1, arrays={"positions": INTEGER})
@dataclasses.dataclass(frozen=True, eq=False)
class PsiSelection(Message):
    """Which of the sender's shuffled points are in the revealed intersection, batch ``index`` of
    ``total``: a little-endian ``bitmap`` (uint8; the common order is the sender's shuffled order)
    or ``indices`` (uint32, in the common order), ``count`` selected in all."""

    session: str
    sender: str
    seq: int
    encoding: str
    index: int
    total: int
    count: int
    positions: np.ndarray
    mac: str


@register("psi_done", version=1)
@dataclasses.dataclass(frozen=True, eq=False)
class PsiDone(Message):
    """The session is over for ``sender``; ``size`` is the result size when the peer may learn it,
    else -1."""

    session: str
    sender: str
    seq: int
    size: int
    mac: str


PSI_MESSAGES = (PsiStart, PsiHello, PsiPoints, PsiAck, PsiSelection, PsiDone)
