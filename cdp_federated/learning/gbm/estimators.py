"""Exported GBM models: scikit-learn compatible estimators over a :class:`.TreeEnsemble`.

Built from a federated run with ``from_ensemble``, or fitted on one party's rows with ``fit``
(the same binning and boosting code with a single party: the centralised baseline). Saved as
plain JSON (:meth:`to_dict`), never pickled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.validation import check_is_fitted

from ...errors import ModelFormatError
from ..estimators import check_model_header, check_width, feature_matrix, reading_model
from .binning import bin_edges, merge_sketches, sketch_columns
from .boosting import fit_local
from .draws import fresh_seed
from .loss import link_inverse
from .model import TreeEnsemble
from .params import GBMParams

__all__ = ["FederatedGBMClassifier", "FederatedGBMRegressor", "MODEL_VERSION"]

MODEL_VERSION = 1
_PARAMS = (
    "n_trees",
    "max_depth",
    "learning_rate",
    "max_bins",
    "reg_lambda",
    "gamma",
    "min_child_weight",
    "subsample",
    "colsample",
    "sketch_size",
    "random_state",
)


def _is_frame(X: Any) -> bool:
    return hasattr(X, "columns") and not isinstance(X, np.ndarray)  # pandas or polars


class _FederatedGBM(BaseEstimator):
    _objective: ClassVar[str]
    _format: ClassVar[str]

    def __init__(
        self,
        *,
        n_trees: int = 100,
        max_depth: int = 6,
        learning_rate: float = 0.1,
        max_bins: int = 32,
        reg_lambda: float = 1.0,
        gamma: float = 0.0,
        min_child_weight: float = 1.0,
        subsample: float = 1.0,
        colsample: float = 1.0,
        sketch_size: int = 1024,
        random_state: int | None = None,
    ) -> None:
        self.n_trees = n_trees
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.max_bins = max_bins
        self.reg_lambda = reg_lambda
        self.gamma = gamma
        self.min_child_weight = min_child_weight
        self.subsample = subsample
        self.colsample = colsample
        self.sketch_size = sketch_size
        self.random_state = random_state

    def gbm_params(self) -> GBMParams:
        """The estimator's settings as validated :class:`GBMParams`."""
        return GBMParams(
            objective=self._objective,
            n_trees=self.n_trees,
            max_depth=self.max_depth,
            learning_rate=self.learning_rate,
            max_bins=self.max_bins,
            reg_lambda=self.reg_lambda,
            gamma=self.gamma,
            min_child_weight=self.min_child_weight,
            subsample=self.subsample,
            colsample=self.colsample,
            seed=self.random_state,
            sketch_size=self.sketch_size,
        )

    # --- building --------------------------------------------------------------------------------

    @classmethod
    def from_ensemble(
        cls,
        ensemble: TreeEnsemble,
        *,
        params: GBMParams,
        edges: Sequence[np.ndarray],
        feature_names: Sequence[str] | None = None,
        classes: Sequence[Any] = (0, 1),
    ):
        """A fitted estimator from federated training's ensemble, parameters and bin edges."""
        model = cls(
            n_trees=params.n_trees,
            max_depth=params.max_depth,
            learning_rate=params.learning_rate,
            max_bins=params.max_bins,
            reg_lambda=params.reg_lambda,
            gamma=params.gamma,
            min_child_weight=params.min_child_weight,
            subsample=params.subsample,
            colsample=params.colsample,
            sketch_size=params.sketch_size,
            random_state=params.seed,
        )
        model._set_fitted(ensemble, edges, feature_names, classes)
        return model

    def _set_fitted(
        self,
        ensemble: TreeEnsemble,
        edges: Sequence[np.ndarray],
        feature_names: Sequence[str] | None,
        classes: Sequence[Any],
    ) -> None:
        d = ensemble.n_features
        if len(edges) != d:
            raise ModelFormatError(
                "one list of bin edges per feature is needed",
                field="bin_edges",
                value=len(edges),
                fix=f"pass {d} edge lists",
            )
        for attr in ("ensemble_", "bin_edges_", "n_features_in_", "feature_names_in_", "classes_"):
            self.__dict__.pop(attr, None)
        if feature_names is not None:
            names = np.asarray([str(n) for n in feature_names], dtype=object)
            if names.shape != (d,):
                raise ModelFormatError(
                    "one feature name per feature is needed",
                    field="feature_names",
                    value=list(feature_names),
                )
            self.feature_names_in_ = names
        if self._objective == "binary":
            if len(classes) != 2:
                raise ModelFormatError(
                    "a binary model needs two classes", field="classes", value=list(classes)
                )
            self.classes_ = np.asarray(classes)
        self.ensemble_ = ensemble
        self.bin_edges_ = [np.asarray(e, dtype=np.float64) for e in edges]
        self.n_features_in_ = d

    def fit(self, X: Any, y: Any):
        """Fit on one party's rows: its own bin edges, then the boosting loop (centralised)."""
        names = [str(c) for c in X.columns] if _is_frame(X) else None
        x = self._as_matrix(X, names, check_width=False)
        y = np.asarray(y).ravel()
        if y.shape[0] != x.shape[0] or x.shape[0] == 0:
            raise ValueError("need one label per row and at least one row")
        classes: Sequence[Any] = (0, 1)
        if self._objective == "binary":
            classes = np.unique(y)
            if classes.size != 2:
                raise ValueError(f"need exactly two classes, got {classes.size}")
            target = (y == classes[1]).astype(np.float64)
        else:
            target = y.astype(np.float64)
        params = self.gbm_params()
        sketches = sketch_columns(x, sketch_size=params.sketch_size, exact_limit=params.max_bins)
        edges = [bin_edges(merge_sketches([s]), params.max_bins) for s in sketches]
        seed = params.seed if params.seed is not None else fresh_seed()
        ensemble = fit_local(x, target, edges, params, seed=seed)
        self._set_fitted(ensemble, edges, names, classes)
        return self

    # --- predicting ------------------------------------------------------------------------------

    def _as_matrix(
        self, X: Any, columns: list[str] | None = None, *, check_width: bool = True
    ) -> np.ndarray:
        return feature_matrix(self, X, columns, check_width=check_width)

    def decision_function(self, X: Any) -> np.ndarray:
        """Margins: the base score plus one leaf value per tree (log-odds for the classifier)."""
        check_is_fitted(self)
        return self.ensemble_.predict_margin(self._as_matrix(X))

    # --- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description of the fitted model."""
        check_is_fitted(self)
        out: dict[str, Any] = {
            "format": self._format,
            "version": MODEL_VERSION,
            "params": {k: getattr(self, k) for k in _PARAMS},
            "trees": self.ensemble_.to_dict(),
            "bin_edges": [e.tolist() for e in self.bin_edges_],
            "n_features_in": int(self.n_features_in_),
        }
        if hasattr(self, "classes_"):
            out["classes"] = self.classes_.tolist()
        if hasattr(self, "feature_names_in_"):
            out["feature_names_in"] = [str(n) for n in self.feature_names_in_]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Inverse of :meth:`to_dict`; a malformed document is a :class:`ModelFormatError`."""
        check_model_header(data, fmt=cls._format, name=cls.__name__, version=MODEL_VERSION)
        with reading_model():
            model = cls(**{k: v for k, v in dict(data["params"]).items() if k in _PARAMS})
            ensemble = TreeEnsemble.from_dict(data["trees"])
            edges = [np.asarray(e, dtype=np.float64) for e in data["bin_edges"]]
            model._set_fitted(
                ensemble, edges, data.get("feature_names_in"), data.get("classes", (0, 1))
            )
        check_width(model, data, "trees")
        return model


class FederatedGBMClassifier(ClassifierMixin, _FederatedGBM):
    """Binary gradient-boosted trees (logistic loss)."""

    _objective = "binary"
    _format = "cdp_federated.FederatedGBMClassifier"

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities of ``classes_[0]`` and ``classes_[1]``, one row per input row."""
        p = link_inverse("binary", self.decision_function(X))
        return np.column_stack([1.0 - p, p])

    def predict(self, X: Any) -> np.ndarray:
        """``classes_[1]`` where the margin is positive, else ``classes_[0]``."""
        margin = self.decision_function(X)  # checks fitting before classes_ is read
        return self.classes_[(margin > 0).astype(np.int64)]


class FederatedGBMRegressor(RegressorMixin, _FederatedGBM):
    """Gradient-boosted regression trees (squared loss)."""

    _objective = "regression"
    _format = "cdp_federated.FederatedGBMRegressor"

    def predict(self, X: Any) -> np.ndarray:
        """Predicted values."""
        return self.decision_function(X)
