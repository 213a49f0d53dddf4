"""Split finding on summed gradient/hessian histograms (XGBoost's exact gain on bins).

For a node with gradient sum ``G`` and hessian sum ``H``, splitting into ``L`` and ``R`` gains

    0.5 * (G_L^2 / (H_L + lambda) + G_R^2 / (H_R + lambda) - G^2 / (H + lambda)) - gamma

and is allowed when both children's hessian sums reach ``min_child_weight`` and the gain is
positive. Ties go to the lowest feature, then the lowest bin. A leaf's value is
``-learning_rate * G / (H + lambda)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SplitChoice", "best_splits", "leaf_value"]


@dataclass(frozen=True)
class SplitChoice:
    """Per node (first axis): ``position`` in the histogram's feature axis (``-1``: no valid
    split), ``bin``, ``gain``, and the left child's gradient and hessian sums."""

    position: np.ndarray
    bin: np.ndarray
    gain: np.ndarray
    left_grad: np.ndarray
    left_hess: np.ndarray


def best_splits(
    grad: np.ndarray,
    hess: np.ndarray,
    n_edges: np.ndarray,
    *,
    reg_lambda: float,
    gamma: float,
    min_child_weight: float,
) -> SplitChoice:
    """Best split of each node from ``(nodes, features, bins)`` histograms; ``n_edges[j]`` is
    the number of edges of histogram feature ``j`` (splits exist at bins ``0..n_edges[j]-1``)."""
    k, f, b = grad.shape
    left_g = np.cumsum(grad, axis=2)[:, :, :-1]
    left_h = np.cumsum(hess, axis=2)[:, :, :-1]
    total_g = grad.sum(axis=2, keepdims=True)
    total_h = hess.sum(axis=2, keepdims=True)
    right_g, right_h = total_g - left_g, total_h - left_h
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = (
            0.5
            * (
                left_g**2 / (left_h + reg_lambda)
                + right_g**2 / (right_h + reg_lambda)
                - total_g**2 / (total_h + reg_lambda)
            )
            - gamma
        )
    valid = (left_h >= min_child_weight) & (right_h >= min_child_weight)
    valid &= np.arange(b - 1)[None, None, :] < np.asarray(n_edges)[None, :, None]
    gain = np.where(valid & np.isfinite(gain), gain, -np.inf).reshape(k, f * (b - 1))
    flat = np.argmax(gain, axis=1)  # first maximum: lowest feature, then lowest bin
    best = gain[np.arange(k), flat]
    ok = best > 0
    position, bins = np.divmod(flat, b - 1)
    rows = np.arange(k)
    return SplitChoice(
        position=np.where(ok, position, -1),
        bin=np.where(ok, bins, -1),
        gain=np.where(ok, best, 0.0),
        left_grad=left_g[rows, position, bins],
        left_hess=left_h[rows, position, bins],
    )


def leaf_value(
    grad_sum: float, hess_sum: float, *, reg_lambda: float, learning_rate: float
) -> float:
    """The leaf's contribution to the margin."""
    return float(-learning_rate * grad_sum / (hess_sum + reg_lambda))
