"""The coordinator service's persistent state: jobs, tasks (requests to participants) and results.

Everything lives in the coordinator's database (tables ``coord_jobs``, ``coord_tasks``,
``coord_results`` in :mod:`.schema`), so SQLite and PostgreSQL behave alike and a later release can
resume from it after a crash. Within one process, waiters (a participant's long-poll, the job
runner awaiting a reply) are woken (each by an event of its own) the moment a row they wait for is
written, and re-check the database at least every ``recheck`` seconds, which also covers writes
made by another worker process.

Delivery is at-least-once: a task stays deliverable to its participant until it is answered or
its deadline passes, so a participant that crashed after receiving a task gets it again.
Submission is exactly-once: a task's result is stored once; the same bytes submitted again get
the stored acknowledgement back (a retried POST), different bytes are refused.

Large values are written once: identical request frames of a batch (a round's FitIns to every
participant) share one ``coord_frames`` row, and this process delivers the frames it queued from
memory. A reply to a task this process queued is handed to its job runner in memory; the result
row then keeps only its digest (what idempotency needs): if this process dies, the round the
reply belonged to is repeated on resume, so the reply itself would never be read again.

The process also remembers the pending tasks it queued, so the per-request work on the hot path
is one short transaction each: a poll finds its task in memory and marks it delivered (one
``UPDATE`` that also checks it is still deliverable), a result for such a task is stored with one
``UPDATE`` and one ``INSERT``, and the job runner learns of replies from memory. The database is
still the truth: every acknowledgement is committed before it is sent, and tasks or results
written by another process are found by the reads of the database that waiters make on start
(a poll: at most every ``recheck`` seconds per participant) and every ``recheck`` seconds.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from ..errors import ConflictError, ForbiddenError, NotFoundError
from ..jobs import JobSpec
from ..store import Store
from .auth import utcnow
from .schema import checkpoints, frames, job_resumes, jobs, relay_envelopes, results, tasks

__all__ = [
    "QUEUED",
    "RUNNING",
    "SUCCEEDED",
    "FAILED",
    "JOB_STATUSES",
    "NotFoundError",
    "ConflictError",
    "JobRecord",
    "TaskRecord",
    "NewTask",
    "Acknowledgement",
    "CoordinatorState",
]

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
JOB_STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED)
PENDING, DONE, EXPIRED = "pending", "done", "expired"
_LIGHT_TASK = [c for c in tasks.c if c.name != "request"]  # a task row without its frame

# The statements of the per-request hot path, built once: building a statement costs about three
# times as much CPU as executing it on SQLite (bound values: the b_* parameters).
_DELIVER = (
    update(tasks)
    .where(
        tasks.c.task_id == bindparam("b_task_id"),
        tasks.c.status == PENDING,
        tasks.c.deadline_at > bindparam("b_now"),
        tasks.c.job_id.in_(select(jobs.c.job_id).where(jobs.c.status == RUNNING)),
    )
    .values(deliveries=tasks.c.deliveries + 1, last_delivered_at=bindparam("b_now"))
)
_DELIVER_RETURNING = _DELIVER.returning(tasks.c.deliveries)
_MARK_DONE = (
    update(tasks)
    .where(
        tasks.c.task_id == bindparam("b_task_id"),
        tasks.c.status == PENDING,
        tasks.c.deadline_at > bindparam("b_now"),
    )
    .values(status=DONE)
)
_INSERT_RESULT = insert(results)
_INSERT_FRAMES = insert(frames)
_INSERT_TASKS = insert(tasks)
_DROP_UNNEEDED_FRAMES = delete(frames).where(  # frames no pending task of the job needs
    frames.c.job_id == bindparam("b_job_id"),
    frames.c.frame_id.not_in(
        select(tasks.c.request_frame).where(
            tasks.c.job_id == bindparam("b_job_id"),
            tasks.c.status == PENDING,
            tasks.c.request_frame.is_not(None),
        )
    ),
)
_REPLIES = select(results.c.task_id, results.c.reply).where(
    results.c.task_id.in_(bindparam("b_task_ids", expanding=True))
)


def _from_db(value: datetime | None) -> datetime | None:
    """A stored time as aware UTC (SQLite returns it naive; it was stored in UTC)."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class JobRecord:
    """A job as stored: ``result`` (aggregate metrics, history and model) once it succeeded,
    ``error`` (``{error, message, field, fix}``) once it failed."""

    job_id: str
    spec: JobSpec
    participants: tuple[str, ...]
    options: dict[str, Any]
    status: str
    rounds_done: int
    history: list[dict[str, Any]]
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    submitted_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    resumes: tuple[dict[str, Any], ...] = ()  # {at, from_round} per restart that resumed it

    def status_dict(self) -> dict[str, Any]:
        """What ``GET /v1/jobs/{id}`` shows: status, progress, aggregate metrics. No model, no
        per-party value."""
        out: dict[str, Any] = {
            "job_id": self.job_id,
            "status": self.status,
            "rounds": self.spec.rounds,
            "rounds_done": self.rounds_done,
            "participants": list(self.participants),
            "history": self.history,
            "created_at": self.created_at.isoformat(),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }
        if self.result is not None:
            out["metrics"] = self.result.get("metrics", {})
        if self.error is not None:
            out["error"] = self.error
        out["resumed"] = len(self.resumes)
        if self.resumes:
            out["resumes"] = list(self.resumes)
        return out


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    job_id: str
    participant_id: str
    seq: int
    stage: str
    round: int
    attempt: int
    request: bytes
    status: str
    deadline_at: datetime
    deliveries: int = 0
    created_at: datetime | None = None


@dataclass(frozen=True)
class NewTask:
    """A task to queue with :meth:`CoordinatorState.add_tasks`: ``request`` is the encoded frame."""

    participant_id: str
    seq: int
    stage: str
    round: int
    request: bytes
    attempt: int = 1


@dataclass(frozen=True)
class Acknowledgement:
    """The answer to a result submission; ``duplicate`` when the same bytes were already stored."""

    task_id: str
    job_id: str
    participant_id: str
    attempt: int
    received_at: datetime
    duplicate: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "job_id": self.job_id,
            "participant_id": self.participant_id,
            "attempt": self.attempt,
            "received_at": self.received_at.isoformat(),
            "duplicate": self.duplicate,
        }


EVERYONE = "*"


def _distinct_frames(requests: Sequence[bytes]) -> list[tuple[str, bytes]]:
    """``(frame id, frame)`` for each of ``requests``, identical frames sharing one new random id
    and one bytes object. Comparing bytes (memcmp, ~0.05 ms for 2.4 MB) instead of hashing them
    (sha256, ~4 ms) finds the duplicates of a batch, which is all the sharing a round needs."""
    seen: list[tuple[str, bytes]] = []
    out = []
    for request in requests:
        for frame_id, frame in seen:
            if frame is request or (len(frame) == len(request) and frame == request):
                out.append((frame_id, frame))
                break
        else:
            seen.append((secrets.token_hex(16), request))
            out.append(seen[-1])
    return out


class _Waiters:
    """Who waits for which writes. Each waiter registers an event under its topics
    (``tasks:<participant>``, ``result:<task_id>``; a waiter without topics watches every write),
    and a write sets only the events of its topics' waiters and of those that watch every write
    (a write without topics concerns everyone and sets them all). So a reply wakes the job runner
    that awaits it, not every waiting long-poll: a shared condition variable woke each of them
    once per write."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, set[threading.Event]] = {}  # topic (or EVERYONE) -> waiters

    @contextmanager
    def watching(self, topics: Sequence[str]) -> Iterator[threading.Event]:
        """An event that writes of ``topics`` (none: every write) set while the block runs."""
        event = threading.Event()
        keys = tuple(topics) or (EVERYONE,)
        with self._lock:
            for key in keys:
                self._events.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                for key in keys:
                    waiting = self._events.get(key)
                    if waiting is not None:
                        waiting.discard(event)
                        if not waiting:
                            del self._events[key]

    def notify(self, topics: Sequence[str]) -> None:
        with self._lock:
            if topics:
                keys = (*topics, EVERYONE)
                woken = set().union(*(self._events.get(key, ()) for key in keys))
            else:
                woken = set().union(*self._events.values())
        for event in woken:
            event.set()


class CoordinatorState:
    """Jobs, tasks and results in the coordinator's ``store``. Thread-safe; ``clock`` gives the
    (UTC) time written to rows and compared with deadlines."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], datetime] = utcnow,
        recheck: float = 0.5,
    ) -> None:
        self.store = store
        self.clock = clock
        self.recheck = recheck
        self._waiters = _Waiters()
        self._closed = threading.Event()
        self._write_lock = threading.RLock() if store.dialect == "sqlite" else None
        # the pending tasks this process queued (with their request frames), by task id: a poll
        # finds them and a result for one is stored without reading the task back, and no large
        # value is read back from the database (dropped once the task is answered or expired)
        self._queued: dict[str, TaskRecord] = {}
        # when each participant's poll last read the database (tasks queued by other processes)
        self._polled_db: dict[str, float] = {}
        # the participants of each job (they never change: authorisation reads them per request)
        self._participants: dict[str, tuple[str, ...]] = {}
        # replies to those tasks, by task id, until the job runner of this process takes them
        # (their result rows hold only the digest): (job id, frame, the decoded message or None)
        self._replies: dict[str, tuple[str, bytes, Any]] = {}
        # the leader lease's check (coordinator.lease.LeaderLease.fence), run first in every
        # transaction that moves a job on, so a coordinator that lost the lease cannot commit;
        # None: no lease (one coordinator process per database)
        self.fence: Callable[[Any], None] | None = None

    # --- wake-ups --------------------------------------------------------------------------------

    def _notify(self, *topics: str) -> None:
        """Wake the waiters of ``topics`` (none: every waiter) and those that watch every write."""
        self._waiters.notify(topics)

    def _wait_for(
        self,
        probe: Callable[[], Any],
        timeout: float,
        stop: threading.Event | None,
        topics: Sequence[str] = (),
        full_probe: Callable[[], Any] | None = None,
    ):
        """``probe()`` once it is truthy, or its last (falsy) value after ``timeout`` seconds.
        It probes again when a write of ``topics`` (none: any write) happened in this process, and
        at least every ``recheck`` seconds for writes by other processes. ``full_probe`` (default
        ``probe``) is the one run first and on those rechecks; ``probe`` runs after a wake-up by
        a write in this process, so it may look only at what this process keeps in memory."""
        end = time.monotonic() + max(0.0, timeout)
        full = full_probe or probe
        woken = False  # by a write in this process (else: the first probe, or a recheck)
        with self._waiters.watching(topics) as written:
            while True:
                written.clear()  # before the probe: a write during it wakes the wait below
                value = (probe if woken else full)()
                now = time.monotonic()
                if (
                    value
                    or now >= end
                    or self._closed.is_set()
                    or (stop is not None and stop.is_set())
                ):
                    return value
                woken = written.wait(min(end, now + self.recheck) - now)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Serialise this process's write transactions on SQLite: a writer queued here gets the
        lock the moment it is free, where SQLite's busy handler would sleep in growing steps
        (1, 2, 5, 10... ms). Other processes still meet the busy timeout; PostgreSQL needs none."""
        if self._write_lock is None:
            yield
            return
        with self._write_lock:
            yield

    def _fenced(self, conn: Any) -> None:
        if self.fence is not None:
            self.fence(conn)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (waits return at once from then on)."""
        return self._closed.is_set()

    def close(self) -> None:
        """Wake every waiter and make further waits return at once (service shutdown)."""
        self._closed.set()
        self._notify()

    # --- jobs ------------------------------------------------------------------------------------

    def create_job(
        self,
        spec: JobSpec,
        participants: Sequence[str],
        options: dict[str, Any],
        *,
        submitted_by: str,
    ) -> JobRecord:
        """Record a queued job; a job id already taken is a :class:`ConflictError`."""
        row = {
            "job_id": spec.job_id,
            "spec": json.dumps(spec.to_dict(), sort_keys=True),
            "participants": json.dumps(sorted(participants)),
            "options": json.dumps(options, sort_keys=True),
            "status": QUEUED,
            "rounds_done": 0,
            "history": "[]",
            "submitted_by": submitted_by,
            "created_at": self.clock(),
        }
        try:
            with self._writing(), self.store.begin() as conn:
                conn.execute(insert(jobs).values(row))
        except IntegrityError:
            raise ConflictError(
                "a job with this id already exists",
                field="job_id",
                value=spec.job_id,
                fix="choose another job id, or leave it out to get a generated one",
            ) from None
        return self.job(spec.job_id)

    def find_job(self, job_id: str) -> JobRecord | None:
        with self.store.begin() as conn:
            row = conn.execute(select(jobs).where(jobs.c.job_id == job_id)).first()
        if row is None:
            return None
        return JobRecord(
            job_id=row.job_id,
            spec=JobSpec.from_dict(json.loads(row.spec)),
            participants=tuple(json.loads(row.participants)),
            options=json.loads(row.options),
            status=row.status,
            rounds_done=row.rounds_done,
            history=json.loads(row.history),
            result=json.loads(row.result) if row.result else None,
            error=json.loads(row.error) if row.error else None,
            submitted_by=row.submitted_by,
            created_at=_from_db(row.created_at),  # type: ignore[arg-type]
            started_at=_from_db(row.started_at),
            finished_at=_from_db(row.finished_at),
            resumes=self._resumes(job_id),
        )

    def _resumes(self, job_id: str) -> tuple[dict[str, Any], ...]:
        with self.store.begin() as conn:
            rows = conn.execute(
                select(job_resumes.c.from_round, job_resumes.c.resumed_at)
                .where(job_resumes.c.job_id == job_id)
                .order_by(job_resumes.c.id)
            ).all()
        return tuple(
            {"at": _from_db(r.resumed_at).isoformat(), "from_round": r.from_round}  # type: ignore[union-attr]
            for r in rows
        )

    def job(self, job_id: str) -> JobRecord:
        record = self.find_job(job_id)
        if record is None:
            raise NotFoundError("unknown job", field="job_id", value=job_id, fix="check the id")
        return record

    def job_participants(self, job_id: str) -> tuple[str, ...]:
        """The job's participants (what authorisation needs), without reading the rest of the
        row; a :class:`NotFoundError` for an unknown job. Remembered: they never change."""
        known = self._participants.get(job_id)
        if known is not None:
            return known
        with self.store.begin() as conn:
            row = conn.execute(select(jobs.c.participants).where(jobs.c.job_id == job_id)).first()
        if row is None:
            raise NotFoundError("unknown job", field="job_id", value=job_id, fix="check the id")
        known = self._participants[job_id] = tuple(json.loads(row.participants))
        return known

    def task_owner(self, task_id: str) -> tuple[str, str] | None:
        """``(participant_id, job_id)`` of a task, without reading its request frame (from memory
        for a pending task this process queued)."""
        queued = self._queued.get(task_id)
        if queued is not None:
            return queued.participant_id, queued.job_id
        with self.store.begin() as conn:
            row = conn.execute(
                select(tasks.c.participant_id, tasks.c.job_id).where(tasks.c.task_id == task_id)
            ).first()
        return None if row is None else (row.participant_id, row.job_id)

    def task_request(self, task_id: str) -> bytes | None:
        """A task's request frame: from memory when this process queued it, else the database
        (None for an unknown task, or an answered one whose job since queued newer frames)."""
        queued = self._queued.get(task_id)
        if queued is not None:
            return queued.request
        with self.store.begin() as conn:
            row = conn.execute(
                select(tasks.c.job_id, tasks.c.request_frame).where(tasks.c.task_id == task_id)
            ).first()
            return None if row is None else self._stored_frame(conn, task_id, row)

    @staticmethod
    def _stored_frame(conn: Any, task_id: str, row: Any) -> bytes | None:
        """The frame of the task ``row`` (with ``job_id`` and ``request_frame``) from the
        database: the shared ``coord_frames`` row, or the task's own ``request`` (older rows)."""
        if row.request_frame is None:
            value = conn.execute(select(tasks.c.request).where(tasks.c.task_id == task_id)).scalar()
        else:
            value = conn.execute(
                select(frames.c.body).where(
                    frames.c.job_id == row.job_id, frames.c.frame_id == row.request_frame
                )
            ).scalar()
        return None if value is None else bytes(value)

    def jobs_with_status(self, *statuses: str) -> list[str]:
        with self.store.begin() as conn:
            rows = conn.execute(
                select(jobs.c.job_id).where(jobs.c.status.in_(statuses)).order_by(jobs.c.job_id)
            )
            return [r.job_id for r in rows]

    def job_started(self, job_id: str) -> None:
        self._update_job(job_id, status=RUNNING, started_at=self.clock())

    def round_committed(
        self, job_id: str, record: dict[str, Any], *, checkpoint: bytes | None = None
    ) -> None:
        """Append one round (aggregates and participant names only) to the job's history and,
        in the same transaction, replace the job's ``checkpoint`` (crash-resume) when given. A
        record whose ``round`` is not the next one is a :class:`ConflictError`: a round is
        committed once, so history and checkpoint never disagree."""
        with self._writing(), self.store.writer() as conn:
            self._fenced(conn)
            row = conn.execute(select(jobs.c.history).where(jobs.c.job_id == job_id)).first()
            history = json.loads(row.history) if row else []
            number = record.get("round")
            if isinstance(number, int) and number != len(history) + 1:
                raise ConflictError(
                    f"round {number} is not the next round of the job ({len(history) + 1})",
                    field="round",
                    value=number,
                    fix="commit each round once, in order",
                )
            history.append(record)
            conn.execute(
                update(jobs)
                .where(jobs.c.job_id == job_id)
                .values(history=json.dumps(history), rounds_done=len(history))
            )
            if checkpoint is not None:
                self._put_checkpoint(conn, job_id, len(history), checkpoint)
            conn.commit()
        self._notify()

    def reset_history(self, job_id: str) -> None:
        """Forget a job's committed rounds and checkpoint: it starts again from its first round
        (jobs whose model kind has no checkpoint yet)."""
        with self._writing(), self.store.begin() as conn:
            conn.execute(
                update(jobs).where(jobs.c.job_id == job_id).values(history="[]", rounds_done=0)
            )
            conn.execute(checkpoints.delete().where(checkpoints.c.job_id == job_id))
        self._notify()

    def save_checkpoint(self, job_id: str, round_number: int, state: bytes) -> None:
        """Replace the job's checkpoint outside a round commit (round 0: standardisation done)."""
        with self._writing(), self.store.begin() as conn:
            self._fenced(conn)
            self._put_checkpoint(conn, job_id, round_number, state)

    def _put_checkpoint(self, conn: Any, job_id: str, round_number: int, state: bytes) -> None:
        # one row per job, rewritten each round; only the job's own thread writes it
        values = {"round": round_number, "state": state, "written_at": self.clock()}
        changed = conn.execute(
            update(checkpoints).where(checkpoints.c.job_id == job_id).values(**values)
        ).rowcount
        if not changed:
            conn.execute(insert(checkpoints).values(job_id=job_id, **values))

    def checkpoint(self, job_id: str) -> tuple[int, bytes] | None:
        """``(round, state)`` of the job's latest checkpoint, or None."""
        with self.store.begin() as conn:
            row = conn.execute(
                select(checkpoints.c.round, checkpoints.c.state).where(
                    checkpoints.c.job_id == job_id
                )
            ).first()
        return None if row is None else (row.round, bytes(row.state))

    def job_resumed(self, job_id: str, from_round: int) -> int:
        """Record that a restarted coordinator resumes the job after ``from_round``, and expire the
        tasks the previous process left pending (a late result for one is then a 409). Returns how
        many tasks expired."""
        with self._writing(), self.store.begin() as conn:
            conn.execute(
                insert(job_resumes).values(
                    job_id=job_id, from_round=from_round, resumed_at=self.clock()
                )
            )
            expired = conn.execute(
                update(tasks)
                .where(tasks.c.job_id == job_id, tasks.c.status == PENDING)
                .values(status=EXPIRED)
            ).rowcount
        for task_id in [t for t, r in list(self._queued.items()) if r.job_id == job_id]:
            self._queued.pop(task_id, None)
        self._notify()
        return expired

    def last_task_seq(self, job_id: str) -> int:
        """The highest request number the job used so far (0 for none): a resumed job numbers
        its new tasks after it, so (job, seq, attempt) stays unique."""
        with self.store.begin() as conn:
            value = conn.execute(
                select(func.max(tasks.c.seq)).where(tasks.c.job_id == job_id)
            ).scalar()
        return int(value or 0)

    def job_finished(
        self,
        job_id: str,
        *,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> None:
        """Mark the job succeeded (with ``result``) or failed (with ``error``); its unanswered
        tasks expire and its relay envelopes are deleted."""
        self._update_job(
            job_id,
            status=FAILED if error is not None else SUCCEEDED,
            result=json.dumps(result, allow_nan=False) if result is not None else None,
            error=json.dumps(error) if error is not None else None,
            finished_at=self.clock(),
        )
        with self._writing(), self.store.begin() as conn:
            expired = conn.execute(
                select(tasks.c.task_id).where(tasks.c.job_id == job_id, tasks.c.status == PENDING)
            ).scalars()
            for task_id in expired:
                self._queued.pop(task_id, None)
            conn.execute(
                update(tasks)
                .where(tasks.c.job_id == job_id, tasks.c.status == PENDING)
                .values(status=EXPIRED)
            )
            conn.execute(delete(relay_envelopes).where(relay_envelopes.c.job_id == job_id))
            conn.execute(delete(frames).where(frames.c.job_id == job_id))
        for task_id in [t for t, (job, *_) in list(self._replies.items()) if job == job_id]:
            self._replies.pop(task_id, None)  # replies no runner took (it was interrupted)
        self._notify()

    def _update_job(self, job_id: str, **values: Any) -> None:
        with self._writing(), self.store.begin() as conn:
            self._fenced(conn)
            conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(**values))
        self._notify()

    def wait_job(
        self, job_id: str, timeout: float, *, done: Sequence[str] = (SUCCEEDED, FAILED)
    ) -> JobRecord:
        """The job once its status is in ``done``, or as it is after ``timeout`` seconds."""
        found = self._wait_for(
            lambda: (r := self.job(job_id)).status in done and r, timeout, stop=None
        )
        return found or self.job(job_id)

    # --- tasks -----------------------------------------------------------------------------------

    def add_task(
        self,
        *,
        job_id: str,
        participant_id: str,
        seq: int,
        stage: str,
        round: int,
        request: bytes,
        deadline: timedelta,
        attempt: int = 1,
    ) -> TaskRecord:
        """Queue ``request`` (an encoded frame) for ``participant_id``, answerable until now +
        ``deadline``; wakes that participant's long-poll."""
        spec = NewTask(participant_id, seq, stage, round, request, attempt)
        return self.add_tasks(job_id, [spec], deadline=deadline)[0]

    def add_tasks(
        self, job_id: str, new: Sequence[NewTask], *, deadline: timedelta
    ) -> list[TaskRecord]:
        """Queue several tasks of ``job_id`` in one transaction, all answerable until now +
        ``deadline``, and wake the long-polls once."""
        now = self.clock()
        records = [
            TaskRecord(
                task_id=secrets.token_urlsafe(18),
                job_id=job_id,
                participant_id=t.participant_id,
                seq=t.seq,
                stage=t.stage,
                round=t.round,
                attempt=t.attempt,
                request=t.request,
                status=PENDING,
                deadline_at=now + deadline,
                created_at=now,
            )
            for t in new
        ]
        if not records:
            return []
        distinct = _distinct_frames([r.request for r in records])
        rows = [
            {
                "task_id": r.task_id,
                "job_id": job_id,
                "participant_id": r.participant_id,
                "seq": r.seq,
                "stage": r.stage,
                "round": r.round,
                "attempt": r.attempt,
                "request": b"",  # the frame is in coord_frames
                "request_frame": frame_id,
                "status": PENDING,
                "created_at": now,
                "deadline_at": r.deadline_at,
                "deliveries": 0,
            }
            for r, (frame_id, _) in zip(records, distinct, strict=True)
        ]
        bodies = dict(distinct)
        with self._writing(), self.store.begin() as conn:
            self._fenced(conn)
            # frames no pending task of the job needs (earlier rounds) go before new ones come
            conn.execute(_DROP_UNNEEDED_FRAMES, {"b_job_id": job_id})
            conn.execute(
                _INSERT_FRAMES,
                [
                    {"job_id": job_id, "frame_id": i, "body": b, "created_at": now}
                    for i, b in bodies.items()
                ],
            )
            conn.execute(_INSERT_TASKS, rows)
        self._queued.update(
            (r.task_id, replace(r, request=f)) for r, (_, f) in zip(records, distinct, strict=True)
        )
        self._notify(*sorted({f"tasks:{r.participant_id}" for r in records}))
        return records

    def task(self, task_id: str) -> TaskRecord | None:
        """A task with its request frame (empty when no longer stored: see :meth:`task_request`)."""
        with self.store.begin() as conn:
            row = conn.execute(select(*_LIGHT_TASK).where(tasks.c.task_id == task_id)).first()
        if row is None:
            return None
        return self._task(row, self.task_request(task_id) or b"")

    @staticmethod
    def _task(row: Any, request: bytes) -> TaskRecord:
        return TaskRecord(
            task_id=row.task_id,
            job_id=row.job_id,
            participant_id=row.participant_id,
            seq=row.seq,
            stage=row.stage,
            round=row.round,
            attempt=row.attempt,
            request=request,
            status=row.status,
            deadline_at=_from_db(row.deadline_at),  # type: ignore[arg-type]
            deliveries=row.deliveries,
        )

    def _next_task(self, participant_id: str, *, database: bool = True) -> TaskRecord | None:
        """The participant's next task: one this process queued (from memory), else, when
        ``database``, the oldest one in the database (queued by another process)."""
        now = self.clock()
        mine = [
            t
            for t in list(self._queued.values())  # a copy: other threads add and drop tasks
            if t.participant_id == participant_id and t.deadline_at > now
        ]
        for task in sorted(mine, key=lambda t: (t.created_at, t.seq)):
            delivered = self._deliver(task, now)
            if delivered is not None:
                return delivered
        if not database:
            return None
        self._polled_db[participant_id] = time.monotonic()
        with self.store.begin() as conn:
            # the task id first, then the row by key: ordering whole rows would copy every
            # candidate's request frame through SQLite's sorter
            task_id = conn.execute(
                select(tasks.c.task_id)
                .join(jobs, jobs.c.job_id == tasks.c.job_id)
                .where(
                    tasks.c.participant_id == participant_id,
                    tasks.c.status == PENDING,
                    tasks.c.deadline_at > now,
                    jobs.c.status == RUNNING,
                )
                .order_by(tasks.c.created_at, tasks.c.seq)
                .limit(1)
            ).scalar()
            if task_id is None:
                return None
            row = conn.execute(select(*_LIGHT_TASK).where(tasks.c.task_id == task_id)).first()
            if row is None:
                return None
            # the frame as this process queued it (frames never change), else from the database
            queued = self._queued.get(task_id)
            frame = queued.request if queued is not None else None
            if frame is None:
                frame = self._stored_frame(conn, task_id, row)
            if frame is None:  # the job finished in between (its frames are deleted)
                return None
        # A transaction of its own: upgrading the read above to a write would fail at once on
        # SQLite ("database is locked", no busy wait) whenever another poll wrote in between.
        # Delivery is at-least-once, so the count needs no atomicity with the read.
        with self._writing(), self.store.begin() as conn:
            conn.execute(
                update(tasks)
                .where(tasks.c.task_id == row.task_id)
                .values(deliveries=tasks.c.deliveries + 1, last_delivered_at=now)
            )
        return self._task(row, frame)

    def _deliver(self, task: TaskRecord, now: datetime) -> TaskRecord | None:
        """Count a delivery of ``task`` (queued by this process) in one statement that also
        checks it is still deliverable (pending, unexpired, its job running); None when not (a
        task no longer pending is forgotten)."""
        bound = {"b_task_id": task.task_id, "b_now": now}
        status = None
        with self._writing(), self.store.begin() as conn:
            if conn.dialect.update_returning:
                count = conn.execute(_DELIVER_RETURNING, bound).scalar()
            elif conn.execute(_DELIVER, bound).rowcount == 1:  # e.g. SQLite before 3.35
                count = conn.execute(
                    select(tasks.c.deliveries).where(tasks.c.task_id == task.task_id)
                ).scalar()
            else:
                count = None
            if count is None:
                status = conn.execute(
                    select(tasks.c.status).where(tasks.c.task_id == task.task_id)
                ).scalar()
        if count is not None:
            return replace(task, deliveries=count - 1)  # as before: the deliveries until now
        if status != PENDING:  # answered or expired by another process, or gone
            self._queued.pop(task.task_id, None)
        return None

    def next_task(
        self, participant_id: str, *, wait: float = 0.0, stop: threading.Event | None = None
    ) -> TaskRecord | None:
        """The oldest unanswered, unexpired task of a running job for ``participant_id``,
        waiting up to ``wait`` seconds for one to be queued (a long-poll).

        Tasks this process queued come from memory, first. The database is read for tasks
        another process queued when the wait starts, at most once every ``recheck`` seconds per
        participant (a participant polls again right after each result), and on every recheck."""

        def full() -> TaskRecord | None:
            last = self._polled_db.get(participant_id)
            due = last is None or time.monotonic() - last >= self.recheck
            return self._next_task(participant_id, database=due)

        return self._wait_for(
            lambda: self._next_task(participant_id, database=False),
            wait,
            stop,
            topics=(f"tasks:{participant_id}",),
            full_probe=full,
        )

    def expire_task(self, task_id: str) -> bool:
        """Give up on an unanswered task (its deadline passed); True when it was still pending."""
        return self.expire_tasks([task_id]) == 1

    def expire_tasks(self, task_ids: Sequence[str]) -> int:
        """Give up on unanswered tasks in one transaction; how many were still pending."""
        if not task_ids:
            return 0
        for task_id in task_ids:
            self._queued.pop(task_id, None)
        with self._writing(), self.store.begin() as conn:
            return conn.execute(
                update(tasks)
                .where(tasks.c.task_id.in_(list(task_ids)), tasks.c.status == PENDING)
                .values(status=EXPIRED)
            ).rowcount

    # --- results ---------------------------------------------------------------------------------

    def submit_result(
        self, participant_id: str, task_id: str, reply: bytes, *, decoded: Any = None
    ) -> Acknowledgement:
        """Store ``reply`` (an already validated frame) as the answer to ``task_id``, once.
        ``decoded`` (the message the caller decoded from it) is handed to the job runner along
        with the frame when the runner is in this process (see :meth:`wait_replies`).

        A task that is not ``participant_id``'s (or does not exist: a caller learns nothing about
        other participants' task ids) is a :class:`ForbiddenError`; other bytes for an answered
        task, or a reply after the task expired, a :class:`ConflictError`."""
        digest = hashlib.sha256(reply).hexdigest()
        now = self.clock()
        # queued by this process (still pending): its job runner is here and takes it from memory
        queued = self._queued.get(task_id)
        hand_over = queued is not None
        if queued is not None and queued.participant_id == participant_id:
            ack = self._submit_queued(queued, digest, now)
            if ack is not None:
                self._handed_over(queued, reply, decoded)
                return ack
        with self._writing(), self.store.writer() as conn:
            task = conn.execute(
                select(
                    tasks.c.participant_id,
                    tasks.c.job_id,
                    tasks.c.attempt,
                    tasks.c.status,
                    tasks.c.created_at,
                    tasks.c.deadline_at,
                ).where(tasks.c.task_id == task_id)
            ).first()
            if task is None or task.participant_id != participant_id:
                raise ForbiddenError(
                    "this task is not assigned to this participant",
                    code="other_participant",
                    field="task_id",
                    fix="submit results only for tasks this participant received",
                )
            stored = conn.execute(
                select(
                    results.c.job_id,
                    results.c.attempt,
                    results.c.reply_sha256,
                    results.c.received_at,
                ).where(results.c.task_id == task_id)
            ).first()
            if stored is not None:
                if stored.reply_sha256 != digest:
                    raise ConflictError(
                        "this task already has a different result",
                        field="task_id",
                        value=task_id,
                        fix="a result is final; do not resubmit changed results",
                    )
                return Acknowledgement(
                    task_id,
                    stored.job_id,
                    participant_id,
                    stored.attempt,
                    _from_db(stored.received_at),  # type: ignore[arg-type]
                    duplicate=True,
                )
            if task.status != PENDING or _from_db(task.deadline_at) <= now:  # type: ignore[operator]
                raise ConflictError(
                    "the task's deadline passed; the coordinator went on without this result",
                    field="task_id",
                    value=task_id,
                    fix="poll for the next task",
                )
            created = _from_db(task.created_at)
            try:
                conn.execute(
                    insert(results).values(
                        task_id=task_id,
                        job_id=task.job_id,
                        participant_id=participant_id,
                        attempt=task.attempt,
                        reply=b"" if hand_over else reply,
                        reply_sha256=digest,
                        received_at=now,
                        seconds=max(0.0, (now - created).total_seconds()),  # type: ignore[operator]
                    )
                )
            except IntegrityError:  # a concurrent identical submission won: answer as it did
                conn.rollback()
                return self.submit_result(participant_id, task_id, reply)
            conn.execute(
                update(tasks)
                .where(and_(tasks.c.task_id == task_id, tasks.c.status == PENDING))
                .values(status=DONE)
            )
            conn.commit()
        if hand_over and queued is not None:
            self._handed_over(queued, reply, decoded)
        else:
            self._queued.pop(task_id, None)
            self._notify(f"result:{task_id}")
        return Acknowledgement(task_id, task.job_id, participant_id, task.attempt, now)

    def _submit_queued(
        self, task: TaskRecord, digest: str, now: datetime
    ) -> Acknowledgement | None:
        """The usual submission, of a first result for a pending task this process queued (so
        its owner, job and attempt are known), in one short transaction: the task is marked done
        only if it is still pending and unexpired, and the result's digest stored with it. None
        when it was not (answered meanwhile, expired): the caller then takes the full path,
        which answers with the stored acknowledgement or the right refusal."""
        with self._writing(), self.store.writer() as conn:
            done = conn.execute(_MARK_DONE, {"b_task_id": task.task_id, "b_now": now}).rowcount
            if done != 1:
                conn.rollback()
                return None
            created = task.created_at or now
            try:
                conn.execute(
                    _INSERT_RESULT,
                    {
                        "task_id": task.task_id,
                        "job_id": task.job_id,
                        "participant_id": task.participant_id,
                        "attempt": task.attempt,
                        "reply": b"",  # handed over in memory: see the module docstring
                        "reply_sha256": digest,
                        "received_at": now,
                        "seconds": max(0.0, (now - created).total_seconds()),
                    },
                )
            except IntegrityError:  # a result row without its task marked done: the full path
                conn.rollback()
                return None
            conn.commit()  # durable before the acknowledgement is sent
        return Acknowledgement(task.task_id, task.job_id, task.participant_id, task.attempt, now)

    def _handed_over(self, task: TaskRecord, reply: bytes, decoded: Any) -> None:
        # a waiter that saw the empty row meanwhile finds the reply on the wake-up below
        self._replies[task.task_id] = (task.job_id, reply, decoded)
        self._queued.pop(task.task_id, None)
        self._notify(f"result:{task.task_id}")

    def _take_replies(
        self, task_ids: Sequence[str], *, database: bool = True
    ) -> dict[str, tuple[bytes, Any]]:
        """``(frame, decoded message or None)`` of the replies to ``task_ids`` that came so far,
        by task id: those handed over in memory (taken: each is returned once), then the rest
        from the database. Without ``database``, tasks this process queued and that are still
        pending here are not looked up (their replies come in memory; one posted to another
        process is found by the next read with ``database``)."""
        found: dict[str, tuple[bytes, Any]] = {}
        for task_id in task_ids:
            handed = self._replies.pop(task_id, None)
            if handed is not None:
                found[task_id] = handed[1:]
        # _handed_over stores the reply before it forgets the task, so a task that is not in
        # _queued any more either has its reply in _replies or its row in the database
        missing = sorted(
            t for t in set(task_ids) - found.keys() if database or t not in self._queued
        )
        if not missing:
            return found
        with self.store.begin() as conn:
            rows = conn.execute(_REPLIES, {"b_task_ids": missing}).all()
        for row in rows:
            if row.reply:
                found[row.task_id] = (bytes(row.reply), None)
            elif (handed := self._replies.pop(row.task_id, None)) is not None:
                found[row.task_id] = handed[1:]  # handed over since the first look
            # else: an empty reply not handed over yet (a wake-up follows), or taken already
        return found

    def _result(self, task_id: str) -> bytes | None:
        found = self._take_replies([task_id]).get(task_id)
        return None if found is None else found[0]

    def wait_result(
        self, task_id: str, timeout: float, *, stop: threading.Event | None = None
    ) -> bytes | None:
        """The reply frame to ``task_id``, waiting up to ``timeout`` seconds; None if none came."""
        return self._wait_for(lambda: self._result(task_id), timeout, stop, (f"result:{task_id}",))

    def wait_results(
        self, task_ids: Sequence[str], timeout: float, *, stop: threading.Event | None = None
    ) -> dict[str, bytes]:
        """The reply frames to ``task_ids`` that came within ``timeout`` seconds, by task id:
        returns as soon as all have come. Each wake-up reads only the replies still missing."""
        return {
            t: frame for t, (frame, _) in self.wait_replies(task_ids, timeout, stop=stop).items()
        }

    def wait_replies(
        self, task_ids: Sequence[str], timeout: float, *, stop: threading.Event | None = None
    ) -> dict[str, tuple[bytes, Any]]:
        """As :meth:`wait_results`, with each frame the message decoded from it when the HTTP
        handler handed that over (else None: the caller decodes the frame). Each reply is
        returned once by this or :meth:`wait_results`."""
        found: dict[str, tuple[bytes, Any]] = {}
        missing = set(task_ids)

        def probe(database: bool = True) -> bool:
            if missing:
                came = self._take_replies(sorted(missing), database=database)
                found.update(came)
                missing.difference_update(came)
            return not missing

        self._wait_for(
            lambda: probe(database=False),
            timeout,
            stop,
            tuple(f"result:{t}" for t in task_ids),
            full_probe=probe,
        )
        return found
