"""Horizontal histogram GBM end to end over the in-process transport, with the wire inspected."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from cdp_federated.coordinator.gbm_runner import run_horizontal_gbm
from cdp_federated.errors import (
    ConfigError,
    NoTrainingDataError,
    SchemaMismatchError,
    SetupRequiredError,
    TrainingError,
)
from cdp_federated.federation import InProcessTransport, decode
from cdp_federated.federation.messages import (
    Failure,
    GBMEvaluateRes,
    GBMHistogramIns,
    GBMHistogramRes,
    GBMSketchRes,
)
from cdp_federated.jobs import JobSpec
from cdp_federated.learning.gbm import GBMParams, bin_codes, fit_local
from cdp_federated.learning.gbm.binning import MIN_ROWS_PER_POINT
from cdp_federated.learning.gbm.draws import feature_sample
from cdp_federated.participant import ParticipantAgent
from tests.learning import gbm_reference as ref
from tests.learning.test_gbm_core import assert_same_trees, heap_trees

FEATURES = ("recency", "spend", "visits", "tenure")
LABEL = "y"
# Non-IID on purpose: different sizes, feature shifts and label rates.
PARTIES = {
    "eu": {"rows": 900, "shift": -0.7, "base": -1.5},
    "us": {"rows": 260, "shift": 0.9, "base": 0.8},
    "uk": {"rows": 75, "shift": 0.2, "base": -0.2},
}


def make_parties(seed: int = 21, regression: bool = False) -> dict[str, dict[str, pl.DataFrame]]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, cfg in PARTIES.items():
        n = cfg["rows"]
        x = np.column_stack(
            [
                rng.exponential(20, n) + 10 * cfg["shift"],
                rng.lognormal(3 + cfg["shift"], 0.7, n),
                rng.poisson(4 + cfg["shift"], n).astype(float),
                rng.normal(100, 30, n),
            ]
        )
        signal = -0.05 * x[:, 0] + 0.02 * x[:, 1] + 0.3 * x[:, 2] * (x[:, 3] > 100) + cfg["base"]
        y = (
            signal + rng.normal(size=n)
            if regression
            else (rng.random(n) < 1 / (1 + np.exp(-signal)))
        )
        ids = [f"{name}-{i}" for i in range(n)]
        frame = pl.DataFrame(
            {"profile_id": ids, **dict(zip(FEATURES, x.T, strict=True)), LABEL: y.astype(float)}
        )
        cut = int(0.8 * n)
        out[name] = {"train": frame[:cut], "test": frame[cut:]}
    return out


def make_job(**params) -> JobSpec:
    return JobSpec(
        job_id="gbm-test",
        kind="horizontal",
        model="gbm",
        purpose="model_training",
        features=FEATURES,
        label=LABEL,
        rounds=params.pop("rounds", 4),
        params={"max_depth": 3, "max_bins": 8, "learning_rate": 0.3, "seed": 5, **params},
    )


def make_transport(parties, *, recorder=None, consent_gate=None) -> InProcessTransport:
    handlers = {
        name: ParticipantAgent(
            name, (lambda f: lambda job, split: f[split])(frames), consent_gate=consent_gate
        ).handle
        for name, frames in parties.items()
    }
    return InProcessTransport(handlers, recorder=recorder)


def pooled(parties, split: str) -> tuple[np.ndarray, np.ndarray]:
    frame = pl.concat([p[split] for p in parties.values()])
    return frame.select(FEATURES).to_numpy(), frame[LABEL].to_numpy()


# --- equal splits --------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["binary", "regression"])
def test_federated_trees_equal_a_naive_centralised_reference_on_the_same_bins(objective):
    parties = make_parties(regression=objective == "regression")
    result = run_horizontal_gbm(make_job(objective=objective), make_transport(parties))
    x, y = pooled(parties, "train")
    edges = list(result.edges)
    trees, margin = ref.train(
        ref.codes_of(x, edges),
        y,
        [e.size for e in edges],
        objective=objective,
        n_trees=4,
        max_depth=3,
        learning_rate=0.3,
        reg_lambda=1.0,
        gamma=0.0,
        min_child_weight=1.0,
        base=result.ensemble.base_score,
    )
    assert_same_trees(heap_trees(result.ensemble), trees)
    np.testing.assert_allclose(result.estimator.decision_function(x), margin, atol=1e-9, rtol=0)
    assert result.rounds == 4
    assert result.rows_per_party == {
        name: {"train": int(0.8 * cfg["rows"]), "test": cfg["rows"] - int(0.8 * cfg["rows"])}
        for name, cfg in PARTIES.items()
    }


def test_federated_model_equals_pooled_training_however_rows_are_split():
    parties = make_parties(seed=3)
    job = make_job(rounds=8, max_depth=4, max_bins=32, subtraction=True)
    result = run_horizontal_gbm(job, make_transport(parties))
    x, y = pooled(parties, "train")
    central = fit_local(x, y, list(result.edges), GBMParams.from_mapping(job.params, n_trees=8))
    assert_same_trees(heap_trees(result.ensemble), heap_trees(central))
    x_test, y_test = pooled(parties, "test")
    exact_auc = roc_auc_score(y_test, result.estimator.predict_proba(x_test)[:, 1])
    assert result.auc == pytest.approx(exact_auc, abs=0.01)  # from 1000-bin score histograms
    assert result.evaluations["test"].participants == ("eu", "uk", "us")


def test_bins_come_from_summaries_close_to_pooled_quantiles():
    parties = make_parties()
    result = run_horizontal_gbm(make_job(rounds=1, max_bins=16), make_transport(parties))
    x, _ = pooled(parties, "train")
    spend = result.edges[1]
    ranks = np.searchsorted(np.sort(x[:, 1]), spend) / x.shape[0]
    assert np.abs(ranks - np.arange(1, 16) / 16).max() < 0.03
    distinct = np.unique(x[:, 2])  # a count feature: exact values, edges midway between them
    visits = result.edges[2]
    assert visits.size <= distinct.size - 1
    assert set(visits.tolist()) <= set(((distinct[:-1] + distinct[1:]) / 2).tolist())


# --- parties, schemas, values --------------------------------------------------------------------


def test_a_party_without_consented_rows_is_excluded_and_the_job_goes_on():
    parties = make_parties()
    parties["uk"] = {"train": parties["uk"]["train"][:0], "test": parties["uk"]["test"]}
    result = run_horizontal_gbm(make_job(rounds=2), make_transport(parties))
    assert set(result.rows_per_party) == {"eu", "us"}
    assert "uk" in result.excluded and "no training rows" in result.excluded["uk"]
    with pytest.raises(NoTrainingDataError, match="needs 3"):
        run_horizontal_gbm(make_job(rounds=2, min_participants=3), make_transport(parties))


def test_mismatched_schema_names_the_party_and_the_columns():
    parties = make_parties()
    parties["us"] = {s: f.rename({"visits": "sessions"}) for s, f in parties["us"].items()}
    with pytest.raises(SchemaMismatchError, match=r"'us'.*\['visits'\]"):
        run_horizontal_gbm(make_job(), make_transport(parties))


def test_missing_values_are_refused_unless_the_job_imputes_them():
    parties = make_parties()
    train = parties["eu"]["train"]
    parties["eu"]["train"] = train.with_columns(
        pl.when(pl.int_range(pl.len()) % 10 == 0)
        .then(None)
        .otherwise(pl.col("spend"))
        .alias("spend")
    )
    with pytest.raises(TrainingError, match=r"'eu'.*missing or non-finite.*spend"):
        run_horizontal_gbm(make_job(), make_transport(parties))
    result = run_horizontal_gbm(make_job(missing="impute"), make_transport(parties))
    assert result.rounds == 4 and 0.5 < result.auc <= 1


def test_bad_jobs_are_config_errors():
    with pytest.raises(ConfigError):
        run_horizontal_gbm(make_job(max_bins=1000), make_transport(make_parties()))
    logreg = JobSpec("j", "horizontal", "logreg", "p", FEATURES, LABEL)
    with pytest.raises(ConfigError, match="model='gbm'"):
        run_horizontal_gbm(logreg, make_transport(make_parties()))


# --- subsampling and consent ---------------------------------------------------------------------


def test_row_and_feature_subsampling_follow_the_shared_seed():
    parties = make_parties()
    job = make_job(rounds=6, subsample=0.6, colsample=0.5)
    first = run_horizontal_gbm(job, make_transport(parties))
    again = run_horizontal_gbm(job, make_transport(parties))
    assert_same_trees(heap_trees(first.ensemble), heap_trees(again.ensemble))
    full = run_horizontal_gbm(make_job(rounds=6), make_transport(parties))
    assert heap_trees(first.ensemble) != heap_trees(full.ensemble)
    for tree, record in enumerate(heap_trees(first.ensemble)):
        allowed = set(feature_sample(5, tree, len(FEATURES), 0.5).tolist())
        assert {f for f, _ in record["splits"].values()} <= allowed


def test_revoked_consent_removes_rows_from_the_next_tree():
    parties = make_parties()
    allowed = set(pl.concat([p[s] for p in parties.values() for s in p])["profile_id"].to_list())
    agents = {
        n: ParticipantAgent(
            n, (lambda f: lambda job, split: f[split])(fr), consent_gate=lambda job: allowed
        )
        for n, fr in parties.items()
    }
    transport = InProcessTransport({n: a.handle for n, a in agents.items()})
    before = run_horizontal_gbm(make_job(rounds=3), transport)
    assert agents["eu"].revoked == {}

    def revoke_after_first_tree(record):
        if record.tree == 0:
            allowed.difference_update(f"eu-{i}" for i in range(100))

    after = run_horizontal_gbm(make_job(rounds=3), transport, on_round=revoke_after_first_tree)
    assert agents["eu"].revoked == {"train": 100}
    first, *rest = heap_trees(after.ensemble)
    assert_same_trees([first], heap_trees(before.ensemble)[:1])  # tree 0 still had the rows
    assert rest != heap_trees(before.ensemble)[1:]


def test_a_participant_failing_mid_training_stops_the_job():
    parties = make_parties()
    agents = {
        n: ParticipantAgent(n, (lambda f: lambda job, split: f[split])(fr)).handle
        for n, fr in parties.items()
    }
    calls = {"n": 0}

    def flaky(message):
        if isinstance(message, GBMHistogramIns):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("disk full")
        return agents["uk"](message)

    transport = InProcessTransport({**agents, "uk": flaky})
    with pytest.raises(
        TrainingError, match="'uk' failed at gbm_histogram: RuntimeError: disk full"
    ):
        run_horizontal_gbm(make_job(), transport)


# --- what crosses the wire -----------------------------------------------------------------------


def test_no_frame_the_coordinator_receives_holds_a_row_or_a_per_row_gradient():
    parties = make_parties()
    frames: list[tuple[str, str, bytes]] = []
    job = make_job(rounds=3, max_bins=8)
    run_horizontal_gbm(job, make_transport(parties, recorder=lambda *f: frames.append(f)))
    replies = [(p, decode(f)) for direction, p, f in frames if direction == "reply"]
    assert {type(m) for _, m in replies} == {GBMSketchRes, GBMHistogramRes, GBMEvaluateRes}
    raw_values = {
        name: np.concatenate(
            [
                fr.select(c).to_numpy().ravel()
                for c in ("recency", "spend", "tenure")
                for fr in frames_.values()
            ]
        )
        for name, frames_ in parties.items()
    }
    for party, message in replies:
        rows = {f.height for f in parties[party].values()}
        if isinstance(message, GBMHistogramRes):
            k = message.nodes.size
            assert message.grad.shape == message.hess.shape == (k, len(FEATURES), 8)
            assert 1 <= k <= 2 ** (job.params["max_depth"] - 1)
            assert message.nodes.max() < 2 ** job.params["max_depth"]
        if isinstance(message, GBMSketchRes):  # per feature: few exact values or chunk means
            train_rows = parties[party]["train"].height
            limits = np.where(message.exact, 8, train_rows // MIN_ROWS_PER_POINT)
            assert (message.lengths <= limits).all()
        for name in type(message).ARRAYS:
            array = getattr(message, name)
            if not isinstance(message, GBMSketchRes):
                assert not (set(array.shape) & rows), (party, message.TYPE, name, array.shape)
            if array.dtype.kind == "f":  # continuous features never appear as they are
                assert not np.isin(array, raw_values[party]).any(), (party, message.TYPE, name)
    requests = [decode(f) for direction, _, f in frames if direction == "request"]
    histogram_requests = [m for m in requests if isinstance(m, GBMHistogramIns)]
    assert all(
        m.build_nodes.size <= max(1, m.split_nodes.size) for m in histogram_requests if m.depth
    )
    assert not any(isinstance(m, Failure) for _, m in replies)


def test_subtraction_asks_for_half_the_nodes_and_gives_the_same_model():
    parties = make_parties()
    sizes = {}
    models = {}
    for subtraction in (True, False):
        frames: list[tuple[str, str, bytes]] = []
        job = make_job(rounds=3, subtraction=subtraction)
        models[subtraction] = run_horizontal_gbm(
            job, make_transport(parties, recorder=lambda *f, frames=frames: frames.append(f))
        )
        sizes[subtraction] = sum(
            decode(f).nodes.size
            for d, _, f in frames
            if d == "reply" and b"gbm_histogram_res" in f[:200]
        )
    assert_same_trees(heap_trees(models[True].ensemble), heap_trees(models[False].ensemble))
    assert sizes[True] < 0.75 * sizes[False]


def test_participants_bin_with_the_agreed_edges():
    parties = make_parties()
    result = run_horizontal_gbm(make_job(rounds=2), make_transport(parties))
    x, _ = pooled(parties, "train")
    codes = bin_codes(x, list(result.edges))
    np.testing.assert_allclose(
        result.ensemble.predict_margin_codes(codes), result.ensemble.predict_margin(x), atol=1e-12
    )


def test_participants_refuse_requests_out_of_order_or_without_bins():
    parties = make_parties()
    agent = ParticipantAgent("eu", lambda job, split: parties["eu"][split])
    job = make_job().to_dict()
    level = {"job": job, "seed": 1, "base_score": 0.0, "features": np.arange(4)}
    no_bins = GBMHistogramIns(tree=0, depth=0, build_nodes=np.array([0]), **level)
    with pytest.raises(SetupRequiredError, match="holds no training state"):
        agent.handle(no_bins)  # the coordinator then sends a catch-up (tests/test_gbm_restart.py)
    edges = {"edges": np.array([10.0, 20.0, 1.0, 2.0, 50.0]), "edge_counts": np.array([2, 0, 2, 1])}
    first = GBMHistogramIns(tree=0, depth=0, build_nodes=np.array([0]), **level, **edges)
    reply = agent.handle(first)
    assert isinstance(reply, GBMHistogramRes) and reply.grad.shape == (1, 4, 8)
    assert reply.hess.sum() == pytest.approx(4 * reply.hess[0, 0].sum())
    skipped = GBMHistogramIns(tree=0, depth=2, build_nodes=np.array([3]), **level)
    with pytest.raises(TrainingError, match="after tree 0 depth 0"):
        agent.handle(skipped)
    bad_node = GBMHistogramIns(tree=0, depth=1, build_nodes=np.array([999]), **level)
    with pytest.raises(TrainingError, match="build_nodes out of range"):
        agent.handle(bad_node)
