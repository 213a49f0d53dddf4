"""The participant as its own process: poll the coordinator for tasks, answer them locally.

:func:`run_participant` reads a :class:`ParticipantConfig` (YAML), enrols with a one-time secret
(or reuses the token saved by a previous run), and serves tasks with a :class:`ParticipantAgent`
whose rows come from the participant's own connector, consent-filtered through its own store and
policy, with every decision in its own audit log -- the same local pipeline as the in-process demo
(:mod:`.pipeline`, :class:`.governance.LocalGovernance`). The coordinator only ever receives the
agent's replies: counts, sums, parameters and histograms.

:func:`serve_tasks` is the loop itself, for any ``message -> message`` handler: long-poll, decode,
handle, encode, post. A handler error becomes a ``Failure`` reply exactly as the in-process
transport makes it, so a job runs identically on both transports. Network errors are retried
with exponential backoff and jitter (from :mod:`secrets`); the token is refreshed once two
thirds of its lifetime passed; the loop stops when ``stop`` is set, or with ``once`` after the
first job it served finished.

The agent is wrapped in :class:`~.secagg_tasks.SecAggTasks`, so a job with
``params.secure_aggregation`` gets masked inputs from this process: its share packets travel
sealed through the coordinator's relay under the participant's long-term relay key
(``relay_key``, created on first start, its public half published per job).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pluggy
import polars as pl
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..connector import ConnectorConfig, ConnectorRegistry
from ..consent.ledger import allowed_ids
from ..errors import (
    AuthError,
    CDPFederatedError,
    CodecError,
    ConfigError,
    ForbiddenError,
    SchemaMismatchError,
    TransportError,
)
from ..federation.codec import Codec
from ..federation.envelope import RelayKeyPair
from ..federation.messages import Failure, Message
from ..federation.relay import RelayChannel
from ..federation.transport import stage_of
from ..governance.audit import AuditLog
from ..governance.budget import BudgetLedger
from ..governance.policy import Policy, load_policy
from ..jobs import JobSpec
from ..store import Store, open_store
from .agent import ParticipantAgent
from .governance import LocalGovernance, decision_context
from .http_client import CoordinatorClient, Task, TokenInfo
from .pipeline import Funnel, check_policy, load_consented, split_train_test
from .relay import http_relay_channel
from .secagg_tasks import SecAggTasks
from .vertical_tasks import participant_vertical_tasks

__all__ = [
    "ClientConfig",
    "ParticipantConfig",
    "load_config",
    "load_participant_config",
    "connect",
    "LocalPipeline",
    "Backoff",
    "serve_tasks",
    "run_participant",
    "relay_keys",
]

log = logging.getLogger(__name__)
FINISHED = ("succeeded", "failed")


# --- configuration ---------------------------------------------------------------------------------


class ClientConfig(BaseModel):
    """How a process reaches the coordinator (an admin's ``client.yaml``; the first keys of a
    participant's config). Paths are relative to the config file. The token is read from
    ``token_file`` when it is still valid, else obtained with the one-time enrolment secret
    (``enrolment_secret`` or ``enrolment_secret_file``) and saved there (mode 0600)."""

    model_config = ConfigDict(extra="forbid")

    coordinator_url: str
    participant_id: str | None = None
    enrolment_secret: str | None = None
    enrolment_secret_file: str | None = None
    token_file: str | None = None
    timeout_seconds: float = 30.0
    verify: bool | str = True
    base_dir: str = "."

    def path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base_dir) / p

    def secret(self) -> str | None:
        if self.enrolment_secret:
            return self.enrolment_secret
        if self.enrolment_secret_file:
            target = self.path(self.enrolment_secret_file)
            if target.is_file():
                return target.read_text().strip() or None
        return None


class ParticipantConfig(ClientConfig):
    """A participant process's settings (``cdp-fl participant run --config participant.yaml``).

    ``connector`` declares the source like any connector (``type``, ``url``, ``query``...; the
    job supplies ``features`` and ``label``, which must be among the connector's ``features``
    when it lists them). ``store`` is this participant's own database (consent ledger, audit
    log); ``policy`` its policy YAML; ``audit_key`` its audit signing key (created when absent);
    ``consent_at`` the time consent is evaluated at (default: now, at each round);
    ``relay_key`` its X25519 relay key file for secure aggregation (created, mode 0600, when
    absent; default: ``<participant_id>-relay.pem`` next to ``token_file``, else next to
    ``audit_key``); ``he_workers`` the local processes a vertical job's HE work may use
    (encryption at the label party, bucket sums at a passive one; 2 pays off from about 50k rows).
    """

    participant_id: str
    store: str
    connector: dict[str, Any]
    policy: str
    audit_key: str
    consent_at: datetime | None = None
    partners: list[str] | None = None
    output_use: str | None = "scoring"
    poll_wait_seconds: float = 20.0
    relay_key: str | None = None
    he_workers: int = Field(default=1, ge=1, le=64)

    def relay_key_path(self) -> Path:
        if self.relay_key:
            return self.path(self.relay_key)
        beside = self.path(self.token_file or self.audit_key).parent
        return beside / f"{self.participant_id}-relay.pem"

    def db_url(self, value: str) -> str:
        """A database URL; a bare path (SQLite) is relative to the config file."""
        from ..settings import normalize_db_url

        return normalize_db_url(value if "://" in value else self.path(value))


def load_participant_config(path: str | os.PathLike[str], **overrides: Any) -> ParticipantConfig:
    """Read a participant YAML; ``overrides`` (not None) replace its keys."""
    return load_config(ParticipantConfig, path, **overrides)  # type: ignore[return-value]


def load_config(
    kind: type[ClientConfig], path: str | os.PathLike[str], **overrides: Any
) -> ClientConfig:
    """Read a client or participant YAML; ``overrides`` (not None) replace its keys."""
    target = Path(path)
    try:
        data = yaml.safe_load(target.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(
            f"cannot read participant config: {exc}",
            field="--config",
            value=str(target),
            fix="give a readable YAML file",
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError("participant config must be a mapping", field="--config")
    data.update({k: v for k, v in overrides.items() if v is not None})
    data.setdefault("base_dir", str(target.resolve().parent))
    try:
        return kind(**data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(
            f"invalid participant config: {first['msg']}",
            field=".".join(map(str, first["loc"])),
            value=str(target),
            fix=f"see {kind.__name__} in cdp_federated.participant.runner",
        ) from None


# --- the local pipeline --------------------------------------------------------------------------


@dataclass
class _Prepared:
    job: JobSpec
    train: pl.DataFrame
    test: pl.DataFrame
    funnel: Funnel
    governance: LocalGovernance


@dataclass
class LocalPipeline:
    """The participant's data side for the agent: per job, governance decides before any row is
    read, the connector's rows are consent-filtered (ledger pushed down), the policy decides again
    on the consented count, the rows are split train/test, and consent is re-checked each round.
    Only the current job's rows are kept."""

    name: str
    store: Store
    policy: Policy
    pm: pluggy.PluginManager
    connector: dict[str, Any]
    audit_key: Path
    consent_at: datetime | None = None
    partners: list[str] | None = None
    output_use: str | None = "scoring"
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    _prepared: _Prepared | None = None
    _audit: AuditLog | None = None

    def at(self) -> datetime:
        return self.consent_at or self.clock()

    def _governance(self) -> LocalGovernance:
        if self._audit is None:
            self._audit = AuditLog.open(self.store, key_path=self.audit_key, create_key=True)
        partners = self.partners or [
            p.name for p in self.policy.partners if "participant" in p.roles
        ]
        if self.name not in partners:
            partners = [*partners, self.name]
        context = decision_context(self.policy, self.name, partners, self.at(), self.output_use)
        # A DP job's epsilon (computed from its spec) is checked and charged to this store's ledger.
        ledger = BudgetLedger(self.store)
        return LocalGovernance(self.policy, self._audit, context, budget=ledger, source=self.name)

    def _connector_config(self, job: JobSpec) -> ConnectorConfig:
        declared = self.connector.get("features")
        if declared is not None:
            extra = sorted(set(job.features) - set(declared))
            if extra:
                raise SchemaMismatchError(
                    f"participant {self.name!r} does not expose features {extra}",
                    field="features",
                    value=extra,
                    fix="ask for the features this participant's connector declares",
                )
        return ConnectorConfig(
            **{
                "name": self.name,
                **self.connector,
                "features": tuple(job.features),
                "label": job.label,
            }
        )

    def prepare(self, job: JobSpec) -> _Prepared:
        if self._prepared is not None and self._prepared.job == job:
            return self._prepared
        self.close_job()
        governance = self._governance()
        governance.decide(job, stage="before_read")  # before any row is read
        check_policy(self.pm, job, self.name)
        with ConnectorRegistry(self.pm).open(self._connector_config(job)) as connector:
            frame, funnel = load_consented(
                connector,
                pm=self.pm,
                purpose=job.purpose,
                at=self.at(),
                ledger=self.store,
                rule=governance.consent_rule(job),
            )
        governance.decide(job, stage="after_consent", rows_available=funnel.consented)
        train, test = split_train_test(frame, float(job.params.get("test_fraction", 0.2)))
        governance.consent_filtered(
            job,
            rows_in=funnel.rows_in,
            consented=funnel.consented,
            aligned=None,
            trained=train.height,
        )
        governance.job_started(job)
        self._prepared = _Prepared(job, train, test, funnel, governance)
        return self._prepared

    def provider(self, job: JobSpec, split: str) -> pl.DataFrame:
        prepared = self.prepare(job)
        return prepared.train if split == "train" else prepared.test

    def consent_gate(self, job: JobSpec) -> pl.Series:
        """The profile ids whose consent allows the job's purpose now (checked every round)."""
        rule = self.policy.purpose_rule(job.purpose)
        return (
            allowed_ids(self.store, job.purpose, self.at(), rule=rule)
            .as_frame()
            .collect()
            .get_column("profile_id")
        )

    def close_job(self) -> dict[str, Any] | None:
        """Sign the audit log's head for the current job (if any) and forget its rows."""
        if self._prepared is None:
            return None
        summary = self._prepared.governance.close()
        self._prepared = None
        return summary


# --- the task loop -------------------------------------------------------------------------------


@dataclass
class Backoff:
    """Exponential backoff with full jitter from :mod:`secrets`: attempt ``n`` waits a uniformly
    drawn fraction in [0.5, 1.0) of ``min(cap, base * 2**n)`` seconds."""

    base: float = 0.2
    cap: float = 10.0
    attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2**self.attempt)
        self.attempt = min(self.attempt + 1, 30)
        return ceiling * (0.5 + secrets.randbelow(1_000_000) / 2_000_000)

    def reset(self) -> None:
        self.attempt = 0


def answer(
    name: str, handler: Callable[[Message], Message], frame: bytes, codec: Codec
) -> tuple[bytes, bool]:
    """The encoded reply to one request frame and whether it is a ``Failure``: any error becomes
    one (as the in-process transport makes it), naming the stage and the error, never a row."""
    stage = "unknown"
    try:
        message = codec.decode(frame)
        stage = stage_of(message)
        reply = handler(message)
        if not isinstance(reply, Message):
            raise TypeError(f"handler returned {type(reply).__name__}, not a message")
        return codec.encode(reply), isinstance(reply, Failure)
    except Exception as exc:  # noqa: BLE001 - any participant-side error becomes a Failure
        return codec.encode(Failure(name, stage, type(exc).__name__, str(exc))), True


@dataclass
class LoopStats:
    tasks: int = 0
    failures: int = 0
    retries: int = 0
    jobs: dict[str, str] = field(default_factory=dict)  # job id -> last known status

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "failures": self.failures,
            "retries": self.retries,
            "jobs": dict(self.jobs),
        }


def serve_tasks(
    client: CoordinatorClient,
    participant_id: str,
    handler: Callable[[Message], Message],
    *,
    stop: threading.Event | None = None,
    once: bool = False,
    poll_wait: float = 20.0,
    codec: Codec | None = None,
    backoff: Backoff | None = None,
    on_token: Callable[[TokenInfo], None] | None = None,
    on_job_finished: Callable[[str, str], None] | None = None,
) -> LoopStats:
    """Poll ``client`` for ``participant_id``'s tasks and answer each with ``handler`` until
    ``stop`` is set (or, with ``once``, a job this loop served has finished). Returns counts.

    An :class:`AuthError` (token refused, disabled) ends the loop by raising; network errors are
    retried with ``backoff``; a result the coordinator no longer wants (deadline passed, 409/403)
    is dropped."""
    stop = stop or threading.Event()
    codec = codec or Codec()
    backoff = backoff or Backoff()
    stats = LoopStats()
    while not stop.is_set():
        try:
            if client.token is not None and client.token.needs_refresh(client.clock()):
                token = client.refresh()
                if on_token is not None:
                    on_token(token)
            task = client.poll(participant_id, wait=poll_wait)
            if task is None:
                if _finished_jobs(client, stats, on_job_finished) and once:
                    break
                backoff.reset()
                continue
            stats.jobs.setdefault(task.job_id, "running")
            _serve(client, participant_id, handler, task, codec, stats, stop, backoff)
            backoff.reset()
        except TransportError as exc:
            stats.retries += 1
            delay = backoff.next_delay()
            log.warning("coordinator unreachable (%s); retrying in %.1f s", exc.message, delay)
            stop.wait(delay)
    return stats


def _serve(
    client: CoordinatorClient,
    participant_id: str,
    handler: Callable[[Message], Message],
    task: Task,
    codec: Codec,
    stats: LoopStats,
    stop: threading.Event,
    backoff: Backoff,
) -> None:
    reply, failed = answer(participant_id, handler, task.frame, codec)
    stats.tasks += 1
    stats.failures += failed
    while not stop.is_set():
        try:
            client.submit(participant_id, task.task_id, reply)
            return
        except TransportError as exc:  # the same bytes again are idempotent on the coordinator
            stats.retries += 1
            delay = backoff.next_delay()
            log.warning("could not post result (%s); retrying in %.1f s", exc.message, delay)
            stop.wait(delay)
        except (ConfigError, ForbiddenError, CodecError) as exc:
            log.warning("coordinator refused the result of task %s: %s", task.task_id, exc)
            return


def _finished_jobs(
    client: CoordinatorClient,
    stats: LoopStats,
    on_job_finished: Callable[[str, str], None] | None,
) -> bool:
    """Refresh the status of the jobs served and not yet finished; True if any has finished."""
    finished = False
    for job_id, status in list(stats.jobs.items()):
        if status in FINISHED:
            finished = True
            continue
        try:
            current = str(client.job_status(job_id).get("status", status))
        except (ConfigError, ForbiddenError):
            current = "failed"
        stats.jobs[job_id] = current
        if current in FINISHED:
            finished = True
            if on_job_finished is not None:
                on_job_finished(job_id, current)
    return finished


# --- the process ---------------------------------------------------------------------------------


def relay_keys(path: Path) -> RelayKeyPair:
    """The participant's long-term relay key pair: read from ``path``, or generated and saved
    there (mode 0600) on first use. A key file readable by others is refused, not replaced."""
    if path.exists() or path.is_symlink():
        return RelayKeyPair.load(path)
    keys = RelayKeyPair.generate()
    keys.save(path)
    return keys


class _RelayChannels:
    """``channel_for(job_id)`` for :class:`SecAggTasks`: one channel per job (its sequence
    numbers live in it), publishing the relay key on first use; :meth:`forget` when the job
    ends."""

    def __init__(self, client: CoordinatorClient, keys: RelayKeyPair) -> None:
        self._client = client
        self._keys = keys
        self._channels: dict[str, RelayChannel] = {}

    def __call__(self, job_id: str) -> RelayChannel:
        if job_id not in self._channels:
            self._channels[job_id] = http_relay_channel(self._client, job_id, self._keys)
        return self._channels[job_id]

    def forget(self, job_id: str) -> None:
        self._channels.pop(job_id, None)


def _save_token(path: Path, token: TokenInfo) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(token.to_dict(), fh)


def _load_token(path: Path | None, now: datetime) -> TokenInfo | None:
    if path is None or not path.is_file():
        return None
    try:
        token = TokenInfo.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        return None
    return token if token.expires_at > now else None


def connect(config: ClientConfig, **client_kwargs: Any) -> CoordinatorClient:
    """A client holding a valid token: the saved one, else one from the enrolment secret."""
    client = CoordinatorClient(
        config.coordinator_url,
        timeout=config.timeout_seconds,
        verify=config.verify,
        **client_kwargs,
    )
    token_path = config.path(config.token_file) if config.token_file else None
    token = _load_token(token_path, client.clock())
    if token is not None and config.participant_id in (None, token.participant_id):
        client.token = token
        if token.needs_refresh(client.clock()):
            token = client.refresh()
    else:
        secret = config.secret()
        if secret is None:
            client.close()
            raise AuthError(
                "no saved token and no enrolment secret",
                code="missing_token",
                field="enrolment_secret_file",
                fix="ask the coordinator's admin for an enrolment secret "
                "(`cdp-fl coordinator enrol NAME`) and put it in the config",
            )
        token = client.enrol(secret)
        if config.participant_id not in (None, token.participant_id):
            client.close()
            raise ConfigError(
                "the enrolment secret is for another participant",
                field="participant_id",
                value=token.participant_id,
                fix="use this participant's own enrolment secret",
            )
    if token_path is not None:
        _save_token(token_path, token)
    return client


def run_participant(
    config: ParticipantConfig,
    *,
    stop: threading.Event | None = None,
    once: bool = False,
    pm: pluggy.PluginManager | None = None,
    on_job_finished: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Enrol (or reuse the saved token), then serve tasks until ``stop`` (or with ``once`` until
    the first job served finished). Returns what the loop did."""
    from ..plugins import make_plugin_manager

    pm = pm or make_plugin_manager()
    policy_path = config.path(config.policy)
    if not policy_path.is_file():
        raise ConfigError("policy file not found", field="policy", value=str(policy_path))
    store = open_store(config.db_url(config.store), create=False)
    connector = dict(config.connector)
    if isinstance(connector.get("url"), str):
        connector["url"] = config.db_url(connector["url"])
    for key in ("path",):
        if isinstance(connector.get(key), str):
            connector[key] = str(config.path(connector[key]))
    pipeline = LocalPipeline(
        name=config.participant_id,
        store=store,
        policy=load_policy(policy_path),
        pm=pm,
        connector=connector,
        audit_key=config.path(config.audit_key),
        consent_at=config.consent_at,
        partners=config.partners,
        output_use=config.output_use,
    )
    agent = ParticipantAgent(
        config.participant_id, pipeline.provider, consent_gate=pipeline.consent_gate
    )
    token_path = config.path(config.token_file) if config.token_file else None
    keys = relay_keys(config.relay_key_path())  # a bad key file fails before enrolment
    client = connect(config)
    channels = _RelayChannels(client, keys)
    policy = pipeline.policy  # enforced on the wire too: no clear update, no too-small round
    tasks = SecAggTasks(
        config.participant_id,
        agent.handle,
        channels,
        require_secure=policy.privacy.secure_aggregation == "required",
        min_participants=policy.minimums.participants_per_round or 0,
    )
    vertical = participant_vertical_tasks(config, pipeline, client, keys, tasks.handle)
    audit: dict[str, Any] = {}

    def finished(job_id: str, status: str) -> None:
        channels.forget(job_id)
        vertical.forget(job_id)
        summary = pipeline.close_job()
        if summary is not None:
            audit[job_id] = summary
        if on_job_finished is not None:
            on_job_finished(job_id, status)

    try:
        stats = serve_tasks(
            client,
            config.participant_id,
            vertical.handle,
            stop=stop,
            once=once,
            poll_wait=config.poll_wait_seconds,
            on_token=(lambda t: _save_token(token_path, t)) if token_path else None,
            on_job_finished=finished,
        )
    except CDPFederatedError:
        pipeline.close_job()
        raise
    finally:
        vertical.close()  # stop vertical protocol threads before their client goes
        client.close()
        store.dispose()
    return {"participant_id": config.participant_id, **stats.to_dict(), "audit": audit}
