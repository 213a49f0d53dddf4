"""How parties exchange messages: a two-method channel, and an in-process one for simulations.

The active party drives the protocol through any object with ``send(recipient, message)`` and
``receive(sender, timeout)`` (the relay's ``RelayChannel`` fits through a one-line adapter that
adds the session). :class:`InProcessChannel` runs passive parties in the same process: every
message is framed and parsed with :data:`~.messages.VERTICAL_CODEC` (so what a party gets is
exactly what the wire would carry) and kept in ``log`` for inspection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from ...errors import CDPFederatedError, ProtocolError, TrainingError, TransportError
from .messages import VERTICAL_CODEC, Failure

__all__ = ["PartyChannel", "InProcessChannel", "receive_reply"]


class PartyChannel(Protocol):
    def send(self, recipient: str, message: Any) -> None: ...

    def receive(self, sender: str, timeout: float | None = None) -> Any: ...


class InProcessChannel:
    """The active party's end; ``parties`` maps a name to an object with ``handle(message)``."""

    def __init__(self, parties: Mapping[str, Any], *, active: str = "active") -> None:
        self.parties = dict(parties)
        self.active = active
        self.log: list[tuple[str, str, Any]] = []  # (sender, recipient, decoded message)
        self._inbox: dict[str, deque] = {name: deque() for name in self.parties}

    def _wire(self, sender: str, recipient: str, message: Any) -> Any:
        decoded = VERTICAL_CODEC.decode(VERTICAL_CODEC.encode(message))
        self.log.append((sender, recipient, decoded))
        return decoded

    def send(self, recipient: str, message: Any) -> None:
        party = self.parties.get(recipient)
        if party is None:
            raise TransportError("unknown party", field="recipient", value=recipient)
        delivered = self._wire(self.active, recipient, message)
        try:
            replies = party.handle(delivered)
        except CDPFederatedError as exc:  # a party's refusal travels back as a Failure message
            replies = [
                Failure(
                    participant=recipient,
                    stage=type(delivered).__name__,
                    error_type=type(exc).__name__,
                    message=exc.message,
                )
            ]
        for reply in replies or []:
            self._inbox[recipient].append(self._wire(recipient, self.active, reply))

    def receive(self, sender: str, timeout: float | None = None) -> Any:
        queue = self._inbox.get(sender)
        if not queue:
            raise TransportError(
                "no reply from party",
                field="sender",
                value=sender,
                fix="check that the party is running and reachable",
            )
        return queue.popleft()


def receive_reply(channel: PartyChannel, sender: str, kind: type, session: str) -> Any:
    """The active party's next message from ``sender``: a dropout or a refusal is a
    :class:`TrainingError` naming the party; any other type or session is a :class:`ProtocolError`."""
    try:
        reply = channel.receive(sender)
    except CDPFederatedError as exc:
        raise TrainingError(
            f"party {sender!r} dropped out",
            field="party",
            value=sender,
            fix="restart the job when it is back",
        ) from exc
    if isinstance(reply, Failure):
        raise TrainingError(
            f"party {sender!r} refused: {reply.message}", field="party", value=sender
        )
    if not isinstance(reply, kind) or getattr(reply, "session", None) != session:
        raise ProtocolError(
            "unexpected reply",
            field="type",
            value=type(reply).__name__,
            fix=f"expected {kind.__name__}",
        )
    return reply


def dispatch(party: Any, message: object, handlers: dict, setup_type: type, refuse: Any) -> Any:
    """A passive party's stage machine step: ``handlers`` maps a message type to (the stages it
    is allowed in, ``"a|b"``, and its handler); every message but the setup must carry the
    party's session. ``refuse(message, field, value)`` builds the party's typed error."""
    entry = handlers.get(type(message))
    if entry is None:
        raise refuse("unexpected message type", "type", type(message).__name__)
    stages, handler = entry
    if party.stage not in stages.split("|"):
        raise refuse(
            f"{type(message).__name__} is out of order in stage {party.stage!r}",
            "stage",
            party.stage,
        )
    if not isinstance(message, setup_type) and message.session != party.session:
        raise refuse("message for another session", "session", message.session)
    return handler(message)


def scoring_rows(features: Any, width: int) -> np.ndarray:
    """Rows to score, checked against the training columns' count."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != width or not np.isfinite(x).all():
        raise TrainingError(
            "scoring features must match the training columns", field="features", value=x.shape
        )
    return x
