"""What every training driver does with a stage's replies (``run_horizontal``, ``run_horizontal_gbm``):
ask all participants at once, turn a missing or wrong reply into a :class:`Failure`, and re-raise a
participant's refusal as the typed error it reported."""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import (
    CDPFederatedError,
    ConfigError,
    NoTrainingDataError,
    PolicyViolation,
    SchemaMismatchError,
    TrainingError,
    TransportError,
)
from ..federation.messages import Failure, Message
from ..federation.transport import Transport, stage_of, undelivered

__all__ = ["ask_all", "as_failure", "raise_failure"]

# Participant-side error types the coordinator re-raises as themselves (others: TrainingError).
TYPED_FAILURES: dict[str, type[CDPFederatedError]] = {
    "SchemaMismatchError": SchemaMismatchError,
    "NoTrainingDataError": NoTrainingDataError,
    "PolicyViolation": PolicyViolation,
    "ConfigError": ConfigError,
}


def ask_all(transport: Transport, requests: Mapping[str, Message]) -> dict[str, Message]:
    """Every participant's reply, asked together and keyed by name (sorted, whatever order they
    came back in); a delivery failure becomes a :class:`Failure` like any other, and so does a
    reply the transport left out."""
    ordered = dict(sorted(requests.items()))
    try:
        replies = transport.request_many(ordered)
    except TransportError as exc:  # the whole batch could not be sent
        replies = {name: undelivered(name, message, exc) for name, message in ordered.items()}
    return {
        name: replies.get(name) or undelivered(name, message, TransportError("no reply returned"))
        for name, message in ordered.items()
    }


def as_failure(participant: str, request: Message, reply: Message, wanted: str) -> Failure:
    """``reply`` itself when it is a failure, else a ProtocolError failure naming what was wanted."""
    if isinstance(reply, Failure):
        return reply
    return Failure(
        participant, stage_of(request), "ProtocolError", f"replied {reply.TYPE} instead of {wanted}"
    )


def raise_failure(failure: Failure) -> None:
    """Raise the participant's failure as its own typed error, or as :class:`TrainingError`."""
    error = TYPED_FAILURES.get(failure.error_type)
    detail = failure.message if error else f"{failure.error_type}: {failure.message}"
    raise (error or TrainingError)(
        f"participant {failure.participant!r} failed at {failure.stage}: {detail}",
        field="participant",
        value=failure.participant,
    )
