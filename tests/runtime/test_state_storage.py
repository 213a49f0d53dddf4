"""How the coordinator stores large values: request frames once per batch, replies handed to the
job runner in memory with only their digest in the database. SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import func, inspect, select

from cdp_federated.coordinator.queue_transport import _same
from cdp_federated.coordinator.schema import frames, open_coordinator_store, results, tasks
from cdp_federated.coordinator.state import ConflictError, CoordinatorState, NewTask
from cdp_federated.federation import encode
from cdp_federated.federation.messages import Failure, StatsIns
from tests.test_horizontal_run import make_job

DEADLINE = timedelta(seconds=30)


@pytest.fixture
def store(db_url):
    store = open_coordinator_store(db_url, create=True)
    yield store
    store.dispose()


def _running_job(state, participants, job_id="j1"):
    spec = make_job(rounds=1)
    spec = type(spec).from_dict(spec.to_dict() | {"job_id": job_id})
    state.create_job(spec, participants, {}, submitted_by="ops")
    state.job_started(job_id)


def _fit_frame(round_number: int) -> bytes:
    # the state never decodes a request: any frame will do, one per round
    return encode(StatsIns(job={"round": round_number, "pad": "x" * 5_000}))


def _reply(text: str) -> bytes:
    return encode(Failure("a", "fit", "NoOp", text))


def _queue(state, names, frame_of, seq=0, job_id="j1"):
    batch = [NewTask(n, seq + i + 1, "fit", 1, frame_of(n)) for i, n in enumerate(names)]
    return state.add_tasks(job_id, batch, deadline=DEADLINE)


def _frame_rows(store, job_id="j1") -> int:
    with store.begin() as conn:
        return conn.execute(
            select(func.count()).select_from(frames).where(frames.c.job_id == job_id)
        ).scalar_one()


def test_identical_frames_of_a_batch_are_stored_once_and_delivered_to_everyone(store):
    state = CoordinatorState(store)
    names = ["a", "b", "c", "d"]
    _running_job(state, names)
    frame = _fit_frame(1)
    queued = _queue(state, names, lambda _: bytes(frame))  # equal bytes, distinct objects

    assert _frame_rows(store) == 1
    with store.begin() as conn:
        stored = conn.execute(select(tasks.c.request, tasks.c.request_frame)).all()
    assert {bytes(r.request) for r in stored} == {b""}  # no copy per task
    assert len({r.request_frame for r in stored}) == 1
    # this process delivers from memory; another process (no memory) reads the shared row
    other = CoordinatorState(store)
    for name, task in zip(names, queued, strict=True):
        assert state.next_task(name).request == frame
        assert other.next_task(name).request == frame
        assert other.task_request(task.task_id) == frame
        assert other.task(task.task_id).request == frame


def test_different_frames_get_rows_of_their_own(store):
    state = CoordinatorState(store)
    _running_job(state, ["a", "b", "c"])
    by_name = {"a": _fit_frame(1), "b": _fit_frame(2), "c": _fit_frame(1)}
    _queue(state, ["a", "b", "c"], by_name.__getitem__)

    assert _frame_rows(store) == 2
    other = CoordinatorState(store)
    assert {n: other.next_task(n).request for n in by_name} == by_name


def test_frames_are_kept_while_a_task_needs_them_and_deleted_with_the_job(store):
    state = CoordinatorState(store)
    _running_job(state, ["a", "b"])
    first = _queue(state, ["a", "b"], lambda _: _fit_frame(1))
    state.submit_result("a", first[0].task_id, _reply("1"))
    second = _queue(state, ["a"], lambda _: _fit_frame(2), seq=2)
    assert _frame_rows(store) == 2  # b has not answered round 1 yet

    state.expire_tasks([first[1].task_id])
    _queue(state, ["a"], lambda _: _fit_frame(3), seq=3)
    assert _frame_rows(store) == 2  # round 1's frame went: no pending task needed it
    assert CoordinatorState(store).task_request(second[0].task_id) == _fit_frame(2)
    assert CoordinatorState(store).task_request(first[1].task_id) is None

    state.job_finished("j1", result={})
    assert _frame_rows(store) == 0


def _stored_reply(store, task_id) -> tuple[bytes, str]:
    with store.begin() as conn:
        row = conn.execute(
            select(results.c.reply, results.c.reply_sha256).where(results.c.task_id == task_id)
        ).one()
    return bytes(row.reply), row.reply_sha256


def test_a_reply_to_a_task_queued_here_is_handed_over_and_stays_idempotent(store):
    state = CoordinatorState(store)
    _running_job(state, ["a", "b"])
    [task] = _queue(state, ["a"], lambda _: _fit_frame(1))
    reply = _reply("7")

    first = state.submit_result("a", task.task_id, reply)
    body, digest = _stored_reply(store, task.task_id)
    assert body == b"" and len(digest) == 64  # only the digest is durable
    assert state.wait_results([task.task_id], 0) == {task.task_id: reply}

    # after the runner took it: the same bytes are a duplicate, other bytes a conflict
    again = state.submit_result("a", task.task_id, reply)
    assert again.duplicate and again.received_at == first.received_at
    with pytest.raises(ConflictError, match="different result"):
        state.submit_result("a", task.task_id, _reply("other"))
    with pytest.raises(ConflictError, match="different result"):
        CoordinatorState(store).submit_result("a", task.task_id, encode(StatsIns(job={})))


def test_a_reply_received_by_another_process_is_stored_whole(store):
    runner = CoordinatorState(store, recheck=0.05)
    _running_job(runner, ["a"])
    [task] = _queue(runner, ["a"], lambda _: _fit_frame(1))
    reply = _reply("7")

    CoordinatorState(store).submit_result("a", task.task_id, reply)  # another worker process
    assert _stored_reply(store, task.task_id)[0] == reply
    assert runner.wait_results([task.task_id], 2.0) == {task.task_id: reply}


def test_a_database_from_before_shared_frames_gets_the_column_and_keeps_its_rows(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    store = open_coordinator_store(url, create=True)
    state = CoordinatorState(store)
    _running_job(state, ["a"])
    frame = encode(StatsIns(job={"k": 1}))
    with store.begin() as conn:  # a task row as an older release wrote it: frame in `request`
        conn.execute(
            tasks.insert().values(
                task_id="old",
                job_id="j1",
                participant_id="a",
                seq=1,
                stage="stats",
                round=0,
                attempt=1,
                request=frame,
                status="pending",
                created_at=state.clock(),
                deadline_at=state.clock() + DEADLINE,
                deliveries=0,
            )
        )
        conn.exec_driver_sql("ALTER TABLE coord_tasks DROP COLUMN request_frame")
    store.dispose()

    store = open_coordinator_store(url, create=True)
    columns = {c["name"] for c in inspect(store.engine).get_columns("coord_tasks")}
    assert "request_frame" in columns
    assert CoordinatorState(store).next_task("a").request == frame
    store.dispose()


def test_the_decoded_reply_goes_along_only_in_memory(store):
    state = CoordinatorState(store)
    _running_job(state, ["a", "b"])
    here, there = _queue(state, ["a", "b"], lambda _: _fit_frame(1))
    decoded = object()  # what the HTTP handler decoded (the state never looks into it)

    state.submit_result("a", here.task_id, _reply("7"), decoded=decoded)
    CoordinatorState(store).submit_result("b", there.task_id, _reply("8"), decoded=object())
    got = state.wait_replies([here.task_id, there.task_id], 0)
    assert got == {here.task_id: (_reply("7"), decoded), there.task_id: (_reply("8"), None)}
    assert state.wait_replies([here.task_id], 0) == {}  # handed over once


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ({"x": 1.5, "v": [1, "a"]}, {"x": 1.5, "v": [1, "a"]}, True),
        ({"x": 0.0}, {"x": -0.0}, False),  # equal, but not the same bits on the wire
        ({"x": 1}, {"x": 1.0}, False),
        ({"x": 1, "y": 2}, {"y": 2, "x": 1}, False),  # another key order is another header
        ({"x": float("nan")}, {"x": float("nan")}, False),
    ],
)
def test_only_messages_that_encode_alike_share_a_frame(a, b, same):
    assert _same(StatsIns(job=a), StatsIns(job=b)) is same
    if same:
        assert encode(StatsIns(job=a)) == encode(StatsIns(job=b))


def test_arrays_are_compared_bit_for_bit():
    values = np.linspace(-1.0, 1.0, 1_000)
    assert _same(values, values.copy())
    assert not _same(values, values.astype(np.float32))
    assert not _same(np.zeros(3), -np.zeros(3))
    assert _same(values[::2], values[::2].copy())  # not contiguous: compared by bytes
