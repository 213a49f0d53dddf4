"""A participant's side of a vertical job run by the coordinator service.

``vertical_start_ins`` names the job; the party reads its role from ``params.active``. Before
replying it runs its local pipeline (:mod:`.vertical_data`), as horizontal tasks do: its own
policy decides on the job as it concerns this party (its own columns; identity method ``psi``),
the plugins vote, and a *passive* party whose source holds the label column refuses the job (a
:class:`~cdp_federated.errors.PolicyViolation`, in its own audit log: the label must not leave
the active party). Then its connector's rows are consent-filtered, identifiers normalised (raw
or already SHA-256-hashed emails meet as the hex SHA-256 of the normalised address), and the
reply says ``running``. The protocol runs on a thread of its own:

1. **Align** by ECDH PSI over the relay (:mod:`cdp_federated.identity.psi_relay`): every PSI
   message sealed end to end; the coordinator carries envelopes it cannot open.
2. **Split** the aligned customers: a customer is held out when the SHA-256 of ``split_salt``
   and its hashed identifier falls in the first ``test_fraction`` of the hash space, so every
   party holds out the same customers without another message.
3. **Train** SecureBoost or logistic regression over the relay
   (:mod:`cdp_federated.learning.vertical.relay_channel`); the active party generates the HE key.
4. **Score** the held-out rows cooperatively; the active party computes AUC (or RMSE).
5. **Keep its part** in its own registry (:mod:`.vertical_parts`): trees with split ids at the
   active party, the lookup table at a passive party. Nothing is saved after a failure.

``vertical_status_ins`` long-polls the thread: it answers when the progress (trees or epochs
done, active party) changed or the thread ended; a failure is raised, so it travels back as a
``Failure`` naming its type. The coordinator fails the job on any failure or missed deadline;
the relay then refuses the job's envelopes, which ends every other party's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import (
    CDPFederatedError,
    NoTrainingDataError,
    TrainingError,
    TransportError,
)
from ..federation.codec import Codec
from ..federation.messages import Failure, Message
from ..federation.relay import RelayChannel
from ..federation.vertical_messages import (
    RUNNING,
    SUCCEEDED,
    VerticalStartIns,
    VerticalStatusIns,
    VerticalStatusRes,
)
from ..jobs import JobSpec
from ..registry import job_spec_hash
from ..vertical_job import VerticalJob
from .vertical_data import PartyRows, held_out, local_rows, psi_ids
from .vertical_parts import logreg_part, save_part, secureboost_part

__all__ = [
    "PartyRows",
    "VerticalTasks",
    "psi_ids",
    "held_out",
    "local_rows",
    "models_dir",
    "participant_vertical_tasks",
]

log = logging.getLogger(__name__)
MAX_STATUS_WAIT = 30.0
_POLL = 0.5  # seconds a passive party's relay receive waits before looking at its stop flag


@dataclass
class _Session:
    vjob: VerticalJob
    role: str
    rows: PartyRows
    stop: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)
    state: str = RUNNING
    error: BaseException | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[], int] = lambda: 0
    thread: threading.Thread | None = None

    def end(self, *, summary: dict[str, Any] | None = None, error: BaseException | None = None):
        with self.changed:
            self.state = SUCCEEDED if error is None else "failed"
            self.error, self.summary = error, summary or {}
            self.changed.notify_all()


class _Counted:
    """The active party's channel, counting the trees it closes (``sb_tree_done``) as progress."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.trees = inner, 0

    def send(self, recipient: str, message: Any) -> None:
        self.inner.send(recipient, message)
        tree = getattr(message, "tree", None)
        if type(message).__name__ == "SBTreeDone" and tree is not None:
            self.trees = max(self.trees, int(tree) + 1)

    def receive(self, sender: str, timeout: float | None = None) -> Any:
        return self.inner.receive(sender, timeout)


class VerticalTasks:
    """Serves the vertical task messages of participant ``name``; any other message goes to
    ``fallback``. ``load(vjob, role)`` runs the local pipeline (see :meth:`local_rows`);
    ``channel_for(job_id, codec)`` gives a relay channel of the job (one per use: a channel is
    not thread-safe; making one publishes this party's relay key); ``published(job_id)`` names
    the parties whose relay keys are published (awaited before the first message); parts are
    saved under ``models_dir``, recorded in ``store``."""

    def __init__(
        self,
        name: str,
        *,
        load: Callable[[VerticalJob, str], PartyRows],
        channel_for: Callable[[str, Codec | None], RelayChannel],
        fallback: Callable[[Message], Message],
        models_dir: Path,
        store: Any = None,
        published: Callable[[str], Any] | None = None,
        he_workers: int = 1,
    ) -> None:
        self.name = name
        self._he_workers = he_workers  # local processes for HE work: this party's own resources
        self._load = load
        self._channel_for = channel_for
        self._published = published
        self._fallback = fallback
        self._models_dir = Path(models_dir)
        self._store = store
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    # --- the task messages -----------------------------------------------------------------------

    def handle(self, message: Message) -> Message:
        if isinstance(message, VerticalStartIns):
            return self._start(message)
        if isinstance(message, VerticalStatusIns):
            return self._status(message)
        return self._fallback(message)

    def close(self) -> None:
        """Stop every running vertical job's thread (the process is stopping)."""
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            session.stop.set()

    def forget(self, job_id: str) -> None:
        """The job finished at the coordinator: stop its thread (if still running)."""
        with self._lock:
            session = self._sessions.pop(job_id, None)
        if session is not None:
            session.stop.set()

    def _start(self, message: VerticalStartIns) -> VerticalStatusRes:
        spec = JobSpec.from_dict(message.job)
        with self._lock:
            known = self._sessions.get(spec.job_id)
        if known is not None:  # the same task delivered again: report, do not start twice
            return self._reply(spec.job_id, known)
        vjob = VerticalJob.from_spec(spec)
        role = vjob.role(self.name)
        rows = self._load(vjob, role)  # policy, consent, label check: refusals reply here
        self._channel_for(spec.job_id, None)  # publish the relay key before replying
        session = _Session(vjob, role, rows)
        session.thread = threading.Thread(
            target=self._run, args=(session,), name=f"vertical-{spec.job_id}", daemon=True
        )
        with self._lock:
            self._sessions[spec.job_id] = session
        session.thread.start()
        return self._reply(spec.job_id, session)

    def _status(self, message: VerticalStatusIns) -> VerticalStatusRes:
        with self._lock:
            session = self._sessions.get(message.job_id)
        if session is None:
            raise TrainingError(
                f"participant {self.name!r} has no running vertical job {message.job_id!r}",
                field="job_id",
                value=message.job_id,
                fix="the participant restarted and lost the job's protocol state: submit the "
                "job again",
            )
        end = time.monotonic() + min(max(0.0, message.wait), MAX_STATUS_WAIT)
        with session.changed:
            while session.state == RUNNING and session.progress() <= message.progress:
                left = end - time.monotonic()
                if left <= 0:
                    break
                session.changed.wait(min(left, 0.25))  # logreg's epochs are read, not signalled
        return self._reply(message.job_id, session)

    def _reply(self, job_id: str, session: _Session) -> VerticalStatusRes:
        if session.error is not None:
            raise session.error
        return VerticalStatusRes(
            job_id=job_id,
            state=session.state,
            progress=int(session.progress()),
            summary=dict(session.summary),
        )

    # --- the protocol thread ---------------------------------------------------------------------

    def _run(self, session: _Session) -> None:
        started = time.perf_counter()
        vjob, rows = session.vjob, session.rows
        try:
            self._await_keys(session)
            order = self._align(session)
            if order.size == 0:
                raise NoTrainingDataError(
                    "no customer is held by every party of the job",
                    field="params.parties",
                    value=sorted(vjob.parties),
                    fix="check that the parties hold the same customers under the same id_kind",
                )
            test = held_out(rows.ids.gather(order), vjob.test_fraction, vjob.split_salt)
            x = rows.x[order]
            y = rows.y[order] if rows.y is not None else None
            rows.governance.consent_filtered(
                rows.spec,
                rows_in=rows.funnel.rows_in,
                consented=rows.funnel.consented,
                aligned=int(order.size),
                trained=int((~test).sum()),
            )
            rows.governance.job_started(rows.spec)
            train = (x[~test], None if y is None else y[~test])
            held = (x[test], None if y is None else y[test])
            if session.role == "active":
                summary = self._train_active(session, train, held)
            else:
                summary = self._train_passive(session, train[0], held[0])
            summary |= {
                "intersection_size": int(order.size),
                "seconds": round(time.perf_counter() - started, 3),
            }
            session.end(summary=summary)
        except BaseException as exc:  # noqa: BLE001 - reported through the next status reply
            if not session.stop.is_set():
                log.warning("vertical job %s failed here: %s", vjob.job.job_id, exc)
            session.end(error=exc)
        finally:
            try:
                rows.governance.close()
            except CDPFederatedError as exc:  # the audit log's own failure: logged, not raised
                log.warning("could not sign the audit log of %s: %s", vjob.job.job_id, exc)

    def _await_keys(self, session: _Session) -> None:
        """Wait until every party published its relay key (a peer may start a moment later)."""
        if self._published is None:
            return
        vjob = session.vjob
        end = time.monotonic() + vjob.reply_timeout_seconds
        while True:
            missing = sorted(set(vjob.parties) - set(self._published(vjob.job.job_id)))
            if not missing:
                return
            if time.monotonic() > end:
                raise TrainingError(
                    f"parties {missing} published no relay key within "
                    f"{vjob.reply_timeout_seconds:g} s",
                    field="party",
                    value=missing,
                    fix="check that every party's participant process is running",
                )
            if session.stop.wait(0.2):
                raise TrainingError("the job was stopped", field="job_id", value=vjob.job.job_id)

    def _align(self, session: _Session) -> np.ndarray:
        from ..identity.psi_relay import PSI_CODEC, align_as_label, align_as_passive

        vjob, job_id = session.vjob, session.vjob.job.job_id
        channel = self._channel_for(job_id, PSI_CODEC)
        timeout = vjob.reply_timeout_seconds
        if session.role == "active":
            result = align_as_label(
                channel, session.rows.ids, vjob.passives, job_id=job_id, timeout=timeout
            )
        else:
            result = align_as_passive(
                channel, session.rows.ids, vjob.active, job_id=job_id, timeout=timeout
            )
        return np.asarray(result.rows, dtype=np.int64)

    def _protocol_session(self, vjob: VerticalJob) -> str:
        return f"{vjob.job.job_id}/{vjob.model}"

    def _train_active(self, session: _Session, train: tuple, held: tuple) -> dict[str, Any]:
        from ..crypto import generate_keypair
        from ..learning.vertical import (
            VERTICAL_CODEC,
            ActiveParty,
            VerticalLogRegActive,
        )
        from ..learning.vertical.relay_channel import RelayPartyChannel

        vjob = session.vjob
        keys = generate_keypair(
            vjob.he, vjob.key_bits, backend=vjob.he_backend, insecure=vjob.insecure_keys
        )
        relay = self._channel_for(vjob.job.job_id, VERTICAL_CODEC)
        channel = _Counted(
            RelayPartyChannel(
                relay, self._protocol_session(vjob), timeout=vjob.reply_timeout_seconds
            )
        )
        (x, y), (x_test, y_test) = train, held
        if y is None or y_test is None:
            raise TrainingError("the active party has no labels", field="job.label")
        if vjob.model == "secureboost":
            party: Any = ActiveParty(
                self.name, x, y, vjob.secureboost_params(), keys, workers=self._he_workers
            )
            session.progress = lambda: channel.trees
            fitted = party.fit(channel, vjob.passives)
            session.progress = lambda: vjob.job.rounds
        else:
            party = VerticalLogRegActive(
                self.name, x, y, vjob.logreg_params(), keys, workers=self._he_workers
            )
            session.progress = lambda: len(party.history_)
            party.fit(channel, vjob.passives)
            fitted = party
        metrics: dict[str, Any] = {"train_rows": int(y.size), "test_rows": int(y_test.size)}
        if y_test.size:
            margin = party.decision_function(x_test, channel, vjob.passives)
            metrics |= _score(vjob.objective, y_test, margin)
        part_of = secureboost_part if vjob.model == "secureboost" else logreg_part
        part = part_of("active", self.name, vjob.objective, session.rows.spec.features, fitted)
        return metrics | self._keep(session, part, metrics)

    def _train_passive(self, session: _Session, x: np.ndarray, x_test: np.ndarray) -> dict:
        from ..learning.vertical import VERTICAL_CODEC, PassiveParty, VerticalLogRegPassive

        vjob = session.vjob
        insecure = vjob.insecure_keys
        if vjob.model == "secureboost":
            party: Any = PassiveParty(
                self.name, x, allow_insecure_keys=insecure, workers=self._he_workers
            )
        else:
            party = VerticalLogRegPassive(self.name, x, allow_insecure_keys=insecure)
        if x_test.shape[0]:
            party.set_scoring_features(x_test)
        relay = self._channel_for(vjob.job.job_id, VERTICAL_CODEC)
        try:
            _serve_passive(
                party,
                relay,
                active=vjob.active,
                session=self._protocol_session(vjob),
                stop=session.stop,
                idle_timeout=vjob.reply_timeout_seconds,
                scoring=x_test.shape[0] > 0,
            )
        finally:
            if hasattr(party, "close"):
                party.close()
        part_of = secureboost_part if vjob.model == "secureboost" else logreg_part
        part = part_of("passive", self.name, vjob.objective, session.rows.spec.features, party)
        return {"train_rows": int(x.shape[0])} | self._keep(session, part, {})

    def _keep(self, session: _Session, part: Any, metrics: dict[str, Any]) -> dict[str, Any]:
        """Save this party's part in its registry, record it in its audit log."""
        spec, rows = session.rows.spec, session.rows
        lineage = {
            "job_id": spec.job_id,
            "job_spec_hash": job_spec_hash(session.vjob.job),
            "purpose": spec.purpose,
            "label": spec.label if session.role == "active" else None,
            "features": list(spec.features),
            "parties": sorted(session.vjob.parties),
            "funnel": {self.name: rows.funnel.to_dict()},
            "params": dict(session.vjob.job.params),
            "rounds": session.vjob.job.rounds,
            "metrics": metrics,
            "policies": {
                self.name: {
                    "name": rows.governance.policy.name,
                    "version": rows.governance.policy.version,
                    "hash": rows.governance.policy.content_hash,
                }
            },
        }
        model_id, path, digest = save_part(
            self._models_dir, part, lineage=lineage, store=self._store
        )
        rows.governance.model_published(spec, model_id, digest, str(path))
        return {"model_id": model_id, "role": session.role}


def _score(objective: str, y: np.ndarray, margin: np.ndarray) -> dict[str, Any]:
    """AUC and log loss (binary; AUC is rank-based, so margins serve as scores) or RMSE on the
    held-out rows."""
    from sklearn.metrics import roc_auc_score

    if objective == "regression":
        return {"rmse": round(float(np.sqrt(np.mean((margin - y) ** 2))), 6)}
    # log(1 + exp(-m)) for positives, log(1 + exp(m)) for negatives, without overflow
    logloss = round(float(np.mean(np.logaddexp(0.0, np.where(y > 0, -margin, margin)))), 6)
    if len(np.unique(y)) < 2:  # one class only among the held-out rows: AUC is undefined
        return {"auc": None, "logloss": logloss}
    return {"auc": round(float(roc_auc_score(y, margin)), 6), "logloss": logloss}


def _serve_passive(
    party: Any,
    relay: RelayChannel,
    *,
    active: str,
    session: str,
    stop: threading.Event,
    idle_timeout: float,
    scoring: bool,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Answer the active party until training ended and (``scoring``) the held-out rows were
    scored. A refusal goes back as a ``failure`` and is raised here too; a ``failure`` from the
    active party, ``idle_timeout`` seconds of silence or ``stop`` end the loop with an error."""
    last, scored = monotonic(), False
    while not (party.stage == "trained" and (scored or not scoring)):
        if stop.is_set():
            raise TrainingError("the job was stopped", field="job_id", value=session)
        try:
            message = relay.receive(active, session, _POLL)
        except TransportError:  # nothing within one poll
            if monotonic() - last > idle_timeout:
                raise TrainingError(
                    f"the active party {active!r} was silent for {idle_timeout:g} s",
                    field="party",
                    value=active,
                    fix="check the active party; submit the job again",
                ) from None
            continue
        last = monotonic()
        if isinstance(message, Failure):
            raise TrainingError(
                f"the active party {active!r} failed: {message.error_type}: {message.message}",
                field="party",
                value=active,
            )
        was_trained = party.stage == "trained"
        try:
            replies = party.handle(message)
        except CDPFederatedError as exc:
            refusal = Failure(party.name, type(message).__name__, type(exc).__name__, exc.message)
            relay.send(active, refusal, session)
            raise
        for reply in replies or []:
            relay.send(active, reply, session)
        scored = scored or was_trained


def models_dir(config: Any) -> Path:
    """Where a participant process keeps its model parts: ``<participant_id>-models`` next to
    its token file (else next to its audit key), like its relay key."""
    beside = config.path(config.token_file or config.audit_key).parent
    return beside / f"{config.participant_id}-models"


def participant_vertical_tasks(
    config: Any, pipeline: Any, client: Any, keys: Any, fallback: Callable[[Message], Message]
) -> VerticalTasks:
    """The vertical task handler of a participant process (:func:`.runner.run_participant`):
    its rows from ``pipeline``, relay channels through ``client`` under its relay ``keys``."""
    from .relay import http_relay_channel

    def channel_for(job_id: str, codec: Codec | None) -> RelayChannel:
        return http_relay_channel(client, job_id, keys, codec=codec)

    return VerticalTasks(
        config.participant_id,
        load=lambda vjob, role: local_rows(pipeline, vjob, role),
        channel_for=channel_for,
        fallback=fallback,
        models_dir=models_dir(config),
        store=pipeline.store,
        published=client.relay_keys,
        he_workers=config.he_workers,
    )
