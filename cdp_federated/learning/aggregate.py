"""Pure aggregation maths: weighted parameter averages, federated moments, metric averages.

Nothing here knows about participants or messages; inputs are plain numbers and arrays, so each
function can be checked by hand.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import TrainingError

__all__ = [
    "weighted_average",
    "local_moments",
    "Moments",
    "combine_moments",
    "weighted_metrics",
]


def weighted_average(
    vectors: Sequence[np.ndarray], weights: Sequence[float] | None = None
) -> np.ndarray:
    """``sum_k w_k v_k / sum_k w_k``; uniform weights when ``weights`` is ``None``.

    FedAvg passes each party's sample count as its weight.
    """
    if not vectors:
        raise TrainingError(
            "nothing to average", field="vectors", value=0, fix="collect at least one result"
        )
    shapes = {np.shape(v) for v in vectors}
    if len(shapes) != 1:
        raise TrainingError(
            "parameter vectors differ in shape",
            field="parameters",
            value=sorted(shapes),
            fix="every party must train the same model",
        )
    w = np.ones(len(vectors)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(vectors),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise TrainingError(
            "weights must be one finite, non-negative number per vector with a positive sum",
            field="weights",
            value=w.tolist(),
            fix="weight by each party's (positive) number of examples",
        )
    stacked = np.stack([np.asarray(v, dtype=np.float64) for v in vectors])
    return np.tensordot(w / w.sum(), stacked, axes=1)


def local_moments(x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """One party's ``(count, sums, scatter)`` of the rows of ``x`` (n x d).

    ``scatter`` is the sum of outer products of deviations from the party's own mean: combined with
    :func:`combine_moments` it gives the global covariance without the cancellation error of
    ``E[x^2] - E[x]^2``.
    """
    n = x.shape[0]
    sums = x.sum(axis=0, dtype=np.float64)
    if n == 0:
        return 0, sums, np.zeros((x.shape[1], x.shape[1]))
    centred = x - sums / n
    return n, sums, centred.T @ centred


@dataclass(frozen=True)
class Moments:
    """Global moments: ``scale`` is the population standard deviation, 1.0 for constant features
    (the zero-variance guard, as scikit-learn's ``StandardScaler`` does)."""

    count: int
    mean: np.ndarray
    scale: np.ndarray
    covariance: np.ndarray
    constant: np.ndarray  # bool mask of zero-variance features

    def standardised_covariance(self) -> np.ndarray:
        """Covariance of ``(x - mean) / scale``; rows and columns of constant features are 0."""
        cov = self.covariance / np.outer(self.scale, self.scale)
        cov[self.constant, :] = 0.0
        cov[:, self.constant] = 0.0
        return cov


def combine_moments(
    counts: Sequence[int], sums: Sequence[np.ndarray], scatters: Sequence[np.ndarray]
) -> Moments:
    """Global mean, standard deviation and covariance from every party's :func:`local_moments`.

    Uses the parallel-variance identity: ``S = sum_k S_k + sum_k n_k (m_k - m)(m_k - m)'``.
    """
    total = int(sum(counts))
    if total <= 0:
        raise TrainingError(
            "no rows across all parties", field="count", value=total, fix="check the data sources"
        )
    mean = np.sum([np.asarray(s, dtype=np.float64) for s in sums], axis=0) / total
    scatter = np.zeros((mean.size, mean.size))
    for n, s, sk in zip(counts, sums, scatters, strict=True):
        if n == 0:
            continue
        delta = np.asarray(s, dtype=np.float64) / n - mean
        scatter += np.asarray(sk, dtype=np.float64) + n * np.outer(delta, delta)
    covariance = scatter / total
    variance = np.clip(np.diag(covariance).copy(), 0.0, None)
    # Below this bound the variance is rounding noise of summing a constant column.
    noise = (total * np.finfo(np.float64).eps * np.abs(mean)) ** 2
    constant = variance <= noise
    scale = np.where(constant, 1.0, np.sqrt(variance))
    return Moments(total, mean, scale, covariance, constant)


def weighted_metrics(results: Iterable[tuple[int, Mapping[str, Any]]]) -> dict[str, float]:
    """Average each numeric metric over ``(num_examples, metrics)`` pairs, weighted by examples.

    A metric counts only the parties that reported it.
    """
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for n, metrics in results:
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            totals[key] = totals.get(key, 0.0) + n * float(value)
            weights[key] = weights.get(key, 0.0) + n
    return {k: totals[k] / weights[k] for k in totals if weights[k] > 0}
