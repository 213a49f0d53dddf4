"""The leader lease (coordinator/lease.py) on SQLite and PostgreSQL: acquire, renew, expiry,
takeover with a new fencing token, release, the fast takeover from a holder process that is
gone, and fencing: a coordinator that lost the lease cannot commit a round, a checkpoint, a job
status or a task batch -- including a leader paused mid-job that wakes up after a takeover."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from cdp_federated.coordinator.jobs import JobOptions, JobRunner, result_summary
from cdp_federated.coordinator.lease import (
    LeaderLease,
    LeaseKeeper,
    LeaseLostError,
    NotLeaderError,
    _start_time,
    database_now,
    holder_gone,
    lead_with_lease,
    process_identity,
)
from cdp_federated.coordinator.schema import open_coordinator_store
from cdp_federated.coordinator.state import CoordinatorState, NewTask
from cdp_federated.federation.messages import EvaluateIns, FitIns
from tests.runtime.test_resume import (
    NAMES,
    ROUNDS,
    Asked,
    Crash,
    QueueParticipants,
    _final_parameters,
    _same_model,
    _spec,
    _uninterrupted,
)


class Clock:
    """Seconds since the epoch, moved by hand (both leases read the same one)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(db_url):
    store = open_coordinator_store(db_url, create=True)
    yield store
    store.dispose()


def _lease(store, holder: str, clock: Clock, **kwargs) -> LeaderLease:
    kwargs.setdefault("is_gone", lambda _holder: False)
    return LeaderLease(store, seconds=15, holder=holder, clock=clock, **kwargs)


def test_acquire_renew_expire_and_take_over_with_a_new_token(store):
    clock = Clock()
    a = _lease(store, "a", clock, address="http://127.0.0.1:1")
    b = _lease(store, "b", clock)
    assert a.current() is None
    assert a.try_acquire() and a.token == 1 and a.held
    assert not b.try_acquire() and b.token is None  # held and not expired
    with pytest.raises(NotLeaderError) as refused:
        b.require_leader()
    assert refused.value.http_status == 503 and refused.value.value == "http://127.0.0.1:1"
    assert refused.value.headers["Retry-After"] == "5"
    a.require_leader()  # the leader passes

    clock.now += 10
    assert a.renew()  # 10 s later: expires 25 s after the start
    clock.now += 14
    assert not b.try_acquire()  # 24 s: still valid thanks to the renewal
    info = a.current()
    assert (info.holder, info.token, info.expires_at) == ("a", 1, clock.now + 1)

    clock.now += 1.5  # expired
    assert b.try_acquire() and b.token == 2
    assert (b.current().holder, b.current().token) == ("b", 2)
    assert not a.renew() and a.token is None and not a.held  # a learns it lost the lease
    assert not a.try_acquire()  # and cannot take it back while b's is valid


def test_release_lets_a_standby_take_over_at_once(store):
    clock = Clock()
    a, b = _lease(store, "a", clock), _lease(store, "b", clock)
    assert a.try_acquire()
    a.release()
    assert a.token is None
    assert b.try_acquire() and b.token == 2  # no wait for the expiry, and a new token


def test_two_standbys_racing_for_an_expired_lease_one_wins(store):
    clock = Clock()
    assert _lease(store, "old", clock).try_acquire()
    clock.now += 60
    contenders = [_lease(store, f"s{i}", clock) for i in range(4)]
    barrier = threading.Barrier(len(contenders))
    won: list[bool] = []

    def race(lease: LeaderLease) -> None:
        barrier.wait()
        won.append(lease.try_acquire())

    threads = [threading.Thread(target=race, args=(c,)) for c in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(won) == [False, False, False, True]
    assert contenders[won.index(True)].current().token == 2  # one acquisition, one increment


def test_a_holder_whose_process_is_gone_is_taken_over_before_expiry(store):
    clock = Clock()
    child = subprocess.Popen(["sleep", "30"])  # a process of this machine that then dies
    host, boot, pidns, _, _, nonce = process_identity().split("|")
    dead = "|".join([host, boot, pidns, str(child.pid), _start_time(child.pid), nonce])
    assert not holder_gone(dead)
    child.kill()  # by pid: the process this test started
    child.wait(10)
    assert holder_gone(dead)
    assert _lease(store, dead, clock).try_acquire()
    live = LeaderLease(store, seconds=15, clock=clock)  # real is_gone
    assert live.try_acquire() and live.token == 2
    assert not holder_gone(live.holder)  # this process is alive


def test_holder_gone_only_for_exited_processes_of_this_machine():
    me = process_identity()
    assert not holder_gone(me)
    host, boot, pidns, pid, started, nonce = me.split("|")
    assert pid == str(os.getpid())
    assert holder_gone("|".join([host, boot, pidns, pid, str(int(started) + 1), nonce]))
    assert not holder_gone("|".join(["elsewhere", boot, pidns, "1", "1", nonce]))
    assert not holder_gone("a holder named some other way")


def test_database_clock_is_used_by_default(store):
    with store.begin() as conn:
        now = database_now(conn)
    assert abs(now - time.time()) < 5  # the database runs on this machine in the tests
    lease = LeaderLease(store, seconds=15, holder="x")
    assert lease.try_acquire()
    assert lease.current().expires_at == pytest.approx(now + 15, abs=5)


def test_fencing_refuses_every_commit_of_a_coordinator_that_lost_the_lease(store):
    clock = Clock()
    a, b = _lease(store, "a", clock), _lease(store, "b", clock)
    state = CoordinatorState(store)
    spec = _spec("fenced")
    state.create_job(spec, NAMES, {}, submitted_by="ops")
    state.fence = a.fence
    assert a.try_acquire()
    state.job_started(spec.job_id)
    state.save_checkpoint(spec.job_id, 0, b"round 0")
    state.round_committed(spec.job_id, {"round": 1}, checkpoint=b"round 1")
    assert a.current().holder == "a"

    clock.now += 30
    assert b.try_acquire()  # a is paused past its expiry; b takes over
    batch = [NewTask("uk", 99, "fit", 2, b"frame")]
    refused = [
        lambda: state.round_committed(spec.job_id, {"round": 2}, checkpoint=b"round 2"),
        lambda: state.save_checkpoint(spec.job_id, 2, b"round 2"),
        lambda: state.job_finished(spec.job_id, error={"error": "TrainingError"}),
        lambda: state.add_tasks(spec.job_id, batch, deadline=timedelta(seconds=5)),
    ]
    for commit in refused:
        with pytest.raises(LeaseLostError) as lost:
            commit()
        assert lost.value.field == "lease.token" and lost.value.value == 1
    record = state.job(spec.job_id)
    assert (record.status, record.rounds_done) == ("running", 1)
    assert state.checkpoint(spec.job_id) == (1, b"round 1")
    assert state.last_task_seq(spec.job_id) == 0  # no task was queued

    state.fence = b.fence  # the new leader commits
    state.round_committed(spec.job_id, {"round": 2}, checkpoint=b"round 2")
    assert state.checkpoint(spec.job_id) == (2, b"round 2")


def test_keeper_calls_back_on_acquire_and_on_loss(store):
    clock = Clock()
    events: list[str] = []
    a = LeaseKeeper(
        _lease(store, "a", clock),
        on_acquired=lambda: events.append("a leads"),
        on_lost=lambda: events.append("a lost"),
    )
    b = LeaseKeeper(
        _lease(store, "b", clock),
        on_acquired=lambda: events.append("b leads"),
        on_lost=lambda: events.append("b lost"),
    )
    assert a.step() and not b.step()
    assert a.step()  # renews
    clock.now += 20  # a paused longer than the lease
    assert b.step()
    assert not a.step()  # a's renewal finds b's token
    assert events == ["a leads", "b leads", "a lost"]
    assert a.renew_seconds == 5 and a.poll_seconds == 1


class PauseBeforeCommit:
    """Wraps a state's ``round_committed``: the first commit of round ``at`` waits (the leader
    is paused with the round aggregated) until ``release`` is set; its outcome is kept."""

    def __init__(self, state: CoordinatorState, at: int) -> None:
        self.original, self.at = state.round_committed, at
        self.paused, self.release = threading.Event(), threading.Event()
        self.outcome: BaseException | None = None
        state.round_committed = self  # type: ignore[method-assign]

    def __call__(self, job_id, record, **kwargs):
        if record.get("round") == self.at and not self.paused.is_set():
            self.paused.set()
            self.release.wait(60)
            try:
                return self.original(job_id, record, **kwargs)
            except BaseException as exc:
                self.outcome = exc
                raise
        return self.original(job_id, record, **kwargs)


def test_a_paused_leader_that_wakes_after_a_takeover_cannot_commit(db_url):
    """Leader A aggregates round 3 and pauses before committing it; its lease expires, B takes
    over, resumes from round 2 and finishes the job; then A wakes up: its commit is refused
    with LeaseLostError, its thread stops, and the job stays as B finished it."""
    from tests.test_horizontal_run import make_parties

    parties = make_parties()
    reference, _ = _uninterrupted(parties)
    clock = Clock()
    coordinators, keepers = [], []
    for name in ("a", "b"):
        state = CoordinatorState(open_coordinator_store(db_url, create=True), recheck=0.02)
        coordinator = SimpleNamespace(state=state, runner=JobRunner(state), lease=None)
        coordinators.append(coordinator)
        keepers.append(lead_with_lease(coordinator, _lease(state.store, name, clock), start=False))
    a, b = coordinators
    pause = PauseBeforeCommit(a.state, at=3)
    peers = QueueParticipants(db_url, Asked(parties))
    try:
        assert keepers[0].step() and not keepers[1].step()
        job_id = a.runner.submit(
            _spec("paused-leader").to_dict(),
            NAMES,
            {"round_deadline_seconds": 60},
            submitted_by="ops",
        )
        assert pause.paused.wait(60)
        assert a.state.job(job_id).rounds_done == 2

        clock.now += 60  # A is paused far past its lease
        assert keepers[1].step()  # B takes over and recovers the job from its round-2 checkpoint
        assert b.runner.running() == [job_id]
        record = b.state.wait_job(job_id, 60)
        assert record.status == "succeeded", record.error

        pause.release.set()  # A wakes up with round 3 in hand
        for _ in range(200):
            if not a.runner.running():
                break
            threading.Event().wait(0.05)
        assert a.runner.running() == []
        assert isinstance(pause.outcome, LeaseLostError)
        assert not keepers[0].step()  # A's keeper learns it too and stops its runner
    finally:
        pause.release.set()
        peers.close()
        for coordinator in coordinators:
            coordinator.runner.shutdown()
            coordinator.state.store.dispose()

    final = b.state.job(job_id)
    assert final.status == "succeeded" and final.error is None
    assert [r["round"] for r in final.history] == list(range(1, ROUNDS + 1))
    assert [r["from_round"] for r in final.resumes] == [2]
    assert _same_model(_final_parameters(final), reference.parameters)
    assert np.isfinite(_final_parameters(final)).all()


class CrashAfterEvaluation:
    """Wraps a state: once the replies to the ``nth`` batch of evaluation tasks have come, the
    job thread dies (:class:`Crash`, standing for SIGKILL) before it records anything."""

    def __init__(self, state: CoordinatorState, nth: int) -> None:
        self.add_tasks, self.wait_replies = state.add_tasks, state.wait_replies
        self.nth, self.batches, self.evaluation_tasks = nth, 0, set()
        state.add_tasks = self._add_tasks  # type: ignore[method-assign]
        state.wait_replies = self._wait_replies  # type: ignore[method-assign]

    def _add_tasks(self, job_id, new, **kwargs):
        queued = self.add_tasks(job_id, new, **kwargs)
        if all(t.stage == "evaluate" for t in new):
            self.batches += 1
            if self.batches == self.nth:
                self.evaluation_tasks = {t.task_id for t in queued}
        return queued

    def _wait_replies(self, task_ids, timeout, **kwargs):
        found = self.wait_replies(task_ids, timeout, **kwargs)
        if self.evaluation_tasks and set(task_ids) == self.evaluation_tasks:
            raise Crash
        return found


@pytest.mark.parametrize("crash_in", [1, 2], ids=["test-split", "train-split"])
def test_a_takeover_during_final_evaluation_repeats_it_with_the_same_metrics(db_url, crash_in):
    """Evaluation results are not checkpointed: a leader that dies during the final evaluation
    (after the participants answered the test split, or the train split) leaves the job at its
    last round's checkpoint; the new leader asks for no fit again, repeats the evaluation, and
    records exactly the metrics of an uninterrupted run (evaluation is a pure function of the
    final model and the participants' rows)."""
    from tests.test_horizontal_run import make_parties

    parties = make_parties()
    reference, _ = _uninterrupted(parties)
    expected = json.loads(json.dumps(result_summary(reference)["metrics"]))
    clock = Clock()
    asked = Asked(parties)
    store = open_coordinator_store(db_url, create=True)
    first = CoordinatorState(store, recheck=0.02)
    lease_a = _lease(store, "a", clock)
    first.fence = lease_a.fence
    assert lease_a.try_acquire()
    CrashAfterEvaluation(first, crash_in)
    spec = _spec(f"evaluation-crash-{crash_in}")
    first.create_job(spec, NAMES, JobOptions().to_dict(), submitted_by="ops")
    peers = QueueParticipants(db_url, asked)
    try:
        with pytest.raises(Crash):  # the job thread's body, run here so the crash surfaces
            JobRunner(first)._run(spec, list(NAMES), JobOptions())
        assert first.job(spec.job_id).rounds_done == ROUNDS  # every round committed
        evaluations_before = asked.count(EvaluateIns.TYPE)

        clock.now += 60  # the dead leader's lease expires
        second = CoordinatorState(open_coordinator_store(db_url), recheck=0.02)
        b = SimpleNamespace(state=second, runner=JobRunner(second), lease=None)
        assert lead_with_lease(b, _lease(second.store, "b", clock), start=False).step()
        record = second.wait_job(spec.job_id, 60)
        b.runner.shutdown()
        second.store.dispose()
    finally:
        peers.close()
        store.dispose()

    assert record.status == "succeeded", record.error
    assert record.result["metrics"] == expected  # the same metrics, to the last bit
    assert [r["round"] for r in record.history] == list(range(1, ROUNDS + 1))
    assert [r["from_round"] for r in record.resumes] == [ROUNDS]
    assert asked.count(FitIns.TYPE) == 3 * ROUNDS  # no round trained twice
    assert evaluations_before == 3 * crash_in  # what the dead leader had asked
    assert asked.count(EvaluateIns.TYPE) == 3 * (crash_in + 2)  # asked again: test and train


def test_a_standby_refuses_jobs_with_503_and_serves_the_rest(live):
    coordinator = live.coordinator
    leader = LeaderLease(
        coordinator.store, seconds=15, holder="elsewhere", address="https://leader.example"
    )
    assert leader.try_acquire()
    coordinator.lease = LeaderLease(coordinator.store, seconds=15, holder="this one")
    admin = live.client("ops", role="admin")
    response = httpx.post(
        f"{live.base_url}/v1/jobs",
        json={"job": _spec("refused").to_dict(), "participants": list(NAMES)},
        headers=admin._headers(True),
    )
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    body = response.json()
    assert body["error"] == "NotLeaderError" and body["field"] == "leader"
    assert "https://leader.example" in body["value"] and "https://leader.example" in body["fix"]
    assert coordinator.state.find_job("refused") is None  # nothing recorded
    assert admin.health() and admin.refresh()  # the rest of the API is served
    schema = httpx.get(f"{live.base_url}/openapi.json").json()
    assert "503" in schema["paths"]["/v1/jobs"]["post"]["responses"]
