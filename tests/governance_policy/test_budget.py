"""The privacy budget ledger on SQLite and PostgreSQL: window, idempotency, refusal, races."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from cdp_federated.errors import BudgetExceededError, ConfigError, PolicyViolation
from cdp_federated.governance.budget import BudgetLedger
from cdp_federated.governance.policy import load_policy
from cdp_federated.store import open_store, schema

from .conftest import PARTNER_POLICY, POLICIES

NOW = datetime(2026, 10, 31, tzinfo=UTC)
HASH = "0" * 64


@pytest.fixture
def ledger(db_url):
    store = open_store(db_url, create=True)
    yield BudgetLedger(store)
    store.dispose()


@pytest.fixture(scope="module")
def policy():
    return load_policy(PARTNER_POLICY)  # epsilon_per_run 2.0, delta 1e-6, budget 8.0 / 30 days


def rows(ledger) -> int:
    with ledger.store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(schema.privacy_budget)).scalar_one()


def test_spent_sums_the_window_now_minus_window_exclusive_to_now_inclusive(ledger):
    ledger.charge("crm", "old", HASH, 1.0, 0.0, NOW - timedelta(days=30))  # at the open edge
    ledger.charge("crm", "inside", HASH, 2.0, 0.0, NOW - timedelta(days=29, hours=23))
    ledger.charge("crm", "now", HASH, 0.5, 0.0, NOW)
    ledger.charge("crm", "future", HASH, 4.0, 0.0, NOW + timedelta(seconds=1))
    ledger.charge("web", "other-source", HASH, 3.0, 0.0, NOW)
    assert ledger.spent("crm", 30, NOW) == pytest.approx(2.5)
    assert ledger.spent("crm", 31, NOW) == pytest.approx(3.5)
    assert ledger.spent("web", 30, NOW) == pytest.approx(3.0)
    assert ledger.spent("nobody", 30, NOW) == 0.0


def test_times_in_other_offsets_are_stored_as_utc(ledger):
    from datetime import timezone

    paris = timezone(timedelta(hours=2))
    charge = ledger.charge("crm", "j", HASH, 1.0, 0.0, datetime(2026, 10, 31, 2, tzinfo=paris))
    assert charge.spent_at == NOW
    assert ledger.charges("crm")[0].spent_at == NOW
    assert ledger.spent("crm", 1, NOW) == 1.0
    assert ledger.spent("crm", 1, NOW - timedelta(seconds=1)) == 0.0


def test_charge_is_idempotent_per_source_and_job(ledger):
    first = ledger.charge("crm", "job-1", HASH, 1.5, 1e-7, NOW)
    again = ledger.charge("crm", "job-1", HASH, 1.5, 1e-7, NOW + timedelta(days=1))
    assert first.created and not again.created
    assert again.spent_at == first.spent_at == NOW  # the existing row, unchanged
    assert rows(ledger) == 1
    assert ledger.spent("crm", 30, NOW + timedelta(days=1)) == pytest.approx(1.5)
    ledger.charge("web", "job-1", HASH, 1.5, 1e-7, NOW)  # another source is another charge
    assert rows(ledger) == 2


def test_a_different_epsilon_for_the_same_job_is_an_error(ledger):
    ledger.charge("crm", "job-1", HASH, 1.5, 1e-7, NOW)
    with pytest.raises(ConfigError) as info:
        ledger.charge("crm", "job-1", HASH, 2.0, 1e-7, NOW)
    assert "already charged epsilon 1.5" in info.value.message
    with pytest.raises(ConfigError):
        ledger.charge("crm", "job-1", HASH, 1.5, 1e-6, NOW)
    assert rows(ledger) == 1


@pytest.mark.parametrize(
    ("epsilon", "delta"), [(0.0, 0.0), (-1.0, 0.0), (float("nan"), 0.0), (1.0, 1.0)]
)
def test_invalid_amounts_are_refused(ledger, epsilon, delta):
    with pytest.raises(ConfigError):
        ledger.charge("crm", "j", HASH, epsilon, delta, NOW)
    assert rows(ledger) == 0


def test_naive_time_is_refused(ledger):
    with pytest.raises(ConfigError):
        ledger.spent("crm", 30, datetime(2026, 10, 31))


def test_check_and_charge_refuses_with_the_numbers_before_writing(ledger, policy):
    for i, eps in enumerate((2.0, 2.0, 2.0, 1.0)):
        ledger.check_and_charge(policy, "crm", f"j{i}", eps, 1e-7, NOW - timedelta(days=i))
    assert ledger.spent("crm", 30, NOW) == pytest.approx(7.0)
    with pytest.raises(BudgetExceededError) as info:
        ledger.check_and_charge(policy, "crm", "j-over", 2.0, 1e-7, NOW)
    err = info.value
    assert "would spend 2.0 on top of 7.0 spent in the last 30 days; budget 8.0" in str(err)
    assert err.context["spent"] == pytest.approx(7.0) and err.context["budget"] == 8.0
    assert err.reasons == (
        "privacy.dp.budget: would spend 2.0 on top of 7.0 spent in the last 30 days; budget 8.0",
    )
    assert rows(ledger) == 4 and ledger.spent("crm", 30, NOW) == pytest.approx(7.0)

    exact = ledger.check_and_charge(policy, "crm", "j-fits", 1.0, 1e-7, NOW)  # 8.0 exactly
    assert exact.created and exact.policy_hash == policy.content_hash
    # the window slides: j3's 1.0 was charged 3 days ago and leaves after 27 more days
    later = NOW + timedelta(days=27)
    assert ledger.check_and_charge(policy, "crm", "j-later", 1.0, 1e-7, later).created


def test_check_and_charge_of_an_already_charged_job_returns_it_without_rechecking(ledger, policy):
    first = ledger.check_and_charge(policy, "crm", "j", 2.0, 1e-7, NOW)
    ledger.charge("crm", "other", HASH, 6.0, 0.0, NOW)  # the budget is now full
    again = ledger.check_and_charge(policy, "crm", "j", 2.0, 1e-7, NOW)
    assert again.created is False and again.epsilon == first.epsilon
    assert rows(ledger) == 2


def test_check_and_charge_enforces_the_per_run_limits(ledger, policy):
    with pytest.raises(PolicyViolation) as info:
        ledger.check_and_charge(policy, "crm", "j", 2.5, 1e-7, NOW)
    assert not isinstance(info.value, BudgetExceededError)
    with pytest.raises(PolicyViolation):
        ledger.check_and_charge(policy, "crm", "j", 1.0, 1e-5, NOW)
    assert rows(ledger) == 0


def test_a_policy_without_dp_records_the_spend_without_limits(ledger):
    internal = load_policy(POLICIES / "internal-regions.yaml")
    for i in range(3):
        ledger.check_and_charge(internal, "crm", f"j{i}", 50.0, 0.0, NOW)
    assert ledger.spent("crm", 30, NOW) == 150.0


def test_two_jobs_racing_for_the_last_of_the_budget_exactly_one_wins(ledger, policy):
    ledger.charge("crm", "earlier", HASH, 7.0, 0.0, NOW - timedelta(days=1))
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def run(job_id: str) -> None:
        barrier.wait()
        try:
            outcomes[job_id] = ledger.check_and_charge(policy, "crm", job_id, 1.0, 1e-7, NOW)
        except BudgetExceededError as exc:
            outcomes[job_id] = exc

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    won = [k for k, v in outcomes.items() if not isinstance(v, Exception)]
    lost = [k for k, v in outcomes.items() if isinstance(v, BudgetExceededError)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert "on top of 8.0 spent" in str(outcomes[lost[0]])
    assert ledger.spent("crm", 30, NOW) == pytest.approx(8.0)
    assert rows(ledger) == 2


def test_racing_charges_of_the_same_job_charge_once(ledger, policy):
    barrier = threading.Barrier(4)
    results = []

    def run() -> None:
        barrier.wait()
        results.append(ledger.check_and_charge(policy, "crm", "same", 1.0, 1e-7, NOW))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 4 and sum(r.created for r in results) == 1
    assert rows(ledger) == 1
