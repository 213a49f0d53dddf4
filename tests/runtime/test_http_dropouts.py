"""Dropouts over the live HTTP service: 3 of 10 participants die in the middle of a round.

With ``min_participants: 7`` the round commits with the 7 survivors once the round's deadline
passes; with 8 the job fails cleanly, its error naming every missing participant. Either way the
round ends within the deadline plus 5 s of the kill, and the rounds committed before stay as they
were. The default suite runs participants as threads whose loop dies on receiving the round's task
(it never answers); the slow matrix runs them as separate processes killed with SIGKILL while they
train, at two different rounds.

    python -m tests.runtime.test_http_dropouts URL NAME SECRET SHARD MARKERS  # one participant
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest

from cdp_federated.federation.messages import FitIns, Message
from cdp_federated.participant import ParticipantAgent
from cdp_federated.participant.http_client import CoordinatorClient
from cdp_federated.participant.runner import serve_tasks
from tests.runtime.conftest import LiveService
from tests.test_horizontal_run import make_job, make_parties, provider

PARTICIPANTS = [f"p{i:02d}" for i in range(10)]
VICTIMS = ["p02", "p05", "p08"]
SURVIVORS = [p for p in PARTICIPANTS if p not in VICTIMS]
ROOT = Path(__file__).resolve().parents[2]


def shard(index: int, count: int = len(PARTICIPANTS)) -> dict[str, pl.DataFrame]:
    """Participant ``index``'s rows: every ``count``-th row of the pooled test data (the same in
    every process: the data is seeded)."""
    pooled = {
        split: pl.concat([party[split] for party in make_parties().values()])
        for split in ("train", "test")
    }
    return {split: frame.gather_every(count, offset=index) for split, frame in pooled.items()}


def wait_round_end(admin: CoordinatorClient, job_id: str, rounds: int, limit: float) -> dict:
    """The job's status once ``rounds`` rounds are committed or it finished (polled every 20 ms)."""
    end = time.monotonic() + limit
    while True:
        status = admin.job_status(job_id)
        done = status["status"] in ("succeeded", "failed")
        if done or status["rounds_done"] >= rounds or time.monotonic() > end:
            return status
        time.sleep(0.02)


@dataclass
class Outcome:
    status: dict
    kill_to_round_end: float
    kill_to_job_end: float
    deadline: float
    history_before_kill: list = field(default_factory=list)


def check(outcome: Outcome, minimum: int, kill_round: int) -> None:
    """What both the thread and the process runs must show."""
    status, deadline = outcome.status, outcome.deadline
    assert outcome.kill_to_round_end <= deadline + 5, outcome
    assert outcome.kill_to_round_end >= deadline * 0.5, outcome  # it did wait for the victims
    committed = status["history"][: kill_round - 1]
    assert committed == outcome.history_before_kill  # earlier rounds untouched
    assert all(r["participants"] == PARTICIPANTS for r in committed)
    if minimum <= len(SURVIVORS):
        assert status["status"] == "succeeded", status
        for record in status["history"][kill_round - 1 :]:
            assert record["participants"] == SURVIVORS
            assert record["failed"] == VICTIMS
        # every later stage (rounds and two evaluations) waits one deadline for the dead
        stages_left = status["rounds"] - kill_round + 1 + 2
        assert outcome.kill_to_job_end <= stages_left * deadline + 5, outcome
    else:
        assert status["status"] == "failed", status
        assert status["rounds_done"] == kill_round - 1
        error = status["error"]
        assert error["error"] == "TrainingError" and error["field"] == "min_fit_participants"
        assert (
            f"round {kill_round} got {len(SURVIVORS)} results, needs {minimum}"
            in (error["message"])
        )
        for victim in VICTIMS:
            assert f"{victim}: DeadlineExceeded" in error["message"], error
        assert outcome.kill_to_job_end <= deadline + 5, outcome


# --- participants as threads ---------------------------------------------------------------------


class Killed(BaseException):
    """Ends a participant thread the way SIGKILL ends a process: no reply, no cleanup."""


@dataclass
class ThreadFleet:
    live: LiveService
    kill_round: int
    killed_at: list[float] = field(default_factory=list)

    def start(self) -> None:
        for index, name in enumerate(PARTICIPANTS):
            handler = ParticipantAgent(name, provider(shard(index))).handle
            if name in VICTIMS:
                handler = self._dies(handler)
            client = self.live.client(name)
            thread = threading.Thread(
                target=self._serve, args=(client, name, handler), name=name, daemon=True
            )
            thread.start()
            self.live.workers.append(thread)  # joined at teardown before the clients close

    def _dies(self, handler):
        def handle(message: Message) -> Message:
            if isinstance(message, FitIns) and message.round == self.kill_round:
                self.killed_at.append(time.monotonic())
                raise Killed
            return handler(message)

        return handle

    def _serve(self, client, name, handler) -> None:
        try:
            serve_tasks(client, name, handler, stop=self.live.stop, poll_wait=1.0)
        except Killed:
            pass


@pytest.mark.parametrize("minimum", [7, 8])
def test_three_of_ten_threads_die_mid_round(live, minimum):
    deadline, rounds, kill_round = 1.0, 2, 2
    fleet = ThreadFleet(live, kill_round)
    fleet.start()
    admin = live.client("ops", role="admin")
    job = make_job(rounds=rounds).to_dict() | {"job_id": f"dropouts-{minimum}"}
    options = {"min_participants": minimum, "round_deadline_seconds": deadline}
    job_id = admin.submit_job(job, PARTICIPANTS, options)

    before = wait_round_end(admin, job_id, kill_round - 1, 30)["history"]
    status = wait_round_end(admin, job_id, kill_round, 30)
    round_end = time.monotonic()
    final = admin.job_status(job_id, wait=30)
    job_end = time.monotonic()

    assert len(fleet.killed_at) == len(VICTIMS)
    killed = max(fleet.killed_at)
    assert status["rounds_done"] >= kill_round or status["status"] == "failed"
    outcome = Outcome(final, round_end - killed, job_end - killed, deadline, before)
    print(
        f"\nthreads min={minimum}: kill->round end {outcome.kill_to_round_end:.2f} s, "
        f"kill->job end {outcome.kill_to_job_end:.2f} s (deadline {deadline:g} s, {final['status']})"
    )
    check(outcome, minimum, kill_round)


# --- participants as processes (slow) ------------------------------------------------------------


def participant_main(url: str, name: str, secret: str, index: int, markers: Path) -> None:
    """One participant process: answers every task from its shard, training 0.3 s per fit round,
    and touches ``markers/NAME.fitN`` when it receives round N (so the test kills it mid-round)."""
    agent = ParticipantAgent(name, provider(shard(index)))

    def handle(message: Message) -> Message:
        if isinstance(message, FitIns):
            (markers / f"{name}.fit{message.round}").touch()
            time.sleep(0.3)
        return agent.handle(message)

    client = CoordinatorClient(url, timeout=10)
    client.enrol(secret)
    serve_tasks(client, name, handle, poll_wait=1.0)


def _wait_for(predicate, limit: float, what: str) -> None:
    end = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("kill_round", [1, 3])
@pytest.mark.parametrize("minimum", [7, 8])
def test_three_of_ten_processes_sigkilled_mid_round(live, tmp_path, minimum, kill_round):
    deadline, rounds = 3.0, 3
    markers = tmp_path / "markers"
    markers.mkdir()
    registry = live.coordinator.registry
    processes: dict[str, subprocess.Popen] = {}
    try:
        for index, name in enumerate(PARTICIPANTS):
            secret = registry.create(name, "participant")
            processes[name] = subprocess.Popen(
                [sys.executable, "-m", "tests.runtime.test_http_dropouts"]
                + [live.base_url, name, secret, str(index), str(markers)],
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        _wait_for(lambda: all(map(registry.is_active, PARTICIPANTS)), 120, "enrolment")
        admin = live.client("ops", role="admin")
        job = make_job(rounds=rounds).to_dict() | {"job_id": f"sigkill-{minimum}-{kill_round}"}
        options = {"min_participants": minimum, "round_deadline_seconds": deadline}
        job_id = admin.submit_job(job, PARTICIPANTS, options)

        before = wait_round_end(admin, job_id, kill_round - 1, 60)["history"]
        _wait_for(
            lambda: all((markers / f"{v}.fit{kill_round}").exists() for v in VICTIMS),
            60,
            f"the victims to receive round {kill_round}",
        )
        for victim in VICTIMS:
            processes[victim].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        for victim in VICTIMS:
            assert processes[victim].wait(5) == -signal.SIGKILL
        wait_round_end(admin, job_id, kill_round, 60)
        round_end = time.monotonic()
        final = admin.job_status(job_id, wait=60)
        job_end = time.monotonic()
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait(10)
    outcome = Outcome(final, round_end - killed, job_end - killed, deadline, before)
    print(
        f"\nsigkill min={minimum} round={kill_round}: kill->round end "
        f"{outcome.kill_to_round_end:.2f} s, kill->job end {outcome.kill_to_job_end:.2f} s "
        f"(deadline {deadline:g} s, status {final['status']})"
    )
    check(outcome, minimum, kill_round)


if __name__ == "__main__":
    url, name, secret, index, markers = sys.argv[1:6]
    participant_main(url, name, secret, int(index), Path(markers))
