"""Horizontal linear models end to end: regression, penalties, strategies, sampling, early stopping,
personalisation and the data refusals, over the in-process transport with the wire inspected."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.linear_model import ElasticNet, LogisticRegression, Ridge
from sklearn.metrics import r2_score, roc_auc_score

from cdp_federated.coordinator import run_horizontal
from cdp_federated.errors import (
    ConfigError,
    NoTrainingDataError,
    SchemaMismatchError,
    TrainingError,
)
from cdp_federated.federation import FitRes, InProcessTransport, decode
from cdp_federated.federation.messages import (
    PersonalizeIns,
    PersonalizeRes,
    RegressionEvaluateRes,
    StatsRes,
)
from cdp_federated.jobs import JobSpec
from cdp_federated.learning.estimators import FederatedLinearRegression
from cdp_federated.participant import ParticipantAgent
from tests.test_horizontal_run import FEATURES, LABEL, make_parties, make_transport, pooled

REG_FEATURES = ("recency_days", "frequency", "tenure_days", "email_opens")
REG_LABEL = "monetary"


def job(model="logreg", rounds=30, **params) -> JobSpec:
    regression = model == "linear"
    return JobSpec(
        job_id="linear-test",
        kind="horizontal",
        model=model,
        purpose="model_training",
        features=REG_FEATURES if regression else FEATURES,
        label=REG_LABEL if regression else LABEL,
        rounds=rounds,
        params={"C": 0.5, **params},
    )


@pytest.fixture(scope="module")
def parties():
    return make_parties()


def standardised(parties, features, split="train"):
    frame = pl.concat([p["train"] for p in parties.values()])
    x = frame.select(features).to_numpy()
    mean, std = x.mean(0), x.std(0)
    target = pl.concat([p[split] for p in parties.values()])
    return (target.select(features).to_numpy() - mean) / std, mean, std


def regression_data(parties, split):
    z, _, _ = standardised(parties, REG_FEATURES, split)
    return z, pl.concat([p[split] for p in parties.values()])[REG_LABEL].to_numpy()


# --- regression ----------------------------------------------------------------------------------


def test_regression_reaches_the_centralised_least_squares_solution(parties):
    frames = []
    result = run_horizontal(
        job("linear", rounds=3),
        make_transport(parties, recorder=lambda *f: frames.append(f)),
    )
    z, y = regression_data(parties, "train")
    z_test, y_test = regression_data(parties, "test")
    ridge = Ridge(alpha=1 / 0.5).fit(z, y)
    central_rmse = float(np.sqrt(np.mean((ridge.predict(z_test) - y_test) ** 2)))

    assert result.objective == "regression" and np.isnan(result.auc)
    assert result.rmse == pytest.approx(central_rmse, rel=1e-9)
    assert result.r2 == pytest.approx(r2_score(y_test, ridge.predict(z_test)), rel=1e-9)
    np.testing.assert_allclose(result.estimator.coef_[0], ridge.coef_, rtol=1e-9)
    assert isinstance(result.estimator, FederatedLinearRegression)
    raw_test = pl.concat([p["test"] for p in parties.values()]).select(REG_FEATURES).to_numpy()
    np.testing.assert_allclose(result.estimator.predict(raw_test), ridge.predict(z_test))
    # With the exact-Hessian preconditioner one round lands on the optimum.
    losses = [r.train_loss for r in result.history]
    assert losses[1] == pytest.approx(losses[2], rel=1e-12) and losses[1] < losses[0]
    # Only sums travel back for evaluation; no prediction, no label.
    replies = [decode(f) for d, _, f in frames if d == "reply"]
    evaluations = [m for m in replies if isinstance(m, RegressionEvaluateRes)]
    assert len(evaluations) == 2 * len(parties)
    assert all(m.ARRAYS == {} for m in evaluations)
    blob = b"".join(f for _, _, f in frames)
    for p in parties.values():
        labels = p["train"][REG_LABEL].to_numpy()
        assert labels[:50].astype("<f8").tobytes() not in blob


def test_regression_with_l1_matches_elastic_net(parties):
    result = run_horizontal(
        job("linear", rounds=300, C=0.002, l1_ratio=0.9), make_transport(parties)
    )
    z, y = regression_data(parties, "train")
    n = z.shape[0]
    net = ElasticNet(alpha=1 / (0.002 * n), l1_ratio=0.9, tol=1e-12, max_iter=100_000).fit(z, y)
    np.testing.assert_allclose(result.estimator.coef_[0], net.coef_, rtol=1e-4, atol=1e-3)
    assert (result.estimator.coef_[0] == 0).sum() == (net.coef_ == 0).sum()


def test_logistic_with_l1_matches_sklearn_and_zeroes_weights(parties):
    result = run_horizontal(job(rounds=400, C=0.002, l1_ratio=1.0), make_transport(parties))
    z, _, _ = standardised(parties, FEATURES)
    _, y, _ = pooled(parties, "train")
    ref = LogisticRegression(C=0.002, l1_ratio=1.0, solver="saga", tol=1e-10, max_iter=50_000)
    ref.fit(z, y)
    np.testing.assert_allclose(result.parameters[:-1], ref.coef_[0], atol=2e-3)
    assert (result.parameters[:-1] == 0).any()
    assert ((result.parameters[:-1] == 0) == (ref.coef_[0] == 0)).all()


# --- strategies ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"strategy": "fedavg"},
        {"strategy": "fedprox", "mu": 0.05, "local_steps": 3},
        {"strategy": "fedavgm", "server_momentum": 0.5},
        {"strategy": "fedadam", "server_learning_rate": 0.1},
        {"strategy": "fedyogi", "server_learning_rate": 0.1},
    ],
)
def test_every_strategy_reaches_centralised_auc_on_non_iid_parties(parties, params):
    result = run_horizontal(job(rounds=40, **params), make_transport(parties))
    z_train, _, _ = standardised(parties, FEATURES)
    z_test, _, _ = standardised(parties, FEATURES, "test")
    _, y_train, _ = pooled(parties, "train")
    _, y_test, _ = pooled(parties, "test")
    central = LogisticRegression(C=0.5, max_iter=1000).fit(z_train, y_train)
    central_auc = roc_auc_score(y_test, central.decision_function(z_test))
    assert abs(result.auc - central_auc) <= 0.005
    assert result.history[-1].train_loss <= result.history[0].train_loss


def test_fedprox_sends_mu_in_the_fit_config(parties):
    frames = []
    run_horizontal(
        job(rounds=2, strategy="fedprox", mu=0.3),
        make_transport(parties, recorder=lambda *f: frames.append(f)),
    )
    configs = [
        m.config for d, _, f in frames if d == "request" and (m := decode(f)).TYPE == "fit_ins"
    ]
    assert configs and all(c["proximal_mu"] == 0.3 for c in configs)


def test_bad_strategy_params_are_config_errors_naming_the_field(parties):
    transport = make_transport(parties)
    for params, field_name in (
        ({"strategy": "fedsgd"}, "params.strategy"),
        ({"strategy": "fedadam", "beta2": 2}, "params.beta2"),
        ({"mu": 0.1}, "params.mu"),
        ({"l1_ratio": 1.5}, "params.l1_ratio"),
        ({"dtype": "float16"}, "params.dtype"),
        ({"fraction_fit": 0.5, "clients_per_round": 2}, "params.clients_per_round"),
        ({"patience": 0}, "params.patience"),
        ({"objective": "regression"}, "params.objective"),  # logreg is binary
    ):
        with pytest.raises(ConfigError) as info:
            run_horizontal(job(rounds=1, **params), transport)
        assert info.value.field == field_name, params


# --- sampling, early stopping, personalisation ---------------------------------------------------


def test_client_sampling_is_recorded_and_reproducible_from_the_seed(parties):
    params = {"clients_per_round": 2, "seed": 11, "min_fit_participants": 2}
    first = run_horizontal(job(rounds=8, **params), make_transport(parties))
    again = run_horizontal(job(rounds=8, **params), make_transport(parties))
    draws = [r.sampled for r in first.history]
    assert draws == [r.sampled for r in again.history]
    assert all(
        len(d) == 2 and r.participants == d for d, r in zip(draws, first.history, strict=True)
    )
    assert len(set(draws)) > 1
    np.testing.assert_array_equal(first.parameters, again.parameters)
    with pytest.raises(ConfigError, match="per round") as info:
        run_horizontal(
            job(rounds=1, clients_per_round=2, min_fit_participants=3), make_transport(parties)
        )
    assert info.value.field == "params.min_fit_participants"


def test_early_stopping_keeps_the_best_model_on_the_validation_hold_out(parties):
    frames = []
    result = run_horizontal(
        job(rounds=60, patience=2, min_delta=1e-3, validation_fraction=0.2),
        make_transport(parties, recorder=lambda *f: frames.append(f)),
    )
    assert result.rounds < 60  # stopped early
    assert result.best_round is not None and result.best_round <= result.rounds
    assert all(r.val_loss is not None and np.isfinite(r.val_loss) for r in result.history)
    validation = result.evaluations["validation"]
    assert validation.count > 0 and abs(validation.logloss - result.history[0].val_loss) < 0.2
    held = validation.count
    train = sum(p["train"].height for p in parties.values())
    assert 0.15 * train < held < 0.25 * train
    assert sum(v["train"] for v in result.rows_per_party.values()) == train - held
    fits = [decode(f) for d, _, f in frames if d == "reply" and b'"fit_res"' in f]
    assert all(set(m.metrics) == {"loss", "val_loss_sum", "val_count"} for m in fits)


def test_personalisation_reports_per_party_metrics_and_keeps_the_model_local(parties):
    frames = []
    agents = {n: ParticipantAgent(n, lambda job, split, f=f: f[split]) for n, f in parties.items()}
    transport = InProcessTransport(
        {n: a.handle for n, a in agents.items()}, recorder=lambda *f: frames.append(f)
    )
    result = run_horizontal(job(rounds=10, personalize_steps=5), transport)
    assert set(result.personalisation) == set(parties)
    for name, report in result.personalisation.items():
        assert report["count"] == parties[name]["test"].height
        assert (
            set(report["global"]) == set(report["personalised"]) == {"auc", "logloss", "accuracy"}
        )
        assert agents[name].personalised["linear-test"].shape == (len(FEATURES) + 1,)
    # The personalised models never cross the wire: replies carry metrics only.
    replies = [decode(f) for d, _, f in frames if d == "reply"]
    personal = [m for m in replies if isinstance(m, PersonalizeRes)]
    assert len(personal) == len(parties) and all(m.ARRAYS == {} for m in personal)
    blob = b"".join(f for d, _, f in frames if d == "reply")
    for agent in agents.values():
        assert agent.personalised["linear-test"].astype("<f8").tobytes() not in blob
    requests = [decode(f) for d, _, f in frames if d == "request"]
    assert sum(isinstance(m, PersonalizeIns) for m in requests) == len(parties)


# --- float32 -------------------------------------------------------------------------------------


def test_float32_job_keeps_float32_matrices_and_matches_float64(parties):
    agents = {n: ParticipantAgent(n, lambda job, split, f=f: f[split]) for n, f in parties.items()}
    transport = InProcessTransport({n: a.handle for n, a in agents.items()})
    result32 = run_horizontal(job(rounds=30, dtype="float32"), transport)
    for agent in agents.values():
        data = agent._data["train"]
        assert data.x.dtype == np.float32 and data.y.dtype == np.float32
        assert data.x.flags.f_contiguous
    result64 = run_horizontal(job(rounds=30), make_transport(parties))
    assert result32.auc == pytest.approx(result64.auc, abs=1e-3)
    np.testing.assert_allclose(result32.parameters, result64.parameters, atol=1e-4)


def test_lazy_sources_are_read_through_the_job_columns_only(parties):
    lazy = {n: {"train": f["train"].lazy(), "test": f["test"].lazy()} for n, f in parties.items()}
    result = run_horizontal(job(rounds=30), make_transport(lazy))
    eager = run_horizontal(job(rounds=30), make_transport(parties))
    np.testing.assert_array_equal(result.parameters, eager.parameters)


# --- data refusals -------------------------------------------------------------------------------


def test_party_without_consented_rows_is_excluded_when_enough_remain(parties):
    empty = dict(parties)
    empty["uk"] = {k: f.clear() for k, f in parties["uk"].items()}
    result = run_horizontal(job(rounds=5, min_fit_participants=2), make_transport(empty))
    assert set(result.excluded) == {"uk"} and "no training rows" in result.excluded["uk"]
    assert result.rows_per_party["uk"] == {"train": 0, "test": 0}
    assert all(r.participants == ("eu-west", "us-east") for r in result.history)
    with pytest.raises(NoTrainingDataError, match="'uk' has no training rows"):
        run_horizontal(job(rounds=2), make_transport(empty))  # everyone is needed by default


def test_mismatched_column_types_name_the_party_and_column(parties):
    broken = dict(parties)
    broken["us-east"] = {
        k: f.with_columns(pl.col("frequency").cast(pl.String))
        for k, f in parties["us-east"].items()
    }
    with pytest.raises(SchemaMismatchError, match="'us-east'.*'frequency' is String") as info:
        run_horizontal(job(rounds=2), make_transport(broken))
    assert info.value.value == "us-east"


def test_missing_value_policy_is_explicit(parties):
    dirty = dict(parties)
    train = parties["eu-west"]["train"]
    holes = pl.Series([None if i % 40 == 0 else v for i, v in enumerate(train["frequency"])])
    dirty["eu-west"] = {**parties["eu-west"], "train": train.with_columns(frequency=holes)}
    for params in ({}, {"missing": "reject"}):
        with pytest.raises(TrainingError, match="'eu-west'.*'frequency': "):
            run_horizontal(job(rounds=2, **params), make_transport(dirty))
    result = run_horizontal(job(rounds=5, missing="impute"), make_transport(dirty))
    assert result.rounds == 5 and result.auc > 0.7
    with pytest.raises(TrainingError, match="unknown missing-value policy"):
        run_horizontal(job(rounds=1, missing="drop"), make_transport(dirty))
    infinite = train.with_columns(
        frequency=pl.Series([float("inf")] + train["frequency"][1:].to_list())
    )
    dirty["eu-west"] = {**parties["eu-west"], "train": infinite}
    with pytest.raises(TrainingError, match="infinities are always refused"):
        run_horizontal(job(rounds=1, missing="impute"), make_transport(dirty))


def test_regression_labels_must_be_finite(parties):
    bad = dict(parties)
    train = parties["uk"]["train"]
    bad["uk"] = {
        **parties["uk"],
        "train": train.with_columns(
            pl.when(pl.int_range(pl.len()) == 3)
            .then(None)
            .otherwise(pl.col(REG_LABEL))
            .alias(REG_LABEL)
        ),
    }
    with pytest.raises(TrainingError, match="'uk': label 'monetary' is missing or not finite in 1"):
        run_horizontal(job("linear", rounds=1), make_transport(bad))


def test_stats_carry_label_moments_for_regression(parties):
    frames = []
    run_horizontal(
        job("linear", rounds=1), make_transport(parties, recorder=lambda *f: frames.append(f))
    )
    stats = [m for d, _, f in frames if d == "reply" and isinstance(m := decode(f), StatsRes)]
    for m in stats:
        labels = next(
            p["train"][REG_LABEL].to_numpy()
            for p in parties.values()
            if p["train"].height == m.count
        )
        assert m.label_positives == pytest.approx(labels.sum())
        assert m.label_scatter == pytest.approx(((labels - labels.mean()) ** 2).sum())
    assert not any(
        isinstance(decode(f), FitRes) and decode(f).metrics.get("val_count")
        for _, _, f in frames
        if b"fit_res" in f
    )
