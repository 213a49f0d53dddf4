"""A vertical job through the coordinator service: two participant runtimes
(:func:`run_participant`, each with its own CSV, store, consent ledger and policy) serve a live
coordinator on 127.0.0.1 (port 0). The shop holds raw emails, basket features and the label; the
brand only SHA-256-hashed emails and its own features; their customers overlap partly, in
different orders. The job aligns them by PSI over the relay, trains SecureBoost and scores the
held-out customers cooperatively.

Checked: the model equals the in-process parties' on the same rows (trees identical, same AUC);
the coordinator never sees an identifier, feature value, label, threshold or plaintext gradient
(every body it received or sent and every row of its database); a passive party dying mid-job
fails the job within the deadline + 5 s, naming it, with no model part saved anywhere; a passive
party holding the label column refuses the job (policy reason, audited locally)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from sqlalchemy import MetaData, select

from cdp_federated.crypto import generate_keypair
from cdp_federated.errors import CodecError
from cdp_federated.federation.envelope import RELAY_CODEC, RelayEnvelope
from cdp_federated.governance.audit import JOB_REFUSED, AuditLog
from cdp_federated.identity.psi_relay import PSI_CODEC
from cdp_federated.jobs import JobSpec
from cdp_federated.learning.vertical import (
    VERTICAL_CODEC,
    ActiveParty,
    InProcessChannel,
    PassiveParty,
)
from cdp_federated.learning.vertical.encoding import encode_fixed
from cdp_federated.learning.vertical.messages import SBHistogramRequest, SBSplitResult
from cdp_federated.participant.runner import ParticipantConfig, run_participant
from cdp_federated.participant.vertical_tasks import held_out, psi_ids
from cdp_federated.store import open_store
from cdp_federated.vertical_job import VerticalJob
from tests.runtime.test_relay_http import start

pytest.importorskip("heu")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "vertical"
NAMES = ("brand", "shop")
CUSTOMERS = 300


def _prepare(out: Path, **kwargs) -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location("vertical_prepare", EXAMPLE / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.prepare(out, customers=CUSTOMERS, seed=7, **kwargs)
    return out


def _config(name: str, data: Path, work: Path, url: str, secret: str) -> ParticipantConfig:
    example = yaml.safe_load((EXAMPLE / f"participant-{name}.yaml").read_text())
    return ParticipantConfig(
        participant_id=name,
        coordinator_url=url,
        enrolment_secret=secret,
        token_file=str(work / "tokens" / f"{name}.json"),
        store=str(data / f"{name}.sqlite"),
        policy=str(EXAMPLE / "policy.yaml"),
        audit_key=str(work / "audit" / f"{name}-audit.key"),
        consent_at=example["consent_at"],
        poll_wait_seconds=0.5,
        connector={**example["connector"], "path": str(data / f"{name}.csv")},
        base_dir=str(work),
    )


def _job(job_id: str, **params) -> tuple[dict, list[str], dict]:
    example = yaml.safe_load((EXAMPLE / "job.yaml").read_text())
    participants = example.pop("participants")
    options = example.pop("options")
    example["params"] |= {"key_bits": 1024, "insecure_keys": True, "reply_timeout_seconds": 30}
    example["params"] |= params
    return {**example, "job_id": job_id, "rounds": 3}, participants, options


class Federation:
    """The live coordinator (with its wire recorder) and one runtime thread per party."""

    def __init__(self, tmp_path: Path, data: Path) -> None:
        self.live, self.wire = start(
            f"sqlite:///{tmp_path / 'coordinator.sqlite'}", tmp_path / "keys"
        )
        self.work = tmp_path
        self.stops = {name: threading.Event() for name in NAMES}
        self.threads: list[threading.Thread] = []
        for name in NAMES:
            secret = self.live.coordinator.registry.create(name, "participant")
            config = _config(name, data, tmp_path, self.live.base_url, secret)
            thread = threading.Thread(
                target=run_participant,
                args=(config,),
                kwargs={"stop": self.stops[name]},
                name=f"runtime-{name}",
                daemon=True,
            )
            thread.start()
            self.threads.append(thread)
        self.admin = self.live.client("ops", role="admin")
        for name in NAMES:  # a job names enrolled participants only: wait for their tokens
            for _ in range(200):
                if (tmp_path / "tokens" / f"{name}.json").is_file():
                    break
                time.sleep(0.05)

    def run(self, job_id: str, timeout: float = 120, **params) -> dict:
        job, participants, options = _job(job_id, **params)
        self.admin.submit_job(job, participants, options)
        return self.wait(job_id, timeout)

    def wait(self, job_id: str, timeout: float) -> dict:
        end = time.monotonic() + timeout
        status = self.admin.job_status(job_id)
        while status["status"] not in ("succeeded", "failed") and time.monotonic() < end:
            status = self.admin.job_status(job_id, wait=5)
        return status

    def parts(self, name: str) -> list[dict]:
        folder = self.work / "tokens" / f"{name}-models"
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*/model.json"))]

    def close(self) -> None:
        for stop in self.stops.values():
            stop.set()
        for thread in self.threads:
            thread.join(10)
        self.live.close()


@pytest.fixture
def federation(tmp_path):
    fed = Federation(tmp_path, _prepare(tmp_path / "data"))
    try:
        yield fed
    finally:
        fed.close()


# --- the in-process reference ----------------------------------------------------------------------


def reference(data: Path, job: dict):
    """The parties' training and held-out rows joined in the clear (what no party can do),
    and the in-process SecureBoost model on them with the job's parameters."""
    vjob = VerticalJob.from_spec(JobSpec.from_dict(job))
    shop = pl.read_csv(data / "shop.csv", schema_overrides={"email": pl.String})
    brand = pl.read_csv(data / "brand.csv")
    shop = shop.with_columns(
        psi_ids(shop["email"], key_format="raw", kind="email", scheme="uid2", region=None).alias(
            "key"
        )
    )
    brand = brand.with_columns(
        psi_ids(
            brand["email_sha256"], key_format="sha256_hex", kind="email", scheme="uid2", region=None
        ).alias("key")
    )
    joined = shop.join(brand, on="key", how="inner")
    test = held_out(joined["key"], vjob.test_fraction, vjob.split_salt)
    xa = joined.select(vjob.parties["shop"].features).to_numpy().astype(float)
    xb = joined.select(vjob.parties["brand"].features).to_numpy().astype(float)
    y = joined["purchased"].to_numpy().astype(float)
    keys = generate_keypair("paillier", 1024, insecure=True)
    passive = PassiveParty("brand", xb[~test], allow_insecure_keys=True)
    channel = InProcessChannel({"brand": passive}, active="shop")
    active = ActiveParty("shop", xa[~test], y[~test], vjob.secureboost_params(), keys)
    model = active.fit(channel, ["brand"])
    passive.set_scoring_features(xb[test])
    margin = active.decision_function(xa[test], channel, ["brand"])
    return joined, test, model, passive, margin, channel.log, (xa, xb, y)


def resolved_reference(model, passive, features):
    out = []
    for tree in model.trees:
        splits = {}
        for node, s in tree.splits.items():
            table = model.own_splits if s.owner == "shop" else passive.records
            f, t = table[s.ref]
            splits[node] = (s.owner, features[s.owner][f], t)
        out.append((splits, tree.leaves))
    return out


def resolved_parts(active: dict, passive: dict):
    own = {"shop": active["model"]["own_splits"], "brand": passive["model"]["records"]}
    names = {"shop": active["model"]["feature_names"], "brand": passive["model"]["feature_names"]}
    out = []
    for tree in active["model"]["trees"]:
        splits = {}
        for node, s in tree["splits"].items():
            f, t = own[s["owner"]][s["ref"]]
            splits[int(node)] = (s["owner"], names[s["owner"]][f], t)
        out.append((splits, {int(k): v for k, v in tree["leaves"].items()}))
    return out


# --- the tests ----------------------------------------------------------------------------------------


def test_vertical_job_through_the_service_matches_in_process_and_hides_everything(
    federation, tmp_path
):
    status = federation.run("vertical-ok")
    assert status["status"] == "succeeded", status
    metrics = status["metrics"]
    job, _, _ = _job("vertical-ok")
    joined, test, model, passive, margin, log, (xa, xb, y) = reference(tmp_path / "data", job)

    # alignment: every customer in both files (70% of them), whatever the id format
    assert metrics["intersection_size"] == joined.height == int(0.7 * CUSTOMERS)
    assert metrics["test_rows"] == int(test.sum()) and metrics["train_rows"] == int((~test).sum())
    assert [r["round"] for r in status["history"]] == [1, 2, 3]

    # the model: each party kept its part; together they are the in-process model
    (active_doc,), (passive_doc,) = federation.parts("shop"), federation.parts("brand")
    assert active_doc["model"]["role"] == "active" and passive_doc["model"]["role"] == "passive"
    assert "trees" not in passive_doc["model"] and "records" not in active_doc["model"]
    features = {"shop": ["age", "visits", "basket_value"], "brand": ["affinity", "brand_visits"]}
    assert resolved_parts(active_doc, passive_doc) == resolved_reference(model, passive, features)
    from sklearn.metrics import roc_auc_score

    assert metrics["auc"] == round(float(roc_auc_score(y[test], margin)), 6)
    assert metrics["auc"] > 0.7
    parts = federation.admin.job_model("vertical-ok")["parts"]
    assert parts["shop"]["model_id"] == active_doc["model_id"]
    assert parts["brand"]["model_id"] == passive_doc["model_id"]

    # the wire: the coordinator relayed sealed envelopes only...
    wire = federation.wire.bodies
    posted = [body for kind, path, body in wire if kind == "in" and "/relay/" in path]
    assert len(posted) > 3 * 4  # PSI, gradients, histograms, splits, scoring
    for body in posted:
        assert isinstance(RELAY_CODEC.decode(body), RelayEnvelope)
        for codec in (VERTICAL_CODEC, PSI_CODEC):
            with pytest.raises(CodecError):
                codec.decode(body)
    # ...and no identifier, feature value, label, threshold, gradient or row partition appears
    # in any body or any row of its database
    needles = _needles(tmp_path / "data", joined, test, model, passive, log, (xa, xb, y))
    frames = [VERTICAL_CODEC.encode(m) for _, _, m in log]
    assert all(any(n in f for f in frames) for n in needles["protocol"])  # control
    haystacks = [body for _, _, body in wire] + _database_rows(federation)
    for group, values in needles.items():
        for needle in values:
            assert not any(needle in h for h in haystacks), group


def _needles(data, joined, test, model, passive, log, arrays) -> dict[str, list[bytes]]:
    xa, xb, y = arrays
    shop = pl.read_csv(data / "shop.csv", schema_overrides={"email": pl.String})
    brand = pl.read_csv(data / "brand.csv")
    ids = [e.strip().encode() for e in shop["email"].to_list()]
    ids += [e.strip().lower().encode() for e in shop["email"].to_list()]
    ids += [h.encode() for h in brand["email_sha256"].to_list()]
    ids += [k.encode() for k in joined["key"].to_list()]
    train = ~test

    def runs(matrix):
        return [np.ascontiguousarray(matrix[:8, j]).tobytes() for j in range(matrix.shape[1])]

    features = runs(xa[train]) + runs(xb[train]) + runs(xa) + runs(xb)
    features += runs(shop.select("age", "visits", "basket_value").to_numpy().astype(float))
    labels = [y[train].tobytes()[:64], np.packbits(y[train].astype(bool)).tobytes()[:12]]
    thresholds = [np.float64(t).tobytes() for _, t in passive.records]
    thresholds += [np.float64(t).tobytes() for _, t in model.own_splits]
    prob = 1 / (1 + np.exp(-model.base_margin))
    gradients = [encode_fixed(prob - y[train], 24).astype(np.int64).tobytes()[:64]]
    gradients.append((prob - y[train]).tobytes()[:64])
    protocol = []  # row partitions and split results, as the parties exchange them in the clear
    for _, _, m in log:
        if isinstance(m, SBHistogramRequest) and m.level > 0:
            protocol.append(VERTICAL_CODEC.encode(m)[-48:])
        if isinstance(m, SBSplitResult):
            protocol.append(VERTICAL_CODEC.encode(m)[-24:])
    return {
        "identifiers": ids,
        "features": features,
        "labels": labels,
        "thresholds": thresholds,
        "gradients": gradients,
        "protocol": protocol,
    }


def _database_rows(federation) -> list[bytes]:
    """Every row of every table of the coordinator's database, as bytes."""
    engine = federation.live.coordinator.store.engine
    meta = MetaData()
    meta.reflect(engine)
    out = []
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(select(table)):
                for value in row:
                    if isinstance(value, bytes | bytearray | memoryview):
                        out.append(bytes(value))
                    elif value is not None:
                        out.append(str(value).encode())
    return out


def test_a_passive_party_dying_mid_job_fails_it_cleanly(federation, monkeypatch):
    deadline = 3.0
    killed_at: list[float] = []
    release = threading.Event()
    original = PassiveParty.handle

    def dies(self, message):
        # the brand's process "dies" in tree 2: its task loop stops and its protocol hangs
        if isinstance(message, SBHistogramRequest) and message.tree == 1 and not killed_at:
            killed_at.append(time.monotonic())
            federation.stops["brand"].set()
            release.wait(60)
            raise RuntimeError("killed")
        return original(self, message)

    monkeypatch.setattr(PassiveParty, "handle", dies)
    job, participants, options = _job("vertical-kill")
    federation.admin.submit_job(job, participants, {"round_deadline_seconds": deadline})
    try:
        status = federation.wait("vertical-kill", 60)
        failed_at = time.monotonic()
    finally:
        release.set()
    assert killed_at, "the passive party never reached tree 2"
    assert status["status"] == "failed", status
    assert "brand" in status["error"]["value"], status["error"]
    assert "brand" in status["error"]["message"]
    assert failed_at - killed_at[0] <= deadline + 5
    assert status["rounds_done"] < 3
    with pytest.raises(Exception) as info:  # 409: no model
        federation.admin.job_model("vertical-kill")
    assert "no model" in str(info.value)
    assert federation.parts("shop") == [] and federation.parts("brand") == []
    # the shop's protocol thread stopped too (the relay closed with the job)
    end = time.monotonic() + 10
    while time.monotonic() < end and _alive("vertical-vertical-kill"):
        time.sleep(0.2)
    assert not _alive("vertical-vertical-kill")


def _alive(thread_name: str) -> bool:
    return any(t.name == thread_name and t.is_alive() for t in threading.enumerate())


def test_a_passive_party_holding_the_label_refuses_the_job(tmp_path):
    data = _prepare(tmp_path / "data", label_at_brand=True)
    federation = Federation(tmp_path, data)
    try:
        status = federation.run("vertical-label", timeout=60)
    finally:
        federation.close()
    assert status["status"] == "failed", status
    error = status["error"]
    assert error["error"] == "PolicyViolation", error
    assert "brand" in error["message"] and "label" in error["message"]
    assert federation.parts("shop") == [] and federation.parts("brand") == []
    store = open_store(f"sqlite:///{data / 'brand.sqlite'}", create=False)
    try:
        audit = AuditLog.open(store, key_path=tmp_path / "audit" / "brand-audit.key")
        refused = [e.payload for e in audit.entries(kind=JOB_REFUSED)]
    finally:
        store.dispose()
    assert any("vertical.label" in json.dumps(p) for p in refused), refused


def test_vertical_logistic_regression_through_the_service(federation):
    job, participants, options = _job("vertical-lr", learning_rate=0.5)
    job["model"] = "logreg"
    for name in ("max_depth", "max_bins"):
        del job["params"][name]
    federation.admin.submit_job(job, participants, options)
    status = federation.wait("vertical-lr", 120)
    assert status["status"] == "succeeded", status
    assert status["metrics"]["model"] == "logreg" and status["metrics"]["auc"] > 0.7
    assert [r["round"] for r in status["history"]] == [1, 2, 3]  # epochs
    (active,), (passive,) = federation.parts("shop"), federation.parts("brand")
    assert len(active["model"]["coef"]) == 3 and "intercept" in active["model"]
    assert len(passive["model"]["coef"]) == 2 and "intercept" not in passive["model"]
