"""``cdp-fl participant run`` takes part in secure aggregation: three participant runtimes
(:func:`run_participant`, each with its own store, connector, policy and relay key file) serve a
live coordinator on 127.0.0.1 (port 0); a job with ``secure_aggregation: true`` gives the plain
FedAvg model within fixed-point error, with masked inputs only and shares through the relay."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from cdp_federated.errors import ConfigError
from cdp_federated.federation.envelope import RelayKeyPair
from cdp_federated.jobs import JobSpec
from cdp_federated.participant.runner import ParticipantConfig, relay_keys, run_participant
from tests.runtime.conftest import start_service

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "localhost"
NAMES = ("eu-west", "us-east", "uk")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    out = tmp_path_factory.mktemp("secagg-stores")
    subprocess.run(
        [sys.executable, str(EXAMPLE / "prepare.py"), str(out), "--customers", "1500"],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    return out


def _config(name: str, stores: Path, work: Path, url: str, secret: str) -> ParticipantConfig:
    example = yaml.safe_load((EXAMPLE / f"participant-{name}.yaml").read_text())
    connector = {**example["connector"], "url": str(stores / f"{name}.sqlite")}
    return ParticipantConfig(
        participant_id=name,
        coordinator_url=url,
        enrolment_secret=secret,
        token_file=str(work / "tokens" / f"{name}.json"),
        store=str(stores / f"{name}.sqlite"),
        policy=str(ROOT / "policies" / "internal-regions.yaml"),
        audit_key=str(work / "keys" / f"{name}-audit.key"),
        consent_at=example["consent_at"],
        poll_wait_seconds=1.0,
        connector=connector,
        base_dir=str(work),
    )


def _job(job_id: str, **params) -> dict:
    example = yaml.safe_load((EXAMPLE / "job.yaml").read_text())
    return JobSpec(
        job_id=job_id,
        kind="horizontal",
        model="logreg",
        purpose=example["purpose"],
        features=tuple(example["features"]),
        label=example["label"],
        rounds=3,
        params={**example["params"], **params},
    ).to_dict()


def test_participant_runtime_serves_secure_aggregation(stores, tmp_path):
    live = start_service(f"sqlite:///{tmp_path / 'coordinator.sqlite'}", tmp_path / "keys")
    stop, threads, outcomes = threading.Event(), [], {}
    try:
        for name in NAMES:
            secret = live.coordinator.registry.create(name, "participant")
            config = _config(name, stores, tmp_path, live.base_url, secret)

            def serve(config=config):
                outcomes[config.participant_id] = run_participant(config, stop=stop)

            threads.append(threading.Thread(target=serve, daemon=True))
            threads[-1].start()
        admin = live.client("ops", role="admin")
        for name in NAMES:  # a job names enrolled participants only: wait for their tokens
            for _ in range(200):
                if (tmp_path / "tokens" / f"{name}.json").is_file():
                    break
                stop.wait(0.05)
        plain_id = admin.submit_job(_job("plain"), list(NAMES), {})
        plain = admin.job_status(plain_id, wait=60)
        secure_id = admin.submit_job(_job("secure", secure_aggregation=True), list(NAMES), {})
        secure = admin.job_status(secure_id, wait=60)
        models = [admin.job_model(j)["parameters"] for j in (plain_id, secure_id)]
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        live.close()
    assert plain["status"] == "succeeded", plain
    assert secure["status"] == "succeeded", secure
    np.testing.assert_allclose(np.array(models[1]), np.array(models[0]), atol=1e-6)
    assert abs(secure["metrics"]["auc"] - plain["metrics"]["auc"]) < 1e-3
    assert [r["participants"] for r in secure["history"]] == [sorted(NAMES)] * 3
    for name in NAMES:  # each runtime created its relay key (0600) next to its token file
        key = tmp_path / "tokens" / f"{name}-relay.pem"
        assert key.is_file() and key.stat().st_mode & 0o777 == 0o600
        assert outcomes[name]["failures"] == 0


def test_relay_key_is_created_once_and_then_reused(tmp_path):
    path = tmp_path / "keys" / "a-relay.pem"
    first = relay_keys(path)
    assert relay_keys(path).public_bytes() == first.public_bytes()
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError) as info:
        relay_keys(path)  # readable by others: refused, never silently replaced
    assert info.value.field == "relay_key"
    assert isinstance(first, RelayKeyPair)


def test_relay_key_path_defaults_next_to_the_token_file(tmp_path):
    config = ParticipantConfig(
        participant_id="eu",
        coordinator_url="http://127.0.0.1:1",
        token_file="tokens/eu.json",
        store="eu.sqlite",
        connector={"type": "csv", "path": "eu.csv"},
        policy="p.yaml",
        audit_key="keys/eu-audit.key",
        base_dir=str(tmp_path),
    )
    assert config.relay_key_path() == tmp_path / "tokens" / "eu-relay.pem"
    moved = config.model_copy(update={"relay_key": "secrets/relay.pem"})
    assert moved.relay_key_path() == tmp_path / "secrets" / "relay.pem"
