"""Enrolment secrets, enrolled participants and the one-time-token replay cache, in the
coordinator's database (tables in :mod:`.schema`).

An admin creates a one-time enrolment secret for a participant id and role and hands it over out of
band; the participant redeems it once (the service then issues its first access token with
:func:`.auth.issue_token`). Only the SHA-256 of a secret is stored: the secret has 256 random bits,
so a fast hash is enough, and looking up by hash needs no constant-time comparison. Redeeming is a
single ``UPDATE ... WHERE used_at IS NULL AND expires_at > now``: of two concurrent redemptions,
in one process or many, exactly one wins.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Connection, Table, delete, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from ..errors import AuthError, ConfigError, StoreError
from ..store import Store
from .auth import MAX_ID_CHARS, _moment
from .authz import ROLES
from .schema import enrolments, participants, used_jti

__all__ = [
    "DEFAULT_ENROLMENT_TTL",
    "MAX_ENROLMENT_TTL",
    "Enrolment",
    "ParticipantRecord",
    "EnrolmentRegistry",
    "StoreReplayCache",
    "check_participant_id",
]

DEFAULT_ENROLMENT_TTL = timedelta(hours=24)
MAX_ENROLMENT_TTL = timedelta(days=30)
_MAX_SECRET_CHARS = 256
_PARTICIPANT_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_ID_CHARS - 1}}}")


def check_participant_id(participant_id: Any) -> str:
    """``participant_id`` if it is a valid id (letters, digits, ``.``, ``_``, ``-``; at most 128
    characters, starting with a letter or digit), else :class:`ConfigError`."""
    if not isinstance(participant_id, str) or not _PARTICIPANT_ID.fullmatch(participant_id):
        raise ConfigError(
            "invalid participant id",
            field="participant_id",
            value=participant_id,
            fix="use letters, digits, '.', '_' and '-' (at most 128, starting with a letter or digit)",
        )
    return participant_id


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _from_db(value: datetime | None) -> datetime | None:
    """A stored time as aware UTC (SQLite gives it back without an offset; it was stored in UTC)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _upsert(conn: Connection, table: Table, row: dict[str, Any], key: str) -> None:
    dialect = conn.dialect.name
    if dialect in ("postgresql", "sqlite"):
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        stmt = dialect_insert(table).values(row)
        changes = {name: stmt.excluded[name] for name in row if name != key}
        conn.execute(stmt.on_conflict_do_update(index_elements=[key], set_=changes))
        return
    values = {name: value for name, value in row.items() if name != key}
    if conn.execute(update(table).where(table.c[key] == row[key]).values(values)).rowcount == 0:
        conn.execute(insert(table).values(row))


def _insert_once(conn: Connection, table: Table, row: dict[str, Any], key: str) -> bool:
    """Insert ``row`` unless its ``key`` exists; True when it was inserted."""
    dialect = conn.dialect.name
    if dialect in ("postgresql", "sqlite"):
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        stmt = dialect_insert(table).values(row).on_conflict_do_nothing(index_elements=[key])
        if conn.dialect.insert_returning:  # psycopg reports no rowcount for this INSERT
            return conn.execute(stmt.returning(table.c[key])).first() is not None
        return conn.execute(stmt).rowcount == 1
    try:
        with conn.begin_nested():
            conn.execute(insert(table).values(row))
    except IntegrityError:
        return False
    return True


class Enrolment(NamedTuple):
    """Who a redeemed enrolment secret enrolled."""

    participant_id: str
    role: str


@dataclass(frozen=True)
class ParticipantRecord:
    participant_id: str
    role: str
    enrolled_at: datetime
    disabled_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.disabled_at is None


class EnrolmentRegistry:
    """Enrolment secrets and enrolled participants in the coordinator's ``store``.

    :meth:`is_active` runs on every authenticated request, so it remembers that a participant is
    active for ``status_ttl`` seconds (``monotonic`` clock). :meth:`disable` and :meth:`redeem`
    on this registry forget it at once, so a participant disabled here is refused on its very
    next request; a participant disabled through another registry (another process on the same
    database) is refused within ``status_ttl``. Only "active" is remembered: a refusal is
    always read from the database."""

    def __init__(
        self,
        store: Store,
        *,
        status_ttl: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.status_ttl = status_ttl
        self._monotonic = monotonic
        self._active_until: dict[str, float] = {}  # participant id -> remembered until
        self._generation = 0  # bumped by every forget: a read older than it is not remembered
        self._status_lock = threading.Lock()

    def _forget_status(self, participant_id: str) -> None:
        with self._status_lock:
            self._generation += 1
            self._active_until.pop(participant_id, None)

    def create(
        self,
        participant_id: str,
        role: str,
        ttl: timedelta = DEFAULT_ENROLMENT_TTL,
        now: datetime | None = None,
    ) -> str:
        """A new one-time enrolment secret for ``participant_id`` with ``role``, valid for
        ``ttl``. The secret is returned once and never stored (only its SHA-256 is)."""
        check_participant_id(participant_id)
        if role not in ROLES:
            raise ConfigError(
                "unknown role", field="role", value=role, fix=f"use one of {sorted(ROLES)}"
            )
        if not timedelta(0) < ttl <= MAX_ENROLMENT_TTL:
            raise ConfigError(
                "enrolment lifetime must be positive and at most 30 days",
                field="ttl",
                value=str(ttl),
                fix=f"use a short lifetime (default {DEFAULT_ENROLMENT_TTL})",
            )
        moment = _moment(now)
        secret = secrets.token_urlsafe(32)
        with self.store.begin() as conn:
            conn.execute(
                enrolments.insert(),
                [
                    {
                        "secret_sha256": _digest(secret),
                        "participant_id": participant_id,
                        "role": role,
                        "created_at": moment,
                        "expires_at": moment + ttl,
                        "used_at": None,
                    }
                ],
            )
        return secret

    def redeem(self, secret: str, now: datetime | None = None) -> Enrolment:
        """Use an enrolment secret, once: record the participant (enabled, with the enrolment's
        role) and return who it is. Raises :class:`AuthError` with code ``unknown_secret``,
        ``expired`` or ``replayed`` (nothing changes then)."""
        if not isinstance(secret, str) or not 0 < len(secret) <= _MAX_SECRET_CHARS:
            raise AuthError("enrolment secret rejected: malformed", code="malformed")
        digest = _digest(secret)
        moment = _moment(now)
        with self.store.writer() as conn:
            used = conn.execute(
                update(enrolments)
                .where(
                    enrolments.c.secret_sha256 == digest,
                    enrolments.c.used_at.is_(None),
                    enrolments.c.expires_at > moment,
                )
                .values(used_at=moment)
            ).rowcount
            row = conn.execute(
                select(
                    enrolments.c.participant_id,
                    enrolments.c.role,
                    enrolments.c.used_at,
                ).where(enrolments.c.secret_sha256 == digest)
            ).first()
            if used != 1 or row is None:
                conn.rollback()
                if row is None:
                    raise AuthError("enrolment secret rejected: unknown", code="unknown_secret")
                if row.used_at is not None:
                    raise AuthError(
                        "enrolment secret rejected: already used",
                        code="replayed",
                        field="participant_id",
                        value=row.participant_id,
                        fix="ask the coordinator's admin for a new enrolment secret",
                    )
                raise AuthError(
                    "enrolment secret rejected: expired",
                    code="expired",
                    field="participant_id",
                    value=row.participant_id,
                    fix="ask the coordinator's admin for a new enrolment secret",
                )
            _upsert(
                conn,
                participants,
                {
                    "participant_id": row.participant_id,
                    "role": row.role,
                    "enrolled_at": moment,
                    "disabled_at": None,
                },
                "participant_id",
            )
            conn.commit()
        self._forget_status(row.participant_id)  # its role may have changed
        return Enrolment(row.participant_id, row.role)

    def disable(self, participant_id: str, now: datetime | None = None) -> None:
        """Disable a participant: its tokens stop verifying (``is_active`` is False) and its
        unused enrolment secrets are revoked. Redeeming a secret created afterwards enables it
        again. An id with neither a participant nor a pending enrolment is a :class:`ConfigError`."""
        check_participant_id(participant_id)
        moment = _moment(now)
        with self.store.writer() as conn:
            disabled = conn.execute(
                update(participants)
                .where(
                    participants.c.participant_id == participant_id,
                    participants.c.disabled_at.is_(None),
                )
                .values(disabled_at=moment)
            ).rowcount
            revoked = conn.execute(
                delete(enrolments).where(
                    enrolments.c.participant_id == participant_id,
                    enrolments.c.used_at.is_(None),
                )
            ).rowcount
            known = conn.execute(
                select(participants.c.participant_id).where(
                    participants.c.participant_id == participant_id
                )
            ).first()
            if not (disabled or revoked or known):
                conn.rollback()
                raise ConfigError(
                    "unknown participant",
                    field="participant_id",
                    value=participant_id,
                    fix="check the id (list the enrolled participants)",
                )
            conn.commit()
        self._forget_status(participant_id)  # after the commit: a read in between sees it

    def participant(self, participant_id: str) -> ParticipantRecord | None:
        with self.store.begin() as conn:
            row = conn.execute(
                select(participants).where(participants.c.participant_id == participant_id)
            ).first()
        if row is None:
            return None
        return ParticipantRecord(
            row.participant_id,
            row.role,
            _from_db(row.enrolled_at),  # type: ignore[arg-type]
            _from_db(row.disabled_at),
        )

    def participants(self) -> list[ParticipantRecord]:
        with self.store.begin() as conn:
            rows = conn.execute(select(participants).order_by(participants.c.participant_id))
            return [
                ParticipantRecord(
                    r.participant_id,
                    r.role,
                    _from_db(r.enrolled_at),  # type: ignore[arg-type]
                    _from_db(r.disabled_at),
                )
                for r in rows
            ]

    def known_active(self, participant_id: str) -> bool | None:
        """True when :meth:`is_active` remembers the participant as active, else None (it would
        read the database): :class:`.auth.TokenVerifier`'s ``is_known_active``."""
        until = self._active_until.get(participant_id)
        return True if until is not None and self._monotonic() < until else None

    def is_active(self, participant_id: str) -> bool:
        """Enrolled and not disabled (:class:`.auth.TokenVerifier`'s ``is_active``); see the
        class docstring for how long an "active" answer is remembered."""
        until = self._active_until.get(participant_id)
        if until is not None and self._monotonic() < until:
            return True
        generation = self._generation
        record = self.participant(participant_id)
        active = record is not None and record.active
        if active and self.status_ttl > 0:
            with self._status_lock:
                # a disable committed while we read must not be overwritten by our older answer
                if generation == self._generation:
                    self._active_until[participant_id] = self._monotonic() + self.status_ttl
        return active


class StoreReplayCache:
    """The replay cache of one-time tokens in the coordinator's database (table
    ``coord_used_jti``), shared by every worker: a ``jti`` is inserted once (insert-or-nothing,
    atomic across processes) and kept until ``expires_at``. Expired entries are purged every
    ``purge_every`` claims (best effort) and by :meth:`purge`."""

    def __init__(self, store: Store, *, purge_every: int = 256) -> None:
        self.store = store
        self.purge_every = max(1, purge_every)
        self._claims = 0
        self._lock = threading.Lock()

    def claim(self, jti: str, *, expires_at: datetime, now: datetime) -> bool:
        expires_at, moment = _moment(expires_at), _moment(now)
        with self.store.writer() as conn:
            first = _insert_once(conn, used_jti, {"jti": jti, "expires_at": expires_at}, "jti")
            conn.commit()
        with self._lock:
            self._claims += 1
            due = self._claims % self.purge_every == 0
        if due:
            try:
                self.purge(moment)
            except (DBAPIError, StoreError):
                pass  # best effort: a later purge removes them; a stale entry is harmless
        return first

    def purge(self, now: datetime | None = None) -> int:
        """Forget one-time tokens that could no longer verify; returns how many."""
        moment = _moment(now)
        with self.store.begin() as conn:
            return conn.execute(delete(used_jti).where(used_jti.c.expires_at <= moment)).rowcount

    def is_used(self, jti: str) -> bool:
        with self.store.begin() as conn:
            return (
                conn.execute(select(used_jti.c.jti).where(used_jti.c.jti == jti)).first()
                is not None
            )
