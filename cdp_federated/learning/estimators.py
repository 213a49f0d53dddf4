"""The exported models: scikit-learn compatible logistic and linear regression built from federated
parameters.

``coef_`` and ``intercept_`` apply to standardised features ``(X - mean_) / scale_``, as the last
step of a ``StandardScaler`` + ``LogisticRegression`` pipeline would; :meth:`decision_function`
standardises first, so callers pass raw feature values. Saved as JSON (:meth:`to_dict`), never
pickled.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.validation import check_is_fitted

from ..errors import ModelFormatError, SchemaMismatchError
from . import linear, logreg
from .aggregate import combine_moments, local_moments

__all__ = [
    "FederatedLogisticRegression",
    "FederatedLinearRegression",
    "MODEL_FORMAT",
    "MODEL_VERSION",
    "LINEAR_MODEL_FORMAT",
]

MODEL_FORMAT = "cdp_federated.FederatedLogisticRegression"
MODEL_VERSION = 1
LINEAR_MODEL_FORMAT = "cdp_federated.FederatedLinearRegression"
_FITTED = (
    "coef_",
    "intercept_",
    "classes_",
    "mean_",
    "scale_",
    "n_features_in_",
    "feature_names_in_",
)


def check_model_header(data: Any, *, fmt: str, name: str, version: int) -> None:
    """Refuse a model document of another format or version before reading its fields."""
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ModelFormatError(
            f"not a {name} document",
            field="format",
            value=data.get("format") if isinstance(data, dict) else type(data).__name__,
            fix="load a model.json written by this release",
        )
    if data.get("version") != version:
        raise ModelFormatError(
            "unsupported model version",
            field="version",
            value=data.get("version"),
            fix=f"this release reads version {version}",
        )


@contextmanager
def reading_model() -> Iterator[None]:
    """Missing keys and wrong types inside a model document become one typed error."""
    try:
        yield
    except ModelFormatError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFormatError(
            f"model document is incomplete or malformed: {exc!r}",
            field="model",
            fix="restore model.json from the registry",
        ) from exc


def check_width(model: Any, data: dict[str, Any], what: str) -> None:
    if model.n_features_in_ != data.get("n_features_in"):
        raise ModelFormatError(
            f"n_features_in does not match the {what}",
            field="n_features_in",
            value=data.get("n_features_in"),
        )


def _is_frame(X: Any) -> bool:
    return hasattr(X, "columns") and not isinstance(X, np.ndarray)  # pandas or polars


def feature_matrix(
    estimator: Any, X: Any, columns: list[str] | None = None, *, check_width: bool = True
) -> np.ndarray:
    """Float64 matrix of ``X`` for ``estimator``: frames are matched to ``columns`` (default: the
    fitted ``feature_names_in_``) by name, extra columns ignored; the width is checked against
    ``n_features_in_`` when ``check_width``; NaN/Inf refused."""
    if _is_frame(X):
        available = [str(c) for c in X.columns]
        wanted = columns or list(getattr(estimator, "feature_names_in_", available))
        missing = [c for c in wanted if c not in available]
        if missing:
            raise SchemaMismatchError(
                f"input lacks the model's feature columns {missing}",
                field="columns",
                value=missing,
                fix=f"pass a frame with columns {wanted}",
            )
        x = np.asarray(X[wanted].to_numpy(), dtype=np.float64)
    else:
        x = np.asarray(X, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d input, got shape {x.shape}")
    expected = getattr(estimator, "n_features_in_", x.shape[1]) if check_width else x.shape[1]
    if x.shape[1] != expected:
        raise ValueError(f"X has {x.shape[1]} features, the model expects {expected}")
    if not np.isfinite(x).all():
        raise ValueError("X contains NaN or Inf; impute or drop those rows first")
    return x


class FederatedLogisticRegression(ClassifierMixin, BaseEstimator):
    """Binary L2 logistic regression on standardised features.

    Usually built from a federated run with :meth:`from_parameters`. :meth:`fit` trains on one
    party's rows with the same objective (scikit-learn's ``C``) and standardisation, which is what
    a centralised baseline or a single-party job needs.
    """

    def __init__(self, *, C: float = 1.0, max_iter: int = 100, tol: float = 1e-10) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol

    # --- building --------------------------------------------------------------------------------

    @classmethod
    def from_parameters(
        cls,
        parameters: np.ndarray,
        *,
        mean: np.ndarray,
        scale: np.ndarray,
        feature_names: Sequence[str] | None = None,
        classes: Sequence[Any] = (0, 1),
        C: float = 1.0,
    ) -> FederatedLogisticRegression:
        """A fitted estimator from the flat parameter vector ``[w..., b]`` and the standardisation."""
        parameters = np.asarray(parameters, dtype=np.float64)
        mean = np.asarray(mean, dtype=np.float64)
        scale = np.asarray(scale, dtype=np.float64)
        d = parameters.size - 1
        if parameters.ndim != 1 or d < 0 or mean.shape != (d,) or scale.shape != (d,):
            raise ModelFormatError(
                "parameters, mean and scale do not describe the same features",
                field="parameters",
                value={"parameters": parameters.shape, "mean": mean.shape, "scale": scale.shape},
                fix="pass d+1 parameters (weights then intercept) and d means and scales",
            )
        if not (np.isfinite(parameters).all() and np.isfinite(mean).all()) or (scale <= 0).any():
            raise ModelFormatError(
                "parameters and mean must be finite and scale positive",
                field="parameters",
                fix="train again; a model must not carry NaN or Inf",
            )
        model = cls(C=C)
        model._set_fitted(parameters, mean, scale, feature_names, classes)
        return model

    def _set_fitted(
        self,
        parameters: np.ndarray,
        mean: np.ndarray,
        scale: np.ndarray,
        feature_names: Sequence[str] | None,
        classes: Sequence[Any],
    ) -> None:
        d = parameters.size - 1
        if len(classes) != 2:
            raise ModelFormatError(
                "a binary model needs two classes", field="classes", value=classes
            )
        names = None
        if feature_names is not None:
            names = np.asarray([str(n) for n in feature_names], dtype=object)
            if names.shape != (d,):
                raise ModelFormatError(
                    "one feature name per coefficient is needed",
                    field="feature_names",
                    value=list(feature_names),
                )
        for attr in _FITTED:
            self.__dict__.pop(attr, None)
        self.coef_ = parameters[:-1].reshape(1, d).copy()
        self.intercept_ = parameters[-1:].copy()
        self.classes_ = np.asarray(classes)
        self.mean_ = mean.copy()
        self.scale_ = scale.copy()
        self.n_features_in_ = d
        if names is not None:
            self.feature_names_in_ = names

    def fit(self, X: Any, y: Any) -> FederatedLogisticRegression:
        """Fit on one party's rows (centralised): standardise, then Newton's method."""
        names = [str(c) for c in X.columns] if _is_frame(X) else None
        x = self._as_matrix(X, names, check_width=False)
        y = np.asarray(y).ravel()
        classes = np.unique(y)
        if y.shape[0] != x.shape[0] or classes.size != 2:
            raise ValueError(
                f"need one label per row and exactly two classes, got {classes.size} classes"
            )
        n, sums, scatter = local_moments(x)
        moments = combine_moments([n], [sums], [scatter])
        z = (x - moments.mean) / moments.scale
        labels = (y == classes[1]).astype(np.float64)
        theta = logreg.fit_newton(z, labels, c=self.C, max_iter=self.max_iter, tol=self.tol)
        self._set_fitted(theta, moments.mean, moments.scale, names, classes)
        return self

    # --- predicting ------------------------------------------------------------------------------

    def _as_matrix(
        self, X: Any, columns: list[str] | None = None, *, check_width: bool = True
    ) -> np.ndarray:
        return feature_matrix(self, X, columns, check_width=check_width)

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits of the positive class: ``((X - mean_) / scale_) @ coef_.T + intercept_``."""
        check_is_fitted(self)
        z = (self._as_matrix(X) - self.mean_) / self.scale_
        return z @ self.coef_[0] + self.intercept_[0]

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probabilities of ``classes_[0]`` and ``classes_[1]``, one row per input row."""
        p = logreg.sigmoid(self.decision_function(X))
        return np.column_stack([1.0 - p, p])

    def predict(self, X: Any) -> np.ndarray:
        """``classes_[1]`` where the logit is positive, else ``classes_[0]``."""
        positive = self.decision_function(X) > 0
        return self.classes_[positive.astype(np.int64)]

    # --- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description of the fitted model (the registry stores it as ``model.json``)."""
        check_is_fitted(self)
        out = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "params": {"C": float(self.C), "max_iter": int(self.max_iter), "tol": float(self.tol)},
            "coef": self.coef_[0].tolist(),
            "intercept": float(self.intercept_[0]),
            "classes": self.classes_.tolist(),
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "n_features_in": int(self.n_features_in_),
        }
        if hasattr(self, "feature_names_in_"):
            out["feature_names_in"] = [str(n) for n in self.feature_names_in_]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FederatedLogisticRegression:
        """Inverse of :meth:`to_dict`; a malformed document is a :class:`ModelFormatError`."""
        check_model_header(data, fmt=MODEL_FORMAT, name=cls.__name__, version=MODEL_VERSION)
        with reading_model():
            params = dict(data["params"])
            parameters = [*data["coef"], data["intercept"]]
            model = cls.from_parameters(
                np.asarray(parameters, dtype=np.float64),
                mean=np.asarray(data["mean"], dtype=np.float64),
                scale=np.asarray(data["scale"], dtype=np.float64),
                feature_names=data.get("feature_names_in"),
                classes=data["classes"],
                C=float(params.get("C", 1.0)),
            )
            model.set_params(**{k: v for k, v in params.items() if k != "C"})
        check_width(model, data, "coefficients")
        return model


class FederatedLinearRegression(RegressorMixin, BaseEstimator):
    """Least-squares linear regression on standardised features, L2 (``C``: ``Ridge(alpha=1/C)``)
    and optional L1 (``l1_ratio``: ``ElasticNet(alpha=1/(C n), l1_ratio)``).

    ``coef_`` applies to ``(X - mean_) / scale_`` and predictions are in the label's own units.
    Built from a federated run with :meth:`from_parameters`; :meth:`fit` solves the same
    objective centrally (the baseline a federated run is compared with). Saved as JSON.
    """

    def __init__(self, *, C: float = 1.0, l1_ratio: float = 0.0, tol: float = 1e-10) -> None:
        self.C = C
        self.l1_ratio = l1_ratio
        self.tol = tol

    @classmethod
    def from_parameters(
        cls,
        parameters: np.ndarray,
        *,
        mean: np.ndarray,
        scale: np.ndarray,
        feature_names: Sequence[str] | None = None,
        C: float = 1.0,
        l1_ratio: float = 0.0,
    ) -> FederatedLinearRegression:
        """A fitted estimator from ``[w..., b]`` (label units) and the standardisation."""
        helper = FederatedLogisticRegression.from_parameters(
            parameters, mean=mean, scale=scale, feature_names=feature_names
        )  # the same checks of shapes, finiteness and names
        model = cls(C=C, l1_ratio=l1_ratio)
        model._copy_fitted(helper)
        return model

    def _copy_fitted(self, source: FederatedLogisticRegression) -> None:
        for attr in _FITTED:
            self.__dict__.pop(attr, None)
            if attr != "classes_" and hasattr(source, attr):
                setattr(self, attr, getattr(source, attr))

    def fit(self, X: Any, y: Any) -> FederatedLinearRegression:
        """Fit on one party's rows (centralised), standardising features and label as a
        federated job does; the optimum is the one in label units."""
        helper = FederatedLogisticRegression()
        names = [str(c) for c in X.columns] if _is_frame(X) else None
        x = helper._as_matrix(X, names, check_width=False)
        y = np.asarray(y, dtype=np.float64).ravel()
        if y.shape[0] != x.shape[0] or not np.isfinite(y).all():
            raise ValueError("need one finite label per row")
        n, sums, scatter = local_moments(x)
        moments = combine_moments([n], [sums], [scatter])
        z = (x - moments.mean) / moments.scale
        label_mean, label_scale = float(y.mean()), float(y.std()) or 1.0
        theta = linear.fit_centralised(
            z,
            (y - label_mean) / label_scale,
            objective="regression",
            c=self.C,
            l1_ratio=self.l1_ratio,
            tol=self.tol,
            label_scale=label_scale,
        )
        fitted = FederatedLogisticRegression.from_parameters(
            linear.to_label_units(theta, label_mean, label_scale),
            mean=moments.mean,
            scale=moments.scale,
            feature_names=names,
        )
        self._copy_fitted(fitted)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """``((X - mean_) / scale_) @ coef_ + intercept_``, in the label's units."""
        check_is_fitted(self)
        return FederatedLogisticRegression.decision_function(self, X)

    def _as_matrix(self, X: Any, columns: list[str] | None = None, **kwargs: Any) -> np.ndarray:
        return FederatedLogisticRegression._as_matrix(self, X, columns, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description of the fitted model."""
        check_is_fitted(self)
        out = {
            "format": LINEAR_MODEL_FORMAT,
            "version": MODEL_VERSION,
            "params": {
                "C": float(self.C),
                "l1_ratio": float(self.l1_ratio),
                "tol": float(self.tol),
            },
            "coef": self.coef_[0].tolist(),
            "intercept": float(self.intercept_[0]),
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "n_features_in": int(self.n_features_in_),
        }
        if hasattr(self, "feature_names_in_"):
            out["feature_names_in"] = [str(n) for n in self.feature_names_in_]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FederatedLinearRegression:
        """Inverse of :meth:`to_dict`; a malformed document is a :class:`ModelFormatError`."""
        check_model_header(data, fmt=LINEAR_MODEL_FORMAT, name=cls.__name__, version=MODEL_VERSION)
        as_logistic = {**data, "format": MODEL_FORMAT, "classes": [0, 1]}
        as_logistic["params"] = {"C": dict(data.get("params") or {}).get("C", 1.0)}
        helper = FederatedLogisticRegression.from_dict(as_logistic)  # the same checks
        params = dict(data["params"])
        model = cls(
            C=float(params.get("C", 1.0)),
            l1_ratio=float(params.get("l1_ratio", 0.0)),
            tol=float(params.get("tol", 1e-10)),
        )
        model._copy_fitted(helper)
        return model
