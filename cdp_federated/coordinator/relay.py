"""The relay: the coordinator carries sealed envelopes between a job's participants, unread.

Participants publish their X25519 relay public keys (``PUT
/v1/participants/{pid}/relay-key``); a job's participants read the keys of that job's
participants (``GET /v1/jobs/{job}/relay/keys``), post envelopes (``POST
/v1/jobs/{job}/relay/{recipient}``, a ``relay_envelope`` CDPF frame) and long-poll their own inbox
(``GET /v1/jobs/{job}/relay``), acknowledging what they opened (``DELETE
/v1/jobs/{job}/relay?id=...``). See :mod:`cdp_federated.federation.relay` for the channel built on
these endpoints and :mod:`cdp_federated.federation.envelope` for the sealing.

What the coordinator checks is what it can read: the routing header (the sender is the caller,
the recipient is another participant of the job), the envelope's fixed sizes, the frame size,
and that a (sender, recipient, session, seq) is stored once (the same bytes again return the
stored acknowledgement; other bytes are a 409). It never opens an envelope: it holds no key that
could.

Keys: a participant's key is versioned (every key keeps its row), and it cannot change while the
participant is in a queued or running job (409): a peer that fetched the old key would seal to a
key nobody holds any more, or, worse, a swapped key would go unnoticed mid-protocol.

Envelopes: the frame is deleted when its recipient acknowledges it; its header row (with the
frame's SHA-256) stays until the job finishes, so a replayed sequence number is still refused,
and then every row of the job is deleted (:meth:`.state.CoordinatorState.job_finished`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from ..errors import (
    AuthError,
    ConfigError,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from ..federation.codec import Codec
from ..federation.envelope import MAX_NAME_BYTES, RELAY_CODEC, RelayEnvelope
from ..federation.relay import (
    MAX_RELAY_SEQ,
    Delivery,
    check_routing,
    fingerprint,
    pack_deliveries,
)
from ..store import Store
from .auth import Claims, utcnow
from .authz import (
    PUBLISH_RELAY_KEY,
    READ_RELAY_KEYS,
    RELAY_RECEIVE,
    RELAY_SEND,
    authorize,
)
from .schema import jobs, relay_envelopes, relay_keys
from .state import FAILED, QUEUED, RUNNING, SUCCEEDED

if TYPE_CHECKING:
    from .service import Coordinator

__all__ = [
    "FRAME_TYPE",
    "BATCH_TYPE",
    "RELAY_OVERHEAD_BYTES",
    "RelayState",
    "envelope_limit",
    "relay_body_limit",
    "relay_router",
]

FRAME_TYPE = "application/x-cdpf"
BATCH_TYPE = "application/x-cdpf-relay"
# Room for an envelope's header, key, nonce and tag around an inner frame (RELAY_CODEC's margin).
RELAY_OVERHEAD_BYTES = 64 * 1024
MAX_BATCH = 1000
_ACTIVE = (QUEUED, RUNNING)
_ID = Annotated[int, Field(ge=1, le=MAX_RELAY_SEQ)]


def envelope_limit(frame_limit: int) -> int:
    """The largest envelope frame: one around an inner frame of up to ``frame_limit`` bytes."""
    return frame_limit + RELAY_OVERHEAD_BYTES


def relay_body_limit(path: str, frame_limit: int) -> int | None:
    """The body limit of a relay post (:func:`envelope_limit`), or None when ``path`` is not
    one (the service's body-limit middleware asks)."""
    parts = path.strip("/").split("/")
    if len(parts) == 5 and parts[:2] == ["v1", "jobs"] and parts[3] == "relay":
        return envelope_limit(frame_limit)
    return None


def _utc(value: datetime) -> str:
    """A stored time as ISO text in UTC (SQLite gives it back without an offset)."""
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def _check_public_key(raw: bytes) -> None:
    """A 32-byte X25519 key that is not a small-order point (sealing to one gives an all-zero
    secret, which ``cryptography`` refuses): refused here, before anyone seals to it."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise ConfigError(
            "not a usable X25519 public key (small-order point)",
            field="public_key",
            fix="publish RelayKeyPair.public_bytes() of a generated key",
        ) from None


def _closed(job_id: str) -> ConflictError:
    return ConflictError(
        "the job has finished: its relay is closed and its envelopes deleted",
        field="job_id",
        value=job_id,
        fix="relay only while the job is queued or running",
    )


class RelayState:
    """Relay keys and envelopes in the coordinator's ``store``; long-polls wake when an envelope
    for their inbox is stored in this process, and re-check every ``recheck`` seconds."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], datetime] = utcnow,
        recheck: float = 0.5,
        closed: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.clock = clock
        self.recheck = recheck
        self._closed = closed
        self._changed = threading.Condition()
        self._versions: Counter[str] = Counter()

    # --- keys ------------------------------------------------------------------------------------

    def publish_key(self, participant_id: str, public_key: bytes) -> dict[str, Any]:
        """Record ``public_key`` as the participant's relay key. The same key again changes
        nothing; another key gets the next version, unless the participant is in a queued or
        running job (:class:`ConflictError`)."""
        _check_public_key(public_key)
        now = self.clock()
        with self.store.writer() as conn:
            rows = conn.execute(
                select(relay_keys)
                .where(relay_keys.c.participant_id == participant_id)
                .order_by(relay_keys.c.version.desc())
            ).all()
            current = rows[0] if rows and rows[0].replaced_at is None else None
            if current is not None and current.public_key == public_key.hex():
                return self._key_info(current, changed=False)
            if current is not None:
                busy = self._active_jobs(conn, participant_id)
                if busy:
                    raise ConflictError(
                        "a relay key cannot change while its participant is in a running job",
                        field="public_key",
                        value=busy[0],
                        fix="publish the same key, or change it once the job(s) finished: "
                        + ", ".join(busy),
                    )
                conn.execute(
                    update(relay_keys)
                    .where(
                        relay_keys.c.participant_id == participant_id,
                        relay_keys.c.version == current.version,
                    )
                    .values(replaced_at=now)
                )
            row = {
                "participant_id": participant_id,
                "version": (rows[0].version if rows else 0) + 1,
                "public_key": public_key.hex(),
                "published_at": now,
                "replaced_at": None,
            }
            try:
                conn.execute(insert(relay_keys).values(row))
                conn.commit()
            except IntegrityError:
                raise ConflictError(
                    "the relay key changed concurrently",
                    field="public_key",
                    fix="publish again",
                ) from None
        return self._key_info(row, changed=True)

    @staticmethod
    def _key_info(row: Any, *, changed: bool | None = None) -> dict[str, Any]:
        get = row.get if isinstance(row, dict) else lambda name: getattr(row, name)
        raw = bytes.fromhex(get("public_key"))
        info = {
            "participant_id": get("participant_id"),
            "public_key": base64.urlsafe_b64encode(raw).rstrip(b"=").decode(),
            "version": get("version"),
            "fingerprint": fingerprint(raw),
            "published_at": _utc(get("published_at")),
        }
        if changed is not None:
            info["changed"] = changed
        return info

    @staticmethod
    def _active_jobs(conn: Any, participant_id: str) -> list[str]:
        rows = conn.execute(
            select(jobs.c.job_id, jobs.c.participants).where(jobs.c.status.in_(_ACTIVE))
        )
        return sorted(r.job_id for r in rows if participant_id in json.loads(r.participants))

    def job_keys(self, participants: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The current key of each of ``participants`` that published one."""
        with self.store.begin() as conn:
            rows = conn.execute(
                select(relay_keys).where(
                    relay_keys.c.participant_id.in_(list(participants)),
                    relay_keys.c.replaced_at.is_(None),
                )
            ).all()
        return {r.participant_id: self._key_info(r) for r in rows}

    # --- envelopes -------------------------------------------------------------------------------

    @staticmethod
    def _finished(conn: Any, job_id: str) -> bool:
        status = conn.execute(select(jobs.c.status).where(jobs.c.job_id == job_id)).scalar()
        if status is None:
            raise NotFoundError("unknown job", field="job_id", value=job_id, fix="check the id")
        return status in (SUCCEEDED, FAILED)

    def _require_open(self, conn: Any, job_id: str) -> None:
        if self._finished(conn, job_id):
            raise _closed(job_id)

    def post(self, job_id: str, envelope: RelayEnvelope, frame: bytes) -> dict[str, Any]:
        """Store an envelope (already checked with :func:`check_routing`) once."""
        digest = hashlib.sha256(frame).hexdigest()
        now = self.clock()
        stream = (
            relay_envelopes.c.job_id == job_id,
            relay_envelopes.c.sender == envelope.sender,
            relay_envelopes.c.recipient == envelope.recipient,
            relay_envelopes.c.session == envelope.session,
            relay_envelopes.c.seq == envelope.seq,
        )
        with self.store.writer() as conn:
            self._require_open(conn, job_id)
            stored = conn.execute(
                select(
                    relay_envelopes.c.id, relay_envelopes.c.body_sha256, relay_envelopes.c.posted_at
                ).where(*stream)
            ).first()
            if stored is not None:
                if stored.body_sha256 != digest:
                    raise ConflictError(
                        "this sequence number was already used in this session",
                        field="relay_envelope.seq",
                        value=envelope.seq,
                        fix="number each (recipient, session) stream's envelopes 0, 1, 2... once",
                    )
                return self._ack(job_id, envelope, stored.id, len(frame), stored.posted_at, True)
            try:
                ident = conn.execute(
                    insert(relay_envelopes).values(
                        job_id=job_id,
                        sender=envelope.sender,
                        recipient=envelope.recipient,
                        session=envelope.session,
                        seq=envelope.seq,
                        size=len(frame),
                        body_sha256=digest,
                        body=frame,
                        posted_at=now,
                    )
                ).inserted_primary_key[0]
                conn.commit()
            except IntegrityError:  # a concurrent post of the same stream and seq won
                conn.rollback()
                return self.post(job_id, envelope, frame)
        # The job may have finished (and purged its envelopes) between the check and the
        # commit: check again, so no envelope outlives its job.
        with self.store.begin() as conn:
            finished = self._finished(conn, job_id)
            if finished:
                conn.execute(delete(relay_envelopes).where(relay_envelopes.c.job_id == job_id))
        if finished:
            raise _closed(job_id)
        self._notify(f"{job_id}/{envelope.recipient}")
        return self._ack(job_id, envelope, ident, len(frame), now, False)

    @staticmethod
    def _ack(
        job_id: str, envelope: RelayEnvelope, ident: int, size: int, at: Any, duplicate: bool
    ) -> dict[str, Any]:
        return {
            "id": int(ident),
            "job_id": job_id,
            "sender": envelope.sender,
            "recipient": envelope.recipient,
            "session": envelope.session,
            "seq": envelope.seq,
            "size": size,
            "posted_at": _utc(at),
            "duplicate": duplicate,
        }

    def _pending(
        self,
        job_id: str,
        recipient: str,
        *,
        sender: str | None,
        session: str | None,
        after: int,
        limit: int,
        max_bytes: int,
    ) -> list[Delivery]:
        where = [
            relay_envelopes.c.job_id == job_id,
            relay_envelopes.c.recipient == recipient,
            relay_envelopes.c.acked_at.is_(None),
            relay_envelopes.c.id > after,
        ]
        if sender is not None:
            where.append(relay_envelopes.c.sender == sender)
        if session is not None:
            where.append(relay_envelopes.c.session == session)
        with self.store.begin() as conn:
            self._require_open(conn, job_id)
            sizes = conn.execute(
                select(relay_envelopes.c.id, relay_envelopes.c.size)
                .where(*where)
                .order_by(relay_envelopes.c.id)
                .limit(limit)
            ).all()
            chosen, total = [], 0
            for row in sizes:  # at least one, then as many as fit in max_bytes
                if chosen and total + row.size > max_bytes:
                    break
                chosen.append(row.id)
                total += row.size
            if not chosen:
                return []
            rows = conn.execute(
                select(relay_envelopes.c.id, relay_envelopes.c.body)
                .where(relay_envelopes.c.id.in_(chosen), relay_envelopes.c.body.is_not(None))
                .order_by(relay_envelopes.c.id)
            ).all()
        return [Delivery(int(r.id), bytes(r.body)) for r in rows]

    def inbox(
        self,
        job_id: str,
        recipient: str,
        *,
        sender: str | None = None,
        session: str | None = None,
        after: int = 0,
        wait: float = 0.0,
        limit: int = 100,
        max_bytes: int = 16 * 1024 * 1024,
    ) -> list[Delivery]:
        """``recipient``'s unacknowledged envelopes in ``job_id`` (above id ``after``, of
        ``sender`` / ``session`` when given), oldest first, waiting up to ``wait`` seconds."""
        return self._wait(
            lambda: self._pending(
                job_id,
                recipient,
                sender=sender,
                session=session,
                after=after,
                limit=limit,
                max_bytes=max_bytes,
            ),
            wait,
            f"{job_id}/{recipient}",
        )

    def acknowledge(self, job_id: str, recipient: str, ids: Sequence[int]) -> int:
        """Delete the frames of ``recipient``'s envelopes ``ids`` (other ids are ignored: they
        are not the caller's); returns how many were pending."""
        if not ids:
            return 0
        with self.store.begin() as conn:
            return conn.execute(
                update(relay_envelopes)
                .where(
                    relay_envelopes.c.job_id == job_id,
                    relay_envelopes.c.recipient == recipient,
                    relay_envelopes.c.id.in_(sorted(set(ids))),
                    relay_envelopes.c.acked_at.is_(None),
                )
                .values(body=None, acked_at=self.clock())
            ).rowcount

    # --- wake-ups --------------------------------------------------------------------------------

    def _notify(self, topic: str) -> None:
        with self._changed:
            self._versions[topic] += 1
            self._changed.notify_all()

    def _wait(self, probe: Callable[[], list[Delivery]], timeout: float, topic: str):
        end = time.monotonic() + max(0.0, timeout)
        while True:
            with self._changed:
                seen = self._versions[topic]
            found = probe()
            now = time.monotonic()
            if found or now >= end or self._closed():
                return found
            recheck_at = min(end, now + self.recheck)
            with self._changed:
                while self._versions[topic] == seen and not self._closed():
                    left = recheck_at - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)


# --- the HTTP routes -----------------------------------------------------------------------------


class RelayKeyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    public_key: str = Field(
        pattern=r"^[A-Za-z0-9_-]{43}$",
        description="the raw 32-byte X25519 public key, base64url without padding",
    )


class RelayKeyInfo(BaseModel):
    participant_id: str
    public_key: str
    version: int
    fingerprint: str
    published_at: str
    changed: bool | None = None


class RelayKeys(BaseModel):
    job_id: str
    keys: dict[str, RelayKeyInfo]
    missing: list[str]


class RelayAck(BaseModel):
    id: int
    job_id: str
    sender: str
    recipient: str
    session: str
    seq: int
    size: int
    posted_at: str
    duplicate: bool


class RelayAcknowledged(BaseModel):
    acknowledged: int


def relay_router(coord: Coordinator) -> APIRouter:
    """The relay's routes over ``coord`` (mounted by :func:`.service.create_app`)."""
    settings = coord.config
    relay = RelayState(
        coord.store,
        clock=coord.clock,
        recheck=settings.recheck_seconds,
        closed=lambda: coord.state.closed,
    )
    frame_limit = envelope_limit(settings.max_frame_bytes)
    codec = Codec(max_bytes=frame_limit, max_elements=frame_limit, types=RELAY_CODEC.types)
    router = APIRouter(tags=["relay"])

    def claims(request: Request) -> Claims:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("no bearer token", code="missing_token")
        return coord.verifier.verify(token.strip())

    def members(job_id: str) -> set[str]:
        if "\x00" in job_id:  # no database stores it: no such job
            return set()
        try:
            return set(coord.state.job_participants(job_id))
        except NotFoundError:
            return set()  # an unknown job: refused like a job the caller is not in

    def in_job(who: Claims, action: str, job_id: str) -> set[str]:
        people = members(job_id)
        authorize(who, action, participant_id=who.sub, job_id=job_id, job_participants=people)
        return people

    @router.put("/v1/participants/{participant_id}/relay-key", response_model=RelayKeyInfo)
    def publish_key(
        participant_id: str, body: RelayKeyBody, who: Claims = Depends(claims)
    ) -> dict[str, Any]:
        """Publish the caller's X25519 relay public key. The same key again is a no-op
        (``changed: false``); another key is a new version, refused (409) while the
        participant is in a queued or running job."""
        authorize(
            who,
            PUBLISH_RELAY_KEY,
            participant_id=participant_id,
            job_id="*",
            job_participants={who.sub},
        )
        raw = base64.urlsafe_b64decode(body.public_key + "=")
        return relay.publish_key(participant_id, raw)

    @router.get("/v1/jobs/{job_id}/relay/keys", response_model=RelayKeys)
    def job_keys(job_id: str, who: Claims = Depends(claims)) -> dict[str, Any]:
        """The relay public keys of the job's participants (to its participants only);
        ``missing`` lists those that published none yet."""
        people = members(job_id)
        authorize(who, READ_RELAY_KEYS, job_id=job_id, job_participants=people)
        keys = relay.job_keys(sorted(people))
        return {"job_id": job_id, "keys": keys, "missing": sorted(people - set(keys))}

    def store_envelope(
        job_id: str, recipient: str, body: bytes, who: Claims, people: set[str]
    ) -> dict[str, Any]:
        if len(body) > frame_limit:
            raise PayloadTooLargeError(
                "relay envelope is too large",
                field="body",
                value=len(body),
                fix=f"send at most {frame_limit} bytes: split the message",
            )
        envelope = codec.decode(body)  # CodecError -> 400
        assert isinstance(envelope, RelayEnvelope)
        check_routing(envelope, caller=who.sub, recipient=recipient, participants=people)
        return relay.post(job_id, envelope, body)

    @router.post(
        "/v1/jobs/{job_id}/relay/{recipient}",
        response_model=RelayAck,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {FRAME_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def post_envelope(
        job_id: str, recipient: str, request: Request, who: Claims = Depends(claims)
    ) -> dict[str, Any]:
        """Relay a sealed envelope (a ``relay_envelope`` CDPF frame) to ``recipient``. The
        same bytes again get the stored acknowledgement (``duplicate: true``); another
        envelope with the same (sender, recipient, session, seq) is a 409."""
        people = await run_in_threadpool(in_job, who, RELAY_SEND, job_id)
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != FRAME_TYPE:
            raise UnsupportedMediaTypeError(
                "a relay envelope must be a CDPF frame",
                field="content-type",
                value=media or None,
                fix=f"send Content-Type: {FRAME_TYPE}",
            )
        body = await request.body()
        return await run_in_threadpool(store_envelope, job_id, recipient, body, who, people)

    @router.get(
        "/v1/jobs/{job_id}/relay",
        responses={
            200: {
                "content": {BATCH_TYPE: {"schema": {"type": "string", "format": "binary"}}},
                "description": "pending envelopes: b'CDPR', u16 version, u32 count, then "
                "per envelope u64 id, u32 length and the frame",
            },
            204: {"description": "no envelope within the wait"},
        },
    )
    def inbox(
        job_id: str,
        sender: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")] = None,
        session: Annotated[str | None, Query(min_length=1, max_length=MAX_NAME_BYTES)] = None,
        after: Annotated[int, Query(ge=0, le=MAX_RELAY_SEQ)] = 0,
        wait: Annotated[float, Query(ge=0, description="long-poll: seconds to wait")] = 0.0,
        limit: Annotated[int, Query(ge=1, le=MAX_BATCH)] = 100,
        who: Claims = Depends(claims),
    ) -> Response:
        """The caller's unacknowledged envelopes in this job, oldest first (above id
        ``after``; of ``sender`` / ``session`` when given). Delivered again until
        acknowledged."""
        in_job(who, RELAY_RECEIVE, job_id)
        if session is not None and (
            "\x00" in session or len(session.encode("utf-8", "replace")) > MAX_NAME_BYTES
        ):
            raise ConfigError("invalid session name", field="session", fix="use printable text")
        found = relay.inbox(
            job_id,
            who.sub,
            sender=sender,
            session=session,
            after=after,
            wait=min(wait, settings.max_poll_wait_seconds),
            limit=limit,
            max_bytes=frame_limit,
        )
        if not found:
            return Response(status_code=204)
        return Response(content=pack_deliveries(found), media_type=BATCH_TYPE)

    @router.delete("/v1/jobs/{job_id}/relay", response_model=RelayAcknowledged)
    def acknowledge(
        job_id: str,
        id: Annotated[list[_ID], Query(min_length=1, max_length=MAX_BATCH)],  # noqa: A002
        who: Claims = Depends(claims),
    ) -> dict[str, int]:
        """Acknowledge envelopes the caller received: their frames are deleted. Ids that are
        not the caller's pending envelopes are ignored."""
        in_job(who, RELAY_RECEIVE, job_id)
        return {"acknowledged": relay.acknowledge(job_id, who.sub, id)}

    return router
