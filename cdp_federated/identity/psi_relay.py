"""ECDH PSI between real parties over relay channels: :func:`align_many`'s flow, message by message.

:func:`~.psi.align_many` runs every party in one process. Here each party runs in its own process
and only its own :class:`~.psi.PsiParty` stage machine; the messages between them travel sealed
through a relay channel (``federation.relay.RelayChannel``, in-process or through the
coordinator), so the relay carries only envelopes it cannot open, and the PSI messages inside are
authenticated again by the session key both hellos fix.

* The label party (:func:`align_as_label`) is the receiver of one session per passive party:
  it runs each until the passive party waits for the result, keeps the rows common to every
  pair, shuffles them into a random common order (:func:`~.psi_crypto.secure_permutation`)
  and reveals to each passive party only its own rows of that common set, in that order.
* A passive party (:func:`align_as_passive`) is the sender: it answers until the label party's
  ``psi_done`` and learns its rows of the common set, in the common order.

What each learns is what :func:`~.psi.align_many` documents: the label party each pairwise
intersection, a passive party only the common set's size and its own rows of it. A refused
message ends the session on both sides: the refusing party sends a ``failure`` before raising.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ..errors import CDPFederatedError, ConfigError, ProtocolError
from ..federation.codec import Codec
from ..federation.messages import Failure, Message
from .psi import (
    AWAITING_RESULT,
    DEFAULT_BATCH,
    DEFAULT_FPR,
    RECEIVER,
    SENDER,
    AlignmentResult,
    PsiConfig,
    PsiParty,
)
from .psi_crypto import Rng, X25519Group, secure_permutation
from .psi_messages import PSI_MESSAGES, PsiAck, PsiDone, PsiStart

__all__ = ["PSI_CODEC", "psi_session", "align_as_label", "align_as_passive"]

# Build the PSI relay channels with this codec: only PSI messages and failures are accepted.
PSI_CODEC = Codec(types={m.TYPE: m for m in (*PSI_MESSAGES, Failure)})


class SessionRelay(Protocol):
    participant: str

    def send(self, recipient: str, message: Message, session: str) -> int: ...

    def receive(self, sender: str, session: str, timeout: float) -> Message: ...


def psi_session(job_id: str, passive: str) -> str:
    """The PSI (and relay) session name of ``passive``'s alignment in ``job_id``: fixed by
    both, short whatever the names' lengths."""
    digest = hashlib.sha256(f"{job_id}\x00{passive}".encode()).hexdigest()[:32]
    return f"psi-{digest}"


def _config(session: str, batch_size: int, fpr: float) -> PsiConfig:
    return PsiConfig(session=session, reveal=(RECEIVER, SENDER), batch_size=batch_size, fpr=fpr)


def _refused(peer: str, failure: Failure) -> ProtocolError:
    return ProtocolError(
        f"{peer} refused the PSI protocol: {failure.error_type}: {failure.message}",
        field="participant",
        value=peer,
        fix="check both parties run the same job and release",
    )


def _handle(party: PsiParty, message: Message, channel: SessionRelay, peer: str, session: str):
    """``party.handle(message)``; on a refusal tell the peer (best effort) before raising."""
    try:
        return party.handle(message)
    except CDPFederatedError as exc:
        failure = Failure(channel.participant, "psi", type(exc).__name__, exc.message)
        try:
            channel.send(peer, failure, session)
        except CDPFederatedError:
            pass  # the relay is gone too: the peer times out instead
        raise


def _exchange(
    channel: SessionRelay,
    party: PsiParty,
    peer: str,
    session: str,
    message: Message,
    timeout: float,
    *,
    pause: bool,
) -> PsiAck | None:
    """Send ``message``, hand each reply to ``party`` and send its answer, until the peer
    answers a done with a done (None) or, with ``pause``, until the peer waits for the result
    (that acknowledgement is returned, not yet handled)."""
    while True:
        channel.send(peer, message, session)
        reply = channel.receive(peer, session, timeout)
        if isinstance(reply, Failure):
            raise _refused(peer, reply)
        if isinstance(message, PsiDone) and isinstance(reply, PsiDone):
            return None
        if pause and isinstance(reply, PsiAck) and reply.stage == AWAITING_RESULT:
            return reply
        message = _handle(party, reply, channel, peer, session)


def align_as_label(
    channel: SessionRelay,
    ids: Any,
    passives: Sequence[str],
    *,
    job_id: str,
    timeout: float,
    batch_size: int = DEFAULT_BATCH,
    fpr: float = DEFAULT_FPR,
    rng: Rng = os.urandom,
    group: X25519Group | None = None,
) -> AlignmentResult:
    """The label party's side: its rows of the ids every passive party also holds, in a fresh
    random common order that each passive party learns too (for its own rows)."""
    if not passives:
        raise ConfigError("PSI needs at least one passive party", field="passives")
    group = group or X25519Group(workers=1)
    paused: dict[str, tuple[PsiParty, PsiAck]] = {}
    for name in passives:
        session = psi_session(job_id, name)
        party = PsiParty(
            ids, role=RECEIVER, config=_config(session, batch_size, fpr), group=group, rng=rng
        )
        hello = party.handle(PsiStart(session=session))
        ack = _exchange(channel, party, name, session, hello, timeout, pause=True)
        if ack is None:
            raise ProtocolError(
                "the PSI session ended before the result", field="participant", value=name
            )
        paused[name] = (party, ack)
    common: np.ndarray | None = None
    for party, _ack in paused.values():
        rows = party.matched_rows()
        common = rows if common is None else np.intersect1d(common, rows, assume_unique=True)
    assert common is not None
    order = common[secure_permutation(len(common), rng)]
    for name, (party, ack) in paused.items():
        session = psi_session(job_id, name)
        party.reveal_only(order)
        message = _handle(party, ack, channel, name, session)
        _exchange(channel, party, name, session, message, timeout, pause=False)
    return AlignmentResult(rows=order, size=len(order))


def align_as_passive(
    channel: SessionRelay,
    ids: Any,
    active: str,
    *,
    job_id: str,
    timeout: float,
    batch_size: int = DEFAULT_BATCH,
    fpr: float = DEFAULT_FPR,
    rng: Rng = os.urandom,
    group: X25519Group | None = None,
) -> AlignmentResult:
    """A passive party's side: answer the label party's session until its ``psi_done``; returns
    this party's rows of the common set, in the common order."""
    session = psi_session(job_id, channel.participant)
    party = PsiParty(
        ids,
        role=SENDER,
        config=_config(session, batch_size, fpr),
        group=group or X25519Group(workers=1),
        rng=rng,
    )
    while True:
        message = channel.receive(active, session, timeout)
        if isinstance(message, Failure):
            raise _refused(active, message)
        reply = _handle(party, message, channel, active, session)
        channel.send(active, reply, session)
        if isinstance(message, PsiDone):
            break
    rows = party.outcome().rows
    assert rows is not None  # reveal names the sender: it learns its rows
    return AlignmentResult(rows=rows, size=len(rows))
