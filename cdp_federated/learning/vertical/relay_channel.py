"""SecureBoost over the relay: the parties' messages travel as sealed envelopes.

:class:`RelayPartyChannel` adapts a relay channel (``federation.relay.RelayChannel``, in-process
or over HTTP through the coordinator) to the two-method :class:`~.channel.PartyChannel` the
active party drives, by fixing the relay session. :func:`serve_passive` is a passive party's
loop on its own relay channel: receive from the active party, ``handle``, send the replies (a
refusal travels back as a :class:`~.messages.Failure`, as in :class:`~.channel.InProcessChannel`).

Duck-typed on purpose: ``learning`` never imports a transport (``DESIGN.md``), so any object
with ``send(recipient, message, session)`` and ``receive(sender, session, timeout)`` fits. Build
the relay channels with ``codec=VERTICAL_CODEC`` so only SecureBoost messages are accepted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ...errors import CDPFederatedError, ConfigError, TransportError
from .messages import Failure, SBFinish, SBPredictResponse

__all__ = ["SessionRelay", "RelayPartyChannel", "serve_passive", "DEFAULT_REPLY_TIMEOUT"]

# A passive party answers one histogram level per request; at 100k rows with Paillier-2048 a
# level takes seconds, so waiting minutes before calling a party gone is deliberate.
DEFAULT_REPLY_TIMEOUT = 600.0


class SessionRelay(Protocol):
    def send(self, recipient: str, message: Any, session: str) -> int: ...

    def receive(self, sender: str, session: str, timeout: float) -> Any: ...


class RelayPartyChannel:
    """The :class:`~.channel.PartyChannel` of one party over ``relay`` in relay session
    ``session``; ``receive`` waits ``timeout`` seconds unless told otherwise."""

    def __init__(
        self, relay: SessionRelay, session: str, *, timeout: float = DEFAULT_REPLY_TIMEOUT
    ) -> None:
        if not session:
            raise ConfigError("a relay session name is required", field="session", value=session)
        if not timeout > 0:
            raise ConfigError("the reply timeout must be positive", field="timeout", value=timeout)
        self.relay = relay
        self.session = session
        self.timeout = float(timeout)

    def send(self, recipient: str, message: Any) -> None:
        self.relay.send(recipient, message, self.session)

    def receive(self, sender: str, timeout: float | None = None) -> Any:
        return self.relay.receive(
            sender, self.session, self.timeout if timeout is None else timeout
        )


def serve_passive(
    party: Any,
    relay: SessionRelay,
    *,
    active: str,
    session: str,
    stop: threading.Event | None = None,
    poll: float = 0.5,
    idle_timeout: float = DEFAULT_REPLY_TIMEOUT,
    predictions: int | None = None,
    monotonic: Callable[[], float] = time.monotonic,
) -> str:
    """Answer the active party's messages until ``stop`` is set, the active party has been
    silent for ``idle_timeout`` seconds, or, when ``predictions`` is given, training finished
    and that many scoring requests were answered. Returns why it stopped (``"stopped"``,
    ``"idle"`` or ``"done"``). Relay errors other than a quiet poll propagate."""
    channel = RelayPartyChannel(relay, session, timeout=max(poll, 1e-3))
    answered, finished = 0, False
    last = monotonic()
    while True:
        if stop is not None and stop.is_set():
            return "stopped"
        if finished and predictions is not None and answered >= predictions:
            return "done"
        try:
            message = channel.receive(active)
        except TransportError:  # nothing within one poll: look at the stop conditions again
            if monotonic() - last > idle_timeout:
                return "idle"
            continue
        last = monotonic()
        try:
            replies = party.handle(message)
        except CDPFederatedError as exc:
            replies = [
                Failure(
                    participant=party.name,
                    stage=type(message).__name__,
                    error_type=type(exc).__name__,
                    message=exc.message,
                )
            ]
        finished = finished or isinstance(message, SBFinish)
        for reply in replies or []:
            channel.send(active, reply)
            answered += isinstance(reply, SBPredictResponse)
