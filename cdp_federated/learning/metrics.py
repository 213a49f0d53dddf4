"""Evaluation metrics from aggregated statistics: per-class score histograms for binary models,
sums of errors and label moments for regression (no per-row score or prediction needed).

Each party counts, per class, how many of its rows' scores fall in each of ``B`` equal-width bins
over [0, 1]; summing the counts across parties gives the histograms of the pooled data, from which
AUC and accuracy follow. With ``B`` bins, AUC is exact up to the pairs that share a bin (counted as
ties, 1/2 each), so its error is at most half the share of such pairs.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "score_histograms",
    "roc_auc_from_histograms",
    "accuracy_from_histograms",
    "mean_log_loss",
    "pooled_scatter",
    "regression_metrics",
]


def score_histograms(
    scores: np.ndarray, labels: np.ndarray, bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(positives, negatives)``: int64 counts of label-1 / label-0 rows per score bin.

    Bin ``i`` holds scores in ``[i/B, (i+1)/B)``; a score of exactly 1.0 goes to the last bin.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError("scores and labels must be 1-d arrays of the same length")
    if scores.size and not ((scores >= 0.0) & (scores <= 1.0)).all():
        raise ValueError("scores must lie in [0, 1] (NaN is not a score)")
    index = np.minimum((scores * bins).astype(np.int64), bins - 1)
    positive = labels == 1
    return (
        np.bincount(index[positive], minlength=bins).astype(np.int64),
        np.bincount(index[~positive], minlength=bins).astype(np.int64),
    )


def roc_auc_from_histograms(positives: np.ndarray, negatives: np.ndarray) -> float:
    """ROC AUC: the probability that a random positive outscores a random negative, with pairs in
    the same bin counted as 1/2. ``nan`` when either class is empty (AUC is undefined)."""
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    negatives_below = np.cumsum(neg) - neg
    wins = pos @ negatives_below + 0.5 * (pos @ neg)
    return float(wins / (n_pos * n_neg))


def accuracy_from_histograms(
    positives: np.ndarray, negatives: np.ndarray, threshold: float = 0.5
) -> float:
    """Share of rows classified correctly when scores at or above ``threshold`` predict 1.

    ``threshold`` must fall on a bin edge (with an even number of bins, 0.5 does), otherwise the
    histograms cannot tell which side of it a row is on. ``nan`` when there are no rows.
    """
    pos = np.asarray(positives, dtype=np.float64)
    neg = np.asarray(negatives, dtype=np.float64)
    edge = threshold * pos.size
    cut = round(edge)
    if abs(edge - cut) > 1e-9 or not 0 <= cut <= pos.size:
        raise ValueError(
            f"threshold {threshold} is not a bin edge of {pos.size} bins; use an even bin count"
        )
    total = pos.sum() + neg.sum()
    if total == 0:
        return float("nan")
    return float((neg[:cut].sum() + pos[cut:].sum()) / total)


def mean_log_loss(log_loss_sum: float, count: int) -> float:
    """Mean log loss from a summed log loss and its row count (``nan`` when there are no rows)."""
    return float(log_loss_sum / count) if count > 0 else float("nan")


def pooled_scatter(counts, sums, scatters) -> float:
    """Sum of squared deviations of the pooled values from the pooled mean, from each party's
    count, sum and scatter about its own mean (the parallel-variance identity, no cancellation)."""
    total = float(np.sum(counts))
    if total <= 0:
        return float("nan")
    mean = float(np.sum(sums)) / total
    out = 0.0
    for n, s, sk in zip(counts, sums, scatters, strict=True):
        if n:
            out += float(sk) + n * (float(s) / n - mean) ** 2
    return out


def regression_metrics(
    count: int, squared_error_sum: float, absolute_error_sum: float, label_scatter: float
) -> dict[str, float]:
    """RMSE, MAE and R^2 (``1 - SSE / SST``, with ``SST`` the label's scatter about its mean)
    from sums; ``nan`` where undefined (no rows; R^2 of a constant label)."""
    if count <= 0:
        return {"rmse": float("nan"), "mae": float("nan"), "r2": float("nan")}
    return {
        "rmse": float(np.sqrt(squared_error_sum / count)),
        "mae": float(absolute_error_sum / count),
        "r2": float(1.0 - squared_error_sum / label_scatter) if label_scatter > 0 else float("nan"),
    }
