"""QueueTransport.request_many: all tasks are queued before any reply, replies are awaited
together under one deadline, and the results match asking one participant at a time."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from cdp_federated.coordinator.queue_transport import DEADLINE_EXCEEDED, QueueTransport
from cdp_federated.coordinator.schema import open_coordinator_store
from cdp_federated.coordinator.state import CoordinatorState
from cdp_federated.federation import Transport, decode, encode
from cdp_federated.federation.messages import Failure, StatsIns, StatsRes
from tests.test_horizontal_run import make_job

NAMES = ("a", "b", "c")


@pytest.fixture
def state(db_url):
    store = open_coordinator_store(db_url, create=True)
    yield CoordinatorState(store, recheck=0.2)
    store.dispose()


def _running_job(state, participants=NAMES, job_id="batch"):
    spec = make_job(rounds=1)
    spec = type(spec).from_dict(spec.to_dict() | {"job_id": job_id})
    state.create_job(spec, participants, {}, submitted_by="ops")
    state.job_started(job_id)


def _answer(state, name, count, *, after=None):
    """A participant that waits for ``after`` (all tasks queued), then answers its one task."""

    def run():
        if after is not None:
            after.wait(5)
        task = state.next_task(name, wait=5)
        assert isinstance(decode(task.request), StatsIns)
        reply = StatsRes(count, np.ones(2) * count, np.eye(2), label_positives=1.0)
        state.submit_result(name, task.task_id, encode(reply))

    worker = threading.Thread(target=run)
    worker.start()
    return worker


def test_every_task_is_queued_before_any_reply_and_results_keep_request_order(state):
    _running_job(state)
    transport = QueueTransport(state, "batch", NAMES, deadline=5.0)
    queued = threading.Event()
    # each participant only answers once all three tasks are visible: a sequential transport
    # would wait a full deadline on the first participant
    workers = [_answer(state, n, i + 1, after=queued) for i, n in enumerate(NAMES)]

    def watch():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if all(state.next_task(n) is not None for n in NAMES):
                queued.set()
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.perf_counter()
    replies = transport.request_many({n: StatsIns(job={"k": 1}) for n in reversed(NAMES)})
    elapsed = time.perf_counter() - started
    for thread in [watcher, *workers]:
        thread.join()

    assert list(replies) == list(reversed(NAMES))
    assert [replies[n].count for n in NAMES] == [1, 2, 3]
    assert elapsed < 2.0


def test_silent_participants_cost_one_deadline_for_the_whole_batch(state):
    _running_job(state)
    transport = QueueTransport(state, "batch", NAMES, deadline=1.0)
    worker = _answer(state, "a", 7)

    started = time.perf_counter()
    replies = transport.request_many({n: StatsIns(job={"k": 1}) for n in NAMES})
    elapsed = time.perf_counter() - started
    worker.join()

    assert replies["a"].count == 7
    for name in ("b", "c"):
        assert isinstance(replies[name], Failure)
        assert replies[name].error_type == DEADLINE_EXCEEDED and replies[name].stage == "stats"
    assert 1.0 <= elapsed < 1.9  # one deadline, not one per silent participant
    assert state.next_task("b") is None  # expired: no longer delivered


def test_unknown_participant_is_a_failure_and_the_others_still_answer(state):
    _running_job(state)
    transport = QueueTransport(state, "batch", NAMES, deadline=2.0)
    worker = _answer(state, "a", 2)

    replies = transport.request_many({"a": StatsIns(job={}), "zz": StatsIns(job={})})
    worker.join()

    assert replies["a"].count == 2
    assert isinstance(replies["zz"], Failure) and replies["zz"].error_type == "TransportError"


def test_queue_transport_batch_equals_the_sequential_default(state):
    _running_job(state)
    transport = QueueTransport(state, "batch", NAMES, deadline=5.0)
    requests = {n: StatsIns(job={"k": 1}) for n in NAMES}

    workers = [_answer(state, n, i + 1) for i, n in enumerate(NAMES)]
    batched = transport.request_many(requests)
    for w in workers:
        w.join()
    workers = [_answer(state, n, i + 1) for i, n in enumerate(NAMES)]
    sequential = Transport.request_many(transport, requests)  # the base class: one at a time
    for w in workers:
        w.join()

    assert list(batched) == list(sequential) == list(NAMES)
    for name in NAMES:
        assert encode(batched[name]) == encode(sequential[name])
