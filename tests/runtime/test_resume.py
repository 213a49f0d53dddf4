"""Crash-resume: round checkpoints, run_horizontal(resume=...), and JobRunner.recover() after a
simulated crash or a graceful stop, on SQLite and PostgreSQL. A resumed job must end with the
same parameters, bit for bit, as an uninterrupted run, with each round committed exactly once."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import threading
from collections import Counter
from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest

from cdp_federated import hookimpl
from cdp_federated.coordinator import run_horizontal
from cdp_federated.coordinator.checkpoint import decode_checkpoint, encode_checkpoint
from cdp_federated.coordinator.jobs import JobOptions, JobRunner
from cdp_federated.coordinator.schema import open_coordinator_store
from cdp_federated.coordinator.state import ConflictError, CoordinatorState
from cdp_federated.errors import CodecError, ConfigError
from cdp_federated.federation import InProcessTransport, encode
from cdp_federated.federation.codec import Codec
from cdp_federated.federation.messages import FitIns, FitRes, Message, StatsIns
from cdp_federated.jobs import JobSpec
from cdp_federated.learning.strategy import FedAvg
from cdp_federated.participant import ParticipantAgent
from cdp_federated.participant.runner import answer
from tests.test_horizontal_run import make_job, make_parties, provider

ROUNDS = 5
NAMES = ("eu-west", "uk", "us-east")


@pytest.fixture(scope="module")
def parties():
    return make_parties()


class Asked:
    """Participant handlers that log what they were asked: (participant, type, round)."""

    def __init__(self, parties) -> None:
        self.log: list[tuple[str, str, int]] = []
        self.agents = {n: ParticipantAgent(n, provider(f)) for n, f in parties.items()}
        self._lock = threading.Lock()
        self.stall_at: tuple[str, int] | None = None  # (participant, fit round): hang once there
        self.stalled = threading.Event()
        self.release = threading.Event()

    def handler(self, name: str):
        def handle(message: Message) -> Message:
            number = int(getattr(message, "round", 0))
            with self._lock:
                self.log.append((name, message.TYPE, number))
                stall = isinstance(message, FitIns) and self.stall_at == (name, number)
                if stall:
                    self.stall_at = None
            if stall:
                self.stalled.set()
                self.release.wait(30)
            return self.agents[name].handle(message)

        return handle

    def handlers(self):
        return {n: self.handler(n) for n in self.agents}

    def count(self, kind: str) -> int:
        return sum(1 for _, t, _ in self.log if t == kind)

    def fit_rounds(self) -> list[int]:
        return sorted({r for _, t, r in self.log if t == FitIns.TYPE})


class Momentum(FedAvg):
    """FedAvg with server momentum: enough state between rounds to tell a restored strategy
    from a fresh one."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.velocity: np.ndarray | None = None
        self.steps = 0
        self._current: np.ndarray | None = None

    def configure_fit(self, round_number, parameters, participants):
        self._current = parameters.copy()
        return super().configure_fit(round_number, parameters, participants)

    def aggregate_fit(self, round_number, results, failures):
        average = super().aggregate_fit(round_number, results, failures)
        delta = average - self._current
        self.velocity = delta if self.velocity is None else 0.5 * self.velocity + delta
        self.steps += 1
        return self._current + self.velocity

    def state_dict(self):
        if self.velocity is None:
            return {"steps": self.steps}
        return {"velocity": self.velocity, "steps": self.steps, "shape": list(self.velocity.shape)}

    def load_state_dict(self, state):
        self.steps = int(state.get("steps", 0))
        velocity = state.get("velocity")
        self.velocity = None if velocity is None else np.array(velocity)


def _uninterrupted(parties, *, strategy=None, rounds=ROUNDS):
    """The reference run and every checkpoint it wrote, as stored bytes."""
    stored: list[bytes] = []
    result = run_horizontal(
        make_job(rounds=rounds),
        InProcessTransport(Asked(parties).handlers()),
        strategy=strategy,
        on_checkpoint=lambda checkpoint, record: stored.append(encode_checkpoint(checkpoint)),
    )
    return result, stored


def _same_model(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _history(records) -> str:
    """Round records as comparable text (a NaN loss equals itself here)."""
    return json.dumps([dataclasses.asdict(r) for r in records])


# --- the checkpoint's bytes ------------------------------------------------------------------------


def test_checkpoint_round_trips_every_bit_without_pickle(parties):
    result, stored = _uninterrupted(parties, rounds=3)
    assert [decode_checkpoint(s).round for s in stored] == [0, 1, 2, 3]
    last = decode_checkpoint(stored[-1])
    assert _same_model(last.parameters, result.parameters)
    assert _history(last.history) == _history(result.history)
    assert last.train_rows == {n: r["train"] for n, r in result.rows_per_party.items()}
    extra = replace(
        last,
        strategy_state={
            "m": np.arange(6, dtype=np.float32).reshape(2, 3),
            "mask": np.array([True, False]),
            "t": np.int64(7),
            "beta": [0.9, 0.999],
        },
    )
    again = decode_checkpoint(encode_checkpoint(extra))
    assert encode_checkpoint(again) == encode_checkpoint(extra)  # stable bytes
    for name in ("parameters", "preconditioner"):
        assert _same_model(getattr(again, name), getattr(extra, name))
    for name in ("mean", "scale", "covariance", "constant"):
        assert _same_model(getattr(again.moments, name), getattr(extra.moments, name))
    assert again.moments.count == extra.moments.count
    assert again.strategy_state["m"].dtype == np.float32
    assert again.strategy_state["mask"].tolist() == [True, False]
    assert (again.strategy_state["t"], again.strategy_state["beta"]) == (7, [0.9, 0.999])


def test_checkpoint_refuses_what_needs_pickle_and_damaged_bytes(parties):
    _, stored = _uninterrupted(parties, rounds=1)
    checkpoint = decode_checkpoint(stored[-1])
    for state in ({"o": np.array([{"a": 1}], dtype=object)}, {"s": {1, 2}}):
        with pytest.raises(ConfigError) as caught:
            encode_checkpoint(replace(checkpoint, strategy_state=state))
        assert caught.value.field == "strategy_state"
    for damaged in (b"", b"garbage", stored[-1][:-5], b"CDPK" + stored[-1][4:6] + b"\xff" * 4):
        with pytest.raises(CodecError):
            decode_checkpoint(damaged)
    # a pickled object array smuggled into a stored checkpoint is refused, never unpickled
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert decode_checkpoint(_rebuilt(stored[-1], {})).round == 1  # the rebuild itself is sound
    with pytest.raises(CodecError):
        decode_checkpoint(_rebuilt(stored[-1], {"parameters": pickled.getvalue()}))


def _rebuilt(data: bytes, buffers: dict[str, bytes]) -> bytes:
    """``data`` (a checkpoint) with some array buffers replaced, laid out as the format says."""
    prefix = struct.Struct("<4sHI")
    magic, version, size = prefix.unpack_from(data)
    header = json.loads(data[prefix.size : prefix.size + size])
    body = data[prefix.size + size :]
    parts, offset = [], 0
    for entry in header["arrays"]:
        part = buffers.get(entry["name"], body[entry["offset"] : entry["offset"] + entry["length"]])
        entry["offset"], entry["length"] = offset, len(part)
        parts.append(part)
        offset += len(part)
    raw = json.dumps(header).encode()
    return prefix.pack(magic, version, len(raw)) + raw + b"".join(parts)


# --- run_horizontal(resume=...) --------------------------------------------------------------------


@pytest.mark.parametrize("after", [0, 2, ROUNDS])
def test_resumed_run_equals_the_uninterrupted_one_bit_for_bit(parties, after):
    reference, stored = _uninterrupted(parties)
    asked = Asked(parties)  # new participant processes: they reload their rows
    resumed = run_horizontal(
        make_job(rounds=ROUNDS),
        InProcessTransport(asked.handlers()),
        resume=decode_checkpoint(stored[after]),
    )
    assert _same_model(resumed.parameters, reference.parameters)
    assert _history(resumed.history) == _history(reference.history) and resumed.rounds == ROUNDS
    assert (resumed.auc, resumed.logloss) == (reference.auc, reference.logloss)
    assert resumed.rows_per_party == reference.rows_per_party
    assert asked.count(StatsIns.TYPE) == 0  # the checkpoint's standardisation is reused
    assert asked.fit_rounds() == list(range(after + 1, ROUNDS + 1))


def test_strategy_state_is_restored_from_the_checkpoint(parties):
    reference, stored = _uninterrupted(parties, strategy=Momentum(min_fit_participants=3))
    assert not _same_model(reference.parameters, _uninterrupted(parties)[0].parameters)
    checkpoint = decode_checkpoint(stored[2])
    assert checkpoint.strategy_state["steps"] == 2

    def resume(state):
        return run_horizontal(
            make_job(rounds=ROUNDS),
            InProcessTransport(Asked(parties).handlers()),
            strategy=Momentum(min_fit_participants=3),
            resume=replace(checkpoint, strategy_state=state),
        ).parameters

    assert _same_model(resume(checkpoint.strategy_state), reference.parameters)
    assert not _same_model(resume({}), reference.parameters)  # momentum lost: another model


def test_early_stopping_state_is_restored_and_a_stopped_job_trains_no_further(parties):
    job = make_job(rounds=40, patience=2, min_delta=1e-3, validation_fraction=0.2)
    stored: list[bytes] = []
    reference = run_horizontal(
        job,
        InProcessTransport(Asked(parties).handlers()),
        on_checkpoint=lambda checkpoint, record: stored.append(encode_checkpoint(checkpoint)),
    )
    stopped_at = reference.rounds
    assert 2 < stopped_at < 40  # it did stop early
    assert decode_checkpoint(stored[-1]).runner_state["stopped"] is True
    for after in (stopped_at - 2, stopped_at):
        asked = Asked(parties)
        resumed = run_horizontal(
            job, InProcessTransport(asked.handlers()), resume=decode_checkpoint(stored[after])
        )
        assert _same_model(resumed.parameters, reference.parameters)
        assert resumed.rounds == stopped_at
        assert asked.fit_rounds() == list(range(after + 1, stopped_at + 1))


def test_a_checkpoint_of_another_job_is_refused(parties):
    _, stored = _uninterrupted(parties, rounds=2)
    checkpoint = decode_checkpoint(stored[-1])
    transport = InProcessTransport(Asked(parties).handlers())
    for job, bad in (
        (make_job(rounds=1), checkpoint),  # more rounds done than the job has
        (make_job(rounds=3), replace(checkpoint, train_rows={"eu-west": 1})),
        (make_job(rounds=3), replace(checkpoint, parameters=np.zeros(3))),
    ):
        with pytest.raises(ConfigError) as caught:
            run_horizontal(job, transport, resume=bad)
        assert caught.value.field == "checkpoint"


# --- the job runner over the task queue ------------------------------------------------------------


class Crash(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even the job's failure handler."""


class CrashAfter:
    """A plugin that kills the job thread once round ``after`` committed (0: standardisation)."""

    def __init__(self, after: int) -> None:
        self.after = after

    @hookimpl
    def cdp_job_started(self, job, participants):
        if self.after == 0:
            raise Crash

    @hookimpl
    def cdp_round_ended(self, job, round_number, metrics):
        if round_number == self.after:
            raise Crash


class QueueParticipants:
    """The parties as threads answering their tasks from the coordinator's database through a
    state of their own (as another process would), until :meth:`close`."""

    def __init__(self, db_url: str, asked: Asked) -> None:
        self.store = open_coordinator_store(db_url)
        self.state = CoordinatorState(self.store, recheck=0.02)
        self.asked = asked
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._serve, args=(n,)) for n in NAMES]
        for thread in self.threads:
            thread.start()

    def _serve(self, name: str) -> None:
        handler, codec = self.asked.handler(name), Codec()
        while not self.stop.is_set():
            task = self.state.next_task(name, wait=0.2, stop=self.stop)
            if task is None:
                continue
            reply, _ = answer(name, handler, task.request, codec)
            try:
                self.state.submit_result(name, task.task_id, reply)
            except ConflictError:  # expired meanwhile: the coordinator went on without it
                pass

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)
        self.store.dispose()


def _spec(job_id: str) -> JobSpec:
    return JobSpec.from_dict(make_job(rounds=ROUNDS).to_dict() | {"job_id": job_id})


def _final_parameters(record) -> np.ndarray:
    return np.array(record.result["model"]["parameters"], dtype=np.float64)


@pytest.mark.parametrize("crash_after", [None, 0, 2])
def test_recover_resumes_a_crashed_job_to_the_same_model(db_url, parties, pm, crash_after):
    reference, _ = _uninterrupted(parties)
    store = open_coordinator_store(db_url, create=True)
    asked = Asked(parties)
    first = CoordinatorState(store, recheck=0.02)
    spec = _spec(f"crash-{crash_after}")
    first.create_job(spec, NAMES, JobOptions().to_dict(), submitted_by="ops")
    peers = QueueParticipants(db_url, asked)
    try:
        if crash_after is not None:  # None: the process died before the job's thread started
            pm.register(CrashAfter(crash_after))
            with pytest.raises(Crash):  # the job thread's body, run here so the crash surfaces
                JobRunner(first, pm=pm)._run(spec, list(NAMES), JobOptions())
    finally:
        peers.close()
    done = crash_after or 0
    assert first.job(spec.job_id).rounds_done == done
    # the dead process had queued the next round already: that task must not survive
    stray = first.add_task(
        job_id=spec.job_id,
        participant_id="uk",
        seq=first.last_task_seq(spec.job_id) + 1,
        stage="fit",
        round=done + 1,
        request=b"never delivered after the restart",
        deadline=timedelta(seconds=60),
    )

    second = CoordinatorState(open_coordinator_store(db_url), recheck=0.02)
    runner = JobRunner(second)
    assert runner.recover() == [spec.job_id]
    peers = QueueParticipants(db_url, asked)
    try:
        record = second.wait_job(spec.job_id, 60)
    finally:
        runner.shutdown()
        peers.close()
        second.store.dispose()

    assert record.status == "succeeded", record.error
    assert _same_model(_final_parameters(record), reference.parameters)
    assert [r["round"] for r in record.history] == list(range(1, ROUNDS + 1))
    assert record.status_dict()["resumed"] == 1
    assert [r["from_round"] for r in record.resumes] == [done]
    assert "parameters" not in str(record.status_dict())  # status: aggregates only
    assert asked.count(StatsIns.TYPE) == 3  # once per participant, across both processes
    fits = Counter(r for _, t, r in asked.log if t == FitIns.TYPE)
    assert fits == {r: 3 for r in range(1, ROUNDS + 1)}  # committed rounds are not asked again
    with pytest.raises(ConflictError):  # a late reply to the dead process's task: the clear 409
        first.submit_result("uk", stray.task_id, encode(FitRes(np.zeros(6), 1, {})))
    store.dispose()


def test_a_graceful_stop_leaves_the_job_to_resume_without_a_partial_round(db_url, parties):
    reference, _ = _uninterrupted(parties)
    store = open_coordinator_store(db_url, create=True)
    asked = Asked(parties)
    asked.stall_at = ("uk", 3)  # uk hangs in round 3 while the coordinator stops
    peers = QueueParticipants(db_url, asked)
    state = CoordinatorState(store, recheck=0.02)
    runner = JobRunner(state)
    try:
        job_id = runner.submit(
            _spec("graceful").to_dict(), NAMES, {"round_deadline_seconds": 60}, submitted_by="ops"
        )
        assert asked.stalled.wait(30)
        runner.shutdown(timeout=10)
        stopped = state.job(job_id)
        assert (stopped.status, stopped.rounds_done, stopped.error) == ("running", 2, None)

        second = CoordinatorState(open_coordinator_store(db_url), recheck=0.02)
        resumed = JobRunner(second)
        assert resumed.recover() == [job_id]
        asked.release.set()  # its stale round-3 reply is refused; it answers the new task
        record = second.wait_job(job_id, 60)
        resumed.shutdown()
        second.store.dispose()
    finally:
        asked.release.set()
        peers.close()
    assert record.status == "succeeded", record.error
    assert _same_model(_final_parameters(record), reference.parameters)
    assert [r["round"] for r in record.history] == list(range(1, ROUNDS + 1))
    assert all(r["failed"] == [] for r in record.history)  # no round committed without uk
    store.dispose()


def test_a_round_is_committed_once_with_its_checkpoint(db_url, parties):
    _, stored = _uninterrupted(parties, rounds=2)
    store = open_coordinator_store(db_url, create=True)
    state = CoordinatorState(store)
    spec = _spec("once")
    state.create_job(spec, NAMES, {}, submitted_by="ops")
    state.job_started(spec.job_id)
    state.save_checkpoint(spec.job_id, 0, stored[0])
    state.round_committed(spec.job_id, {"round": 1}, checkpoint=stored[1])
    for again in (1, 3):  # a duplicate and a gap
        with pytest.raises(ConflictError):
            state.round_committed(spec.job_id, {"round": again}, checkpoint=stored[2])
    assert state.checkpoint(spec.job_id) == (1, stored[1])  # untouched by the refused commits
    assert state.job(spec.job_id).rounds_done == 1
    store.dispose()
