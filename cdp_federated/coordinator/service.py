"""The coordinator as an HTTP service: a FastAPI app over the coordinator's database.

Participants run in their own processes (:mod:`cdp_federated.participant.runner`) and reach the
coordinator only through this API: they long-poll for tasks (CDPF frames, ``application/x-cdpf``),
answer them with frames, and never expose an endpoint of their own. Jobs run in background threads
(:class:`.jobs.JobRunner`) that drive the same strategy as the simulation over a
:class:`.queue_transport.QueueTransport`.

Every endpoint but enrolment, the JWKS and the health check authenticates the caller's bearer
token (:class:`.auth.TokenVerifier`; any failure is the same bare 401 with ``WWW-Authenticate:
Bearer``), then authorises the action (:func:`.authz.authorize`; 403). Frames are validated by the
codec before anything is stored (400 with the codec's message), bodies are size-limited (413), and
every typed error is answered as JSON ``{error, message, field, fix}``. The OpenAPI document is at
``/openapi.json``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pluggy
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    AuthError,
    CDPFederatedError,
    CodecError,
    ConfigError,
    ForbiddenError,
    NotFoundError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from ..federation.codec import DEFAULT_MAX_BYTES, Codec
from ..federation.messages import MESSAGE_TYPES, Failure
from ..store import Store
from .auth import DEFAULT_TTL, MAX_TTL, Claims, KeyRing, TokenVerifier, issue_token, utcnow
from .authz import POLL_TASKS, READ_JOB_STATUS, READ_MODEL, SUBMIT_JOB, SUBMIT_RESULT, authorize
from .enrolment import EnrolmentRegistry, StoreReplayCache
from .jobs import JobRunner
from .relay import relay_body_limit, relay_router
from .replies import check_reply
from .schema import open_coordinator_store
from .state import SUCCEEDED, ConflictError, CoordinatorState

__all__ = [
    "FRAME_TYPE",
    "ServiceConfig",
    "Coordinator",
    "create_app",
    "PayloadTooLargeError",
    "UnsupportedMediaTypeError",
]

log = logging.getLogger(__name__)

FRAME_TYPE = "application/x-cdpf"
JSON_BODY_LIMIT = 1024 * 1024
# What a participant may send as a reply: results and failures, never a request.
REPLY_TYPES = {
    name: cls
    for name, cls in MESSAGE_TYPES.items()
    if name.endswith("_res") or name == Failure.TYPE
}


@dataclass(frozen=True)
class ServiceConfig:
    """The coordinator service's settings (``cdp-fl coordinator serve --config`` reads them).

    ``db_url``: the coordinator's database (SQLite file or PostgreSQL); ``key_dir``: its signing
    keys (created on first start); ``issuer``/``audience``: the tokens' ``iss``/``aud``;
    ``token_ttl_seconds``: access-token lifetime; ``max_frame_bytes``: largest frame accepted;
    ``max_poll_wait_seconds``: longest long-poll; ``worker_threads``: threads serving blocking
    requests (each waiting long-poll holds one)."""

    db_url: str
    key_dir: Path
    issuer: str = "cdp-federated-coordinator"
    audience: str = "cdp-federated"
    token_ttl_seconds: float = DEFAULT_TTL.total_seconds()
    max_frame_bytes: int = DEFAULT_MAX_BYTES
    max_poll_wait_seconds: float = 30.0
    worker_threads: int = 64
    recheck_seconds: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.token_ttl_seconds <= MAX_TTL.total_seconds():
            raise ConfigError(
                "token_ttl_seconds must be positive and at most a day",
                field="token_ttl_seconds",
                value=self.token_ttl_seconds,
            )
        if self.max_frame_bytes < 1024 or self.max_poll_wait_seconds < 0:
            raise ConfigError("limits must be positive", field="max_frame_bytes")


@dataclass
class Coordinator:
    """The service's parts, built once by :meth:`open`: the store, keys, enrolment registry,
    token verifier, state and job runner."""

    config: ServiceConfig
    store: Store
    keyring: KeyRing
    registry: EnrolmentRegistry
    verifier: TokenVerifier
    state: CoordinatorState
    runner: JobRunner
    clock: Callable[[], datetime] = utcnow
    reply_codec: Codec = field(default_factory=lambda: Codec(types=REPLY_TYPES))
    # the leader lease when several coordinators share the database (.lease.lead_with_lease):
    # a standby serves everything from the database but starts no job (503)
    lease: Any = None

    @classmethod
    def open(
        cls,
        config: ServiceConfig,
        *,
        pm: pluggy.PluginManager | None = None,
        clock: Callable[[], datetime] = utcnow,
        recover: bool = True,
    ) -> Coordinator:
        """``recover=False``: do not resume the jobs a previous process left (the leader lease
        decides who does: :func:`.lease.lead_with_lease`)."""
        store = open_coordinator_store(config.db_url, create=True)
        keyring = KeyRing.open(config.key_dir, now=clock())
        registry = EnrolmentRegistry(store)
        verifier = TokenVerifier(
            keyring,
            issuer=config.issuer,
            audience=config.audience,
            replay_cache=StoreReplayCache(store),
            clock=clock,
            is_active=registry.is_active,
            is_known_active=registry.known_active,
        )
        state = CoordinatorState(store, clock=clock, recheck=config.recheck_seconds)
        runner = JobRunner(state, registry=registry, pm=pm)
        resumed = runner.recover() if recover else []  # before serving: no old task is handed out
        if resumed:
            log.warning("resuming %d job(s) of a previous run: %s", len(resumed), resumed)
        return cls(
            config,
            store,
            keyring,
            registry,
            verifier,
            state,
            runner,
            clock,
            Codec(max_bytes=config.max_frame_bytes, types=REPLY_TYPES),
        )

    def close(self) -> None:
        self.runner.shutdown()
        self.store.dispose()

    def token(self, sub: str, role: str) -> dict[str, Any]:
        """A fresh access token for ``sub`` and when it expires."""
        now = self.clock()
        ttl = timedelta(seconds=self.config.token_ttl_seconds)
        token = issue_token(
            self.keyring,
            sub=sub,
            role=role,
            audience=self.config.audience,
            issuer=self.config.issuer,
            ttl=ttl,
            now=now,
        )
        expires = math.floor(now.timestamp()) + math.ceil(ttl.total_seconds())
        return {
            "participant_id": sub,
            "role": role,
            "access_token": token,
            "token_type": "Bearer",
            "expires_at": datetime.fromtimestamp(expires, UTC).isoformat(),
            "expires_in": math.ceil(ttl.total_seconds()),
        }


# --- request bodies --------------------------------------------------------------------------------


class EnrolRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    secret: str = Field(min_length=1, max_length=256, description="one-time enrolment secret")


class TokenResponse(BaseModel):
    participant_id: str
    role: str
    access_token: str
    token_type: str
    expires_at: str
    expires_in: int


class JobSubmission(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job: dict[str, Any] = Field(description="a JobSpec (job_id optional: generated when absent)")
    participants: list[str] = Field(description="enrolled participant ids that train together")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="min_participants (default: all), round_deadline_seconds (default 60)",
    )


class JobCreated(BaseModel):
    job_id: str
    status: str


class ErrorBody(BaseModel):
    """Every refusal (4xx): the typed error's name, a message, and the field, value and fix."""

    error: str
    message: str
    field: str | None = None
    value: str | None = None
    fix: str | None = None


# --- body limits -----------------------------------------------------------------------------------


def _error_body(exc: CDPFederatedError) -> dict[str, Any]:
    return exc.to_dict()


class _BodyLimit:
    """ASGI middleware: refuse bodies over the limit (413) before the app reads them. Frames may
    be ``max_frame_bytes``; everything else (JSON) at most 1 MiB."""

    def __init__(self, app: Any, frame_limit: int) -> None:
        self.app = app
        self.frame_limit = frame_limit

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.frame_limit if scope["path"].endswith("/result") else JSON_BODY_LIMIT
        limit = relay_body_limit(scope["path"], self.frame_limit) or limit  # an envelope
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                await self._refuse(scope, receive, send, limit)
                return
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:  # chunked: buffer up to the limit, then replay
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await self._refuse(scope, receive, send, limit)
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(scope: Any, receive: Any, send: Any, limit: int) -> None:
        error = PayloadTooLargeError(
            "request body is too large",
            field="body",
            fix=f"send at most {limit} bytes",
        )
        await JSONResponse(_error_body(error), status_code=413)(scope, receive, send)


# --- the app ---------------------------------------------------------------------------------------


def create_app(
    config: ServiceConfig | None = None,
    *,
    coordinator: Coordinator | None = None,
    pm: pluggy.PluginManager | None = None,
) -> FastAPI:
    """The coordinator's ASGI app, over ``coordinator`` (or one opened from ``config``). The app
    owns a coordinator it opened and closes it on shutdown."""
    if coordinator is None:
        if config is None:
            raise ConfigError("create_app needs a config or a coordinator", field="config")
        coordinator = Coordinator.open(config, pm=pm)
        owned = True
    else:
        owned = False
    coord = coordinator
    settings = coord.config

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        import anyio.to_thread

        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, settings.worker_threads)
        try:
            yield
        finally:
            coord.state.close()  # wake long-polls so the server can stop
            if owned:
                await run_in_threadpool(coord.close)

    app = FastAPI(
        title="cdp-federated coordinator",
        version="1",
        summary="Drives federated jobs; participants poll for tasks and post results.",
        lifespan=lifespan,
        # documents our error body for every 4xx (FastAPI would publish its own 422 shape)
        responses={"4XX": {"model": ErrorBody, "description": "refused: see error and fix"}},
    )
    app.state.coordinator = coord
    app.add_middleware(_BodyLimit, frame_limit=settings.max_frame_bytes)

    # --- errors ----------------------------------------------------------------------------------

    @app.exception_handler(AuthError)
    async def _auth_error(_request: Request, exc: AuthError) -> JSONResponse:
        log.info("authentication failed: %s", exc.code)
        challenge = "Bearer" if exc.code == "missing_token" else 'Bearer error="invalid_token"'
        body = {
            "error": "AuthError",
            "message": "authentication failed",
            "field": "authorization",
            "fix": "send a valid, unexpired bearer token (enrol or refresh to get one)",
        }
        return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": challenge})

    @app.exception_handler(CDPFederatedError)
    async def _typed_error(_request: Request, exc: CDPFederatedError) -> JSONResponse:
        status = getattr(exc, "http_status", None)
        if status is None:
            status = 400 if isinstance(exc, ConfigError | CodecError) else 500
        if status >= 500:
            log.error("request failed: %s", exc)
        headers = getattr(exc, "headers", None)  # Retry-After of a standby's 503
        return JSONResponse(_error_body(exc), status_code=status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (unknown path, wrong method, unparsable body) in our shape."""
        kind = NotFoundError if exc.status_code == 404 else ConfigError
        where = {404: "path", 405: "method"}.get(exc.status_code, "body")
        error = kind(str(exc.detail), field=where, fix="see the API at /openapi.json")
        return JSONResponse(_error_body(error), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        detail = first.get("msg", "malformed")
        if first.get("type") == "json_invalid":  # its loc holds a character offset, not a field
            where = "body"
            detail += f" at character {first['loc'][-1]}: {first.get('ctx', {}).get('error', '')}"
        error = ConfigError(
            f"invalid request: {detail}",
            field=where,
            fix="see the request schema at /openapi.json",
        )
        return JSONResponse(_error_body(error), status_code=422)

    # --- authentication --------------------------------------------------------------------------

    async def claims(request: Request) -> Claims:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError("no bearer token", code="missing_token")
        # A token seen before is checked on the event loop (no I/O: microseconds); a thread hop
        # costs about 0.1 ms of CPU, and a participant sends the same token all along.
        known = coord.verifier.verify_remembered(token.strip())
        if known is not None:
            return known
        return await run_in_threadpool(coord.verifier.verify, token.strip())

    def own_queue(participant_id: str, who: Claims, action: str) -> None:
        """Role and ownership: only participant ``participant_id`` itself touches its queue
        (each task is then authorised against its own job)."""
        authorize(
            who, action, participant_id=participant_id, job_id="*", job_participants={who.sub}
        )

    # --- enrolment and tokens --------------------------------------------------------------------

    @app.get("/healthz", tags=["service"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/.well-known/jwks.json", tags=["tokens"])
    def jwks() -> dict[str, Any]:
        """The public keys that verify the coordinator's tokens (RFC 7517)."""
        return coord.keyring.jwks(coord.clock())

    @app.post("/v1/enrol", response_model=TokenResponse, tags=["tokens"])
    def enrol(body: EnrolRequest) -> dict[str, Any]:
        """Redeem a one-time enrolment secret for a first access token."""
        enrolment = coord.registry.redeem(body.secret, coord.clock())
        return coord.token(enrolment.participant_id, enrolment.role)

    @app.post("/v1/token/refresh", response_model=TokenResponse, tags=["tokens"])
    def refresh(who: Claims = Depends(claims)) -> dict[str, Any]:
        """A new short-lived token for the caller (still enrolled and enabled)."""
        return coord.token(who.sub, who.role)

    # --- jobs ------------------------------------------------------------------------------------

    @app.post(
        "/v1/jobs",
        response_model=JobCreated,
        status_code=201,
        tags=["jobs"],
        responses={503: {"model": ErrorBody, "description": "a standby: retry at the leader"}},
    )
    def submit_job(body: JobSubmission, who: Claims = Depends(claims)) -> dict[str, Any]:
        """Submit a job (admins only); it starts at once in the background."""
        authorize(who, SUBMIT_JOB)
        if coord.lease is not None:
            coord.lease.require_leader()  # a standby: 503 naming the leader
        job_id = coord.runner.submit(
            body.job, body.participants, body.options, submitted_by=who.sub
        )
        return {"job_id": job_id, "status": coord.state.job(job_id).status}

    def _job_for(job_id: str, who: Claims, action: str):
        record = coord.state.find_job(job_id)
        authorize(
            who,
            action,
            job_id=job_id,
            job_participants=set(record.participants) if record else set(),
        )
        return coord.state.job(job_id)  # 404 for admins and observers

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    def job_status(
        job_id: str,
        wait: float = Query(0.0, ge=0, description="seconds to wait for the job to finish"),
        who: Claims = Depends(claims),
    ) -> dict[str, Any]:
        """Status, rounds done and, once finished, aggregate metrics (or the error)."""
        record = _job_for(job_id, who, READ_JOB_STATUS)
        if wait:
            record = coord.state.wait_job(job_id, min(wait, settings.max_poll_wait_seconds))
        return record.status_dict()

    @app.get("/v1/jobs/{job_id}/model", tags=["jobs"])
    def job_model(job_id: str, who: Claims = Depends(claims)) -> dict[str, Any]:
        """The trained model (parameters and standardisation) of a succeeded job."""
        record = _job_for(job_id, who, READ_MODEL)
        if record.status != SUCCEEDED or record.result is None:
            raise ConflictError(
                "the job has no model yet",
                field="status",
                value=record.status,
                fix="wait until the job succeeded",
            )
        return {"job_id": job_id, **record.result["model"]}

    # --- tasks -----------------------------------------------------------------------------------

    @app.get(
        "/v1/participants/{participant_id}/tasks",
        tags=["tasks"],
        responses={
            200: {"content": {FRAME_TYPE: {}}, "description": "a task (CDPF frame)"},
            204: {"description": "no task within the wait"},
        },
    )
    def poll_task(
        participant_id: str,
        wait: float = Query(0.0, ge=0, description="long-poll: seconds to wait for a task"),
        who: Claims = Depends(claims),
    ) -> Response:
        """The participant's next task as a CDPF frame (headers ``X-Task-Id``, ``X-Job-Id``,
        ``X-Task-Stage``, ``X-Task-Round``, ``X-Task-Deadline``), or 204."""
        own_queue(participant_id, who, POLL_TASKS)
        task = coord.state.next_task(participant_id, wait=min(wait, settings.max_poll_wait_seconds))
        if task is None:
            return Response(status_code=204)
        authorize(
            who,
            POLL_TASKS,
            participant_id=participant_id,
            job_id=task.job_id,
            job_participants=set(coord.state.job_participants(task.job_id)),
        )
        return Response(
            content=task.request,
            media_type=FRAME_TYPE,
            headers={
                "X-Task-Id": task.task_id,
                "X-Job-Id": task.job_id,
                "X-Task-Stage": task.stage,
                "X-Task-Round": str(task.round),
                "X-Task-Attempt": str(task.attempt),
                "X-Task-Deadline": task.deadline_at.isoformat(),
            },
        )

    def _store_result(participant_id: str, task_id: str, body: bytes, who: Claims) -> Any:
        owner = coord.state.task_owner(task_id)  # not the task itself: its frame is large
        if owner is None or owner[0] != participant_id:
            raise ForbiddenError(
                "this task is not assigned to this participant",
                code="other_participant",
                field="task_id",
                fix="submit results only for tasks this participant received",
            )
        job_id = owner[1]
        authorize(
            who,
            SUBMIT_RESULT,
            participant_id=participant_id,
            job_id=job_id,
            job_participants=set(coord.state.job_participants(job_id)),
        )
        reply = coord.reply_codec.decode(body)  # CodecError -> 400 with its message
        check_reply(reply, coord.state.task_request(task_id))  # wrong type or shape: 400 too
        if isinstance(reply, Failure) and reply.participant != participant_id:
            raise CodecError(
                "a failure must name the participant that sends it",
                field="failure.participant",
                fix="set Failure.participant to your own participant id",
            )
        # the decoded reply goes along: the job runner then does not decode the frame again
        return coord.state.submit_result(participant_id, task_id, body, decoded=reply).to_dict()

    @app.post(
        "/v1/participants/{participant_id}/tasks/{task_id}/result",
        tags=["tasks"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {FRAME_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    async def submit_result(
        participant_id: str, task_id: str, request: Request, who: Claims = Depends(claims)
    ) -> dict[str, Any]:
        """Post the reply to a task (a CDPF frame). Idempotent: the same bytes again get the
        stored acknowledgement (``duplicate: true``); other bytes are a 409."""
        own_queue(participant_id, who, SUBMIT_RESULT)  # pure (no database): no thread hop
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != FRAME_TYPE:
            raise UnsupportedMediaTypeError(
                "a result must be a CDPF frame",
                field="content-type",
                value=media or None,
                fix=f"send Content-Type: {FRAME_TYPE}",
            )
        body = await request.body()
        return await run_in_threadpool(_store_result, participant_id, task_id, body, who)

    app.include_router(relay_router(coord))  # peer-to-peer envelopes (coordinator/relay.py)
    return app
