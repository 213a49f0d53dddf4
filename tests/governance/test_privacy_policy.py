"""Issue 8, policy integration: a participant's policy refuses, through ``LocalGovernance.decide``,
a job without secure aggregation when it is required, a DP job over ``epsilon_per_run`` or over
the window's budget, and a job whose rounds could aggregate fewer participants than its minimum;
the participant's secure-aggregation wrapper enforces the same on the wire."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from cdp_federated.errors import BudgetExceededError, PolicyViolation
from cdp_federated.federation.messages import FitIns, FitRes, SecAggIns
from cdp_federated.governance.audit import AuditLog
from cdp_federated.governance.budget import BudgetLedger
from cdp_federated.governance.engine import DecisionContext
from cdp_federated.governance.policy import load_policy
from cdp_federated.jobs import JobSpec
from cdp_federated.participant.governance import LocalGovernance
from cdp_federated.participant.secagg_tasks import SecAggTasks
from cdp_federated.store import open_store

POLICIES = Path(__file__).parents[2] / "policies"
NOW = datetime(2026, 10, 31, tzinfo=UTC)
FEATURES = ("recency_days", "frequency", "monetary")
PARTNERS = ("eu-west", "us-east", "uk")


def _policy(tmp_path, privacy: str, minimums: str = ""):
    text = (POLICIES / "internal-regions.yaml").read_text()
    text = text.replace("secure_aggregation: optional", privacy)
    if minimums:
        text = text.replace("cohort_size:", f"participants_per_round: {minimums}\n  cohort_size:")
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return load_policy(path)


def _governance(tmp_path, policy, partners=PARTNERS) -> LocalGovernance:
    store = open_store(f"sqlite:///{tmp_path / 'eu.sqlite'}", create=True)
    audit = AuditLog.open(store, key_path=tmp_path / "keys" / "eu.key", create_key=True)
    context = DecisionContext(
        participant="eu-west",
        now=NOW,
        organisation="acme-retail",
        coordinator_region="EU",
        partners=partners,
        output_use="scoring",
    )
    return LocalGovernance(policy, audit, context, budget=BudgetLedger(store), source="eu-crm")


def _job(n: int = 1, **params) -> JobSpec:
    return JobSpec(
        f"job-{n}", "horizontal", "logreg", "model_training", FEATURES, "purchased_30d", 5, params
    )


def _failed(exc) -> list[str]:
    return [reason.split(":")[0] for reason in exc.reasons]


def test_required_secure_aggregation_refuses_a_job_without_it(tmp_path):
    gov = _governance(tmp_path, _policy(tmp_path, "secure_aggregation: required"))
    with pytest.raises(PolicyViolation) as info:
        gov.decide(_job(), stage="before_read")
    assert _failed(info.value) == ["privacy.secure_aggregation"]
    assert gov.decide(_job(secure_aggregation=True), stage="before_read").allow
    assert gov.decide(_job(secure_aggregation={"threshold": 2}), stage="before_read").allow


def test_epsilon_per_run_refuses_a_job_over_it(tmp_path):
    privacy = "secure_aggregation: optional\n  dp: {epsilon_per_run: 2.0, delta: 1.0e-5}"
    gov = _governance(tmp_path, _policy(tmp_path, privacy))
    with pytest.raises(PolicyViolation) as info:
        gov.decide(_job(dp_epsilon=3.0), stage="before_read")
    assert _failed(info.value) == ["privacy.dp.epsilon_per_run"]
    # the epsilon is the participant's own calibration of the job's noise (~3.0, never above)
    assert "exceeds epsilon_per_run 2.0" in str(info.value)
    with pytest.raises(PolicyViolation) as info:  # no DP at all: required
        gov.decide(_job(), stage="before_read")
    assert "privacy.dp.epsilon_per_run" in _failed(info.value)
    assert gov.decide(_job(dp_epsilon=2.0), stage="before_read").allow


def test_window_budget_refuses_a_job_once_spent(tmp_path):
    privacy = (
        "secure_aggregation: required\n  dp: {epsilon_per_run: 2.0, delta: 1.0e-5, "
        "budget: {epsilon: 3.0, window_days: 30}}"
    )
    gov = _governance(tmp_path, _policy(tmp_path, privacy))
    first = _job(1, dp_epsilon=2.0, secure_aggregation=True)
    gov.decide(first, stage="before_read")
    gov.job_started(first)  # charged: 2.0 of 3.0
    with pytest.raises(BudgetExceededError) as info:
        gov.decide(_job(2, dp_epsilon=2.0, secure_aggregation=True), stage="before_read")
    assert info.value.field == "privacy.dp.budget"
    assert "spent in the last 30 days; budget 3.0" in str(info.value)
    assert [round(c.epsilon, 3) for c in gov.budget.charges("eu-crm")] == [2.0]


@pytest.mark.parametrize(
    ("params", "partners", "why"),
    [
        ({"min_fit_participants": 2}, PARTNERS, "params.min_fit_participants is 2"),
        ({"clients_per_round": 2}, PARTNERS, "params.clients_per_round is 2"),
        ({"secure_aggregation": {"threshold": 2}}, PARTNERS, "threshold is 2"),
        ({"dp_noise_multiplier": 1.0, "fraction_fit": 0.5}, PARTNERS, "sampled"),
        ({}, ("eu-west", "uk"), "the job has 2 participants"),
    ],
)
def test_minimum_participants_per_round_refuses_smaller_rounds(tmp_path, params, partners, why):
    gov = _governance(tmp_path, _policy(tmp_path, "secure_aggregation: optional", "3"), partners)
    with pytest.raises(PolicyViolation) as info:
        gov.decide(_job(**params), stage="before_read")
    assert _failed(info.value) == ["minimums.participants_per_round"]
    assert why in str(info.value)


def test_minimum_participants_per_round_allows_a_job_that_keeps_it(tmp_path):
    gov = _governance(tmp_path, _policy(tmp_path, "secure_aggregation: optional", "3"))
    assert gov.decide(_job(min_fit_participants=3), stage="before_read").allow
    assert gov.decide(_job(secure_aggregation={"threshold": 3}), stage="before_read").allow


def test_policies_without_the_minimum_keep_their_hash(tmp_path):
    plain = load_policy(POLICIES / "internal-regions.yaml")
    assert plain.minimums.participants_per_round is None
    same = _policy(tmp_path, "secure_aggregation: optional")
    assert same.content_hash == plain.content_hash
    assert _policy(tmp_path, "secure_aggregation: optional", "3").content_hash != plain.content_hash


# --- enforced on the wire by the participant's secure-aggregation wrapper -------------------------


def _fit_ins() -> FitIns:
    return FitIns({"job_id": "j"}, 1, np.zeros(3), np.zeros(2), np.ones(2), {})


def test_a_participant_requiring_secure_aggregation_sends_no_clear_update():
    tasks = SecAggTasks("a", lambda m: FitRes(np.ones(3), 10, {}), lambda j: None)
    assert isinstance(tasks.handle(_fit_ins()), FitRes)
    strict = SecAggTasks(
        "a", lambda m: FitRes(np.ones(3), 10, {}), lambda j: None, require_secure=True
    )
    with pytest.raises(PolicyViolation) as info:
        strict.handle(_fit_ins())
    assert info.value.field == "privacy.secure_aggregation"


@pytest.mark.parametrize("stage", ["share", "mask", "unmask"])
def test_a_participant_sits_out_a_stage_below_its_minimum(stage):
    tasks = SecAggTasks("a", lambda m: m, lambda j: None, min_participants=3)
    message = SecAggIns(
        stage=stage, job_id="j", session="j/secagg/round-1/x", threshold=2, names=["a", "b"]
    )
    with pytest.raises(PolicyViolation) as info:
        tasks.handle(message)
    assert info.value.field == "minimums.participants_per_round"
