"""Exact integer histograms and XGBoost's split gain on fixed-point sums (pure numpy).

For a node with gradient/hessian sums ``G, H`` and a candidate whose left child has ``GL, HL``
(all fixed-point integers at scale ``2**f``), with ``g = G * 2**-f`` etc. and
``gR = (G - GL) * 2**-f``, ``hR = (H - HL) * 2**-f``::

    gain = 0.5 * (gL*gL / (hL + lambda) + gR*gR / (hR + lambda) - g*g / (h + lambda)) - gamma

A candidate is valid when ``hL >= min_child_weight`` and ``hR >= min_child_weight``; a node
splits at the first valid candidate of maximal gain when that gain is ``> 0``. Candidates are
ordered active party first (feature, then bin), then each passive party in turn (its own
candidate order). A leaf's value is ``-learning_rate * g / (h + lambda)``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["exact_sums", "node_histograms", "gains", "leaf_value", "valid_candidates"]

_LOW_BITS = 26


def exact_sums(index: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """``np.bincount(index, weights)`` exactly for int64 weights: float64 bincount is exact only
    below 2**53, so sum the low 26 bits and the rest separately (both stay far below 2**53)."""
    low = weights & ((1 << _LOW_BITS) - 1)
    high = weights >> _LOW_BITS
    lo = np.bincount(index, weights=low.astype(np.float64), minlength=size).astype(np.int64)
    hi = np.bincount(index, weights=high.astype(np.float64), minlength=size).astype(np.int64)
    return (hi << _LOW_BITS) + lo


def node_histograms(
    codes: np.ndarray, rows: np.ndarray, g: np.ndarray, h: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative ``(features, n_bins)`` gradient and hessian sums of ``rows``: entry ``[f, b]``
    sums the rows with bin ``<= b`` of feature ``f``."""
    n_features = codes.shape[1]
    sub = codes[rows].astype(np.int64) + np.arange(n_features, dtype=np.int64) * n_bins
    flat = sub.reshape(-1)
    gw = np.repeat(g[rows], n_features)
    hw = np.repeat(h[rows], n_features)
    size = n_features * n_bins
    gs = exact_sums(flat, gw, size).reshape(n_features, n_bins)
    hs = exact_sums(flat, hw, size).reshape(n_features, n_bins)
    return np.cumsum(gs, axis=1), np.cumsum(hs, axis=1)


def valid_candidates(codes: np.ndarray, rows: np.ndarray, n_bins: int) -> np.ndarray:
    """Flat ``f * n_bins + b`` ids of the candidates offered for ``rows`` (a passive party calls
    it once per tree, on every row): bin ``b`` holds some of the rows and some bin above it does
    too. Any other ``b`` repeats the left sums of a lower candidate (or empties a child), and a
    child's candidates are a subset of its parent's, so XGBoost's first maximum is among these
    at every node."""
    n_features = codes.shape[1]
    counts = np.zeros((n_features, n_bins), dtype=np.int64)
    for f in range(n_features):
        counts[f] = np.bincount(codes[rows, f], minlength=n_bins)[:n_bins]
    above = np.cumsum(counts[:, ::-1], axis=1)[:, ::-1]  # rows in bins >= b
    has_right = np.zeros_like(counts, dtype=bool)
    has_right[:, :-1] = above[:, 1:] > 0
    ok = (counts > 0) & has_right
    return np.flatnonzero(ok.reshape(-1))


def gains(
    left_g: np.ndarray,
    left_h: np.ndarray,
    total_g: int,
    total_h: int,
    *,
    frac_bits: int,
    reg_lambda: float,
    gamma: float,
    min_child_weight: float,
) -> np.ndarray:
    """Gain per candidate (``-inf`` where invalid); the formula is in the module docstring."""
    scale = 2.0**-frac_bits
    gl = left_g.astype(np.float64) * scale
    hl = left_h.astype(np.float64) * scale
    gr = (np.int64(total_g) - left_g).astype(np.float64) * scale
    hr = (np.int64(total_h) - left_h).astype(np.float64) * scale
    g = float(total_g) * scale
    h = float(total_h) * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = (
            0.5
            * (gl * gl / (hl + reg_lambda) + gr * gr / (hr + reg_lambda) - g * g / (h + reg_lambda))
            - gamma
        )
    valid = (hl >= min_child_weight) & (hr >= min_child_weight) & np.isfinite(gain)
    return np.where(valid, gain, -np.inf)


def leaf_value(
    total_g: int, total_h: int, *, frac_bits: int, reg_lambda: float, learning_rate: float
) -> float:
    scale = 2.0**-frac_bits
    return float(-learning_rate * (float(total_g) * scale) / (float(total_h) * scale + reg_lambda))
