"""A participant's local governance: decisions, refusals and budget charges in its own audit log."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cdp_federated.errors import BudgetExceededError, PolicyViolation
from cdp_federated.governance.audit import AuditLog
from cdp_federated.governance.budget import BudgetLedger
from cdp_federated.governance.engine import DecisionContext
from cdp_federated.governance.policy import load_policy
from cdp_federated.jobs import JobSpec
from cdp_federated.participant.governance import LocalGovernance
from cdp_federated.store import open_store

POLICIES = Path(__file__).parents[2] / "policies"
NOW = datetime(2026, 10, 31, tzinfo=UTC)
FEATURES = ("recency_days", "frequency", "monetary")


@pytest.fixture
def policy(tmp_path):
    text = (POLICIES / "internal-regions.yaml").read_text()
    text = text.replace(
        "secure_aggregation: optional",
        "secure_aggregation: optional\n  dp: {epsilon_per_run: 2.0, delta: 1.0e-6, "
        "budget: {epsilon: 5.0, window_days: 30}}",
    )
    path = tmp_path / "dp-regions.yaml"
    path.write_text(text)
    return load_policy(path)


@pytest.fixture(params=["sqlite", "postgresql"])
def governance(request, tmp_path, policy):
    url = f"sqlite:///{tmp_path / 'eu.sqlite'}" if request.param == "sqlite" else None
    url = url or request.getfixturevalue("pg_url")
    store = open_store(url, create=True)
    audit = AuditLog.open(store, key_path=tmp_path / "keys" / "eu.key", create_key=True)
    context = DecisionContext(
        participant="eu-west",
        now=NOW,
        organisation="acme-retail",
        coordinator_region="EU",
        partners=("eu-west", "us-east", "uk"),
        dp_epsilon=2.0,
        dp_delta=1e-6,
        output_use="scoring",
    )
    gov = LocalGovernance(policy, audit, context, budget=BudgetLedger(store), source="eu-crm")
    yield gov
    store.dispose()


def job(n: int) -> JobSpec:
    return JobSpec(f"job-{n}", "horizontal", "logreg", "model_training", FEATURES, "purchased_30d")


def kinds(gov) -> list[str]:
    return [e.kind for e in gov.audit.entries()]


def test_budget_is_read_before_deciding_and_charged_when_the_job_starts(governance):
    for n in (1, 2):
        governance.decide(job(n), stage="before_read")
        governance.job_started(job(n))
    assert [c.epsilon for c in governance.budget.charges("eu-crm")] == [2.0, 2.0]
    with pytest.raises(BudgetExceededError) as err:
        governance.decide(job(3), stage="before_read")
    assert "would spend 2.0 on top of 4.0 spent in the last 30 days; budget 5.0" in str(err.value)
    assert kinds(governance)[-2:] == ["policy_decision", "job_refused"]
    assert governance.audit.verify(strict=True).ok
    # 31 days later the first charges have left the window.
    later = replace(governance, context=replace(governance.context, now=NOW + timedelta(days=31)))
    later.decide(job(3), stage="before_read")
    later.job_started(job(3))
    assert len(governance.budget.charges("eu-crm")) == 3


def test_a_job_that_lost_the_budget_race_is_refused_at_charge_time(governance):
    governance.decide(job(1), stage="before_read")
    governance.decide(job(2), stage="before_read")
    governance.decide(job(3), stage="before_read")  # all three see 0 spent
    governance.job_started(job(1))
    governance.job_started(job(2))
    with pytest.raises(BudgetExceededError):
        governance.job_started(job(3))
    entries = list(governance.audit.entries())
    refusal = entries[-1]
    assert refusal.kind == "job_refused" and refusal.payload["stage"] == "budget_charge"
    assert "budget" in refusal.payload["reasons"][0]
    charged = [e.payload["job_id"] for e in entries if e.kind == "budget_charged"]
    assert charged == ["job-1", "job-2"]
    governance.job_started(job(1))  # idempotent: the same job is never charged twice
    assert len(governance.budget.charges("eu-crm")) == 2


def test_a_forbidden_feature_is_refused_before_any_row_is_read(governance):
    bad = replace(job(9), features=(*FEATURES, "email"))
    with pytest.raises(PolicyViolation) as err:
        governance.decide(bad, stage="before_read")
    assert not isinstance(err.value, BudgetExceededError)
    assert "email" in str(err.value)
    assert kinds(governance) == ["policy_decision", "job_refused"]
    decision = next(governance.audit.entries()).payload
    assert decision["allow"] is False and decision["stage"] == "before_read"
    assert {r["rule"] for r in decision["reasons"] if not r["ok"]} == {"features"}
