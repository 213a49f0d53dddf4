"""Losses of the two objectives: gradients, hessians, base scores, links and summed losses."""

from __future__ import annotations

import numpy as np

__all__ = ["gradients", "base_score", "link_inverse", "loss_sum"]

_EPS = 1e-15


def _sigmoid(margin: np.ndarray) -> np.ndarray:
    out = np.empty_like(margin, dtype=np.float64)
    positive = margin >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-margin[positive]))
    e = np.exp(margin[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def gradients(
    objective: str, margin: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(g, h)`` per row; ``h`` is ``None`` for squared loss, whose hessian is 1 everywhere
    (histograms then count rows instead of summing ones)."""
    if objective == "regression":
        return margin - y, None
    p = _sigmoid(margin)
    return p - y, p * (1.0 - p)


def base_score(objective: str, label_sum: float, count: int) -> float:
    """The constant margin that minimises the loss of the pooled labels: their mean, or the
    log-odds of the positive rate (clipped away from 0 and 1)."""
    mean = label_sum / count
    if objective == "regression":
        return float(mean)
    p = min(max(mean, 1e-6), 1 - 1e-6)
    return float(np.log(p / (1.0 - p)))


def link_inverse(objective: str, margin: np.ndarray) -> np.ndarray:
    """Predictions from margins: probabilities of class 1, or the regression value itself."""
    return _sigmoid(margin) if objective == "binary" else margin


def loss_sum(objective: str, margin: np.ndarray, y: np.ndarray) -> float:
    """Summed log loss (binary) or summed squared error (regression)."""
    if objective == "regression":
        return float(np.sum((margin - y) ** 2))
    # log(1 + exp(m)) - y m, stable for large |m|
    return float(np.sum(np.logaddexp(0.0, margin) - y * margin))


def clipped_log_loss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row log loss of probabilities (clipped like scikit-learn's ``log_loss``)."""
    p = np.clip(p, _EPS, 1 - _EPS)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))
