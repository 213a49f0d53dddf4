"""Transports: how the coordinator reaches participants. One interface, in-process or (later) HTTP.

A transport delivers a request message to a named participant and returns its reply. A
participant that fails to serve a request (its handler raised, or its reply could not be encoded
or decoded) is reported as a :class:`~.messages.Failure` *reply*, not an exception: the coordinator
decides whether a round can go on without it. Only delivery problems on the coordinator's own side
(an unknown participant, a request the codec refuses) raise.

:meth:`Transport.request_many` sends one request to each of several participants and returns every
reply. The default asks them one after another; a transport that can wait for replies together
(:class:`~cdp_federated.coordinator.queue_transport.QueueTransport`) overrides it, so a round
costs the slowest participant's time rather than the sum of all of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping

from ..errors import TransportError
from .codec import Codec
from .messages import Failure, Message

__all__ = [
    "Transport",
    "InProcessTransport",
    "Handler",
    "Recorder",
    "stage_of",
    "undelivered",
]

Handler = Callable[[Message], Message]
# (direction, participant, frame): direction is "request" (to the participant) or "reply".
Recorder = Callable[[str, str, bytes], None]


def stage_of(message: Message) -> str:
    """The protocol stage a request belongs to: ``"fit"`` for ``fit_ins`` and so on."""
    return message.TYPE.removesuffix("_ins")


def undelivered(participant: str, message: Message, exc: TransportError) -> Failure:
    """The :class:`Failure` reply standing for a request that could not be delivered."""
    return Failure(participant, stage_of(message), type(exc).__name__, str(exc))


class Transport(ABC):
    """Delivers typed messages to participants and returns their typed replies."""

    @abstractmethod
    def participants(self) -> list[str]:
        """Names of the participants this transport can reach, sorted."""

    @abstractmethod
    def request(self, participant: str, message: Message) -> Message:
        """Send ``message`` to ``participant`` and return its reply (a :class:`Failure` when the
        participant could not serve it). Raises :class:`TransportError` when it cannot be sent."""

    def request_many(self, requests: Mapping[str, Message]) -> dict[str, Message]:
        """Send each participant its request and return ``{participant: reply}``, in the order
        of ``requests``. A request that cannot be delivered (:class:`TransportError` from
        :meth:`request`, such as an unknown participant) is a :class:`Failure` reply with that
        error type, so one bad address does not lose the other replies; any other error raises.

        This default asks the participants one after another and gives exactly what calling
        :meth:`request` for each would; transports that can wait for replies concurrently
        override it with the same results."""
        replies: dict[str, Message] = {}
        for participant, message in requests.items():
            try:
                replies[participant] = self.request(participant, message)
            except TransportError as exc:
                replies[participant] = undelivered(participant, message, exc)
        return replies


class InProcessTransport(Transport):
    """Participants as in-process handlers, with every message crossing the real wire format.

    Both directions always go through ``codec`` (encode -> bytes -> decode), so a simulation
    exercises exactly what an HTTP deployment would send; ``recorder`` sees every frame.
    """

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        codec: Codec | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self._handlers = dict(handlers)
        self._codec = codec or Codec()
        self._recorder = recorder

    def participants(self) -> list[str]:
        return sorted(self._handlers)

    def request(self, participant: str, message: Message) -> Message:
        handler = self._handlers.get(participant)
        if handler is None:
            raise TransportError(
                "unknown participant",
                field="participant",
                value=participant,
                fix=f"use one of: {', '.join(self.participants()) or '(none)'}",
            )
        delivered = self._codec.decode(self._frame("request", participant, message))
        try:
            reply = handler(delivered)
            if not isinstance(reply, Message):
                raise TypeError(f"handler returned {type(reply).__name__}, not a message")
            frame = self._frame("reply", participant, reply)
            return self._codec.decode(frame)
        except Exception as exc:  # noqa: BLE001 - any participant-side error becomes a Failure
            failure = Failure(
                participant=participant,
                stage=stage_of(message),
                error_type=type(exc).__name__,
                message=str(exc),
            )
            return self._codec.decode(self._frame("reply", participant, failure))

    def _frame(self, direction: str, participant: str, message: Message) -> bytes:
        frame = self._codec.encode(message)
        if self._recorder is not None:
            self._recorder(direction, participant, frame)
        return frame
