"""Per-party quantile binning: each party bins its own columns; edges never leave the party.

Edges are the distinct values of ``np.quantile(x, q)`` at ``q = k / max_bins`` for
``k = 1 .. max_bins-1`` (numpy's default linear interpolation). A value falls in bin
``b = number of edges strictly below it``, so ``x <= edges[b]`` is the same test as ``bin <= b``:
a split "bin <= b" has threshold ``edges[b]``.
"""

from __future__ import annotations

import numpy as np

from ...errors import TrainingError

__all__ = ["quantile_edges", "bin_codes"]


def quantile_edges(x: np.ndarray, max_bins: int) -> list[np.ndarray]:
    """Per column of ``x`` (rows x features), at most ``max_bins - 1`` increasing edges."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise TrainingError(
            "features must be a finite 2-D array",
            field="features",
            value=getattr(x, "shape", None),
            fix="impute or drop missing values before training",
        )
    q = np.arange(1, max_bins) / max_bins
    return [
        np.unique(np.quantile(x[:, j], q)) if x.shape[0] else np.zeros(0) for j in range(x.shape[1])
    ]


def bin_codes(x: np.ndarray, edges: list[np.ndarray]) -> np.ndarray:
    """``(rows, features)`` uint8 bin codes."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty(x.shape, dtype=np.uint8)
    for j, e in enumerate(edges):
        out[:, j] = np.searchsorted(e, x[:, j], side="left")
    return out
