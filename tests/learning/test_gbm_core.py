"""GBM building blocks: binning, draws, histograms, split finding, the model and estimators."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from cdp_federated.errors import ConfigError, ModelFormatError
from cdp_federated.learning.gbm import (
    FederatedGBMClassifier,
    FederatedGBMRegressor,
    GBMParams,
    LocalBooster,
    TreeEnsemble,
    bin_codes,
    bin_edges,
    fit_local,
    merge_sketches,
    sketch_columns,
)
from cdp_federated.learning.gbm.binning import MIN_ROWS_PER_POINT, pack_edges, unpack_edges
from cdp_federated.learning.gbm.draws import feature_sample, row_sample, uniforms
from tests.learning import gbm_reference as ref


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.column_stack(
        [
            rng.normal(size=n),
            rng.exponential(3.0, size=n),
            rng.integers(0, 4, n),
            rng.normal(size=n),
        ]
    ).astype(float)
    logit = x[:, 0] - 0.4 * x[:, 1] + 0.7 * (x[:, 2] == 2) + x[:, 0] * x[:, 3]
    y_binary = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(float)
    y_regression = logit + rng.normal(scale=0.5, size=n)
    return x, y_binary, y_regression


def edges_of(x: np.ndarray, max_bins: int, sketch_size: int = 256) -> list[np.ndarray]:
    sketches = sketch_columns(x, sketch_size=sketch_size, exact_limit=max_bins)
    return [bin_edges(merge_sketches([s]), max_bins) for s in sketches]


def heap_trees(ensemble: TreeEnsemble) -> list[dict]:
    """The ensemble's trees in the reference's heap numbering."""
    trees = []
    for root in ensemble.roots:
        splits, leaves, stack = {}, {}, [(int(root), 0)]
        while stack:
            i, heap = stack.pop()
            if ensemble.feature[i] < 0:
                leaves[heap] = float(ensemble.value[i])
            else:
                splits[heap] = (int(ensemble.feature[i]), int(ensemble.threshold_bin[i]))
                stack += [
                    (int(ensemble.left[i]), 2 * heap + 1),
                    (int(ensemble.right[i]), 2 * heap + 2),
                ]
        trees.append({"splits": splits, "leaves": leaves})
    return trees


def assert_same_trees(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a["splits"] == b["splits"]
        assert sorted(a["leaves"]) == sorted(b["leaves"])
        for node, value in b["leaves"].items():
            assert a["leaves"][node] == pytest.approx(value, abs=1e-9, rel=0)


# --- binning -------------------------------------------------------------------------------------


def test_low_cardinality_columns_are_exact_and_edges_sit_between_values():
    x = np.array([[0.0], [1.0], [1.0], [3.0], [0.0]])
    (sketch,) = sketch_columns(x, sketch_size=64, exact_limit=8)
    assert sketch.exact
    assert sketch.values.tolist() == [0.0, 1.0, 3.0]
    assert sketch.weights.tolist() == [2.0, 2.0, 1.0]
    assert bin_edges(sketch, 8).tolist() == [0.5, 2.0]


def test_continuous_summaries_are_chunk_means_never_raw_values():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1000, 1))
    (sketch,) = sketch_columns(x, sketch_size=64, exact_limit=32)
    assert not sketch.exact
    assert sketch.values.size == 64 and sketch.weights.sum() == 1000
    assert sketch.weights.min() >= MIN_ROWS_PER_POINT
    assert not np.isin(sketch.values, x[:, 0]).any()
    assert (np.diff(sketch.values) > 0).all()


def test_tiny_party_still_averages_rows():
    x = np.arange(40, dtype=float).reshape(-1, 1) * 1.37
    (sketch,) = sketch_columns(x, sketch_size=1024, exact_limit=8)
    assert sketch.weights.min() >= MIN_ROWS_PER_POINT
    assert sketch.values.size == 40 // MIN_ROWS_PER_POINT


def test_merged_edges_approximate_pooled_quantiles_for_non_iid_parties():
    rng = np.random.default_rng(5)
    parts = [rng.normal(-2, 1, 3000), rng.normal(1, 0.5, 800), rng.exponential(2.0, 5000)]
    sketches = [sketch_columns(p.reshape(-1, 1), sketch_size=512, exact_limit=32)[0] for p in parts]
    edges = bin_edges(merge_sketches(sketches), 32)
    pooled = np.concatenate(parts)
    assert edges.size == 31 and (np.diff(edges) > 0).all()
    ranks = np.searchsorted(np.sort(pooled), edges) / pooled.size
    assert np.abs(ranks - np.arange(1, 32) / 32).max() < 0.01  # within 1% of the true quantiles


def test_bin_codes_agree_with_edge_comparisons_and_pack_round_trips():
    x, _, _ = make_data(500)
    edges = edges_of(x, 16)
    codes = bin_codes(x, edges)
    assert codes.shape == (4, 500) and codes.dtype == np.uint8
    for j, e in enumerate(edges):
        for b in range(e.size):
            np.testing.assert_array_equal(codes[j] <= b, x[:, j] <= e[b])
    flat, counts = pack_edges(edges)
    assert [a.tolist() for a in unpack_edges(flat, counts)] == [e.tolist() for e in edges]
    with pytest.raises(ValueError):
        unpack_edges(flat, counts + 1)
    with pytest.raises(ValueError):
        unpack_edges(np.array([2.0, 1.0]), np.array([2]))


# --- draws ---------------------------------------------------------------------------------------


def test_draws_are_a_function_of_the_seed_only():
    np.testing.assert_array_equal(uniforms(7, "a", 100), uniforms(7, "a", 100))
    assert not np.array_equal(uniforms(7, "a", 100), uniforms(8, "a", 100))
    assert not np.array_equal(row_sample(7, 0, "p", 1000, 0.5), row_sample(7, 1, "p", 1000, 0.5))
    assert abs(row_sample(7, 0, "p", 10_000, 0.3).size - 3000) < 200
    assert row_sample(7, 0, "p", 10, 1.0) is None
    chosen = feature_sample(7, 3, 10, 0.5)
    assert chosen.size == 5 and (np.diff(chosen) > 0).all()
    np.testing.assert_array_equal(chosen, feature_sample(7, 3, 10, 0.5))
    assert feature_sample(7, 3, 10, 0.01).size == 1


# --- trees against the naive reference -----------------------------------------------------------


@pytest.mark.parametrize("objective", ["binary", "regression"])
def test_single_party_trees_equal_the_naive_reference(objective):
    x, yb, yr = make_data(200, seed=1)
    y = yb if objective == "binary" else yr
    params = GBMParams(objective=objective, n_trees=3, max_depth=3, max_bins=6, learning_rate=0.3)
    edges = edges_of(x, 6)
    ensemble = fit_local(x, y, edges, params)
    trees, margin = ref.train(
        ref.codes_of(x, edges),
        y,
        [e.size for e in edges],
        objective=objective,
        n_trees=3,
        max_depth=3,
        learning_rate=0.3,
        reg_lambda=1.0,
        gamma=0.0,
        min_child_weight=1.0,
        base=ensemble.base_score,
    )
    assert_same_trees(heap_trees(ensemble), trees)
    np.testing.assert_allclose(ensemble.predict_margin(x), margin, atol=1e-9, rtol=0)
    np.testing.assert_allclose(
        ensemble.predict_margin_codes(bin_codes(x, edges)), margin, atol=1e-9, rtol=0
    )


def test_gamma_and_min_child_weight_prune_like_the_reference():
    x, yb, _ = make_data(200, seed=2)
    params = GBMParams(
        n_trees=2, max_depth=4, max_bins=8, gamma=0.5, min_child_weight=3.0, reg_lambda=2.0
    )
    edges = edges_of(x, 8)
    ensemble = fit_local(x, yb, edges, params)
    trees, _ = ref.train(
        ref.codes_of(x, edges),
        yb,
        [e.size for e in edges],
        objective="binary",
        n_trees=2,
        max_depth=4,
        learning_rate=0.1,
        reg_lambda=2.0,
        gamma=0.5,
        min_child_weight=3.0,
        base=ensemble.base_score,
    )
    assert_same_trees(heap_trees(ensemble), trees)
    assert len(trees[0]["leaves"]) < 16  # pruning happened


def test_histogram_subtraction_gives_the_same_trees_as_full_histograms():
    x, yb, _ = make_data(3000, seed=4)
    edges = edges_of(x, 32)
    with_sub = fit_local(x, yb, edges, GBMParams(n_trees=5, max_depth=5))
    without = fit_local(x, yb, edges, GBMParams(n_trees=5, max_depth=5, subtraction=False))
    a, b = heap_trees(with_sub), heap_trees(without)
    assert_same_trees(a, b)


def test_histograms_are_nodes_by_features_by_bins():
    codes = np.array([[0, 1, 2, 1], [1, 1, 0, 0]], dtype=np.uint8)
    booster = LocalBooster(
        codes,
        np.array([1.0, 0.0, 1.0, 0.0]),
        objective="regression",
        base_score=0.5,
        n_bins=3,
        max_depth=2,
    )
    booster.start_tree(None)  # gradients: margin - y = [-0.5, 0.5, -0.5, 0.5]
    grad, hess = booster.histograms(np.array([0]), np.array([0, 1]))
    assert grad.shape == hess.shape == (1, 2, 3)
    np.testing.assert_allclose(grad[0, 0], [-0.5, 1.0, -0.5])
    np.testing.assert_allclose(hess[0, 1], [2.0, 2.0, 0.0])
    booster.apply_splits(np.array([0]), np.array([0]), np.array([0]))  # row 0 left
    grad, hess = booster.histograms(np.array([1, 2]), np.array([1]))
    np.testing.assert_allclose(hess[:, 0, :], [[0, 1, 0], [2, 1, 0]])


# --- params, model, estimators -------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"objective": "poisson"},
        {"max_depth": 0},
        {"max_bins": 300},
        {"learning_rate": 0},
        {"subsample": 1.5},
        {"lambda": -1},
        {"lambda": 0, "min_child_weight": 0},
        {"n_trees": 2.5},
        {"histogram_bins": 999},
    ],
)
def test_bad_params_are_config_errors_naming_the_field(bad):
    with pytest.raises(ConfigError) as err:
        GBMParams.from_mapping(bad)
    assert err.value.field.startswith("params.")


def test_classifier_is_a_json_round_tripping_sklearn_estimator():
    x, yb, _ = make_data(600, seed=6)
    labels = np.where(yb == 1, "churn", "stay")
    frame = pl.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "d": x[:, 3]})
    model = FederatedGBMClassifier(n_trees=10, max_depth=3, random_state=1)
    with pytest.raises(NotFittedError):
        model.predict(x)
    model.fit(frame, labels)
    assert model.classes_.tolist() == ["churn", "stay"]
    assert model.feature_names_in_.tolist() == ["a", "b", "c", "d"]
    proba = model.predict_proba(frame)
    assert proba.shape == (600, 2) and np.allclose(proba.sum(axis=1), 1)
    assert set(model.predict(frame)) <= {"churn", "stay"}
    assert model.score(frame, labels) > 0.6
    copy = FederatedGBMClassifier.from_dict(json.loads(json.dumps(model.to_dict())))
    np.testing.assert_array_equal(copy.predict_proba(frame.select(["d", "c", "b", "a"])), proba)
    assert copy.get_params() == model.get_params()
    assert clone(model).get_params() == model.get_params()
    with pytest.raises(ValueError, match="NaN"):
        model.predict(np.full((1, 4), np.nan))


def test_regressor_round_trips_and_rejects_foreign_documents():
    x, _, yr = make_data(400, seed=7)
    model = FederatedGBMRegressor(n_trees=5, max_depth=2, random_state=0).fit(x, yr)
    assert model.score(x, yr) > 0.3
    document = model.to_dict()
    np.testing.assert_array_equal(
        FederatedGBMRegressor.from_dict(document).predict(x), model.predict(x)
    )
    with pytest.raises(ModelFormatError):
        FederatedGBMClassifier.from_dict(document)
    broken = json.loads(json.dumps(document))
    broken["trees"]["left"][0] = 0  # a cycle
    with pytest.raises(ModelFormatError):
        FederatedGBMRegressor.from_dict(broken)
