"""A party's side of boosting: its binned rows, their margins, and gradient/hessian histograms.

The party keeps, for the current tree, the heap id of the node each of its rows sits in. Per
level it applies the splits the coordinator chose (a row goes left when its bin is at most the
split bin) and builds histograms for the nodes it is asked about: for each feature, one
``np.bincount`` over ``slot * bins + code`` of the selected rows, weighted by gradients and then
by hessians (counts for squared loss). Work per level is proportional to the rows in the asked
nodes, which with histogram subtraction is at most half the rows below the root.
"""

from __future__ import annotations

import numpy as np

from .loss import gradients

__all__ = ["LocalBooster"]


class LocalBooster:
    """Training state of one party. ``codes`` is ``(n_features, n)`` uint8 (see
    :func:`.binning.bin_codes`), ``y`` the labels, ``n_bins`` the histogram width."""

    def __init__(
        self,
        codes: np.ndarray,
        y: np.ndarray,
        *,
        objective: str,
        base_score: float,
        n_bins: int,
        max_depth: int,
    ) -> None:
        self.codes = np.ascontiguousarray(codes, dtype=np.uint8)
        self.row_codes = np.ascontiguousarray(self.codes.T)  # row-major copy for partitioning
        self.y = np.asarray(y, dtype=np.float64)
        self.objective = objective
        self.n_bins = n_bins
        self.table_size = 2 ** (max_depth + 1)
        n = self.y.size
        self.margin = np.full(n, float(base_score))
        self.node = np.zeros(n, dtype=np.int32)
        self.active: np.ndarray | None = None  # rows of the current tree; None: all rows
        self.g = np.zeros(n)
        self.h: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        return int(self.y.size)

    def keep_rows(self, keep: np.ndarray) -> None:
        """Drop rows (consent revoked between trees): ``keep`` is a boolean mask over rows."""
        self.codes = np.ascontiguousarray(self.codes[:, keep])
        self.row_codes = np.ascontiguousarray(self.codes.T)
        self.y, self.margin, self.node = self.y[keep], self.margin[keep], self.node[keep]
        self.g = self.g[keep]
        self.h = None if self.h is None else self.h[keep]
        self.active = None

    def start_tree(self, active: np.ndarray | None) -> None:
        """New tree: every row back at the root, gradients at the current margins."""
        self.node.fill(0)
        self.active = active
        self.g, self.h = gradients(self.objective, self.margin, self.y)

    def apply_splits(self, nodes: np.ndarray, features: np.ndarray, bins: np.ndarray) -> None:
        """Move the rows of each split node to its left (``bin <= split bin``) or right child."""
        if nodes.size == 0:
            return
        split_feature = np.full(self.table_size, -1, dtype=np.int64)
        split_bin = np.zeros(self.table_size, dtype=np.int64)
        split_feature[nodes] = features
        split_bin[nodes] = bins
        feature = split_feature[self.node]
        moving = np.flatnonzero(feature >= 0)
        if moving.size == 0:
            return
        heap = self.node[moving]
        # Row-major lookup: each row's code sits in its own few bytes, so the gather streams.
        right = self.row_codes[moving, feature[moving]] > split_bin[heap]
        self.node[moving] = 2 * heap + 1 + right

    def finish_tree(self, nodes: np.ndarray, values: np.ndarray) -> None:
        """Add each leaf's value to the margins of the rows in it (all rows, sampled or not)."""
        if nodes.size == 0:
            return
        table = np.zeros(self.table_size)
        table[nodes] = values
        self.margin += table[self.node]

    def histograms(self, nodes: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(grad, hess)`` of the current tree's rows in ``nodes``, each
        ``(len(nodes), len(features), n_bins)`` float64."""
        k, b = nodes.size, self.n_bins
        grad = np.zeros((k, features.size, b))
        hess = np.zeros((k, features.size, b))
        if k == 0:
            return grad, hess
        slot_of = np.full(self.table_size, -1, dtype=np.int64)
        slot_of[nodes] = np.arange(k)
        rows = self.active
        slots = slot_of[self.node if rows is None else self.node[rows]]
        selected = slots >= 0
        every_row = rows is None and bool(selected.all())
        if not every_row:
            picked = np.flatnonzero(selected)
            rows = picked if rows is None else rows[picked]
            slots = slots[picked]
        offset = slots * b
        g = self.g if every_row else self.g[rows]
        h = None if self.h is None else (self.h if every_row else self.h[rows])
        size = k * b
        for j, f in enumerate(features):
            column = self.codes[f] if every_row else self.codes[f][rows]
            index = offset + column if k > 1 else column.astype(np.intp)
            grad[:, j, :] = np.bincount(index, weights=g, minlength=size).reshape(k, b)
            hess[:, j, :] = (
                np.bincount(index, minlength=size)
                if h is None
                else np.bincount(index, weights=h, minlength=size)
            ).reshape(k, b)
        return grad, hess
