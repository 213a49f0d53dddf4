"""FederatedLogisticRegression behaves like a scikit-learn classifier and saves as JSON."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import polars as pl
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cdp_federated.errors import ModelFormatError, SchemaMismatchError
from cdp_federated.learning.estimators import FederatedLogisticRegression

NAMES = ["recency", "frequency", "monetary"]


def fitted_from_parameters() -> FederatedLogisticRegression:
    return FederatedLogisticRegression.from_parameters(
        np.array([0.5, -1.0, 2.0, 0.25]),
        mean=np.array([10.0, 2.0, 100.0]),
        scale=np.array([5.0, 1.0, 50.0]),
        feature_names=NAMES,
        C=0.5,
    )


def raw_rows(n: int = 20) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.normal([10.0, 2.0, 100.0], [5.0, 1.0, 50.0], size=(n, 3))


def test_predict_proba_matches_manual_sigmoid():
    model = fitted_from_parameters()
    x = raw_rows()
    z = (x - model.mean_) / model.scale_
    expected = 1 / (1 + np.exp(-(z @ np.array([0.5, -1.0, 2.0]) + 0.25)))
    proba = model.predict_proba(x)
    np.testing.assert_allclose(proba[:, 1], expected, rtol=1e-12)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(model.predict(x), (expected > 0.5).astype(int))
    np.testing.assert_allclose(model.decision_function(x), np.log(expected / (1 - expected)))


def test_fitted_attributes():
    model = fitted_from_parameters()
    assert model.coef_.shape == (1, 3) and model.intercept_.shape == (1,)
    assert model.classes_.tolist() == [0, 1]
    assert model.n_features_in_ == 3 and model.feature_names_in_.tolist() == NAMES
    assert model.get_params() == {"C": 0.5, "max_iter": 100, "tol": 1e-10}


def test_not_fitted_error_before_fitting():
    model = FederatedLogisticRegression(C=2.0)
    for call in (model.predict_proba, model.predict, model.decision_function):
        with pytest.raises(NotFittedError):
            call(raw_rows())
    with pytest.raises(NotFittedError):
        model.to_dict()


def test_to_dict_from_dict_round_trip_through_json():
    model = fitted_from_parameters()
    doc = json.loads(json.dumps(model.to_dict()))
    loaded = FederatedLogisticRegression.from_dict(doc)
    x = raw_rows()
    np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))
    for attr in ("coef_", "intercept_", "mean_", "scale_", "classes_"):
        np.testing.assert_array_equal(getattr(loaded, attr), getattr(model, attr))
    assert loaded.feature_names_in_.tolist() == NAMES and loaded.get_params() == model.get_params()
    assert doc["feature_names_in"] == NAMES  # the registry's model card reads this key


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("coef"),
        lambda d: d.__setitem__("format", "pickle"),
        lambda d: d.__setitem__("version", 99),
        lambda d: d.__setitem__("mean", [1.0]),
        lambda d: d.__setitem__("scale", [1.0, 0.0, 1.0]),
        lambda d: d.__setitem__("n_features_in", 4),
        lambda d: d.__setitem__("coef", ["a", "b", "c"]),
        lambda d: d.__setitem__("feature_names_in", ["a"]),
    ],
)
def test_malformed_documents_are_model_format_errors(mutate):
    doc = fitted_from_parameters().to_dict()
    mutate(doc)
    with pytest.raises(ModelFormatError):
        FederatedLogisticRegression.from_dict(doc)


@pytest.mark.parametrize("frame_type", ["polars", "pandas"])
def test_frames_are_matched_by_column_name(frame_type):
    model = fitted_from_parameters()
    x = raw_rows()
    data = {"profile_id": [f"p{i}" for i in range(len(x))]}
    data |= {name: x[:, j] for j, name in reversed(list(enumerate(NAMES)))}  # shuffled order
    frame = pl.DataFrame(data) if frame_type == "polars" else pd.DataFrame(data)
    np.testing.assert_allclose(model.predict_proba(frame), model.predict_proba(x))


def test_frame_missing_a_feature_is_a_schema_error_naming_it():
    model = fitted_from_parameters()
    frame = pl.DataFrame({"recency": [1.0], "frequency": [2.0]})
    with pytest.raises(SchemaMismatchError, match="monetary") as info:
        model.predict_proba(frame)
    assert info.value.value == ["monetary"]


def test_wrong_width_and_non_finite_input_are_refused():
    model = fitted_from_parameters()
    with pytest.raises(ValueError, match="expects 3"):
        model.predict(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN"):
        model.predict(np.array([[np.nan, 1.0, 2.0]]))


def test_fit_matches_a_standard_scaler_logistic_regression_pipeline():
    rng = np.random.default_rng(1)
    x = rng.normal([5.0, -3.0, 1000.0], [2.0, 0.5, 300.0], size=(400, 3))
    y = np.where(x[:, 0] + rng.normal(0, 2, 400) > 5, "buyer", "browser")
    frame = pd.DataFrame(x, columns=NAMES)
    ours = FederatedLogisticRegression(C=0.3).fit(frame, y)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, tol=1e-12, max_iter=5000))
    ref.fit(x, y)
    np.testing.assert_allclose(ours.predict_proba(frame), ref.predict_proba(x), atol=1e-6)
    assert ours.classes_.tolist() == ["browser", "buyer"]
    assert set(ours.predict(frame)) <= {"browser", "buyer"}
    assert ours.feature_names_in_.tolist() == NAMES
    refit = clone(ours).fit(x[:, :2], y)  # refitting on arrays drops the old names
    assert refit.n_features_in_ == 2 and not hasattr(refit, "feature_names_in_")
