"""The pieces of a vertical job through the service, without HTTP: the job spec's checks, PSI
between separate parties over a relay, identifier formats and the held-out split."""

from __future__ import annotations

import base64
import hashlib
import threading

import numpy as np
import polars as pl
import pytest
import yaml

from cdp_federated.coordinator.jobs import job_from_dict
from cdp_federated.coordinator.vertical_runner import check_vertical_participants
from cdp_federated.errors import ConfigError, ProtocolError
from cdp_federated.federation.envelope import RelayKeyPair
from cdp_federated.federation.relay import InProcessRelay
from cdp_federated.identity.psi_relay import PSI_CODEC, align_as_label, align_as_passive
from cdp_federated.jobs import JobSpec
from cdp_federated.participant.vertical_tasks import held_out, psi_ids
from cdp_federated.vertical_job import VerticalJob


def job(**params) -> dict:
    base = {
        "active": "shop",
        "parties": {"shop": {"features": ["age"]}, "brand": {"features": ["affinity"]}},
        "max_depth": 3,
    }
    return {
        "job_id": "v1",
        "kind": "vertical",
        "model": "secureboost",
        "purpose": "model_training",
        "features": ["age", "affinity"],
        "label": "purchased",
        "rounds": 3,
        "params": base | params,
    }


def test_a_vertical_spec_is_read_with_its_roles_and_defaults():
    spec = job_from_dict(job(he="ou", test_fraction=0.25))
    vjob = VerticalJob.from_spec(spec)
    assert (vjob.active, vjob.passives, vjob.role("brand")) == ("shop", ["brand"], "passive")
    assert (vjob.align, vjob.he, vjob.key_bits, vjob.test_fraction) == ("psi", "ou", 2048, 0.25)
    assert vjob.secureboost_params().n_trees == 3 and vjob.secureboost_params().max_depth == 3
    assert vjob.local_spec("brand").features == ("affinity",)
    body = job(learning_rate=0.1) | {"model": "vertical_logreg"}
    del body["params"]["max_depth"]  # a tree parameter: refused for logistic regression
    logreg = VerticalJob.from_spec(JobSpec.from_dict(body))
    assert logreg.model == "logreg" and logreg.logreg_params().epochs == 3


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (
            {"params": {"active": "shop", "parties": {"shop": {"features": ["age"]}}}},
            "job.features",
        ),
        ({"features": ["age", "affinity", "purchased"]}, "job.features"),
        ({"label": "affinity"}, "job.label"),
        ({"model": "gbm"}, "job.kind"),
    ],
)
def test_a_bad_vertical_job_is_refused_at_submission(change, field):
    with pytest.raises(ConfigError) as info:
        job_from_dict(job() | change)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"align": "salted-hash"}, "params.align"),
        ({"key_bits": 1024}, "params.key_bits"),
        ({"he": "ckks"}, "params.he"),
        ({"active": "media"}, "params.active"),
        ({"max_depth": 40}, "params.max_depth"),
        ({"C": 1.0}, "params.C"),
        ({"test_fraction": 1.0}, "params.test_fraction"),
        ({"parties": {"shop": {"features": ["age"]}, "brand": {"features": []}}}, "params.parties"),
    ],
)
def test_bad_vertical_parameters_name_their_field(params, field):
    body = job(**params)
    if not body["params"]["parties"]["brand"]["features"]:
        body["features"] = ["age"]
    with pytest.raises(ConfigError) as info:
        job_from_dict(body)
    assert info.value.field == field


def test_the_participants_must_be_exactly_the_parties():
    spec = job_from_dict(job())
    check_vertical_participants(spec, ["brand", "shop"])
    with pytest.raises(ConfigError, match="exactly its parties"):
        check_vertical_participants(spec, ["brand", "shop", "media"])
    with pytest.raises(ConfigError, match="min_participants"):
        check_vertical_participants(spec, ["brand", "shop"], min_participants=1)


def test_raw_and_hashed_emails_meet_as_one_psi_input():
    emails = pl.Series(["Ann@Example.com", "bob@example.com", "not an email", None])
    digests = [hashlib.sha256(e.lower().encode()).digest() for e in emails[:2]]
    raw = psi_ids(emails, key_format="raw", kind="email", scheme="uid2", region=None)
    hexed = psi_ids(
        pl.Series([d.hex().upper() for d in digests] + ["xyz", None]),
        key_format="sha256_hex",
        kind="email",
        scheme="uid2",
        region=None,
    )
    b64 = psi_ids(
        pl.Series([base64.b64encode(d).decode() for d in digests] + ["!!", None]),
        key_format="sha256_b64",
        kind="email",
        scheme="uid2",
        region=None,
    )
    assert raw.to_list() == hexed.to_list() == b64.to_list()
    assert raw.to_list()[:2] == [d.hex() for d in digests] and raw.to_list()[2:] == [None, None]


def test_the_held_out_split_is_deterministic_and_salted():
    ids = pl.Series([f"id{i}" for i in range(4000)])
    mask = held_out(ids, 0.2, "")
    assert 0.17 < mask.mean() < 0.23
    np.testing.assert_array_equal(mask, held_out(ids.reverse(), 0.2, "")[::-1])
    assert not np.array_equal(mask, held_out(ids, 0.2, "other"))
    assert not held_out(ids, 0.0, "").any()


def _channels(names):
    relay = InProcessRelay(names)
    return relay, {n: relay.channel(n, RelayKeyPair.generate(), codec=PSI_CODEC) for n in names}


def test_psi_between_separate_parties_over_the_relay_aligns_the_common_customers():
    shop = [f"c{i}" for i in range(0, 80)]
    brand = [f"c{i}" for i in range(20, 100)][::-1]
    media = [f"c{i}" for i in range(10, 70)]
    relay, channels = _channels(["shop", "brand", "media"])
    results, errors = {}, []

    def passive(name, ids):
        try:
            results[name] = align_as_passive(
                channels[name], ids, "shop", job_id="job-1", timeout=20
            )
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [
        threading.Thread(target=passive, args=(n, ids), daemon=True)
        for n, ids in (("brand", brand), ("media", media))
    ]
    for t in threads:
        t.start()
    label = align_as_label(channels["shop"], shop, ["brand", "media"], job_id="job-1", timeout=20)
    for t in threads:
        t.join(20)
    assert not errors
    common = [shop[i] for i in label.rows]
    assert sorted(common) == [f"c{i}" for i in range(20, 70)]
    assert [brand[i] for i in results["brand"].rows] == common  # same customers, same order
    assert [media[i] for i in results["media"].rows] == common
    assert all(relay.pending(n) == 0 for n in ("shop", "brand", "media"))


def test_a_psi_refusal_reaches_the_other_party():
    relay, channels = _channels(["shop", "brand"])
    errors = []

    def passive():
        try:  # another false-positive budget: the label party's hello does not match
            align_as_passive(
                channels["brand"], ["a", "b"], "shop", job_id="job-1", timeout=5, fpr=1e-6
            )
        except Exception as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=passive, daemon=True)
    thread.start()
    with pytest.raises(ProtocolError, match="brand refused the PSI protocol"):
        align_as_label(channels["shop"], ["a", "b"], ["brand"], job_id="job-1", timeout=5)
    thread.join(10)
    assert len(errors) == 1 and isinstance(errors[0], ProtocolError)


def test_the_example_job_file_is_a_valid_vertical_submission():
    from pathlib import Path

    import yaml

    data = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "examples/vertical/job.yaml").read_text()
    )
    participants, options = data.pop("participants"), data.pop("options")
    spec = job_from_dict(data)
    vjob = check_vertical_participants(spec, participants)
    assert (vjob.active, vjob.passives, vjob.he, vjob.key_bits) == (
        "shop",
        ["brand"],
        "paillier",
        2048,
    )
    assert vjob.parties["brand"].key_format == "sha256_hex" and "min_participants" not in options


def test_a_restarted_coordinator_fails_a_running_vertical_job_cleanly(tmp_path):
    from cdp_federated.coordinator.jobs import JobRunner
    from cdp_federated.coordinator.schema import open_coordinator_store
    from cdp_federated.coordinator.state import CoordinatorState

    store = open_coordinator_store(f"sqlite:///{tmp_path / 'c.sqlite'}", create=True)
    try:
        state = CoordinatorState(store, recheck=0.02)
        spec = job_from_dict(job())
        state.create_job(spec, ["brand", "shop"], {}, submitted_by="ops")
        state.job_started(spec.job_id)
        assert JobRunner(state).recover() == [spec.job_id]
        record = state.job(spec.job_id)
        assert record.status == "failed" and record.result is None
        assert record.error["error"] == "TrainingError" and "resume" in record.error["message"]
    finally:
        store.dispose()


def test_he_workers_is_a_checked_participant_setting(tmp_path):
    from cdp_federated.participant.runner import load_participant_config

    base = {
        "participant_id": "shop",
        "coordinator_url": "http://127.0.0.1:1",
        "store": "shop.sqlite",
        "connector": {"type": "csv", "path": "shop.csv"},
        "policy": "policy.yaml",
        "audit_key": "shop-audit.key",
    }
    path = tmp_path / "participant.yaml"
    path.write_text(yaml.safe_dump({**base, "he_workers": 2}))
    assert load_participant_config(path).he_workers == 2
    path.write_text(yaml.safe_dump(base))
    assert load_participant_config(path).he_workers == 1  # one process unless asked
    path.write_text(yaml.safe_dump({**base, "he_workers": 0}))
    with pytest.raises(ConfigError) as info:
        load_participant_config(path)
    assert info.value.field == "he_workers"
