"""A :class:`~cdp_federated.federation.transport.Transport` over the coordinator's task queue.

The strategy (:func:`.runner.run_horizontal`) calls ``request_many({participant: message})`` for
each stage exactly as it does in-process. Here every request is encoded once and persisted as a
task row for its participant (:class:`.state.CoordinatorState`), all in one transaction, and the
call blocks until every participant -- polling the HTTP API from its own process -- has posted its
reply, or the one deadline shared by the batch passes. A missed deadline is a
:class:`~cdp_federated.federation.messages.Failure` reply (stage and "deadline exceeded"), so the
strategy treats the participant as a dropout, as it does any other failure.

Latency: the participants of a round work concurrently, so a round costs about the slowest
participant's reply time, and a silent participant costs one ``deadline`` per stage, not one per
request. A waiting call wakes the moment a reply is written (an event of its own, no sleep loop)
and then reads only the replies still missing; see ``docs/runtime.md`` and
``benchmarks/runtime_overhead.py`` for figures. ``request`` is a batch of one. Messages of a batch
that would encode to the same bytes (a round's FitIns to every participant) are encoded once.

Stopping: when the coordinator shuts down (``stop`` set, or the state closed) before every reply
came, the call raises :class:`JobInterrupted` instead of reporting dropouts, so no round is
committed with participants missing only because the coordinator went away; the job stays
running in the database and resumes on the next start. A resumed job's transport numbers its
requests after the highest number the job used before, so (job, seq, attempt) stays unique.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import numpy as np

from ..errors import CDPFederatedError, CodecError, TransportError
from ..federation.codec import Codec
from ..federation.messages import Failure, Message
from ..federation.transport import Recorder, Transport, stage_of, undelivered
from .state import CoordinatorState, NewTask

__all__ = ["QueueTransport", "DEADLINE_EXCEEDED", "JobInterrupted"]

DEADLINE_EXCEEDED = "DeadlineExceeded"


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    if a.flags.c_contiguous and b.flags.c_contiguous:
        return bool(np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))
    return a.tobytes() == b.tobytes()


def _same(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are bit for bit the same value (so they encode alike): same types
    all the way down, arrays of one dtype and shape with equal bytes, floats with equal bits
    (``0.0`` is not ``-0.0``, NaN is never the same). Anything else is not the same."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and _same_bytes(a, b)
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, str | int | bytes):
        return a == b
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            _same(ka, kb) and _same(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(map(_same, a, b))
    if dataclasses.is_dataclass(a):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return False


class JobInterrupted(CDPFederatedError):
    """The coordinator is stopping while a request awaits replies: the job is left as the
    database has it (last committed round) for the next start to resume. Not a job failure."""


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
        # a reply the HTTP handler decoded (default limits, reply types only) decodes alike here
        self._reuse_decoded = codec is None
        self._recorder = recorder
        self._stop = stop
        self._seq = state.last_task_seq(job_id)  # 0 for a new job; after the old ones if resumed
        self._lock = threading.Lock()

    def participants(self) -> list[str]:
        return list(self._participants)

    def request(self, participant: str, message: Message) -> Message:
        if participant not in self._participants:
            raise self._unknown(participant)
        return self.request_many({participant: message})[participant]

    def request_many(self, requests: Mapping[str, Message]) -> dict[str, Message]:
        """Queue every request (one transaction), then await all replies under one deadline."""
        self._check_running()
        replies: dict[str, Message] = {}
        frames: dict[str, bytes] = {}
        encoded: list[tuple[Message, bytes]] = []  # each distinct message once
        for participant, message in requests.items():
            if participant not in self._participants:
                replies[participant] = undelivered(participant, message, self._unknown(participant))
                continue
            frame = next((f for m, f in encoded if _same(m, message)), None)
            if frame is None:
                frame = self._codec.encode(message)  # the coordinator's defect: raises
                encoded.append((message, frame))
            frames[participant] = frame
            if self._recorder is not None:
                self._recorder("request", participant, frames[participant])
        with self._lock:
            first = self._seq + 1
            self._seq += len(frames)
        queued = self.state.add_tasks(
            self.job_id,
            [
                NewTask(
                    participant_id=participant,
                    seq=first + i,
                    stage=stage_of(requests[participant]),
                    round=int(getattr(requests[participant], "round", 0)),
                    request=frame,
                )
                for i, (participant, frame) in enumerate(frames.items())
            ],
            deadline=self.deadline,
        )
        task_ids = {task.participant_id: task.task_id for task in queued}
        seconds = self.deadline.total_seconds()
        answers = self.state.wait_replies(list(task_ids.values()), seconds, stop=self._stop)
        late = [t for t in task_ids.values() if t not in answers]
        if late:
            self._check_running()  # a reply missing because the coordinator stops is no dropout
            self.state.expire_tasks(late)
            answers |= self.state.wait_replies(late, 0)  # answered just before they expired?
        for participant, message in requests.items():
            if participant in task_ids:
                replies[participant] = self._reply(
                    participant, stage_of(message), answers.get(task_ids[participant])
                )
        return {participant: replies[participant] for participant in requests}

    def _check_running(self) -> None:
        if (self._stop is not None and self._stop.is_set()) or self.state.closed:
            raise JobInterrupted(
                "the coordinator is stopping; the job resumes from its last committed round "
                "on the next start",
                field="job_id",
                value=self.job_id,
            )

    def _reply(self, participant: str, stage: str, answer: tuple[bytes, Any] | None) -> Message:
        if answer is None:
            seconds = self.deadline.total_seconds()
            return Failure(
                participant=participant,
                stage=stage,
                error_type=DEADLINE_EXCEEDED,
                message=f"no reply within {seconds:g} s (deadline exceeded)",
            )
        reply, decoded = answer
        if self._recorder is not None:
            self._recorder("reply", participant, reply)
        if decoded is not None and self._reuse_decoded:
            return decoded  # validated and decoded when it was posted: not decoded twice
        try:
            return self._codec.decode(reply)  # validated when received; decoded here again
        except CodecError as exc:
            return Failure(participant, stage, type(exc).__name__, str(exc))

    def _unknown(self, participant: str) -> TransportError:
        return TransportError(
            "unknown participant",
            field="participant",
            value=participant,
            fix=f"use one of: {', '.join(self._participants) or '(none)'}",
        )
