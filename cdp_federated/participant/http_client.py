"""The participant's (and the admin CLI's) HTTP client for the coordinator service.

A thin, typed wrapper over ``httpx`` with explicit timeouts: every error answer of the service
(``{error, message, field, fix}``) becomes the matching typed error (401 -> :class:`AuthError`,
403 -> :class:`ForbiddenError`, 400 on a frame -> :class:`CodecError`, other 4xx ->
:class:`ConfigError`), and a network failure or 5xx becomes :class:`TransportError`, which the
participant runner retries with backoff.

``recorder(direction, path, body)`` sees every request and response body (tests assert that no
row or identifier ever crosses the wire).
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from ..errors import (
    AuthError,
    CDPFederatedError,
    CodecError,
    ConfigError,
    ForbiddenError,
    TransportError,
)
from ..federation.relay import Delivery, unpack_deliveries

__all__ = ["FRAME_TYPE", "Task", "TokenInfo", "CoordinatorClient", "BodyRecorder"]

FRAME_TYPE = "application/x-cdpf"
BodyRecorder = Callable[[str, str, bytes], None]  # (direction, path, body)


@dataclass(frozen=True)
class Task:
    """One request from the coordinator: the frame to decode and answer."""

    task_id: str
    job_id: str
    stage: str
    round: int
    frame: bytes


@dataclass(frozen=True)
class TokenInfo:
    participant_id: str
    role: str
    access_token: str
    expires_at: datetime
    issued_at: datetime

    @classmethod
    def from_response(cls, data: Mapping[str, Any], now: datetime) -> TokenInfo:
        return cls(
            participant_id=str(data["participant_id"]),
            role=str(data["role"]),
            access_token=str(data["access_token"]),
            expires_at=datetime.fromisoformat(str(data["expires_at"])),
            issued_at=now,
        )

    def to_dict(self) -> dict[str, str]:
        return {
            "participant_id": self.participant_id,
            "role": self.role,
            "access_token": self.access_token,
            "expires_at": self.expires_at.isoformat(),
            "issued_at": self.issued_at.isoformat(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenInfo:
        return cls(
            participant_id=str(data["participant_id"]),
            role=str(data["role"]),
            access_token=str(data["access_token"]),
            expires_at=datetime.fromisoformat(str(data["expires_at"])),
            issued_at=datetime.fromisoformat(str(data["issued_at"])),
        )

    def needs_refresh(self, now: datetime, fraction: float = 1 / 3) -> bool:
        """True once less than ``fraction`` of the token's lifetime is left."""
        lifetime = max(self.expires_at - self.issued_at, timedelta(seconds=1))
        return self.expires_at - now < lifetime * fraction


def _utcnow() -> datetime:
    return datetime.now(UTC)


class CoordinatorClient:
    """Calls the coordinator at ``base_url``. ``timeout`` bounds connecting and each read (a
    long-poll's read timeout is its wait plus ``timeout``); ``verify`` is TLS verification (a CA
    bundle path, or True). ``transport`` lets tests route requests to an app in-process."""

    def __init__(
        self,
        base_url: str,
        *,
        token: TokenInfo | None = None,
        timeout: float = 30.0,
        verify: bool | str = True,
        transport: httpx.BaseTransport | None = None,
        recorder: BodyRecorder | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.recorder = recorder
        self.clock = clock
        self._lock = threading.Lock()
        hooks: dict[str, list[Callable[..., Any]]] = {}
        if recorder is not None:
            hooks = {"request": [self._record_request], "response": [self._record_response]}
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout),
            verify=verify,
            transport=transport,
            event_hooks=hooks,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing --------------------------------------------------------------------------------

    def _record_request(self, request: httpx.Request) -> None:
        assert self.recorder is not None
        self.recorder("request", request.url.path, request.read())

    def _record_response(self, response: httpx.Response) -> None:
        assert self.recorder is not None
        self.recorder("response", response.request.url.path, response.read())

    def _headers(self, auth: bool) -> dict[str, str]:
        if not auth:
            return {}
        if self.token is None:
            raise AuthError("no access token: enrol first", code="missing_token")
        return {"Authorization": f"Bearer {self.token.access_token}"}

    def _call(
        self,
        method: str,
        path: str,
        *,
        auth: bool = True,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        headers = {**kwargs.pop("headers", {}), **self._headers(auth)}
        try:
            response = self._http.request(
                method,
                path,
                headers=headers,
                timeout=httpx.Timeout(timeout) if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                **kwargs,
            )
        except httpx.HTTPError as exc:
            raise TransportError(
                f"cannot reach the coordinator: {type(exc).__name__}: {exc}",
                field="coordinator",
                value=self.base_url,
                fix="check that the coordinator runs and its URL, network and TLS settings",
            ) from exc
        if response.status_code >= 400:
            raise self._error(response)
        return response

    @staticmethod
    def _error(response: httpx.Response) -> CDPFederatedError:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        message = str(body.get("message") or response.reason_phrase or "request failed")
        kwargs = {"field": body.get("field"), "fix": body.get("fix")}
        status = response.status_code
        if status == 401:
            return AuthError(f"coordinator refused the token: {message}", code="rejected", **kwargs)
        if status == 403:
            return ForbiddenError(message, code="forbidden", **kwargs)
        if status >= 500:
            return TransportError(f"coordinator error {status}: {message}", **kwargs)
        if body.get("error") == "CodecError":
            return CodecError(message, **kwargs)
        return ConfigError(f"coordinator answered {status}: {message}", **kwargs)

    # --- tokens ----------------------------------------------------------------------------------

    def enrol(self, secret: str) -> TokenInfo:
        """Redeem a one-time enrolment secret; keeps and returns the first access token."""
        response = self._call("POST", "/v1/enrol", auth=False, json={"secret": secret})
        self.token = TokenInfo.from_response(response.json(), self.clock())
        return self.token

    def refresh(self) -> TokenInfo:
        """Exchange the current token for a fresh one."""
        response = self._call("POST", "/v1/token/refresh")
        self.token = TokenInfo.from_response(response.json(), self.clock())
        return self.token

    def jwks(self) -> dict[str, Any]:
        return self._call("GET", "/.well-known/jwks.json", auth=False).json()

    def health(self) -> bool:
        try:
            return self._call("GET", "/healthz", auth=False).status_code == 200
        except CDPFederatedError:
            return False

    # --- tasks -----------------------------------------------------------------------------------

    def poll(self, participant_id: str, *, wait: float = 20.0) -> Task | None:
        """Long-poll for the next task (None after ``wait`` seconds without one)."""
        response = self._call(
            "GET",
            f"/v1/participants/{participant_id}/tasks",
            params={"wait": wait},
            timeout=wait + self.timeout,
        )
        if response.status_code == 204:
            return None
        return Task(
            task_id=response.headers["X-Task-Id"],
            job_id=response.headers.get("X-Job-Id", ""),
            stage=response.headers.get("X-Task-Stage", ""),
            round=int(response.headers.get("X-Task-Round", "0")),
            frame=response.content,
        )

    def submit(self, participant_id: str, task_id: str, frame: bytes) -> dict[str, Any]:
        """Post the reply frame to ``task_id``; returns the acknowledgement."""
        response = self._call(
            "POST",
            f"/v1/participants/{participant_id}/tasks/{task_id}/result",
            content=frame,
            headers={"Content-Type": FRAME_TYPE},
        )
        return response.json()

    # --- jobs ------------------------------------------------------------------------------------

    def submit_job(
        self,
        job: Mapping[str, Any],
        participants: Sequence[str],
        options: Mapping[str, Any] | None = None,
    ) -> str:
        response = self._call(
            "POST",
            "/v1/jobs",
            json={"job": dict(job), "participants": list(participants), "options": options or {}},
        )
        return str(response.json()["job_id"])

    def job_status(self, job_id: str, *, wait: float = 0.0) -> dict[str, Any]:
        """The job's status; with ``wait``, the server holds the answer until the job finished or
        ``wait`` seconds passed."""
        return self._call(
            "GET", f"/v1/jobs/{job_id}", params={"wait": wait}, timeout=wait + self.timeout
        ).json()

    def job_model(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/jobs/{job_id}/model").json()

    # --- relay (coordinator/relay.py; the channel on top: participant/relay.py) -------------------

    def publish_relay_key(self, participant_id: str, public_key: bytes) -> dict[str, Any]:
        """Publish this participant's raw 32-byte X25519 relay public key."""
        encoded = base64.urlsafe_b64encode(bytes(public_key)).rstrip(b"=").decode()
        return self._call(
            "PUT", f"/v1/participants/{participant_id}/relay-key", json={"public_key": encoded}
        ).json()

    def relay_keys(self, job_id: str) -> dict[str, bytes]:
        """The relay public keys the job's participants published, by participant."""
        data = self._call("GET", f"/v1/jobs/{job_id}/relay/keys").json()
        return {
            name: base64.urlsafe_b64decode(info["public_key"] + "=")
            for name, info in data["keys"].items()
        }

    def relay_send(self, job_id: str, recipient: str, frame: bytes) -> dict[str, Any]:
        """Post an envelope frame to ``recipient``; returns the acknowledgement."""
        return self._call(
            "POST",
            f"/v1/jobs/{job_id}/relay/{recipient}",
            content=frame,
            headers={"Content-Type": FRAME_TYPE},
        ).json()

    def relay_inbox(
        self,
        job_id: str,
        *,
        sender: str | None = None,
        session: str | None = None,
        after: int = 0,
        wait: float = 0.0,
        limit: int = 100,
    ) -> list[Delivery]:
        """This participant's unacknowledged envelopes, long-polling up to ``wait`` seconds."""
        params: dict[str, Any] = {"after": after, "wait": wait, "limit": limit}
        if sender is not None:
            params["sender"] = sender
        if session is not None:
            params["session"] = session
        response = self._call(
            "GET", f"/v1/jobs/{job_id}/relay", params=params, timeout=wait + self.timeout
        )
        if response.status_code == 204:
            return []
        return unpack_deliveries(response.content)

    def relay_ack(self, job_id: str, ids: Sequence[int]) -> int:
        """Acknowledge received envelopes (the coordinator deletes them)."""
        done = 0
        for start in range(0, len(ids), 1000):  # the service takes 1000 ids per request
            chunk = list(ids[start : start + 1000])
            response = self._call("DELETE", f"/v1/jobs/{job_id}/relay", params={"id": chunk})
            done += int(response.json()["acknowledged"])
        return done
