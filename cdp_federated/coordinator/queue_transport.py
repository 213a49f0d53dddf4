"""A :class:`~cdp_federated.federation.transport.Transport` over the coordinator's task queue.

The strategy (:func:`.runner.run_horizontal`) calls ``request(participant, message)`` exactly as
it does in-process. Here the request is encoded once, persisted as a task row for that participant
(:class:`.state.CoordinatorState`), and the call blocks until the participant -- polling the HTTP
API from its own process -- posts its reply, or the deadline passes. A missed deadline is a
:class:`~cdp_federated.federation.messages.Failure` reply (stage and "deadline exceeded"), so the
strategy treats the participant as a dropout, as it does any other failure.

Latency: ``run_horizontal`` asks participants one after another, so a round costs the sum of the
participants' reply times, not their maximum. A waiting call wakes the moment the reply is
written (a condition variable, no sleep loop), so the added cost per request on loopback is one
long-poll answer plus one POST and a few small transactions; see ``docs/runtime.md`` for figures.
A participant that never answers costs ``deadline`` per request.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import timedelta

from ..errors import CodecError, TransportError
from ..federation.codec import Codec
from ..federation.messages import Failure, Message
from ..federation.transport import Recorder, Transport, stage_of
from .state import CoordinatorState

__all__ = ["QueueTransport", "DEADLINE_EXCEEDED"]

DEADLINE_EXCEEDED = "DeadlineExceeded"


class QueueTransport(Transport):
    """Requests to ``participants`` of ``job_id`` as task rows in ``state``; each reply is awaited
    at most ``deadline``. ``stop`` (an event) makes pending waits give up at once (shutdown)."""

    def __init__(
        self,
        state: CoordinatorState,
        job_id: str,
        participants: Iterable[str],
        deadline: timedelta | float,
        *,
        codec: Codec | None = None,
        recorder: Recorder | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.state = state
        self.job_id = job_id
        self._participants = sorted(set(participants))
        self.deadline = deadline if isinstance(deadline, timedelta) else timedelta(seconds=deadline)
        if self.deadline <= timedelta(0):
            raise TransportError(
                "the reply deadline must be positive",
                field="deadline",
                value=str(self.deadline),
                fix="use a deadline of a few seconds or more",
            )
        self._codec = codec or Codec()
        self._recorder = recorder
        self._stop = stop
        self._seq = 0
        self._lock = threading.Lock()

    def participants(self) -> list[str]:
        return list(self._participants)

    def request(self, participant: str, message: Message) -> Message:
        if participant not in self._participants:
            raise TransportError(
                "unknown participant",
                field="participant",
                value=participant,
                fix=f"use one of: {', '.join(self._participants) or '(none)'}",
            )
        frame = self._codec.encode(message)  # the coordinator's own defect: raises
        if self._recorder is not None:
            self._recorder("request", participant, frame)
        with self._lock:
            self._seq += 1
            seq = self._seq
        stage = stage_of(message)
        task = self.state.add_task(
            job_id=self.job_id,
            participant_id=participant,
            seq=seq,
            stage=stage,
            round=int(getattr(message, "round", 0)),
            request=frame,
            deadline=self.deadline,
        )
        reply = self.state.wait_result(task.task_id, self.deadline.total_seconds(), stop=self._stop)
        if reply is None:
            self.state.expire_task(task.task_id)
            reply = self.state.wait_result(task.task_id, 0)  # answered just before it expired?
        if reply is None:
            seconds = self.deadline.total_seconds()
            why = "coordinator is stopping" if self._stop and self._stop.is_set() else ""
            return Failure(
                participant=participant,
                stage=stage,
                error_type=DEADLINE_EXCEEDED,
                message=f"no reply within {seconds:g} s (deadline exceeded){why and '; ' + why}",
            )
        if self._recorder is not None:
            self._recorder("reply", participant, reply)
        try:
            return self._codec.decode(reply)  # validated when received; decoded here again
        except CodecError as exc:
            return Failure(participant, stage, type(exc).__name__, str(exc))
