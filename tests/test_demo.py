"""End to end: the demo scenario ingests, filters by consent, trains federated, publishes."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from sqlalchemy import select

from cdp_federated.consent import allowed_ids
from cdp_federated.consent.active import active_rule
from cdp_federated.demo import run_demo
from cdp_federated.registry import load_model, load_model_document
from cdp_federated.store import open_store, schema
from tests.plugins.every_hook import EveryHook

GBM_TREES = 8


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from cdp_federated.plugins import FIRST_PARTY_CONNECTORS, make_plugin_manager

    fixture = EveryHook()
    pm = make_plugin_manager(load_entrypoints=False, plugins=[*FIRST_PARTY_CONNECTORS, fixture])
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(out, customers=1500, rounds=30, pm=pm, gbm_trees=GBM_TREES)
    return result, fixture, pm


def test_federated_auc_matches_centralized(demo_run):
    result, _, _ = demo_run
    assert result["auc"] > 0.65  # the label is learnable
    assert abs(result["auc"] - result["centralized_auc"]) <= 0.01
    assert result["rounds"] == 30
    gbm = result["gbm"]
    assert gbm["trees"] == GBM_TREES and gbm["auc"] > 0.65
    assert abs(gbm["auc"] - gbm["centralized_auc"]) <= 0.01
    assert load_model(gbm["model_path"]).predict_proba(
        np.zeros((1, len(load_model(result["model_path"]).feature_names_in_)))
    ).shape == (1, 2)


def test_funnel_accounts_for_every_row(demo_run):
    result, _, _ = demo_run
    assert set(result["funnel"]) == set(result["databases"]) and len(result["databases"]) == 3
    for name, f in result["funnel"].items():
        assert f["consented"] <= f["rows_in"]
        assert f["consented"] < f["rows_in"] or name == "us-east"  # opt-in regions lose rows
        assert f["trained"] + result["test_rows_per_party"][name] == f["consented"]
        assert f["trained"] == result["rows_per_party"][name]
        ing = result["ingest"][name]
        assert ing["received"] == ing["applied"] + ing["duplicates"] + ing["dead_lettered"]
        assert ing["dead_lettered"] > 0  # the scenario injects bad lines


def test_only_consented_profiles_were_trained(demo_run):
    result, _, _ = demo_run
    doc = load_model_document(result["model_path"])
    at = pl.Series([doc["lineage"]["consent_evaluated_at"]]).str.to_datetime(time_zone="UTC")[0]
    for name, url in result["databases"].items():
        store = open_store(url)
        rule = active_rule(store, "model_training")  # the demo's policy, recorded in the store
        assert rule is not None and rule.tcf is not None
        allowed = set(
            allowed_ids(store, "model_training", at, rule=rule).as_frame().collect()["profile_id"]
        )
        with store.engine.connect() as conn:
            labelled = {r[0] for r in conn.execute(select(schema.profile_labels.c.profile_id))}
        assert len(allowed & labelled) == result["funnel"][name]["consented"]
        store.dispose()


def test_model_is_published_loadable_and_scores_consented_profiles(demo_run):
    result, fixture, pm = demo_run
    model = load_model(result["model_path"])
    assert list(model.feature_names_in_)[:3] == ["recency_days", "tenure_days", "frequency"]
    assert "cdp_model_published" in fixture.names()
    url = next(iter(result["databases"].values()))
    store = open_store(url)
    with store.engine.connect() as conn:
        published = conn.execute(select(schema.models.c.model_id, schema.models.c.sha256)).all()
        ids = [r[0] for r in conn.execute(select(schema.profile_features.c.profile_id))]
    # both models are recorded; scoring without a model id uses the latest one, the GBM
    assert [r[0] for r in published] == [result["model_id"], result["gbm"]["model_id"]]
    rule = active_rule(store, "model_training")
    allowed_now = set(
        allowed_ids(store, "model_training", datetime.now(UTC), rule=rule)
        .as_frame()
        .collect()["profile_id"]
    )
    scored = {
        p: pm.hook.cdp_score_profile(
            profile_id=p, store=store, model_id=None, purpose="model_training"
        )
        for p in ids[:300]
    }
    assert {p for p, s in scored.items() if s is not None} == allowed_now & set(scored)
    assert any(s is None for s in scored.values()) and any(s is not None for s in scored.values())
    assert all(
        0.0 <= s["score"] <= 1.0 and s["model_id"] == result["gbm"]["model_id"]
        for s in scored.values()
        if s
    )
    store.dispose()


def test_hooks_saw_the_job_lifecycle(demo_run):
    _, fixture, _ = demo_run
    names = fixture.names()
    assert names.count("cdp_policy_decision") == 3  # the GBM job reuses the first decision hook
    assert (
        names.index("cdp_job_started")
        < names.index("cdp_round_ended")
        < names.index("cdp_model_published")
    )
    assert names.count("cdp_round_ended") == 30 + GBM_TREES
    assert names.count("cdp_model_published") == 2


def test_every_participant_audited_its_decisions_funnel_rounds_and_model(demo_run):
    from cdp_federated.governance.audit import AuditLog

    result, _, _ = demo_run
    out = result["model_path"].split("/models/")[0]
    for name, url in result["databases"].items():
        log = AuditLog.open(url, key_path=f"{out}/keys/{name}-audit.key")
        report = log.verify(strict=True)
        assert report.ok, report.reason
        entries = list(log.entries())
        kinds = [e.kind for e in entries]
        assert kinds[:2] == ["policy_decision", "policy_decision"]
        assert [e.payload["stage"] for e in entries[:2]] == ["before_read", "after_consent"]
        assert all(e.payload["allow"] for e in entries[:2])
        assert entries[0].payload["policy_hash"] == result["policy"]["hash"]
        funnel = next(e.payload for e in entries if e.kind == "consent_filter")
        f = result["funnel"][name]
        assert (funnel["rows_in"], funnel["consented"], funnel["trained"]) == (
            f["rows_in"],
            f["consented"],
            f["trained"],
        )
        assert kinds.count("round_committed") == result["rounds"] + GBM_TREES
        published = [e.payload["model_id"] for e in entries if e.kind == "model_published"]
        assert published == [result["model_id"], result["gbm"]["model_id"]]
        assert kinds[-1] == "model_published"
        # the GBM job was decided under the policy before it read a row
        gbm_decisions = [
            e.payload["stage"]
            for e in entries
            if e.kind == "policy_decision" and e.payload.get("job_id", "").endswith("-gbm")
        ]
        assert gbm_decisions == ["before_read", "after_consent"]
        assert result["audit"][name]["entries"] == len(entries)
        log.store.dispose()


def test_a_policy_violation_refuses_the_job_with_reasons_and_is_audited(tmp_path):
    from cdp_federated.errors import PolicyViolation
    from cdp_federated.governance.audit import AuditLog

    strict = tmp_path / "strict.yaml"
    text = (Path(__file__).parents[1] / "policies" / "internal-regions.yaml").read_text()
    # The same policy, but the EU region may no longer use monetary features.
    strict.write_text(
        text.replace(
            "forbidden: [profile_id, jurisdiction]",
            "forbidden: [profile_id, jurisdiction, monetary]",
        )
    )
    with pytest.raises(PolicyViolation) as err:
        run_demo(tmp_path / "out", customers=300, rounds=2, policy=strict)
    assert "monetary" in str(err.value) and "features" in str(err.value)
    assert any(r.startswith("features") for r in err.value.reasons)
    log = AuditLog.open(
        f"sqlite:///{tmp_path / 'out' / 'eu-west.sqlite'}",
        key_path=tmp_path / "out" / "keys" / "eu-west-audit.key",
    )
    entries = list(log.entries())
    assert [e.kind for e in entries] == ["policy_decision", "job_refused"]
    assert entries[0].payload["allow"] is False
    assert log.verify(strict=True).ok
    log.store.dispose()
    assert not (tmp_path / "out" / "models").exists()  # nothing trained, nothing published
