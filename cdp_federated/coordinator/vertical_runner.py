"""The coordinator's driver of a vertical job: start every party, follow them, record the outcome.

A vertical job's protocol runs between the parties, sealed through the relay; the coordinator
only starts it and watches. Through the task queue each party gets one ``vertical_start_ins``
(the job; its role is in ``params``), answered once its own policy, consent filter and label
check passed, then ``vertical_status_ins`` long-polls, each answered when the party's progress
changed or within ``poll_wait`` seconds. The active party's progress (trees or epochs done)
becomes the job's history; its final summary the job's metrics.

What the coordinator sees: sealed envelopes on the relay, and in these replies a state, a
progress count and the final summary (AUC or RMSE on the active party's held-out aligned rows,
row counts, the intersection size, seconds, each party's model-part id). Only those whitelisted
scalars are kept. Never a feature, a label, an identifier, a gradient or a threshold.

Failure: a ``Failure`` reply from any party (a policy refusal, a protocol error, a relay timeout)
or a reply missing past the deadline (a party that died) fails the job at once, naming the party;
the coordinator then closes the job's relay, which ends every other party's protocol thread.
Each party's model part is saved only once its protocol finished, so a failed job publishes no
model. A vertical job does not resume after a coordinator restart: the parties' protocol state
lived in memory (HE keys, sessions), so :meth:`.jobs.JobRunner.recover` fails it cleanly.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from ..errors import ConfigError, TrainingError
from ..federation.messages import Message
from ..federation.vertical_messages import (
    RUNNING,
    SUCCEEDED,
    VerticalStartIns,
    VerticalStatusIns,
    VerticalStatusRes,
)
from ..jobs import JobSpec
from ..vertical_job import VerticalJob
from .queue_transport import JobInterrupted, QueueTransport
from .stages import as_failure, ask_all, raise_failure
from .state import CoordinatorState

__all__ = [
    "check_vertical_participants",
    "commit_progress",
    "not_resumable",
    "run_vertical",
    "MAX_POLL_WAIT",
]

MAX_POLL_WAIT = 5.0
# What the job row keeps of a party's summary (anything else a party sends is dropped).
_ACTIVE_METRICS = ("auc", "logloss", "rmse", "train_rows", "test_rows", "intersection_size")


def check_vertical_participants(
    spec: JobSpec, participants: Sequence[str], *, min_participants: int | None = None
) -> VerticalJob:
    """The job's participants must be exactly the parties its params name (every party is
    needed: there is no vertical job with a party missing)."""
    vjob = VerticalJob.from_spec(spec)
    if set(participants) != set(vjob.parties):
        raise ConfigError(
            "a vertical job's participants must be exactly its parties",
            field="participants",
            value=sorted(set(participants) ^ set(vjob.parties)),
            fix=f"list {sorted(vjob.parties)} as participants",
        )
    if min_participants is not None:
        raise ConfigError(
            "a vertical job needs every party: min_participants does not apply",
            field="options.min_participants",
            value=min_participants,
            fix="leave min_participants out",
        )
    return vjob


def commit_progress(state: CoordinatorState, job_id: str, done: int) -> None:
    """Record trees (or epochs) ``1..done`` in the job's history, each once, in order."""
    record = state.job(job_id)
    for number in range(record.rounds_done + 1, done + 1):
        state.round_committed(
            job_id,
            # no loss: the coordinator sees progress only (the key keeps the history's shape)
            {"round": number, "participants": list(record.participants), "train_loss": None},
        )


def not_resumable(job_id: str) -> TrainingError:
    return TrainingError(
        "a vertical job cannot resume after a coordinator restart: its parties' protocol "
        "state (HE keys, sessions) lived in memory",
        field="job_id",
        value=job_id,
        fix="submit the job again",
    )


def _number(value: Any) -> Any:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
    return value if ok or value is None else None


def run_vertical(
    spec: JobSpec,
    state: CoordinatorState,
    participants: Sequence[str],
    deadline: float,
    *,
    stop: threading.Event,
    on_progress: Callable[[int], None] | None = None,
    poll_wait: float | None = None,
) -> dict[str, Any]:
    """Run vertical job ``spec`` through ``state``'s task queue; returns what the job row keeps
    (``metrics`` and ``model``: where the parts are). Raises the failing party's typed error
    (or :class:`~cdp_federated.errors.TrainingError` naming it); :class:`JobInterrupted` when
    ``stop`` is set."""
    vjob = check_vertical_participants(spec, participants)
    started = time.perf_counter()
    halt = threading.Event()  # ends this job's waits: set on the way out, or by ``stop``
    transport = QueueTransport(
        state, spec.job_id, participants, timedelta(seconds=deadline), stop=halt
    )
    wait = min(MAX_POLL_WAIT, deadline / 3) if poll_wait is None else poll_wait
    events: queue.Queue[tuple[str, Message]] = queue.Queue()
    watcher = threading.Thread(target=_relay_stop, args=(stop, halt), daemon=True)
    watcher.start()
    try:
        start = VerticalStartIns(job=spec.to_dict())
        answers = ask_all(transport, dict.fromkeys(participants, start))
        done: dict[str, VerticalStatusRes] = {}
        for name in sorted(participants):
            reply = _checked(name, start, answers[name], spec.job_id)
            if reply.state == SUCCEEDED:
                done[name] = reply
            else:
                threading.Thread(
                    target=_poll,
                    args=(transport, name, spec.job_id, reply.progress, wait, events, halt),
                    name=f"vertical-poll-{spec.job_id}-{name}",
                    daemon=True,
                ).start()
        progress = 0
        while len(done) < len(participants):
            try:
                name, reply = events.get(timeout=0.2)
            except queue.Empty:
                if stop.is_set():
                    raise JobInterrupted(
                        "the coordinator is stopping", field="job_id", value=spec.job_id
                    ) from None
                continue
            request = VerticalStatusIns(job_id=spec.job_id, progress=progress, wait=wait)
            reply = _checked(name, request, reply, spec.job_id)
            if name == vjob.active and reply.progress > progress:
                progress = min(int(reply.progress), spec.rounds)
                if on_progress is not None:
                    on_progress(progress)
            if reply.state == SUCCEEDED:
                done[name] = reply
    finally:
        halt.set()
    if on_progress is not None and progress < spec.rounds:
        on_progress(spec.rounds)  # the last trees' progress may come with the final reply
    return _summary(vjob, done, time.perf_counter() - started)


def _relay_stop(stop: threading.Event, halt: threading.Event) -> None:
    while not halt.wait(0.2):
        if stop.is_set():
            halt.set()


def _checked(name: str, request: Message, reply: Message, job_id: str) -> VerticalStatusRes:
    ok = (
        isinstance(reply, VerticalStatusRes)
        and reply.job_id == job_id
        and reply.state in (RUNNING, SUCCEEDED)
        and reply.progress >= 0
    )
    if not ok:
        raise_failure(as_failure(name, request, reply, "vertical_status_res"))
    assert isinstance(reply, VerticalStatusRes)
    return reply


def _poll(
    transport: QueueTransport,
    name: str,
    job_id: str,
    seen: int,
    wait: float,
    events: queue.Queue,
    halt: threading.Event,
) -> None:
    """One party's status long-polls, each reply handed to the driver, until it ends."""
    while not halt.is_set():
        try:
            reply = transport.request(
                name, VerticalStatusIns(job_id=job_id, progress=seen, wait=wait)
            )
        except JobInterrupted:
            return
        events.put((name, reply))
        if not isinstance(reply, VerticalStatusRes) or reply.state != RUNNING:
            return
        seen = max(seen, reply.progress)


def _summary(vjob: VerticalJob, done: dict[str, VerticalStatusRes], seconds: float) -> dict:
    active = done[vjob.active].summary
    metrics: dict[str, Any] = {
        key: _number(active.get(key)) for key in _ACTIVE_METRICS if key in active
    }
    metrics |= {
        "seconds": round(seconds, 3),
        "rounds": vjob.job.rounds,
        "objective": vjob.objective,
        "model": vjob.model,
        "he": vjob.he,
        "align": vjob.align,
    }
    parts = {
        name: {
            "role": vjob.role(name),
            "model_id": str(reply.summary.get("model_id", ""))[:64] or None,
        }
        for name, reply in sorted(done.items())
    }
    return {
        "metrics": metrics,
        "model": {
            "kind": "vertical",
            "model": vjob.model,
            "active": vjob.active,
            "parts": parts,
            "note": "each part stays in its owner's registry; scoring needs every owner",
        },
    }
