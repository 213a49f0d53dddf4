"""Example-level DP for horizontal histogram GBM: Gaussian noise on the summed gradient and
hessian histograms, added by the coordinator before it picks splits and leaf values.

Sensitivity. For log loss every row's gradient ``p - y`` lies in [-1, 1] and its hessian
``p (1 - p)`` in [0, 1/4], whatever the model. At one tree level a row sits in exactly one node,
so adding or removing it changes at most one bin per feature of one built node: L2 change at
most ``sqrt(f) * 1`` in the gradient histograms and ``sqrt(f) * 1/4`` in the hessian ones
(``f <= d`` features asked). With noise ``z sqrt(2 d) * 1`` on every gradient cell and
``z sqrt(2 d) / 4`` on every hessian cell, the pair released per level is one Gaussian
mechanism with noise multiplier ``z``. A tree asks at most ``max_depth`` levels (children at
``max_depth`` become leaves from the last level's sums), so a job is ``n_trees * max_depth``
compositions, accounted like DP-FedAvg (:mod:`.accountant`, ``sampling_rate`` 1). Siblings by
subtraction, splits and leaf values are post-processing; negative noisy hessians are clamped to
zero (post-processing too).

Regression gradients are unbounded, so DP GBM is binary only. Not covered by the noise: the
quantile sketches that fix the bin edges, the row and label counts behind the base score, and
the evaluation histograms (see docs/privacy.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError, TrainingError
from .accountant import ACCOUNTANTS, PrivacySpend, calibrate, epsilon
from .noise import DEFAULT_GRID, RandomSource, gaussian_noise, noise_std_for

__all__ = ["GRAD_BOUND", "HESS_BOUND", "HistogramDP", "gbm_histogram_dp"]

GRAD_BOUND, HESS_BOUND = 1.0, 0.25  # |p - y| and p (1 - p) for log loss
_GBM_DP_KEYS = ("dp_epsilon", "dp_noise_multiplier", "dp_delta", "dp_accountant")
_NOT_FOR_GBM = ("dp_clip", "dp_local", "dp_adaptive_clip", "dp_batch_fraction")


class HistogramDP:
    """The DP settings of a GBM job and the noise for each level's histograms. Counts the
    releases and refuses one beyond the accounted ``releases``."""

    def __init__(
        self,
        *,
        noise_multiplier: float,
        delta: float,
        releases: int,
        n_features: int,
        accountant: str = "rdp",
        source: RandomSource | None = None,
        grid: float = DEFAULT_GRID,
    ) -> None:
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.releases = releases
        self.n_features = n_features
        self.accountant = accountant
        self.source = source
        self.grid = grid
        self.released = 0

    @classmethod
    def from_params(
        cls,
        params: Mapping[str, Any],
        *,
        n_trees: int,
        max_depth: int,
        n_features: int,
        objective: str,
    ) -> HistogramDP | None:
        """None without ``dp_epsilon``/``dp_noise_multiplier``; a :class:`ConfigError` for DP
        the histograms cannot honour (regression, DP-FedAvg-only settings)."""
        if "dp_epsilon" not in params and "dp_noise_multiplier" not in params:
            stray = [k for k in (*_GBM_DP_KEYS, *_NOT_FOR_GBM) if k in params]
            if stray:
                raise ConfigError(
                    f"DP settings {stray} given without a noise level",
                    field=f"params.{stray[0]}",
                    value=params[stray[0]],
                    fix="set params.dp_epsilon (target) or params.dp_noise_multiplier",
                )
            return None
        wrong = [k for k in _NOT_FOR_GBM if k in params]
        if wrong or "dp_epsilon" in params and "dp_noise_multiplier" in params:
            key = wrong[0] if wrong else "dp_noise_multiplier"
            raise ConfigError(
                "DP for GBM takes one noise level (dp_epsilon or dp_noise_multiplier) and "
                "dp_delta; it clips nothing (log-loss gradients are bounded)",
                field=f"params.{key}",
                value=params[key],
                fix=f"leave params.{key} out of GBM jobs",
            )
        if objective != "binary":
            raise ConfigError(
                "DP for GBM needs the binary objective: regression gradients are unbounded",
                field="params.objective",
                value=objective,
                fix="train a binary GBM or a DP linear model",
            )
        delta = _positive(params, "dp_delta", 1e-5, below_one=True)
        accountant = str(params.get("dp_accountant", "rdp"))
        if accountant not in ACCOUNTANTS:
            raise ConfigError(
                "unknown privacy accountant",
                field="params.dp_accountant",
                value=accountant,
                fix=f"use one of {', '.join(ACCOUNTANTS)}",
            )
        releases = n_trees * max_depth
        if "dp_epsilon" in params:
            z = calibrate(_positive(params, "dp_epsilon", 1.0), delta, releases, 1.0)
        else:
            z = _positive(params, "dp_noise_multiplier", 1.0)
        return cls(
            noise_multiplier=z,
            delta=delta,
            releases=releases,
            n_features=n_features,
            accountant=accountant,
        )

    def spend(self) -> PrivacySpend:
        eps = epsilon(
            self.noise_multiplier, self.releases, 1.0, self.delta, accountant=self.accountant
        )
        return PrivacySpend(
            eps, self.delta, self.noise_multiplier, 1.0, self.releases, self.accountant
        )

    def stds(self, cells: int) -> tuple[float, float]:
        """Noise standard deviations of a gradient and a hessian cell."""
        spread = self.noise_multiplier * math.sqrt(2.0 * self.n_features)
        return (
            noise_std_for(spread, GRAD_BOUND, cells, self.grid),
            noise_std_for(spread, HESS_BOUND, cells, self.grid),
        )

    def noisy(self, grad: np.ndarray, hess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One level's summed histograms with their noise (hessians clamped at zero)."""
        self.released += 1
        if self.released > self.releases:
            raise TrainingError(
                f"histogram release {self.released} exceeds the {self.releases} accounted",
                field="params.max_depth",
                value=self.releases,
                fix="report this: the tree grower asked more levels than max_depth",
            )
        std_g, std_h = self.stds(grad.size)
        noisy_grad = gaussian_noise(grad, std_g, grid=self.grid, source=self.source)
        noisy_hess = gaussian_noise(hess, std_h, grid=self.grid, source=self.source)
        return noisy_grad, np.maximum(noisy_hess, 0.0)


def _positive(
    params: Mapping[str, Any], key: str, default: float, *, below_one: bool = False
) -> float:
    value = params.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0 or (below_one and value >= 1):
        interval = "(0, 1)" if below_one else "(0, inf)"
        raise ConfigError(
            f"{key} must be a number in {interval}",
            field=f"params.{key}",
            value=value,
            fix=f"set params.{key} within {interval}",
        )
    return float(value)


def gbm_histogram_dp(job: Any) -> HistogramDP | None:
    """The histogram DP of a horizontal GBM job spec (None without DP)."""
    from ..learning.gbm.params import GBMParams

    gbm = GBMParams.from_mapping(job.params, n_trees=max(job.rounds, 1))
    return HistogramDP.from_params(
        job.params,
        n_trees=gbm.n_trees,
        max_depth=gbm.max_depth,
        n_features=len(job.features),
        objective=gbm.objective,
    )
