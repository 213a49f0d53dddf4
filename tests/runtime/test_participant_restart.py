"""Participant kill/restart matrix (slow): one participant, ``uk``, runs as a real
``cdp-fl participant run`` process (its own store, SQL connector, policy, token and relay key
files, from ``examples/localhost``) against a live coordinator on 127.0.0.1; the two others run
the same runtime (:func:`run_participant`) on threads. The coordinator (in this process) SIGKILLs
``uk`` at a chosen point of a job, the test restarts it at once with the same config, and the job
must either end with the uninterrupted run's model or fail with a typed error naming ``uk``,
within the deadline plus 5 s, with every round committed once and no task answered twice.

Kill points, counted in ``uk``'s tasks of the job (``stage``, ``nth``):
- ``polling``: after its nth reply of the stage, while its next long-poll waits (the others'
  replies are held back 1.5 s so that nothing is queued for it meanwhile);
- ``received``: the nth task of the stage was handed to it (delivery counted) and it is killed
  before the answer leaves the coordinator, so it never replies (at-least-once delivery: the
  restarted process gets the task again);
- ``replied``: its nth reply of the stage was stored, before the acknowledgement reaches it.

``-s`` prints the matrix as JSON lines (docs/runtime.md, "Participant restarts")."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from sqlalchemy import func, select

from cdp_federated.coordinator.schema import results, tasks
from cdp_federated.jobs import JobSpec
from cdp_federated.participant.runner import ParticipantConfig, run_participant
from tests.runtime.conftest import start_service
from tests.runtime.test_resume_kill import CDP_FL

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "localhost"
NAMES = ("eu-west", "uk", "us-east")
VICTIM = "uk"
DEADLINE = 30.0
ROUNDS = 4


def _settings(name: str, stores: Path, work: Path, url: str, secret: str) -> dict:
    example = yaml.safe_load((EXAMPLE / f"participant-{name}.yaml").read_text())
    return {
        "participant_id": name,
        "coordinator_url": url,
        "enrolment_secret": secret,
        "token_file": str(work / "tokens" / f"{name}.json"),
        "store": str(stores / f"{name}.sqlite"),
        "policy": str(ROOT / "policies" / "internal-regions.yaml"),
        "audit_key": str(work / "keys" / f"{name}-audit.key"),
        "consent_at": example["consent_at"],
        "poll_wait_seconds": 1.0,
        "connector": {**example["connector"], "url": str(stores / f"{name}.sqlite")},
        "base_dir": str(work),
    }


def _job(job_id: str, kind: str) -> dict:
    example = yaml.safe_load((EXAMPLE / "job.yaml").read_text())
    params = dict(example["params"])
    model, rounds = "logreg", ROUNDS
    if kind == "secagg":
        params["secure_aggregation"] = True
    elif kind in ("gbm", "gbm-secagg"):
        model, rounds = "gbm", 3
        params |= {"max_depth": 2, "max_bins": 8, "learning_rate": 0.3, "seed": 5}
        if kind == "gbm-secagg":
            params["secure_aggregation"] = True
    return JobSpec(
        job_id=job_id,
        kind="horizontal",
        model=model,
        purpose=example["purpose"],
        features=tuple(example["features"]),
        label=example["label"],
        rounds=rounds,
        params=params,
    ).to_dict()


def model_hash(result: dict) -> str:
    model = result["model"]
    if "parameters" in model:
        data = np.asarray(model["parameters"], dtype=np.float64).tobytes()
    else:
        data = json.dumps(model["estimator"], sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


class Victim:
    """``cdp-fl participant run`` for ``uk``: started, SIGKILLed (by pid) and restarted."""

    def __init__(self, config: Path, work: Path) -> None:
        self.config, self.work = config, work
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self.lock = threading.Lock()

    def start(self) -> None:
        with (self.work / f"uk-{self.starts}.log").open("w") as log:
            self.process = subprocess.Popen(
                [str(CDP_FL), "participant", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work,
            )
        self.starts += 1

    def kill(self) -> None:
        with self.lock:
            if self.process is not None and self.process.poll() is None:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Trigger:
    """Where to kill ``uk`` in job ``job_id`` (see the module docstring)."""

    job_id: str
    kind: str  # polling | received | replied
    stage: str
    nth: int
    delivered: int = 0
    replied: int = 0
    holding: bool = False  # polling: hold the others' next replies back
    fired_at: float | None = None
    where: str = ""


class KillSwitch:
    """Wraps the live coordinator's state: counts ``uk``'s tasks of the armed job and kills it
    at the trigger."""

    def __init__(self, state, victim: Victim) -> None:
        self.state, self.victim = state, victim
        self.next_task, self.submit_result = state.next_task, state.submit_result
        self.trigger: Trigger | None = None
        self.fired = threading.Event()
        state.next_task = self._next_task
        state.submit_result = self._submit_result

    def arm(self, trigger: Trigger) -> None:
        self.fired.clear()
        self.trigger = trigger

    def _fire(self, where: str) -> None:
        trigger = self.trigger
        if trigger is None or trigger.fired_at is not None:
            return
        self.victim.kill()
        trigger.fired_at, trigger.where = time.perf_counter(), where
        trigger.holding = False
        self.fired.set()

    def _next_task(self, participant_id, **kwargs):
        trigger = self.trigger
        waiting = None
        if participant_id == VICTIM and trigger is not None and trigger.holding:
            waiting = threading.Timer(0.15, self._fire, args=("in its next long-poll",))
            waiting.start()
        task = self.next_task(participant_id, **kwargs)
        if waiting is not None:
            waiting.cancel()
        trigger = self.trigger  # armed while this long-poll waited, perhaps
        if (
            task is not None
            and participant_id == VICTIM
            and trigger is not None
            and trigger.fired_at is None
            and task.job_id == trigger.job_id
            and task.stage == trigger.stage
        ):
            trigger.delivered += 1
            if trigger.kind == "received" and trigger.delivered == trigger.nth:
                self._fire(f"{task.stage} task #{trigger.nth} received (round {task.round})")
        return task

    def _submit_result(self, participant_id, task_id, reply, **kwargs):
        trigger = self.trigger
        task = self.state.task(task_id) if trigger is not None else None
        mine = task is not None and task.job_id == trigger.job_id
        if mine and participant_id != VICTIM and trigger.holding:
            time.sleep(1.5)  # a slow peer: nothing new for uk while it polls
        ack = self.submit_result(participant_id, task_id, reply, **kwargs)
        if mine and participant_id == VICTIM and task.stage == trigger.stage:
            trigger.replied += 1
            if trigger.replied == trigger.nth and trigger.fired_at is None:
                if trigger.kind == "replied":
                    self._fire(f"{task.stage} reply #{trigger.nth} stored (round {task.round})")
                elif trigger.kind == "polling":
                    trigger.holding = True
        return ack


class Matrix:
    """The live federation the cases share."""

    def __init__(self, stores: Path, work: Path) -> None:
        self.work = work
        self.live = start_service(f"sqlite:///{work / 'coordinator.sqlite'}", work / "keys")
        coordinator = self.live.coordinator
        secrets_ = {n: coordinator.registry.create(n, "participant") for n in NAMES}
        victim_yaml = work / "uk.yaml"
        victim_yaml.write_text(
            yaml.safe_dump(_settings(VICTIM, stores, work, self.live.base_url, secrets_[VICTIM]))
        )
        self.victim = Victim(victim_yaml, work)
        self.victim.start()
        self.stop = threading.Event()
        self.threads = []
        for name in NAMES:
            if name == VICTIM:
                continue
            config = ParticipantConfig(
                **_settings(name, stores, work, self.live.base_url, secrets_[name])
            )
            thread = threading.Thread(
                target=run_participant, args=(config,), kwargs={"stop": self.stop}, daemon=True
            )
            thread.start()
            self.threads.append(thread)
        for name in NAMES:  # a job names enrolled participants only
            deadline = time.monotonic() + 120
            while not (work / "tokens" / f"{name}.json").is_file():
                assert time.monotonic() < deadline, f"{name} did not enrol"
                time.sleep(0.05)
        self.admin = self.live.client("ops", role="admin")
        self.switch = KillSwitch(coordinator.state, self.victim)
        self.references: dict[str, dict] = {}

    def run(self, job_id: str, kind: str, options: dict | None = None) -> dict:
        submitted = self.admin.submit_job(
            _job(job_id, kind), list(NAMES), {"round_deadline_seconds": DEADLINE, **(options or {})}
        )
        return self.admin.job_status(submitted, wait=0)

    def wait(self, job_id: str, timeout: float) -> dict:
        end = time.monotonic() + timeout
        while True:
            status = self.admin.job_status(job_id, wait=min(5.0, max(0.1, end - time.monotonic())))
            if status["status"] in ("succeeded", "failed") or time.monotonic() > end:
                return status

    def result(self, job_id: str) -> dict:
        return self.live.coordinator.state.job(job_id).result or {}

    def answers_per_task(self, job_id: str) -> tuple[int, dict[str, int]]:
        """The most results any one task of the job has, and uk's tasks per stage."""
        store = self.live.coordinator.store
        with store.begin() as conn:
            most = conn.execute(
                select(func.count())
                .select_from(results)
                .where(results.c.job_id == job_id)
                .group_by(results.c.task_id)
                .order_by(func.count().desc())
                .limit(1)
            ).scalar()
            stages = conn.execute(
                select(tasks.c.stage).where(
                    tasks.c.job_id == job_id, tasks.c.participant_id == VICTIM
                )
            ).scalars()
            return int(most or 0), dict(Counter(stages))

    def close(self) -> None:
        self.stop.set()
        self.victim.stop()
        for thread in self.threads:
            thread.join(15)
        self.live.close()


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    stores = tmp_path_factory.mktemp("restart-stores")
    subprocess.run(
        [sys.executable, str(EXAMPLE / "prepare.py"), str(stores), "--customers", "1500"],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    federation = Matrix(stores, tmp_path_factory.mktemp("restart-work"))
    try:
        for kind, options in (
            ("logreg", {}),
            ("gbm", {}),
            ("gbm-secagg", {}),
            ("secagg", {"min_participants": 2}),
        ):
            status = federation.wait(
                federation.run(f"reference-{kind}", kind, options)["job_id"], 180
            )
            assert status["status"] == "succeeded", status.get("error")
            federation.references[kind] = federation.result(f"reference-{kind}")
        yield federation
    finally:
        federation.close()


# (kind of job, kill point, stage, nth, job options, expected outcome)
CASES = [
    ("logreg", "polling", "fit", 2, {}, "same-model"),
    ("logreg", "received", "stats", 1, {}, "same-model"),
    ("logreg", "received", "fit", 2, {}, "same-model"),
    ("logreg", "replied", "fit", 2, {}, "same-model"),
    ("logreg", "received", "evaluate", 1, {}, "same-model"),
    ("logreg", "replied", "evaluate", 1, {}, "same-model"),
    ("secagg", "received", "secagg", 5, {"min_participants": 2}, "same-model"),
    ("secagg", "replied", "secagg", 6, {"min_participants": 2}, "dropped-one-round"),
    ("secagg", "replied", "secagg", 6, {}, "typed-failure"),
    ("gbm", "received", "gbm_sketch", 1, {}, "same-model"),
    # a restarted GBM participant answers SetupRequiredError and is caught up (gbm_catch_up)
    ("gbm", "polling", "gbm_histogram", 2, {}, "same-model"),
    ("gbm", "received", "gbm_histogram", 3, {}, "same-model"),
    ("gbm", "replied", "gbm_histogram", 3, {}, "same-model"),
    ("gbm", "received", "gbm_evaluate", 1, {}, "same-model"),
    # GBM over secure aggregation: 4 secagg tasks per level (advertise, share, mask, unmask)
    ("gbm-secagg", "polling", "secagg", 4, {}, "same-model"),  # between levels: caught up
    # inside a level's session: it aborts before unmasking, the party is caught up, level rerun
    ("gbm-secagg", "replied", "secagg", 2, {}, "same-model"),
]


@pytest.mark.parametrize(
    ("kind", "point", "stage", "nth", "options", "expected"),
    CASES,
    ids=[f"{c[0]}-{c[1]}-{c[2]}{c[3]}{'-min2' if c[4] else ''}" for c in CASES],
)
def test_participant_killed_and_restarted(matrix, kind, point, stage, nth, options, expected):
    job_id = f"{kind}-{point}-{stage}-{nth}-{len(options)}"
    trigger = Trigger(job_id, point, stage, nth)
    matrix.switch.arm(trigger)
    matrix.run(job_id, kind, options)
    assert matrix.switch.fired.wait(120), f"the kill point was never reached: {trigger}"
    matrix.victim.start()  # restarted at once, same config (token and relay key files)
    status = matrix.wait(job_id, 240)
    ended = time.perf_counter()
    matrix.switch.trigger = None
    most, uk_tasks = matrix.answers_per_task(job_id)
    result = matrix.result(job_id)
    reference = matrix.references[kind]
    same = bool(result) and model_hash(result) == model_hash(reference)
    same_metrics = bool(result) and result["metrics"] == reference["metrics"]
    failed_rounds = {r["round"]: r["failed"] for r in status["history"] if r.get("failed")}
    row = {
        "job": kind + (" min2" if options else ""),
        "kill": f"{point} {stage} #{nth}",
        "where": trigger.where,
        "status": status["status"],
        "same_model": same,
        "same_metrics": same_metrics,
        "error": (status.get("error") or {}).get("error"),
        "message": (status.get("error") or {}).get("message", "")[:160],
        "rounds_with_failures": failed_rounds,
        "kill_to_end_s": round(ended - trigger.fired_at, 1),
        "uk_tasks": uk_tasks,
        "max_results_per_task": most,
    }
    print(json.dumps(row))

    assert status["status"] in ("succeeded", "failed"), row  # never hangs
    assert ended - trigger.fired_at <= DEADLINE + 5 + 60, row
    assert most <= 1, row  # no task answered twice
    rounds = Counter(r["round"] for r in status["history"])
    assert all(n == 1 for n in rounds.values()), row  # no round committed twice
    if expected == "same-model":
        assert status["status"] == "succeeded" and same and same_metrics, row
        assert not failed_rounds, row
    elif expected == "dropped-one-round":
        assert status["status"] == "succeeded", row
        assert list(failed_rounds.values()) == [[VICTIM]], row
    else:
        assert status["status"] == "failed", row
        assert row["error"] in ("TrainingError", "SecureAggregationAborted"), row
        assert VICTIM in status["error"]["message"], row
