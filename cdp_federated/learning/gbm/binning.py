"""Federated quantile binning: per-feature summaries from each party, merged into shared bin edges.

A party summarises each feature column without sending rows:

* when the column has at most ``exact_limit`` distinct values (binary flags, small categories,
  counts), its distinct values with their counts, exactly;
* otherwise ``<= sketch_size`` weighted points: the rows are sorted and cut into equal-count
  chunks of at least :data:`MIN_ROWS_PER_POINT` rows, and each chunk sends its *mean* and its row
  count. A point is therefore an average of several rows, and the summary's rank error is at most
  half a chunk.

Summaries merge by concatenation (points with equal values add their weights). The coordinator
turns the merged summary into at most ``max_bins - 1`` increasing edges: midpoints between the
distinct values when every party was exact and there are few enough, weighted quantile midpoints
otherwise (the rule scikit-learn's ``HistGradientBoosting`` applies to pooled data). A value
``x`` falls in bin ``b`` = the number of edges strictly below ``x``, so ``x <= edges[b]`` is the
same test as ``bin <= b``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MIN_ROWS_PER_POINT",
    "FeatureSketch",
    "sketch_columns",
    "merge_sketches",
    "bin_edges",
    "bin_codes",
    "pack_edges",
    "unpack_edges",
]

MIN_ROWS_PER_POINT = 4


@dataclass(frozen=True)
class FeatureSketch:
    """One feature's summary: increasing ``values`` with positive ``weights`` (row counts)."""

    values: np.ndarray
    weights: np.ndarray
    exact: bool


def sketch_column(x: np.ndarray, *, sketch_size: int, exact_limit: int) -> FeatureSketch:
    """Summary of one finite column (see the module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return FeatureSketch(np.zeros(0), np.zeros(0), True)
    ordered = np.sort(x)
    distinct = np.flatnonzero(np.diff(ordered)) + 1
    if distinct.size + 1 <= exact_limit:
        starts = np.concatenate(([0], distinct))
        counts = np.diff(np.concatenate((starts, [ordered.size])))
        return FeatureSketch(ordered[starts], counts.astype(np.float64), True)
    chunks = max(1, min(sketch_size, ordered.size // MIN_ROWS_PER_POINT))
    starts = np.unique(np.linspace(0, ordered.size, chunks + 1).astype(np.int64)[:-1])
    counts = np.diff(np.concatenate((starts, [ordered.size]))).astype(np.float64)
    means = np.add.reduceat(ordered, starts) / counts
    return FeatureSketch(means, counts, False)


def sketch_columns(x: np.ndarray, *, sketch_size: int, exact_limit: int) -> list[FeatureSketch]:
    """One :func:`sketch_column` per column of the (n, d) matrix ``x``."""
    return [
        sketch_column(x[:, j], sketch_size=sketch_size, exact_limit=exact_limit)
        for j in range(x.shape[1])
    ]


def merge_sketches(sketches: Sequence[FeatureSketch]) -> FeatureSketch:
    """The summary of the union of the parties' rows of one feature."""
    if not sketches:
        return FeatureSketch(np.zeros(0), np.zeros(0), True)
    values = np.concatenate([s.values for s in sketches])
    weights = np.concatenate([s.weights for s in sketches])
    unique, inverse = np.unique(values, return_inverse=True)
    merged = np.bincount(inverse, weights=weights, minlength=unique.size)
    return FeatureSketch(unique, merged, all(s.exact for s in sketches))


def bin_edges(sketch: FeatureSketch, max_bins: int) -> np.ndarray:
    """At most ``max_bins - 1`` strictly increasing edges for one merged feature summary."""
    values, weights = sketch.values, sketch.weights
    if values.size <= 1:
        return np.zeros(0)
    if sketch.exact and values.size <= max_bins:
        return (values[:-1] + values[1:]) / 2.0
    cumulative = np.cumsum(weights)
    targets = cumulative[-1] * np.arange(1, max_bins) / max_bins
    at = np.searchsorted(cumulative, targets, side="left")
    at = np.unique(np.minimum(at, values.size - 1))
    at = at[at < values.size - 1]  # an edge at the largest value would leave its upper bin empty
    return np.unique((values[at] + values[at + 1]) / 2.0)


def bin_codes(x: np.ndarray, edges: Sequence[np.ndarray]) -> np.ndarray:
    """``(d, n)`` uint8 bin codes of the (n, d) matrix ``x``: one contiguous row per feature, the
    layout the histogram builder reads column by column."""
    n, d = x.shape
    codes = np.empty((d, n), dtype=np.uint8)
    for j in range(d):
        codes[j] = np.searchsorted(edges[j], x[:, j], side="left")
    return codes


def pack_edges(edges: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Edges as two wire arrays: all edges concatenated, and each feature's edge count."""
    flat = (
        np.concatenate([np.asarray(e, dtype=np.float64) for e in edges]) if edges else np.zeros(0)
    )
    return flat, np.array([len(e) for e in edges], dtype=np.int64)


def unpack_edges(flat: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Inverse of :func:`pack_edges`; ``ValueError`` when counts and edges disagree or a
    feature's edges are not strictly increasing."""
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any() or int(counts.sum()) != flat.size:
        raise ValueError("edge counts do not add up to the edges sent")
    parts = (
        np.split(np.asarray(flat, dtype=np.float64), np.cumsum(counts)[:-1]) if counts.size else []
    )
    for part in parts:
        if part.size > 1 and not (np.diff(part) > 0).all():
            raise ValueError("bin edges must be strictly increasing")
    return list(parts)
