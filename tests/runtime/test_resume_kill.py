"""Crash/resume reliability: the coordinator as a real process (``cdp-fl coordinator serve``),
killed with SIGKILL at random points of 10-round jobs and restarted on the same database and
port, while three participants (threads using the real HTTP client) keep serving. Every job must
commit rounds 1..10 exactly once and end with the model of an uninterrupted run (same sha256 of
the final parameters' bytes).

The full matrix (20 kills, one to one and a half minutes) is ``slow``; a 1-kill version (two
coordinator starts, about 5 s on a quiet machine) runs in the default suite. ``-s`` prints the
figures as JSON."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from cdp_federated.coordinator import run_horizontal
from cdp_federated.coordinator.enrolment import EnrolmentRegistry
from cdp_federated.coordinator.schema import checkpoints, open_coordinator_store, results, tasks
from cdp_federated.coordinator.state import CoordinatorState
from cdp_federated.errors import TransportError
from cdp_federated.federation import InProcessTransport
from cdp_federated.participant import ParticipantAgent
from cdp_federated.participant.http_client import CoordinatorClient
from cdp_federated.participant.runner import Backoff, serve_tasks
from tests.test_horizontal_run import make_job, make_parties, provider

ROUNDS = 10
KILLS_PER_JOB = 2
NAMES = ("eu-west", "uk", "us-east")
CDP_FL = Path(sys.executable).with_name("cdp-fl")


def model_hash(parameters) -> str:
    return hashlib.sha256(np.asarray(parameters, dtype=np.float64).tobytes()).hexdigest()


class CoordinatorProcess:
    """``cdp-fl coordinator serve`` on 127.0.0.1: started, SIGKILLed and restarted on the same
    database and port (the first start takes any free port)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.config = work / "coordinator.yaml"
        self.config.write_text(
            "host: 127.0.0.1\n"
            "db: coordinator.sqlite\n"
            "key_dir: keys\n"
            "max_poll_wait_seconds: 5\n"
            "recheck_seconds: 0.2\n"
        )
        self.db_url = f"sqlite:///{work / 'coordinator.sqlite'}"
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait until it serves; returns the seconds that took."""
        port_file = self.work / "port"
        port_file.unlink(missing_ok=True)
        started = time.perf_counter()
        log = (self.work / f"coordinator-{self.starts}.log").open("w")
        self.process = subprocess.Popen(
            [str(CDP_FL), "coordinator", "serve", "--config", str(self.config)]
            + ["--port", str(self.port), "--port-file", str(port_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.work,
        )
        log.close()
        self.starts += 1
        while not port_file.is_file():
            if self.process.poll() is not None or time.perf_counter() - started > timeout:
                raise RuntimeError(f"the coordinator did not start (see {log.name})")
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        return time.perf_counter() - started

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)  # by pid: the process this test started
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class Federation:
    """A coordinator process, three participant threads and an admin client."""

    def __init__(self, work: Path) -> None:
        self.coordinator = CoordinatorProcess(work)
        store = open_coordinator_store(self.coordinator.db_url, create=True)
        registry = EnrolmentRegistry(store)
        secrets_ = {n: registry.create(n, "participant") for n in NAMES}
        admin_secret = registry.create("ops", "admin")
        store.dispose()
        self.coordinator.start()
        parties = make_parties()
        self.stop = threading.Event()
        self.clients: list[CoordinatorClient] = []
        self.threads = []
        for name in NAMES:
            client = self._client(secrets_[name])
            agent = ParticipantAgent(name, provider(parties[name]))
            thread = threading.Thread(
                target=serve_tasks,
                args=(client, name, agent.handle),
                kwargs={
                    "stop": self.stop,
                    "poll_wait": 1.0,
                    "backoff": Backoff(base=0.05, cap=0.5),  # back quickly after a restart
                },
                daemon=True,
            )
            thread.start()
            self.threads.append(thread)
        self.admin = self._client(admin_secret)
        # the test reads job rows straight from the database: the admin's HTTP calls would
        # fail while the coordinator is down
        self.store = open_coordinator_store(self.coordinator.db_url)
        self.state = CoordinatorState(self.store)

    def _client(self, secret: str) -> CoordinatorClient:
        client = CoordinatorClient(self.coordinator.url, timeout=5.0)
        client.enrol(secret)
        self.clients.append(client)
        return client

    def submit(self, job_id: str) -> str:
        job = make_job(rounds=ROUNDS).to_dict() | {"job_id": job_id}
        for attempt in range(3):  # a pooled connection to the killed process fails once
            try:
                return self.admin.submit_job(job, list(NAMES), {"round_deadline_seconds": 60})
            except TransportError:
                if attempt == 2:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def wait(self, job_id: str, timeout: float = 120.0, *, steps: int | None = None):
        """The job once it finished (or made ``steps`` of :meth:`progress`), or after
        ``timeout``."""
        end = time.monotonic() + timeout
        while (record := self.state.job(job_id)).status not in ("succeeded", "failed"):
            if steps is not None and self.progress(job_id) >= steps:
                return record
            if time.monotonic() > end:
                return record
            time.sleep(0.005)
        return record

    def last_stage(self, job_id: str) -> str:
        """The stage of the job's newest request (where a kill landed)."""
        with self.store.begin() as conn:
            row = conn.execute(
                select(tasks.c.stage)
                .where(tasks.c.job_id == job_id)
                .order_by(tasks.c.seq.desc())
                .limit(1)
            ).first()
        return "queued" if row is None else row.stage

    def progress(self, job_id: str) -> int:
        """How many distinct (stage, round, participant) replies the job has received: a
        request asked again after a restart does not count twice."""
        with self.store.begin() as conn:
            rows = conn.execute(
                select(tasks.c.stage, tasks.c.round, tasks.c.participant_id)
                .join(results, results.c.task_id == tasks.c.task_id)
                .where(tasks.c.job_id == job_id)
            ).all()
        return len(set(rows))

    def checkpoint_round(self, job_id: str) -> int | None:
        with self.store.begin() as conn:
            return conn.execute(
                select(checkpoints.c.round).where(checkpoints.c.job_id == job_id)
            ).scalar()

    def close(self) -> None:
        self.stop.set()
        self.coordinator.stop()
        for thread in self.threads:
            thread.join(10)
        for client in self.clients:
            client.close()
        self.store.dispose()


@pytest.fixture(scope="module")
def reference_hash() -> str:
    """The uninterrupted run's model, in-process (bit-identical to HTTP, see
    test_http_federation)."""
    parties = make_parties()
    result = run_horizontal(
        make_job(rounds=ROUNDS),
        InProcessTransport(
            {n: ParticipantAgent(n, provider(f)).handle for n, f in parties.items()}
        ),
    )
    return model_hash(result.parameters)


def run_matrix(work: Path, kills: int, seed: int, reference: str) -> dict:
    """Submit 10-round jobs one after another and SIGKILL the coordinator at random moments
    until ``kills`` kills hit a running job; check every job; return the figures."""
    rng = random.Random(seed)
    started = time.perf_counter()
    federation = Federation(work)
    try:
        # an uninterrupted job over HTTP first: its hash and how long a job takes
        t0 = time.perf_counter()
        baseline = federation.wait(federation.submit("uninterrupted"))
        job_seconds = time.perf_counter() - t0
        assert baseline.status == "succeeded", baseline.error
        baseline_hash = model_hash(baseline.result["model"]["parameters"])

        total_steps = federation.progress("uninterrupted")
        step = job_seconds / total_steps
        jobs: dict[str, int] = {}  # job id -> kills that hit it while it ran
        stages: Counter[str] = Counter()
        at_round: Counter[int] = Counter()
        restarts: list[float] = []
        total = 0
        while sum(jobs.values()) < kills:
            job_id = federation.submit(f"killed-{len(jobs)}")
            jobs[job_id] = 0
            # kill points spread uniformly over the job, counted in replies (a participant's
            # answer to one stage of one round) so a restart's own delay does not count
            count = min(KILLS_PER_JOB, kills - sum(jobs.values()))
            for target in sorted(rng.sample(range(total_steps - 1), count)):
                low = federation.progress(job_id) + (1 if jobs[job_id] else 0)  # progress first
                federation.wait(job_id, 60, steps=max(target, low))
                time.sleep(rng.uniform(0.0, step))  # and a random point within a reply
                federation.coordinator.kill()
                total += 1
                record = federation.state.job(job_id)
                if record.status == "running":
                    jobs[job_id] += 1
                    stages[federation.last_stage(job_id)] += 1
                    at_round[record.rounds_done] += 1
                restarts.append(federation.coordinator.start())
                if record.status != "running":
                    break
            federation.wait(job_id)
        records = {job_id: federation.wait(job_id) for job_id in jobs}
        checkpointed = {job_id: federation.checkpoint_round(job_id) for job_id in jobs}
    finally:
        federation.close()

    lost = duplicated = 0
    hashes_equal = baseline_hash == reference
    for job_id, record in records.items():
        assert record.status == "succeeded", (job_id, record.error)
        rounds = Counter(r["round"] for r in record.history)
        lost += sum(1 for r in range(1, ROUNDS + 1) if r not in rounds)
        duplicated += sum(n - 1 for n in rounds.values() if n > 1)
        hashes_equal &= model_hash(record.result["model"]["parameters"]) == reference
        assert len(record.resumes) == jobs[job_id], job_id
        assert checkpointed[job_id] == ROUNDS, job_id
    figures = {
        "kills": total,
        "kills_mid_job": sum(jobs.values()),
        "jobs": len(jobs),
        "rounds_lost": lost,
        "rounds_duplicated": duplicated,
        "hashes_equal": hashes_equal,
        "reference_sha256": reference[:16],
        "kill_stages": dict(sorted(stages.items())),
        "kill_rounds_done": dict(sorted(at_round.items())),
        "replies_per_job": total_steps,
        "uninterrupted_job_seconds": round(job_seconds, 2),
        "mean_restart_seconds": round(sum(restarts) / len(restarts), 2),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(figures))
    return figures


@pytest.mark.slow
def test_twenty_sigkills_lose_or_duplicate_no_round_and_keep_the_model(tmp_path, reference_hash):
    figures = run_matrix(tmp_path, kills=20, seed=20240605, reference=reference_hash)
    assert figures["rounds_lost"] == figures["rounds_duplicated"] == 0
    assert figures["hashes_equal"] and figures["kills_mid_job"] == 20


def test_one_sigkill_resumes_to_the_same_model(tmp_path, reference_hash):
    figures = run_matrix(tmp_path, kills=1, seed=7, reference=reference_hash)
    assert figures["rounds_lost"] == figures["rounds_duplicated"] == 0
    assert figures["hashes_equal"] and figures["kills_mid_job"] == 1
