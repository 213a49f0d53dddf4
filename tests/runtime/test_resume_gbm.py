"""A GBM job left running by a crashed coordinator starts again from its first tree on restart
(trees are not checkpointed yet) and reaches the uninterrupted model, with one history entry
per tree."""

from __future__ import annotations

import threading

import pytest

from cdp_federated import hookimpl
from cdp_federated.coordinator.gbm_runner import run_horizontal_gbm
from cdp_federated.coordinator.jobs import JobOptions, JobRunner
from cdp_federated.coordinator.schema import open_coordinator_store
from cdp_federated.coordinator.state import ConflictError, CoordinatorState
from cdp_federated.federation.codec import Codec
from cdp_federated.jobs import JobSpec
from cdp_federated.participant import ParticipantAgent
from cdp_federated.participant.runner import answer
from tests.test_horizontal_gbm import make_job, make_parties, make_transport

TREES = 4


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even the job's failure handler."""


class CrashAfterTree:
    def __init__(self, tree: int) -> None:
        self.tree = tree

    @hookimpl
    def cdp_round_ended(self, job, round_number, metrics):
        if round_number == self.tree:
            raise Crash


class Peers:
    """The parties as threads answering tasks from the coordinator's database."""

    def __init__(self, db_url: str, parties) -> None:
        self.store = open_coordinator_store(db_url)
        self.state = CoordinatorState(self.store, recheck=0.02)
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._serve, args=(name, frames))
            for name, frames in parties.items()
        ]
        for thread in self.threads:
            thread.start()

    def _serve(self, name, frames) -> None:
        handler, codec = ParticipantAgent(name, lambda j, s: frames[s]).handle, Codec()
        while not self.stop.is_set():
            task = self.state.next_task(name, wait=0.2, stop=self.stop)
            if task is None:
                continue
            reply, _ = answer(name, handler, task.request, codec)
            try:
                self.state.submit_result(name, task.task_id, reply)
            except ConflictError:
                pass

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)
        self.store.dispose()


def test_recovered_gbm_job_restarts_and_reaches_the_same_model(db_url, pm):
    parties = make_parties()
    spec = JobSpec.from_dict(make_job(rounds=TREES).to_dict() | {"job_id": "gbm-crash"})
    reference = run_horizontal_gbm(spec, make_transport(parties))
    names = sorted(parties)
    store = open_coordinator_store(db_url, create=True)
    first = CoordinatorState(store, recheck=0.02)
    first.create_job(spec, names, JobOptions().to_dict(), submitted_by="ops")
    pm.register(CrashAfterTree(2))
    peers = Peers(db_url, parties)
    try:
        with pytest.raises(Crash):
            JobRunner(first, pm=pm)._run(spec, names, JobOptions())
    finally:
        peers.close()
    assert first.job(spec.job_id).rounds_done == 2

    second = CoordinatorState(open_coordinator_store(db_url), recheck=0.02)
    runner = JobRunner(second)
    assert runner.recover() == [spec.job_id]
    peers = Peers(db_url, parties)
    try:
        record = second.wait_job(spec.job_id, 60)
    finally:
        runner.shutdown()
        peers.close()
        second.store.dispose()
    store.dispose()

    assert record.status == "succeeded", record.error
    assert record.result["model"]["estimator"] == reference.estimator.to_dict()
    assert [r["round"] for r in record.history] == list(range(1, TREES + 1))
    assert [r["from_round"] for r in record.resumes] == [0]
