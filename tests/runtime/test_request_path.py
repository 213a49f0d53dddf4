"""The coordinator's per-request hot path (docs/runtime.md, "Measured on loopback"): what it
remembers instead of reading the database on every request, and that each shortcut still gives
the answers the database would. SQLite and PostgreSQL where a database is involved."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, select

from cdp_federated.coordinator.auth import KeyRing, MemoryReplayCache, TokenVerifier, issue_token
from cdp_federated.coordinator.enrolment import EnrolmentRegistry
from cdp_federated.coordinator.schema import (
    open_coordinator_store,
    participants,
    results,
    tasks,
)
from cdp_federated.coordinator.state import ConflictError, CoordinatorState, NewTask, _Waiters
from cdp_federated.errors import AuthError, ForbiddenError
from cdp_federated.federation import encode
from cdp_federated.federation.messages import Failure, StatsIns
from tests.runtime.conftest import start_service
from tests.test_horizontal_run import make_job

T0 = datetime(2030, 3, 1, 9, 0, tzinfo=UTC)
DEADLINE = timedelta(seconds=30)


@pytest.fixture
def store(db_url):
    store = open_coordinator_store(db_url, create=True)
    yield store
    store.dispose()


class Clock:
    """A settable clock (``datetime`` or monotonic seconds)."""

    def __init__(self, start):
        self.now = start

    def __call__(self):
        return self.now


# --- participant status: remembered, forgotten on revoke --------------------------------------


def test_a_revoked_participant_is_refused_on_its_very_next_request(db_url, tmp_path):
    live = start_service(db_url, tmp_path / "keys")
    try:
        client = live.client("p1")
        for _ in range(3):  # the token and the status are remembered after the first request
            assert client.poll("p1", wait=0) is None
        assert live.coordinator.registry.known_active("p1") is True

        live.coordinator.registry.disable("p1")

        with pytest.raises(AuthError):
            client.poll("p1", wait=0)
        with pytest.raises(AuthError):
            client.submit("p1", "any-task", encode(Failure("p1", "fit", "E", "x")))
    finally:
        live.close()


def test_status_is_remembered_for_status_ttl_when_another_process_disables(store):
    seconds = Clock(100.0)
    registry = EnrolmentRegistry(store, status_ttl=5.0, monotonic=seconds)
    registry.redeem(registry.create("acme", "participant"))
    assert registry.known_active("acme") is None  # nothing read yet
    assert registry.is_active("acme")
    assert registry.known_active("acme") is True

    EnrolmentRegistry(store).disable("acme")  # e.g. another coordinator on the same database

    seconds.now += 4.9
    assert registry.is_active("acme")  # the documented window
    seconds.now += 0.2
    assert registry.known_active("acme") is None
    assert not registry.is_active("acme")
    assert registry.known_active("acme") is None  # a refusal is never remembered


def test_an_answer_read_before_a_disable_is_not_remembered(store):
    registry = EnrolmentRegistry(store, status_ttl=60.0)
    registry.redeem(registry.create("acme", "participant"))
    read = registry.participant

    def racing(participant_id):
        record = read(participant_id)  # still enabled here...
        registry.disable(participant_id)  # ...and disabled before the answer is remembered
        return record

    registry.participant = racing  # type: ignore[method-assign]
    assert registry.is_active("acme")  # this request was already in flight
    registry.participant = read  # type: ignore[method-assign]
    assert registry.known_active("acme") is None
    assert not registry.is_active("acme")


# --- tokens: the signature once, everything else on every use ---------------------------------


@pytest.fixture
def ring():
    return KeyRing.generate(now=T0, overlap=timedelta(minutes=10))


def _verifier(ring, clock, active):
    return TokenVerifier(
        ring,
        issuer="i",
        audience="a",
        clock=clock,
        replay_cache=MemoryReplayCache(),
        is_active=lambda sub: active.get(sub, False),
        is_known_active=lambda sub: active.get(sub),
    )


def _token(ring, now, **kwargs):
    return issue_token(
        ring, sub="p1", role="participant", audience="a", issuer="i", now=now, **kwargs
    )


def test_a_remembered_token_is_still_refused_once_expired_or_disabled(ring):
    clock, active = Clock(T0), {"p1": True}
    verifier = _verifier(ring, clock, active)
    token = _token(ring, T0, ttl=timedelta(minutes=5))
    assert verifier.verify_remembered(token) is None  # never seen: verify() must run
    claims = verifier.verify(token)
    assert verifier.verify_remembered(token) == claims

    active["p1"] = False
    with pytest.raises(AuthError, match="disabled"):
        verifier.verify_remembered(token)
    with pytest.raises(AuthError, match="disabled"):
        verifier.verify(token)
    del active["p1"]  # status unknown without a read: verify() must run (and refuses)
    assert verifier.verify_remembered(token) is None

    active["p1"] = True
    clock.now = T0 + timedelta(minutes=6)  # past exp and the default leeway
    for check in (verifier.verify, verifier.verify_remembered):
        with pytest.raises(AuthError, match="expired"):
            check(token)


def test_a_remembered_token_of_a_retired_key_is_refused(ring):
    clock, active = Clock(T0), {"p1": True}
    verifier = _verifier(ring, clock, active)
    token = _token(ring, T0, ttl=timedelta(hours=1))
    verifier.verify(token)
    ring.rotate(now=T0)  # the old key verifies for the 10-minute overlap
    clock.now = T0 + timedelta(minutes=5)
    assert verifier.verify(token).sub == "p1"
    clock.now = T0 + timedelta(minutes=11)
    assert verifier.verify_remembered(token) is None
    with pytest.raises(AuthError, match="signing key"):
        verifier.verify(token)


def test_one_time_tokens_are_never_remembered(ring):
    verifier = _verifier(ring, Clock(T0), {"p1": True})
    token = _token(ring, T0, one_time=True)
    verifier.verify(token)
    assert verifier.verify_remembered(token) is None
    with pytest.raises(AuthError, match="already used"):
        verifier.verify(token)


# --- SQLite: pooled connections ----------------------------------------------------------------


def test_pooled_sqlite_connections_are_reused_and_see_each_others_commits(tmp_path):
    store = open_coordinator_store(f"sqlite:///{tmp_path / 'c.sqlite'}", create=True)
    store.dispose()  # count the connections from here on
    opened = []
    event.listen(store.engine, "connect", lambda *_: opened.append(1))
    registry = EnrolmentRegistry(store)
    try:
        # the writer's connection stays checked out, so each read runs on another pooled
        # connection, in another thread: it sees every write committed before it
        with store.engine.connect() as writer:
            for n in range(5):
                with writer.begin():
                    writer.execute(
                        participants.insert().values(
                            participant_id=f"p{n}", role="participant", enrolled_at=T0
                        )
                    )
                with ThreadPoolExecutor(1) as other:
                    seen = other.submit(registry.participant, f"p{n}").result()
                assert seen is not None and seen.participant_id == f"p{n}"

        held = threading.Barrier(12)

        def work() -> None:
            for _ in range(5):
                with store.begin() as conn:  # 12 transactions open at once, five times over
                    conn.execute(select(tasks.c.task_id).limit(1)).all()
                    held.wait(10)
                held.wait(10)  # every connection back in the pool before the next round

        threads = [threading.Thread(target=work) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # no connection opened per transaction: with 5 pooled connections (as before), the 7
        # beyond them were opened and closed again in each of the five rounds (40 in all)
        assert len(opened) <= 13
    finally:
        store.dispose()


# --- the state: tasks and results of this process from memory, the database still the truth ----


def _running_job(state, participants, job_id="j1"):
    spec = make_job(rounds=1)
    spec = type(spec).from_dict(spec.to_dict() | {"job_id": job_id})
    state.create_job(spec, participants, {}, submitted_by="ops")
    state.job_started(job_id)


def _queue(state, names, seq=0, job_id="j1"):
    frame = encode(StatsIns(job={"pad": "x" * 1000}))
    batch = [NewTask(n, seq + i + 1, "stats", 0, frame) for i, n in enumerate(names)]
    return state.add_tasks(job_id, batch, deadline=DEADLINE)


def _reply(text: str) -> bytes:
    return encode(Failure("a", "stats", "NoOp", text))


def test_a_task_expired_by_another_process_is_not_delivered_from_memory(store):
    state = CoordinatorState(store)
    _running_job(state, ["a"])
    [task] = _queue(state, ["a"])
    CoordinatorState(store).expire_tasks([task.task_id])

    assert state.next_task("a") is None
    with pytest.raises(ConflictError, match="deadline passed"):
        state.submit_result("a", task.task_id, _reply("late"))


def test_a_delivery_from_memory_is_counted_in_the_database(store):
    state = CoordinatorState(store)
    _running_job(state, ["a"])
    [task] = _queue(state, ["a"])
    assert state.next_task("a").deliveries == 0
    assert state.next_task("a").deliveries == 1  # at least once: until answered
    with store.begin() as conn:
        row = conn.execute(
            select(tasks.c.deliveries, tasks.c.last_delivered_at).where(
                tasks.c.task_id == task.task_id
            )
        ).one()
    assert row.deliveries == 2 and row.last_delivered_at is not None


def test_a_waiting_poll_gets_a_task_another_process_queued(store):
    state = CoordinatorState(store, recheck=0.05)
    _running_job(state, ["a"])
    got = []
    poll = threading.Thread(target=lambda: got.append(state.next_task("a", wait=5.0)))
    poll.start()
    time.sleep(0.1)
    [task] = _queue(CoordinatorState(store), ["a"])  # another process: no wake-up here
    poll.join(5)
    assert got and got[0] is not None and got[0].task_id == task.task_id


def test_a_result_is_acknowledged_only_once_durable(store):
    clock = Clock(datetime.now(UTC))
    state = CoordinatorState(store, clock=clock)
    _running_job(state, ["a", "b"])
    here, late = _queue(state, ["a", "b"])

    ack = state.submit_result("a", here.task_id, _reply("7"))
    with store.begin() as conn:  # committed before the acknowledgement came back
        stored = conn.execute(
            select(results.c.reply_sha256).where(results.c.task_id == here.task_id)
        ).scalar_one()
        status = conn.execute(
            select(tasks.c.status).where(tasks.c.task_id == here.task_id)
        ).scalar_one()
    assert len(stored) == 64 and status == "done" and not ack.duplicate
    assert state.submit_result("a", here.task_id, _reply("7")).duplicate
    with pytest.raises(ConflictError, match="different result"):
        state.submit_result("a", here.task_id, _reply("8"))

    clock.now += DEADLINE + timedelta(seconds=1)
    with pytest.raises(ConflictError, match="deadline passed"):
        state.submit_result("b", late.task_id, _reply("9"))
    with pytest.raises(ForbiddenError, match="not assigned"):
        state.submit_result("a", late.task_id, _reply("9"))


def test_a_write_wakes_only_the_waiters_of_its_topics():
    waiters = _Waiters()
    with (
        waiters.watching(["result:t1"]) as runner,
        waiters.watching(["tasks:p1"]) as poll,
        waiters.watching([]) as everything,
    ):
        waiters.notify(["result:t1"])
        assert runner.is_set() and everything.is_set() and not poll.is_set()
        runner.clear()
        everything.clear()
        waiters.notify([])  # a write that concerns everyone
        assert runner.is_set() and poll.is_set() and everything.is_set()
    waiters.notify([])  # nobody left to wake
