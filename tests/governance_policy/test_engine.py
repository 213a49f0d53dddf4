"""The decision engine: every rule both ways, the decision's forms, and the pluggy plugin."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from cdp_federated.errors import BudgetExceededError, ConfigError, PolicyViolation
from cdp_federated.governance import PolicyVote
from cdp_federated.governance.engine import (
    BUDGET_RULE,
    DecisionContext,
    PolicyDecision,
    evaluate,
    policy_plugin,
)
from cdp_federated.governance.policy import load_policy
from cdp_federated.jobs import JobSpec
from cdp_federated.participant.pipeline import check_policy

from .conftest import PARTNER_POLICY, POLICIES

NOW = datetime(2026, 10, 31, tzinfo=UTC)
RULES = (
    "purposes.allowed",
    "purposes.lawful_basis",
    "partners",
    "residency.data_regions",
    "residency.coordinator_regions",
    "features",
    "features.label",
    "identity.methods",
    "privacy.secure_aggregation",
    "privacy.dp.epsilon_per_run",
    "privacy.dp.budget",
    "minimums.rows_per_party",
    "minimums.participants_per_round",
    "outputs.uses",
)


@pytest.fixture(scope="module")
def policy():
    return load_policy(PARTNER_POLICY)


@pytest.fixture(scope="module")
def internal():
    return load_policy(POLICIES / "internal-regions.yaml")


JOB = JobSpec(
    job_id="j-1",
    kind="vertical",
    model="logreg",
    purpose="model_training",
    features=("recency_days", "frequency", "monetary"),
    label="purchased_30d",
    params={"C": 1.0},
)
CONTEXT = DecisionContext(
    participant="retailer-eu",
    organisation="acme-retail",
    region="EU",
    coordinator_region="EU",
    partners=("retailer-eu", "brand-eu"),
    identity_method="psi",
    secure_aggregation=True,
    dp_epsilon=1.0,
    dp_delta=1e-7,
    rows_available=1000,
    budget_spent=2.0,
    now=NOW,
    output_use="scoring",
)


def failing(decision: PolicyDecision) -> set[str]:
    return {r.rule for r in decision.failures}


def message(decision: PolicyDecision, rule: str) -> str:
    return next(r.message for r in decision.reasons if r.rule == rule)


def test_the_base_job_is_allowed_and_every_rule_is_reported(policy):
    decision = evaluate(policy, JOB, CONTEXT)
    assert decision.allow
    assert tuple(r.rule for r in decision.reasons) == RULES
    assert all(r.ok and r.message for r in decision.reasons)


# Each case breaks exactly the rules listed (every other rule must still pass).
CASES = {
    "purpose not allowed": (
        {"purpose": "personalization"},
        {},
        {"purposes.allowed", "purposes.lawful_basis"},
        "not allowed",
    ),
    "declared basis differs": (
        {"params": {"lawful_basis": "contract"}},
        {},
        {"purposes.lawful_basis"},
        "'contract'",
    ),
    "unlisted partner": ({}, {"partners": ("retailer-eu", "stranger")}, {"partners"}, "stranger"),
    "coordinator as participant": (
        {},
        {"partners": ("retailer-eu", "coordinator-eu")},
        {"partners"},
        "coordinator-eu may not take part",
    ),
    "organisation mismatch": (
        {},
        {"organisation": "globex-brands"},
        {"partners"},
        "belongs to 'acme-retail'",
    ),
    "data region": ({}, {"region": "US"}, {"residency.data_regions"}, "'US'"),
    "coordinator region": (
        {},
        {"coordinator_region": "US"},
        {"residency.coordinator_regions"},
        "'US'",
    ),
    "coordinator region unknown": (
        {},
        {"coordinator_region": None},
        {"residency.coordinator_regions"},
        "unknown",
    ),
    "pii and forbidden features": (
        {"features": ("recency_days", "Email_Address", "customerPhone", "loyalty_id")},
        {},
        {"features"},
        "Email_Address is built-in PII (email); customerPhone is built-in PII (phone); "
        "loyalty_id is forbidden by features.forbidden (*_id)",
    ),
    "pii label": ({"label": "date_of_birth"}, {}, {"features.label"}, "built-in PII"),
    "forbidden label": ({"label": "jurisdiction"}, {}, {"features.label"}, "forbidden"),
    "salted hash across organisations": (
        {},
        {"identity_method": "salted_hash"},
        {"identity.methods"},
        "dictionary attack",
    ),
    "vertical job without identity method": (
        {},
        {"identity_method": None},
        {"identity.methods"},
        "needs an identity method",
    ),
    "no secure aggregation": (
        {},
        {"secure_aggregation": False},
        {"privacy.secure_aggregation"},
        "required",
    ),
    "epsilon over the per-run limit": (
        {},
        {"dp_epsilon": 2.5},
        {"privacy.dp.epsilon_per_run"},
        "epsilon 2.5 exceeds epsilon_per_run 2.0",
    ),
    "delta over the limit": ({}, {"dp_delta": 1e-5}, {"privacy.dp.epsilon_per_run"}, "delta"),
    "no dp at all": (
        {},
        {"dp_epsilon": None},
        {"privacy.dp.epsilon_per_run", BUDGET_RULE},
        "declares none",
    ),
    "budget": (
        {},
        {"dp_epsilon": 2.0, "budget_spent": 7.0},
        {BUDGET_RULE},
        "would spend 2.0 on top of 7.0 spent in the last 30 days; budget 8.0",
    ),
    "too few rows": ({}, {"rows_available": 499}, {"minimums.rows_per_party"}, "499 rows"),
    "output use not permitted": ({}, {"output_use": "resale"}, {"outputs.uses"}, "'resale'"),
    "output use undeclared": ({}, {"output_use": None}, {"outputs.uses"}, "declares no output use"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_rule_denies_on_its_own(policy, case):
    job_changes, context_changes, rules, words = CASES[case]
    decision = evaluate(policy, replace(JOB, **job_changes), replace(CONTEXT, **context_changes))
    assert not decision.allow
    assert failing(decision) == rules
    assert any(words in message(decision, rule) for rule in rules)
    assert len(decision.reasons) == len(RULES)


def test_budget_exactly_used_up_is_allowed(policy):
    decision = evaluate(policy, JOB, replace(CONTEXT, dp_epsilon=2.0, budget_spent=6.0))
    assert decision.allow
    assert message(decision, BUDGET_RULE) == (
        "spends 2.0 on top of 6.0 spent in the last 30 days; budget 8.0; 0.0 left"
    )


def test_float_sums_that_fit_the_budget_are_allowed(policy):
    context = replace(CONTEXT, dp_epsilon=0.1, budget_spent=7.9)
    assert evaluate(policy, JOB, context).allow


def test_rows_not_yet_counted_pass_and_say_so(policy):
    decision = evaluate(policy, JOB, replace(CONTEXT, rows_available=None))
    assert decision.allow and "not yet counted" in message(decision, "minimums.rows_per_party")


def test_declared_lawful_basis_equal_to_the_policys_passes(policy):
    job = replace(JOB, params={"lawful_basis": "consent"})
    assert evaluate(policy, job, CONTEXT).allow


def test_region_defaults_to_the_partner_entry_and_matches_by_prefix(internal):
    job = replace(
        JOB,
        kind="horizontal",
        features=("recency_days", "frequency"),
    )
    base = replace(
        CONTEXT,
        participant="us-east",
        organisation="acme-retail",
        partners=("eu-west", "us-east", "uk"),
        identity_method=None,
        secure_aggregation=False,
        dp_epsilon=None,
        dp_delta=None,
        rows_available=300,
    )
    assert evaluate(internal, job, replace(base, region=None)).allow
    assert evaluate(internal, job, replace(base, region="us-east-1")).allow
    wrong = evaluate(internal, job, replace(base, region="EU"))
    assert failing(wrong) == {"residency.data_regions"}
    assert "policy lists it in 'US'" in message(wrong, "residency.data_regions")


def test_features_outside_an_allow_list_are_named(internal):
    job = replace(JOB, kind="horizontal", features=("recency_days", "shoe_size", "zodiac"))
    context = replace(
        CONTEXT,
        participant="eu-west",
        partners=("eu-west", "uk"),
        identity_method=None,
        secure_aggregation=False,
        dp_epsilon=None,
        rows_available=300,
    )
    decision = evaluate(internal, job, context)
    assert failing(decision) == {"features"}
    assert message(decision, "features") == (
        "shoe_size is not in features.allowed; zodiac is not in features.allowed"
    )


def test_salted_hash_inside_one_organisation_is_allowed(internal):
    job = replace(JOB, kind="vertical", features=("recency_days",))
    context = replace(
        CONTEXT,
        participant="eu-west",
        partners=("eu-west", "uk"),
        identity_method="salted_hash",
        secure_aggregation=False,
        dp_epsilon=None,
        rows_available=300,
    )
    decision = evaluate(internal, job, context)
    assert decision.allow, decision.failures
    assert message(decision, "identity.methods") == "identity method salted_hash is allowed"


def test_salted_hash_refusal_explains_the_dictionary_attack(policy):
    decision = evaluate(policy, JOB, replace(CONTEXT, identity_method="salted_hash"))
    text = message(decision, "identity.methods")
    assert "not an allowed identity method (allowed: psi)" in text
    assert "acme-retail, globex-brands" in text and "dictionary" in text and "psi" in text


def test_evaluate_is_pure(policy):
    first, second = evaluate(policy, JOB, CONTEXT), evaluate(policy, JOB, CONTEXT)
    assert first == second
    assert first.decided_at == NOW


def test_to_dict_has_the_audit_keys(policy):
    data = evaluate(policy, JOB, replace(CONTEXT, rows_available=10)).to_dict()
    assert {"policy", "version", "policy_hash", "allow", "reasons"} <= set(data)
    assert data["policy"] == "test-partners" and data["version"] == 2
    assert data["policy_hash"] == policy.content_hash and data["allow"] is False
    assert data["decided_at"] == NOW.isoformat() and data["job_id"] == "j-1"
    assert all(set(r) == {"rule", "ok", "message"} for r in data["reasons"])
    assert [r["rule"] for r in data["reasons"] if not r["ok"]] == ["minimums.rows_per_party"]


def test_raise_if_denied(policy):
    evaluate(policy, JOB, CONTEXT).raise_if_denied()  # allowed: no error

    budget_only = evaluate(policy, JOB, replace(CONTEXT, dp_epsilon=2.0, budget_spent=7.0))
    with pytest.raises(BudgetExceededError) as info:
        budget_only.raise_if_denied()
    assert info.value.reasons == (
        f"{BUDGET_RULE}: would spend 2.0 on top of 7.0 spent in the last 30 days; budget 8.0",
    )

    mixed = evaluate(
        policy, JOB, replace(CONTEXT, dp_epsilon=2.0, budget_spent=7.0, output_use="resale")
    )
    with pytest.raises(PolicyViolation) as info:
        mixed.raise_if_denied()
    assert not isinstance(info.value, BudgetExceededError)
    assert [r.split(":")[0] for r in info.value.reasons] == [BUDGET_RULE, "outputs.uses"]
    assert info.value.value == "j-1"


def test_context_from_dict_parses_time_and_refuses_unknown_keys():
    context = DecisionContext.from_dict(
        {"participant": "a", "now": "2026-10-31T00:00:00", "partners": ["a", "b"]}
    )
    assert context.now == NOW and context.partners == ("a", "b")
    with pytest.raises(ConfigError):
        DecisionContext.from_dict({"participant": "a", "now": NOW, "regoin": "EU"})
    with pytest.raises(ConfigError):
        DecisionContext.from_dict({"participant": "a"})


# --- Plugin ----------------------------------------------------------------------------------------


def test_policy_plugin_votes_through_the_plugin_manager(pm, policy):
    decisions: list[PolicyDecision] = []

    def context_for(job, participant):
        if participant == "someone-else":
            return None
        spent = 7.5 if job.job_id == "expensive" else 2.0
        return replace(CONTEXT, participant=participant, budget_spent=spent)

    pm.register(policy_plugin(policy, context_for, on_decision=decisions.append))
    pm.check_pending()

    check_policy(pm, JOB, "retailer-eu")  # allowed: no error
    votes = pm.hook.cdp_policy_decision(job=JOB, participant="retailer-eu")
    mine = [v for v in votes if isinstance(v, PolicyVote)]
    assert len(mine) == 1 and mine[0].allow
    assert mine[0].rule == f"policy:test-partners@{policy.short_hash}"

    with pytest.raises(PolicyViolation) as info:
        check_policy(pm, replace(JOB, job_id="expensive"), "retailer-eu")
    assert "would spend 1.0 on top of 7.5" in str(info.value)

    assert all(v is None for v in pm.hook.cdp_policy_decision(job=JOB, participant="someone-else"))
    assert [d.allow for d in decisions] == [True, True, False]
