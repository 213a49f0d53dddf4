"""Failover between two real ``cdp-fl coordinator serve`` processes on one database (PostgreSQL
when CDP_FL_TEST_PG_URL is set, else an SQLite file): the first holds the leader lease and runs a
10-round job, the second is a standby; the leader is SIGKILLed mid-job, the standby takes the
lease over (the dead holder's process is gone, so it does not wait for the expiry), resumes the
job from its checkpoint, and the job ends with the uninterrupted run's model. Participants (three
threads with the real HTTP client) reach the coordinators through one address, a small failover
proxy standing in for a load balancer. ``-s`` prints the figures as JSON."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from cdp_federated.coordinator.enrolment import EnrolmentRegistry
from cdp_federated.coordinator.lease import LeaderLease, database_now
from cdp_federated.coordinator.schema import open_coordinator_store
from cdp_federated.coordinator.state import CoordinatorState
from cdp_federated.errors import TransportError
from cdp_federated.participant import ParticipantAgent
from cdp_federated.participant.http_client import CoordinatorClient
from cdp_federated.participant.runner import Backoff, serve_tasks
from tests.runtime.test_resume_kill import CDP_FL, NAMES, ROUNDS, model_hash, reference_hash
from tests.test_horizontal_run import make_job, make_parties, provider

__all__ = ["reference_hash"]  # the module fixture, shared with test_resume_kill


class Serve:
    """One ``cdp-fl coordinator serve`` process on the shared config (its own port file)."""

    def __init__(self, work: Path, config: Path, name: str) -> None:
        self.work, self.config, self.name = work, config, name
        port_file = work / f"port-{name}"
        self.log = work / f"coordinator-{name}.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [str(CDP_FL), "coordinator", "serve", "--config", str(config)]
                + ["--port", "0", "--port-file", str(port_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=work,
            )
        started = time.monotonic()
        while not port_file.is_file():
            if self.process.poll() is not None or time.monotonic() - started > 60:
                raise RuntimeError(f"coordinator {name} did not start: {self.log.read_text()}")
            time.sleep(0.02)
        self.port = int(port_file.read_text())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)  # by pid: the process this test started
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


class FailoverProxy:
    """A TCP proxy on 127.0.0.1: each connection goes to the first backend that accepts it (the
    way a load balancer with health checks sends traffic to a live coordinator)."""

    def __init__(self, backends: list[int]) -> None:
        self.backends = backends
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        for port in self.backends:
            try:
                upstream = socket.create_connection(("127.0.0.1", port), timeout=2)
                break
            except OSError:
                continue
        else:
            client.close()
            return
        upstream.settimeout(None)
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()


@pytest.fixture
def shared_db(tmp_path, request):
    if os.environ.get("CDP_FL_TEST_PG_URL"):
        return request.getfixturevalue("pg_url")
    return f"sqlite:///{tmp_path / 'coordinator.sqlite'}"


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["kill", "pause"])
def test_standby_takes_over_a_failed_leader_and_finishes_with_the_same_model(
    tmp_path, shared_db, reference_hash, failure
):
    """``kill``: SIGKILL (the holder's process is gone: taken over at the standby's next look).
    ``pause``: SIGSTOP (alive but silent: taken over once the lease expired); after the job
    finished the old leader gets SIGCONT, finds its lease gone, stops its job thread without
    committing anything, and serves on as a standby."""
    config = tmp_path / "coordinator.yaml"
    config.write_text(
        f"host: 127.0.0.1\ndb: {shared_db}\nkey_dir: keys\nmax_poll_wait_seconds: 2\n"
        "recheck_seconds: 0.2\nlease_seconds: 3\n"
    )
    store = open_coordinator_store(shared_db, create=True)
    registry = EnrolmentRegistry(store)
    secrets_ = {n: registry.create(n, "participant") for n in NAMES}
    secrets_ |= {a: registry.create(a, "admin") for a in ("ops", "ops-2")}
    state = CoordinatorState(store)
    started = time.perf_counter()
    leader = Serve(tmp_path, config, "a")
    standby = Serve(tmp_path, config, "b")
    proxy = FailoverProxy([leader.port, standby.port])
    stop = threading.Event()
    clients: list[CoordinatorClient] = []
    threads: list[threading.Thread] = []
    try:
        lease = LeaderLease(store, holder="observer").current()
        assert lease is not None and lease.token == 1
        assert f"|{leader.process.pid}|" in lease.holder and lease.address == leader.url

        parties = make_parties()
        for name in NAMES:
            client = CoordinatorClient(proxy.url, timeout=5.0)
            client.enrol(secrets_[name])
            clients.append(client)
            agent = ParticipantAgent(name, provider(parties[name]))
            thread = threading.Thread(
                target=serve_tasks,
                args=(client, name, agent.handle),
                kwargs={"stop": stop, "poll_wait": 1.0, "backoff": Backoff(base=0.05, cap=0.5)},
                daemon=True,
            )
            thread.start()
            threads.append(thread)
        admin = CoordinatorClient(proxy.url, timeout=5.0)
        admin.enrol(secrets_["ops"])
        clients.append(admin)
        to_standby = CoordinatorClient(standby.url, timeout=5.0)
        to_standby.enrol(secrets_["ops-2"])  # enrolment and tokens work on a standby
        clients.append(to_standby)

        job = make_job(rounds=ROUNDS).to_dict() | {"job_id": "failover"}
        with pytest.raises(TransportError, match="503.*standby"):
            to_standby.submit_job(job, list(NAMES), {"round_deadline_seconds": 60})
        job_id = admin.submit_job(job, list(NAMES), {"round_deadline_seconds": 60})
        assert to_standby.job_status(job_id)["status"] in ("queued", "running")  # reads: fine

        while (record := state.job(job_id)).rounds_done < 3 and record.status == "running":
            time.sleep(0.01)
        assert record.status == "running"
        killed_at = time.perf_counter()
        if failure == "kill":
            leader.kill()
        else:
            proxy.backends.remove(leader.port)  # a load balancer's health check would
            os.kill(leader.process.pid, signal.SIGSTOP)  # by pid: the process this test started
        taken = None
        while (record := state.job(job_id)).status not in ("succeeded", "failed"):
            if taken is None and (LeaderLease(store, holder="observer").current().token == 2):
                taken = time.perf_counter() - killed_at
            assert time.perf_counter() - killed_at < 120, "the standby did not finish the job"
            time.sleep(0.02)
        finished = time.perf_counter() - killed_at
        if failure == "pause":
            os.kill(leader.process.pid, signal.SIGCONT)
            deadline = time.monotonic() + 30
            while "no longer the leader" not in leader.log.read_text():
                assert time.monotonic() < deadline, leader.log.read_text()
                time.sleep(0.05)
            time.sleep(1.0)  # time for a stale commit, were it possible
            assert leader.process.poll() is None  # alive, a standby now
    finally:
        stop.set()
        for client in clients:
            client.close()
        for thread in threads:
            thread.join(10)
        proxy.close()
        leader.stop()
        standby.stop()

    lease = LeaderLease(store, holder="observer").current()
    with store.begin() as conn:
        now = database_now(conn)
    record = CoordinatorState(store).job(job_id)  # as it is after the old leader woke up
    store.dispose()
    assert record.status == "succeeded", (record.error, standby.log.read_text())
    rounds = Counter(r["round"] for r in record.history)
    assert rounds == {r: 1 for r in range(1, ROUNDS + 1)}  # none lost, none twice
    assert len(record.resumes) == 1 and record.resumes[0]["from_round"] >= 3
    assert model_hash(record.result["model"]["parameters"]) == reference_hash
    assert lease.token == 2 and f"|{standby.process.pid}|" in lease.holder
    assert lease.expires_at <= now  # SIGTERM: released on the way out, no wait for a successor
    figures = {
        "failure": failure,
        "db": shared_db.split(":", 1)[0],
        "killed_after_rounds": record.resumes[0]["from_round"],
        "takeover_seconds": round(taken or 0.0, 2),
        "kill_to_finish_seconds": round(finished, 2),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(figures))
