"""DP end to end: the CLI's figures, the model's lineage, the participant's policy and budget."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from cdp_federated.coordinator.runner import run_horizontal
from cdp_federated.errors import BudgetExceededError, ConfigError, PolicyViolation
from cdp_federated.federation.transport import InProcessTransport
from cdp_federated.governance.audit import AuditLog
from cdp_federated.governance.budget import BudgetLedger
from cdp_federated.governance.engine import DecisionContext
from cdp_federated.governance.policy import load_policy
from cdp_federated.jobs import JobSpec
from cdp_federated.participant.agent import ParticipantAgent
from cdp_federated.participant.governance import LocalGovernance
from cdp_federated.privacy.accountant import RDP_ORDERS
from cdp_federated.privacy.dp_fedavg import DPShortfallWarning, job_privacy_spend
from cdp_federated.registry import load_model_document
from cdp_federated.store import open_store
from tests.test_simulate_cli import files, frame, simulate  # noqa: F401  (module fixture)

POLICIES = Path(__file__).parents[2] / "policies"
NOW = datetime(2026, 11, 1, tzinfo=UTC)


def closed_form_epsilon(z: float, rounds: int, delta: float) -> float:
    """Full participation: RDP rounds*alpha/(2 z^2), Balle et al. 2020's conversion."""
    return min(
        rounds * a / (2 * z**2) + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1)
        for a in RDP_ORDERS
    )


def test_cli_reports_the_spend_and_the_registry_keeps_it(monkeypatch, capsys, files, tmp_path):  # noqa: F811
    code, out, err = simulate(
        monkeypatch,
        capsys,
        files,
        tmp_path,
        *("--label", "churn", "--rounds", "8", "--json"),
        *("--dp-epsilon", "6", "--dp-delta", "1e-6", "--dp-clip", "2"),
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["epsilon"] == pytest.approx(6.0, rel=1e-3)
    assert result["delta"] == 1e-6 and result["sampling_rate"] == 1.0
    independent = closed_form_epsilon(result["noise_multiplier"], 8, 1e-6)
    assert result["epsilon"] == pytest.approx(independent, rel=1e-5)
    # The noise comes from `secrets`: with three parties, client-level DP at this epsilon can
    # push the AUC anywhere, so utility is measured in benchmarks/dp_utility.py, not here.
    assert result["noise_multiplier"] > 0 and 0.0 <= result["auc"] <= 1.0
    lineage = load_model_document(result["model_path"])["lineage"]
    assert lineage["epsilon"] == pytest.approx(result["epsilon"], rel=1e-6)
    assert lineage["delta"] == 1e-6 and lineage["params"]["dp_clip"] == 2


def test_cli_without_dp_reports_no_spend(monkeypatch, capsys, files, tmp_path):  # noqa: F811
    code, out, err = simulate(
        monkeypatch, capsys, files, tmp_path, "--label", "churn", "--rounds", "2", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert "epsilon" not in result
    assert load_model_document(result["model_path"])["lineage"]["epsilon"] is None


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (("--model", "gbm", "--objective", "regression", "--dp-noise", "1"), "params.objective"),
        (("--model", "gbm", "--dp-noise", "1", "--dp-clip", "1"), "params.dp_clip"),
        (("--dp-epsilon", "1", "--dp-noise", "1"), "--dp-noise"),
        (("--dp-clip", "1"), "--dp-epsilon"),
    ],
)
def test_cli_refuses_dp_it_cannot_honour(monkeypatch, capsys, files, tmp_path, extra, field):  # noqa: F811
    code, out, err = simulate(
        monkeypatch, capsys, files, tmp_path, "--label", "churn", "--rounds", "2", *extra
    )
    assert code != 0
    assert field in err


def _agents(n: int = 4):
    frames = {f"p{i}": frame(300, 0.2 * i, -0.3, 40 + i, f"p{i}") for i in range(n)}
    features = ("tenure", "tickets", "monthly_charges")

    def provider(f):
        return lambda _job, split: (
            f.select(["profile_id", *features, "churn"])
            if split != ("test")
            else f.head(0).select(["profile_id", *features, "churn"])
        )

    return {name: ParticipantAgent(name, provider(f)) for name, f in frames.items()}, features


def test_poisson_sampled_dp_job_runs_through_the_runner():
    agents, features = _agents(6)
    transport = InProcessTransport({n: a.handle for n, a in agents.items()})
    job = JobSpec(
        "dp-poisson",
        "horizontal",
        "logreg",
        "model_training",
        features,
        "churn",
        rounds=6,
        params={"dp_noise_multiplier": 0.8, "fraction_fit": 0.5, "seed": 3, "dp_clip": 1.0},
    )
    result = run_horizontal(job, transport)
    sampled = [len(r.sampled) for r in result.history]
    assert len(result.history) == 6 and len(set(sampled)) > 1  # Poisson draws vary
    assert all(math.isnan(r.train_loss) for r in result.history)  # no loss leaves a party
    assert np.isfinite(result.parameters).all()


def test_a_dropped_party_warns_and_the_round_stands():
    agents, features = _agents(3)
    handlers = {n: a.handle for n, a in agents.items()}
    real = handlers["p2"]

    def flaky(message):
        if type(message).__name__ == "FitIns":
            raise RuntimeError("p2 went away")
        return real(message)

    handlers["p2"] = flaky
    job = JobSpec(
        "dp-drop",
        "horizontal",
        "logreg",
        "model_training",
        features,
        "churn",
        rounds=2,
        params={"dp_noise_multiplier": 1.0, "min_fit_participants": 2},
    )
    with pytest.warns(DPShortfallWarning, match="2 of 3 sampled"):
        result = run_horizontal(job, InProcessTransport(handlers))
    assert [r.participants for r in result.history] == [("p0", "p1")] * 2


# --- the participant's policy and budget ---------------------------------------------------------


@pytest.fixture
def governance(tmp_path):
    text = (POLICIES / "internal-regions.yaml").read_text()
    text = text.replace(
        "secure_aggregation: optional",
        "secure_aggregation: optional\n  dp: {epsilon_per_run: 3.0, delta: 1.0e-5, "
        "budget: {epsilon: 5.0, window_days: 30}}",
    )
    (tmp_path / "p.yaml").write_text(text)
    store = open_store(f"sqlite:///{tmp_path / 'eu.sqlite'}", create=True)
    audit = AuditLog.open(store, key_path=tmp_path / "eu.key", create_key=True)
    context = DecisionContext(
        participant="eu-west",
        now=NOW,
        organisation="acme-retail",
        coordinator_region="EU",
        partners=("eu-west", "us-east", "uk"),
        output_use="scoring",
    )  # no dp_epsilon: the participant computes it from the job itself
    policy = load_policy(tmp_path / "p.yaml")
    yield LocalGovernance(policy, audit, context, budget=BudgetLedger(store), source="eu-crm")
    store.dispose()


def dp_job(n: int, **params) -> JobSpec:
    features = ("recency_days", "frequency", "monetary")
    return JobSpec(
        f"job-{n}",
        "horizontal",
        "logreg",
        "model_training",
        features,
        "purchased_30d",
        rounds=10,
        params=params,
    )


def test_participant_computes_checks_and_charges_the_jobs_epsilon(governance):
    job = dp_job(1, dp_noise_multiplier=5.0)
    spend = job_privacy_spend(job)
    assert 2.0 < spend.epsilon < 3.0
    governance.decide(job, stage="before_read")
    governance.job_started(job)
    [charge] = governance.budget.charges("eu-crm")
    assert charge.epsilon == pytest.approx(spend.epsilon) and charge.delta == 1e-5
    charged = [e for e in governance.audit.entries() if e.kind == "budget_charged"]
    assert charged[0].payload["epsilon"] == pytest.approx(spend.epsilon)
    # The next job would pass epsilon_per_run but not the window's remaining budget.
    with pytest.raises(BudgetExceededError):
        governance.decide(dp_job(2, dp_noise_multiplier=5.0), stage="before_read")


def test_a_job_over_epsilon_per_run_is_refused(governance):
    with pytest.raises(PolicyViolation) as err:
        governance.decide(dp_job(3, dp_epsilon=4.0), stage="before_read")
    assert any("privacy.dp.epsilon_per_run" in r for r in err.value.reasons)
    assert governance.budget.charges("eu-crm") == []


def test_a_job_without_dp_is_refused_when_the_policy_requires_it(governance):
    with pytest.raises(PolicyViolation):
        governance.decide(dp_job(4), stage="before_read")


def test_dp_params_on_a_model_without_dp_are_refused():
    job = JobSpec(
        "v", "vertical", "logreg", "model_training", ("a",), "y", params={"dp_epsilon": 1.0}
    )
    with pytest.raises(ConfigError):
        job_privacy_spend(job)


def test_a_dp_job_refuses_a_strategy_that_adds_no_noise():
    from cdp_federated.learning.strategy import FedAvg

    agents, features = _agents(2)
    job = JobSpec(
        "dp-own",
        "horizontal",
        "logreg",
        "model_training",
        features,
        "churn",
        2,
        {"dp_noise_multiplier": 1.0},
    )
    transport = InProcessTransport({n: a.handle for n, a in agents.items()})
    with pytest.raises(ConfigError) as err:
        run_horizontal(job, transport, strategy=FedAvg())
    assert err.value.field == "strategy"
