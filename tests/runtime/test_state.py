"""Jobs, tasks and results in the coordinator's database, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from cdp_federated.coordinator.queue_transport import DEADLINE_EXCEEDED, QueueTransport
from cdp_federated.coordinator.schema import open_coordinator_store
from cdp_federated.coordinator.state import ConflictError, CoordinatorState, NotFoundError
from cdp_federated.errors import ForbiddenError
from cdp_federated.federation import decode, encode
from cdp_federated.federation.messages import Failure, StatsIns, StatsRes
from tests.test_horizontal_run import make_job


@pytest.fixture
def state(db_url):
    store = open_coordinator_store(db_url, create=True)
    yield CoordinatorState(store, recheck=0.2)
    store.dispose()


def _running_job(state, job_id="j1", participants=("a", "b")):
    spec = make_job(rounds=1)
    spec = type(spec).from_dict(spec.to_dict() | {"job_id": job_id})
    state.create_job(spec, participants, {}, submitted_by="ops")
    state.job_started(job_id)
    return spec


def test_job_lifecycle(state):
    _running_job(state)
    with pytest.raises(ConflictError):
        _running_job(state)
    state.round_committed("j1", {"round": 1, "participants": ["a", "b"], "failed": []})
    state.job_finished("j1", result={"metrics": {"auc": 0.8}})
    record = state.job("j1")
    assert (record.status, record.rounds_done) == ("succeeded", 1)
    assert record.status_dict()["metrics"] == {"auc": 0.8}
    with pytest.raises(NotFoundError):
        state.job("nope")


def test_tasks_are_delivered_until_answered_and_results_stored_once(state):
    _running_job(state)
    frame = encode(StatsIns(job={"k": 1}))
    task = state.add_task(
        job_id="j1",
        participant_id="a",
        seq=1,
        stage="stats",
        round=0,
        request=frame,
        deadline=timedelta(seconds=30),
    )
    assert state.next_task("b") is None
    got = state.next_task("a")
    assert got.task_id == task.task_id and got.request == frame
    assert state.next_task("a").task_id == task.task_id  # at-least-once: until answered
    reply = encode(Failure("a", "stats", "X", "y"))
    with pytest.raises(ForbiddenError):
        state.submit_result("b", task.task_id, reply)
    first = state.submit_result("a", task.task_id, reply)
    again = state.submit_result("a", task.task_id, reply)
    assert not first.duplicate and again.duplicate and again.received_at == first.received_at
    with pytest.raises(ConflictError):
        state.submit_result("a", task.task_id, encode(Failure("a", "stats", "X", "z")))
    assert state.next_task("a") is None
    assert state.wait_result(task.task_id, 0) == reply


def test_expired_task_refuses_late_results(state):
    _running_job(state)
    task = state.add_task(
        job_id="j1",
        participant_id="a",
        seq=1,
        stage="stats",
        round=0,
        request=encode(StatsIns(job={})),
        deadline=timedelta(seconds=30),
    )
    assert state.expire_task(task.task_id)
    with pytest.raises(ConflictError, match="deadline"):
        state.submit_result("a", task.task_id, encode(Failure("a", "stats", "X", "y")))


def test_queue_transport_round_trip_and_deadline(state):
    _running_job(state)
    transport = QueueTransport(state, "j1", ["a", "b"], deadline=2.0)

    def participant_a():
        task = state.next_task("a", wait=5)
        message = decode(task.request)
        assert isinstance(message, StatsIns)
        import numpy as np

        reply = StatsRes(3, np.ones(2), np.eye(2), label_positives=1.0)
        state.submit_result("a", task.task_id, encode(reply))

    worker = threading.Thread(target=participant_a)
    worker.start()
    started = time.perf_counter()
    reply = transport.request("a", StatsIns(job={"k": 1}))
    woke = time.perf_counter() - started
    worker.join()
    assert isinstance(reply, StatsRes) and reply.count == 3
    assert woke < 1.0  # woken by the write, not by a poll interval

    started = time.perf_counter()
    silent = transport.request("b", StatsIns(job={"k": 1}))
    assert isinstance(silent, Failure) and silent.error_type == DEADLINE_EXCEEDED
    assert "deadline exceeded" in silent.message and silent.stage == "stats"
    assert 2.0 <= time.perf_counter() - started < 3.0
