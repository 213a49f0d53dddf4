"""Robust aggregation for federations that do not fully trust each other: coordinate-wise median,
trimmed mean and norm bounding, as a wrapper around any FedAvg-family strategy.

* **Norm bounding** (``params.norm_bound``): each participant's update (its parameters minus the
  global ones handed out) is scaled down to L2 norm at most the bound before anything else, so
  one participant moves the model by at most ``bound * its weight``.
* **Median** / **trimmed mean** (``params.aggregation``; ``params.trim_fraction`` beta, default
  0.1): per coordinate, the median of the participants' parameters, or their mean after dropping
  the ``floor(beta n)`` lowest and highest values. Both weight participants *equally*: sample
  counts are self-reported, and an attacker could inflate its own.

The wrapped strategy still applies its server optimiser (momentum, Adam...) to the robust
aggregate: the wrapper hands it every participant's result with the parameters replaced by the
robust aggregate, so its sample-weighted average is that aggregate and its ``min_fit`` check and
state stay its own. Robust rules cannot run on a securely aggregated sum (they need each update);
norm bounding can, participant side, which is what DP clipping does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, TrainingError
from ..learning.strategy import FedAvg, FitInstructions, FitResult, Strategy

__all__ = [
    "AGGREGATIONS",
    "RobustSettings",
    "robust_settings",
    "coordinate_median",
    "trimmed_mean",
    "clip_update",
    "RobustAggregation",
]

AGGREGATIONS = ("mean", "median", "trimmed_mean")
DEFAULT_TRIM = 0.1


@dataclass(frozen=True)
class RobustSettings:
    """``params.aggregation``, ``params.trim_fraction`` and ``params.norm_bound``, validated."""

    aggregation: str = "mean"
    trim_fraction: float = DEFAULT_TRIM
    norm_bound: float | None = None

    @property
    def active(self) -> bool:
        return self.aggregation != "mean" or self.norm_bound is not None


def robust_settings(params: Mapping[str, Any]) -> RobustSettings:
    """Read and check the robust-aggregation job parameters (ConfigError naming the field)."""
    aggregation = params.get("aggregation", "mean")
    if aggregation not in AGGREGATIONS:
        raise ConfigError(
            "unknown aggregation rule",
            field="params.aggregation",
            value=aggregation,
            fix=f"use one of {', '.join(AGGREGATIONS)}",
        )
    beta = params.get("trim_fraction", DEFAULT_TRIM)
    if not _number(beta) or not 0 <= beta < 0.5:
        raise ConfigError(
            "trim_fraction must be a number in [0, 0.5)",
            field="params.trim_fraction",
            value=beta,
            fix="trim for example 0.1 (10%) from each end",
        )
    if "trim_fraction" in params and aggregation != "trimmed_mean":
        raise ConfigError(
            "trim_fraction applies to the trimmed mean only",
            field="params.trim_fraction",
            value=beta,
            fix="set params.aggregation='trimmed_mean' or remove params.trim_fraction",
        )
    bound = params.get("norm_bound")
    if bound is not None and (not _number(bound) or bound <= 0):
        raise ConfigError(
            "norm_bound must be a positive number",
            field="params.norm_bound",
            value=bound,
            fix="bound each update's L2 norm, for example 1.0, or leave it out",
        )
    return RobustSettings(str(aggregation), float(beta), None if bound is None else float(bound))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)


# --- pure rules ----------------------------------------------------------------------------------


def _stack(vectors: Sequence[np.ndarray]) -> np.ndarray:
    if not vectors:
        raise TrainingError(
            "nothing to aggregate", field="vectors", value=0, fix="collect at least one result"
        )
    shapes = {np.shape(v) for v in vectors}
    if len(shapes) != 1:
        raise TrainingError(
            "parameter vectors differ in shape",
            field="parameters",
            value=sorted(shapes),
            fix="every party must train the same model",
        )
    return np.stack([np.asarray(v, dtype=np.float64) for v in vectors])


def coordinate_median(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Per coordinate, the median (the mean of the two middle values for an even count)."""
    return np.median(_stack(vectors), axis=0)


def trimmed_mean(vectors: Sequence[np.ndarray], beta: float) -> np.ndarray:
    """Per coordinate, the mean after dropping the ``floor(beta n)`` smallest and largest values."""
    stacked = _stack(vectors)
    if not 0 <= beta < 0.5:
        raise ConfigError("trim fraction must be in [0, 0.5)", field="trim_fraction", value=beta)
    n = stacked.shape[0]
    cut = int(np.floor(beta * n))
    return np.sort(stacked, axis=0)[cut : n - cut].mean(axis=0)


def clip_update(update: np.ndarray, bound: float) -> tuple[np.ndarray, bool]:
    """``update`` scaled to L2 norm at most ``bound``, and whether it had to be."""
    norm = float(np.linalg.norm(update))
    if norm <= bound:
        return np.asarray(update, dtype=np.float64), False
    return np.asarray(update, dtype=np.float64) * (bound / norm), True


# --- the strategy wrapper ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Result:
    """A participant's result with replaced parameters (what the wrapped strategy sees)."""

    parameters: np.ndarray
    num_examples: int
    metrics: Mapping[str, Any] = field(default_factory=dict)


class RobustAggregation(Strategy):
    """``strategy`` with norm-bounded updates and a robust aggregation rule (see module doc).
    ``last_clipped`` names the participants whose update the last round scaled down."""

    def __init__(self, strategy: FedAvg, settings: RobustSettings) -> None:
        self.inner = strategy
        self.settings = settings
        self.last_clipped: tuple[str, ...] = ()
        self._global: np.ndarray | None = None

    @property
    def min_fit_participants(self) -> int:
        return self.inner.min_fit_participants

    def initialize(self, num_features: int) -> np.ndarray:
        return self.inner.initialize(num_features)

    def configure_fit(
        self, round_number: int, parameters: np.ndarray, participants: Sequence[str]
    ) -> dict[str, FitInstructions]:
        self._global = np.array(parameters, dtype=np.float64)
        return self.inner.configure_fit(round_number, parameters, participants)

    def aggregate_fit(
        self,
        round_number: int,
        results: Mapping[str, FitResult],
        failures: Mapping[str, Any],
    ) -> np.ndarray:
        results = self._bounded(results)
        rule = self.settings.aggregation
        if rule == "mean" or len(results) < self.inner.min_fit_participants:
            return self.inner.aggregate_fit(round_number, results, failures)  # it may refuse
        ordered = sorted(results)
        vectors = [results[p].parameters for p in ordered]
        robust = (
            coordinate_median(vectors)
            if rule == "median"
            else trimmed_mean(vectors, self.settings.trim_fraction)
        )
        stand_ins = {
            p: _Result(robust, results[p].num_examples, results[p].metrics) for p in ordered
        }
        return self.inner.aggregate_fit(round_number, stand_ins, failures)

    def _bounded(self, results: Mapping[str, FitResult]) -> Mapping[str, FitResult]:
        bound = self.settings.norm_bound
        if bound is None or self._global is None:
            self.last_clipped = ()
            return results
        out: dict[str, FitResult] = {}
        clipped = []
        for name, result in sorted(results.items()):
            update, was = clip_update(np.asarray(result.parameters) - self._global, bound)
            if was:
                clipped.append(name)
                result = _Result(self._global + update, result.num_examples, result.metrics)
            out[name] = result
        self.last_clipped = tuple(clipped)
        return out

    def aggregate_fit_metrics(self, results: Mapping[str, FitResult]) -> dict[str, float]:
        return self.inner.aggregate_fit_metrics(results)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()  # the wrapper keeps nothing between rounds

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)
