"""Horizontal FedAvg end to end over the in-process transport, with the wire inspected."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cdp_federated import hookimpl
from cdp_federated.coordinator import HorizontalResult, run_horizontal
from cdp_federated.errors import (
    ConfigError,
    NoTrainingDataError,
    PolicyViolation,
    SchemaMismatchError,
    TrainingError,
)
from cdp_federated.federation import (
    EvaluateRes,
    FitIns,
    FitRes,
    InProcessTransport,
    StatsRes,
    decode,
)
from cdp_federated.governance import PolicyVote
from cdp_federated.jobs import JobSpec
from cdp_federated.participant import ParticipantAgent

FEATURES = ("recency_days", "frequency", "monetary", "tenure_days", "email_opens")
LABEL = "purchased"
C = 0.5
BINS = 1000
# Non-IID on purpose: each party has its own feature shift, scale and base rate.
PARTY_SETUP = {
    "eu-west": {"rows": 1450, "shift": -0.8, "spread": 1.0, "base": -1.2},
    "us-east": {"rows": 2150, "shift": 0.6, "spread": 1.6, "base": -0.3},
    "uk": {"rows": 730, "shift": 1.5, "spread": 0.7, "base": -2.0},
}


def make_parties(seed: int = 11) -> dict[str, dict[str, pl.DataFrame]]:
    rng = np.random.default_rng(seed)
    d = len(FEATURES)
    corr = 0.6 * np.ones((d, d)) + 0.4 * np.eye(d)
    units = np.array([30.0, 4.0, 250.0, 400.0, 6.0])
    offsets = np.array([60.0, 5.0, 500.0, 900.0, 10.0])
    beta = np.array([-1.0, 0.8, 0.6, -0.3, 0.5])
    parties = {}
    for name, cfg in PARTY_SETUP.items():
        n = cfg["rows"]
        latent = rng.multivariate_normal(np.full(d, cfg["shift"]), corr * cfg["spread"], size=n)
        x = offsets + units * latent
        y = (rng.random(n) < 1 / (1 + np.exp(-(latent @ beta + cfg["base"])))).astype(float)
        ids = [f"cust_{name}_{rng.integers(10**9):09d}_{i}" for i in range(n)]
        frame = pl.DataFrame({"profile_id": ids, **dict(zip(FEATURES, x.T, strict=True)), LABEL: y})
        cut = int(0.8 * n)
        parties[name] = {"train": frame[:cut], "test": frame[cut:]}
    return parties


def make_job(rounds: int = 30, **params) -> JobSpec:
    return JobSpec(
        job_id="horizontal-test",
        kind="horizontal",
        model="logreg",
        purpose="model_training",
        features=FEATURES,
        label=LABEL,
        rounds=rounds,
        params={"C": C, "histogram_bins": BINS, **params},
    )


def provider(frames: dict[str, pl.DataFrame]):
    return lambda job, split: frames[split]


def make_transport(parties, *, recorder=None, pm=None, wrap=None) -> InProcessTransport:
    handlers = {}
    for name, frames in parties.items():
        handler = ParticipantAgent(name, provider(frames), pm=pm).handle
        handlers[name] = wrap(name, handler) if wrap else handler
    return InProcessTransport(handlers, recorder=recorder)


def pooled(parties, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    frame = pl.concat([p[split] for p in parties.values()])
    return frame.select(FEATURES).to_numpy(), frame[LABEL].to_numpy(), frame["profile_id"].to_list()


@pytest.fixture(scope="module")
def parties():
    return make_parties()


@pytest.fixture(scope="module")
def federated(parties) -> tuple[HorizontalResult, list[tuple[str, str, bytes]]]:
    frames: list[tuple[str, str, bytes]] = []
    result = run_horizontal(
        make_job(), make_transport(parties, recorder=lambda *f: frames.append(f))
    )
    return result, frames


# --- accuracy ------------------------------------------------------------------------------------


def test_federated_auc_matches_centralised_sklearn(parties, federated):
    result, _ = federated
    x_train, y_train, _ = pooled(parties, "train")
    x_test, y_test, _ = pooled(parties, "test")
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    central = LogisticRegression(C=C, max_iter=1000).fit((x_train - mean) / std, y_train)
    central_auc = roc_auc_score(y_test, central.decision_function((x_test - mean) / std))

    gap = abs(result.auc - central_auc)
    print(f"federated AUC {result.auc:.5f}, centralised {central_auc:.5f}, gap {gap:.5f}")
    assert gap <= 0.005
    np.testing.assert_allclose(result.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(result.scale, std, rtol=1e-9)
    np.testing.assert_allclose(
        result.parameters, np.r_[central.coef_[0], central.intercept_], atol=5e-3
    )
    # The exported estimator scores raw rows exactly like the federated model evaluated them.
    scores = result.estimator.predict_proba(x_test)[:, 1]
    assert abs(roc_auc_score(y_test, scores) - result.auc) < 1e-3
    assert result.accuracy == pytest.approx(np.mean((scores >= 0.5) == y_test), abs=1e-12)


def test_result_shape(parties, federated):
    result, _ = federated
    assert result.rounds == 30 and [r.round for r in result.history] == list(range(1, 31))
    assert result.rows_per_party == {
        name: {"train": p["train"].height, "test": p["test"].height} for name, p in parties.items()
    }
    assert result.feature_names == FEATURES
    assert result.estimator.feature_names_in_.tolist() == list(FEATURES)
    assert set(result.evaluations) == {"test", "train"}
    assert result.evaluations["test"].count == sum(p["test"].height for p in parties.values())
    assert result.evaluations["train"].participants == ("eu-west", "uk", "us-east")
    assert all(not r.failures and len(r.participants) == 3 for r in result.history)
    losses = [r.train_loss for r in result.history]
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:], strict=False))  # monotone
    assert 0 < result.logloss < np.log(2) and 0.5 < result.accuracy <= 1


# --- what crosses the wire -----------------------------------------------------------------------


def test_no_identifier_or_raw_row_crosses_the_wire(parties, federated):
    result, frames = federated
    blob = b"\x00".join(frame for _, _, frame in frames)
    assert b"cust_" not in blob  # every profile_id starts with it
    for p in parties.values():
        train = p["train"]
        for pid in train["profile_id"].to_list()[::97]:
            assert pid.encode() not in blob
        x = train.select(FEATURES).to_numpy()
        z = (x - result.mean) / result.scale
        for i in range(0, train.height, 101):
            assert x[i].astype("<f8").tobytes() not in blob
            assert z[i].astype("<f8").tobytes() not in blob
        for split in ("train", "test"):
            labels = p[split][LABEL].to_numpy()
            assert labels.astype("<f8").tobytes() not in blob
            assert labels.astype(bool).tobytes() not in blob


def test_replies_carry_only_aggregates_of_fixed_size(parties, federated):
    _, frames = federated
    d = len(FEATURES)
    replies = [decode(frame) for direction, _, frame in frames if direction == "reply"]
    assert {type(m) for m in replies} == {StatsRes, FitRes, EvaluateRes}
    for m in replies:
        if isinstance(m, FitRes):
            assert m.parameters.shape == (d + 1,) and set(m.metrics) == {"loss"}
        elif isinstance(m, StatsRes):
            assert m.sums.shape == (d,) and m.scatter.shape == (d, d)
        else:
            assert m.positives.shape == m.negatives.shape == (BINS,)
    fit_frames = [f for direction, _, f in frames if direction == "reply" and b'"fit_res"' in f]
    assert len(fit_frames) == 30 * len(parties)
    assert max(len(f) for f in fit_frames) < 400  # parameters + a loss, whatever the row count


def test_requests_carry_the_job_and_model_never_data(federated):
    _, frames = federated
    for direction, _, frame in frames:
        if direction == "request":
            message = decode(frame)
            assert message.job["job_id"] == "horizontal-test"


def test_fit_setup_is_sent_once_per_participant_then_named(parties, federated):
    # The job spec, mean, scale and preconditioner travel in each participant's first fit
    # request only; later rounds name them by digest (FitIns.setup) and carry the model.
    _, frames = federated
    d = len(FEATURES)
    fits = [
        (name, decode(frame))
        for direction, name, frame in frames
        if direction == "request" and b'"fit_ins"' in frame
    ]
    full = [(name, m) for name, m in fits if not m.is_short]
    assert sorted(name for name, _ in full) == sorted(parties)
    assert all(m.preconditioner.shape == (d + 1, d + 1) and m.round == 1 for _, m in full)
    assert {m.setup for _, m in fits} == {full[0][1].setup} and len(full[0][1].setup) == 64
    short = [m for _, m in fits if m.is_short]
    assert len(short) == len(fits) - len(parties) > 0
    assert all(
        m.job == {"job_id": "horizontal-test"} and m.parameters.shape == (d + 1,) for m in short
    )


# --- refusals ------------------------------------------------------------------------------------


def test_schema_mismatch_names_the_participant_and_columns(parties):
    broken = dict(parties)
    broken["uk"] = {k: f.rename({"tenure_days": "tenure"}) for k, f in parties["uk"].items()}
    with pytest.raises(SchemaMismatchError) as info:
        run_horizontal(make_job(rounds=2), make_transport(broken))
    message = str(info.value)
    assert "'uk'" in message and "tenure_days" in message and "'tenure'" in message
    assert info.value.value == "uk"


def test_party_without_rows_is_a_clear_error(parties):
    empty = dict(parties)
    empty["eu-west"] = {k: f.clear() for k, f in parties["eu-west"].items()}
    with pytest.raises(NoTrainingDataError, match="'eu-west' has no training rows"):
        run_horizontal(make_job(rounds=2), make_transport(empty))


def test_nan_features_are_refused_unless_mean_imputation_is_asked_for(parties):
    dirty = dict(parties)
    train = parties["us-east"]["train"]
    holes = pl.Series([None if i % 50 == 0 else v for i, v in enumerate(train["monetary"])])
    dirty["us-east"] = {**parties["us-east"], "train": train.with_columns(monetary=holes)}
    expected = f"'us-east'.*missing or non-finite.*'monetary': {holes.null_count()}"
    with pytest.raises(TrainingError, match=expected):
        run_horizontal(make_job(rounds=2), make_transport(dirty))

    result = run_horizontal(make_job(rounds=5, impute="mean"), make_transport(dirty))
    assert result.rounds == 5 and result.auc > 0.7


def fail_in_round(failing: str, round_number: int):
    def wrap(name, handler):
        def maybe_fail(message):
            if name == failing and isinstance(message, FitIns) and message.round == round_number:
                raise ConnectionResetError("link to the data centre dropped")
            return handler(message)

        return maybe_fail

    return wrap


def test_round_commits_without_a_failed_party_when_enough_remain(parties):
    transport = make_transport(parties, wrap=fail_in_round("uk", 3))
    seen = []
    result = run_horizontal(
        make_job(rounds=6, min_fit_participants=2), transport, on_round=seen.append
    )
    third = result.history[2]
    assert third.participants == ("eu-west", "us-east")
    assert third.failures == {"uk": "ConnectionResetError: link to the data centre dropped"}
    assert third.num_examples == sum(parties[p]["train"].height for p in ("eu-west", "us-east"))
    assert all(len(r.participants) == 3 for r in result.history if r.round != 3)
    assert seen == list(result.history) and result.rounds == 6


def test_too_few_results_is_a_training_error(parties):
    transport = make_transport(parties, wrap=fail_in_round("uk", 2))
    with pytest.raises(TrainingError, match=r"round 2 got 2 results, needs 3.*uk: Connection"):
        run_horizontal(make_job(rounds=4), transport)


def test_bad_params_are_config_errors(parties):
    transport = make_transport(parties)
    for params in (
        {"histogram_bins": 999},
        {"C": -1},
        {"local_steps": 1.5},
        {"min_fit_participants": 4},
    ):
        with pytest.raises(ConfigError) as info:
            run_horizontal(make_job(rounds=1, **params), transport)
        assert info.value.field.startswith("params.")
    with pytest.raises(ConfigError, match="horizontal logistic regression"):
        run_horizontal(replace(make_job(), model="gbm"), transport)


# --- hooks and governance ------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    @hookimpl
    def cdp_job_started(self, job, participants):
        self.calls.append(("started", {"job": job, "participants": participants}))

    @hookimpl
    def cdp_round_ended(self, job, round_number, metrics):
        self.calls.append(("round", {"job": job, "round_number": round_number, "metrics": metrics}))


def test_lifecycle_hooks_are_called_with_the_right_arguments(pm, parties):
    recorder = Recorder()
    pm.register(recorder)
    job = make_job(rounds=3)
    result = run_horizontal(job, make_transport(parties), pm=pm)

    assert [name for name, _ in recorder.calls] == ["started", "round", "round", "round"]
    started = recorder.calls[0][1]
    assert started == {"job": job, "participants": ["eu-west", "uk", "us-east"]}
    for (_, call), record in zip(recorder.calls[1:], result.history, strict=True):
        assert call["job"] is job and call["round_number"] == record.round
        assert call["metrics"] == {
            "round": record.round,
            "train_loss": record.train_loss,
            "participants": ["eu-west", "uk", "us-east"],
            "failed": [],
            "num_examples": sum(p["train"].height for p in parties.values()),
        }
    assert recorder.calls[1][1]["metrics"]["train_loss"] == pytest.approx(np.log(2))


class DenyUk:
    @hookimpl
    def cdp_policy_decision(self, job, participant):
        if participant == "uk":
            return PolicyVote(False, "no transfers to this partner", "partners")
        return None


def test_a_participant_policy_deny_stops_the_job_before_training(pm, parties):
    pm.register(DenyUk())
    with pytest.raises(PolicyViolation, match="'uk'.*no transfers to this partner"):
        run_horizontal(make_job(rounds=2), make_transport(parties, pm=pm))
