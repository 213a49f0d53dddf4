"""Who may do what on the coordinator: one pure function over verified claims.

Every endpoint calls :func:`authorize` after the token verified (:class:`.auth.TokenVerifier`) and
before it touches anything. It is deny by default: an action allows a role only through the
rules below, and a job- or participant-scoped action without its scope is refused.

=====================  =========  ==========================================  ========
action                 admin      participant                                 observer
=====================  =========  ==========================================  ========
``submit_job``         yes        no                                          no
``manage_participants`` yes       no                                          no
``read_job_status``    any job    jobs it is in                               any job
``read_model``         any job    jobs it is in                               no
``poll_tasks``         no         its own, jobs (and rounds) it is in         no
``submit_result``      no         its own, jobs (and rounds) it is in         no
``read_result``        any        its own, jobs it is in                      no
``read_relay_keys``    no         jobs it is in                               no
``relay_send``         no         as itself, jobs it is in                    no
``relay_receive``      no         its own inbox, jobs it is in                no
``publish_relay_key``  no         its own                                     no
=====================  =========  ==========================================  ========

An admin never polls tasks or submits results: it would act as a participant it is not. The
relay (:mod:`.relay`) is for participants only: its keys and envelopes are the job's
participants' business.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from ..errors import ConfigError, ForbiddenError

__all__ = [
    "ADMIN",
    "PARTICIPANT",
    "OBSERVER",
    "ROLES",
    "SUBMIT_JOB",
    "MANAGE_PARTICIPANTS",
    "READ_JOB_STATUS",
    "READ_MODEL",
    "POLL_TASKS",
    "SUBMIT_RESULT",
    "READ_RESULT",
    "READ_RELAY_KEYS",
    "RELAY_SEND",
    "RELAY_RECEIVE",
    "PUBLISH_RELAY_KEY",
    "ACTIONS",
    "Principal",
    "authorize",
]

ADMIN = "admin"
PARTICIPANT = "participant"
OBSERVER = "observer"
ROLES = frozenset({ADMIN, PARTICIPANT, OBSERVER})

SUBMIT_JOB = "submit_job"
MANAGE_PARTICIPANTS = "manage_participants"  # enrolment secrets, disabling
READ_JOB_STATUS = "read_job_status"  # state, round number, aggregate metrics
READ_MODEL = "read_model"  # the job's aggregated model
POLL_TASKS = "poll_tasks"
SUBMIT_RESULT = "submit_result"
READ_RESULT = "read_result"  # one participant's submitted result for a job
READ_RELAY_KEYS = "read_relay_keys"  # the relay public keys of a job's participants
RELAY_SEND = "relay_send"  # post an envelope as itself (participant_id: the sender)
RELAY_RECEIVE = "relay_receive"  # read and acknowledge its own relay inbox
PUBLISH_RELAY_KEY = "publish_relay_key"  # its own relay public key (job "*")

_GLOBAL = frozenset({SUBMIT_JOB, MANAGE_PARTICIPANTS})
_JOB = frozenset({READ_JOB_STATUS, READ_MODEL})
_OWN = frozenset({POLL_TASKS, SUBMIT_RESULT, READ_RESULT})  # scoped to a job and a participant
_RELAY_JOB = frozenset({READ_RELAY_KEYS})
_RELAY_OWN = frozenset({RELAY_SEND, RELAY_RECEIVE, PUBLISH_RELAY_KEY})
_RELAY = _RELAY_JOB | _RELAY_OWN  # participants only
ACTIONS = _GLOBAL | _JOB | _OWN | _RELAY

# role -> actions it may ever do (scopes are checked afterwards)
_ALLOWED: dict[str, frozenset[str]] = {
    ADMIN: _GLOBAL | _JOB | {READ_RESULT},
    PARTICIPANT: _JOB | _OWN | _RELAY,
    OBSERVER: frozenset({READ_JOB_STATUS}),
}


class Principal(Protocol):
    """What authorisation needs from verified claims (:class:`.auth.Claims` is one)."""

    @property
    def sub(self) -> str: ...

    @property
    def role(self) -> str: ...


def _deny(message: str, code: str, **kwargs: object) -> ForbiddenError:
    return ForbiddenError(message, code=code, **kwargs)


def authorize(
    claims: Principal,
    action: str,
    *,
    job_participants: Collection[str] = (),
    participant_id: str | None = None,
    job_id: str | None = None,
    round_participants: Collection[str] | None = None,
) -> None:
    """Return when ``claims`` may do ``action``; raise :class:`ForbiddenError` otherwise.

    ``job_id`` is the job the request touches and ``job_participants`` the participant ids in it
    (an empty collection when the job is unknown: nobody but an admin or observer gets through).
    ``participant_id`` is the participant whose tasks or results the request touches (the path
    parameter, never taken from the token). ``round_participants``, when given, is the round's
    cohort: polling and submitting also need the caller to be in it. An unknown ``action`` is a
    programming error (:class:`ConfigError`).
    """
    if action not in ACTIONS:
        raise ConfigError(
            "unknown authorisation action",
            field="action",
            value=action,
            fix=f"use one of {sorted(ACTIONS)}",
        )
    for name, members in (
        ("job_participants", job_participants),
        ("round_participants", round_participants),
    ):
        if isinstance(members, str | bytes):  # `in` would match substrings
            raise ConfigError(
                f"{name} must be a collection of participant ids, not a string",
                field=name,
                fix="pass a set, list or tuple of participant ids",
            )
    role = claims.role
    if not isinstance(role, str) or role not in ROLES or action not in _ALLOWED[role]:
        raise _deny(
            f"role {role!r} may not {action}",
            "role",
            field="role",
            value=role,
            fix="use a token of a role allowed to do this",
        )
    if action in _GLOBAL:
        return
    if job_id is None:
        raise _deny(
            f"{action} needs a job",
            "missing_scope",
            field="job_id",
            fix="pass the job the request touches to authorize()",
        )
    if action in _OWN | _RELAY_OWN and participant_id is None:
        raise _deny(
            f"{action} needs a participant",
            "missing_scope",
            field="participant_id",
            fix="pass the participant whose data the request touches to authorize()",
        )
    if role != PARTICIPANT:
        return  # admin and observer: not scoped to jobs or participants
    if action in _OWN | _RELAY_OWN and participant_id != claims.sub:
        raise _deny(
            "a participant may only touch its own tasks and results",
            "other_participant",
            field="participant_id",
            value=participant_id,
        )
    if claims.sub not in job_participants:
        raise _deny(
            "participant is not in this job",
            "not_in_job",
            field="job_id",
            value=job_id,
        )
    if (
        action in (POLL_TASKS, SUBMIT_RESULT)
        and round_participants is not None
        and claims.sub not in round_participants
    ):
        raise _deny(
            "participant is not in this round's cohort",
            "not_in_round",
            field="job_id",
            value=job_id,
        )
