"""A trained ensemble as flat numpy arrays, with vectorised prediction over all trees at once.

Node ``i`` of the concatenated trees splits on ``feature[i]`` (``-1`` for a leaf): rows with
``x[feature] <= threshold[i]`` (equivalently ``bin <= threshold_bin[i]``) go to ``left[i]``,
the others to ``right[i]`` (absolute indices); a leaf adds ``value[i]`` to the margin.
``roots[t]`` is tree ``t``'s root. The margin is ``base_score`` plus one leaf value per tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...errors import ModelFormatError

__all__ = ["TreeEnsemble", "TreeBuilder"]


@dataclass(frozen=True, eq=False)
class TreeEnsemble:
    feature: np.ndarray  # int32
    threshold: np.ndarray  # float64 edge value
    threshold_bin: np.ndarray  # int32
    left: np.ndarray  # int32
    right: np.ndarray  # int32
    value: np.ndarray  # float64 leaf values (learning rate applied)
    roots: np.ndarray  # int32
    base_score: float
    n_features: int
    depth: int = field(init=False)  # longest root-to-leaf path, computed

    def __post_init__(self) -> None:
        self.validate()
        depth = np.zeros(self.feature.size, dtype=np.int64)
        for i in np.flatnonzero(self.feature >= 0):  # children point forward: one pass
            depth[self.left[i]] = depth[self.right[i]] = depth[i] + 1
        object.__setattr__(self, "depth", int(depth.max()) if depth.size else 0)

    @property
    def n_trees(self) -> int:
        return int(self.roots.size)

    def validate(self) -> None:
        """Refuse arrays that do not form trees (a model read from JSON or the wire)."""
        arrays = (
            self.feature,
            self.threshold,
            self.threshold_bin,
            self.left,
            self.right,
            self.value,
        )
        n = self.feature.size
        problem = None
        if any(a.ndim != 1 or a.size != n for a in arrays) or self.roots.ndim != 1:
            problem = "node arrays must be 1-d and of one length"
        elif not (np.isfinite(self.threshold).all() and np.isfinite(self.value).all()):
            problem = "thresholds and values must be finite"
        elif not np.isfinite(self.base_score):
            problem = "base_score must be finite"
        elif n and ((self.feature < -1).any() or (self.feature >= self.n_features).any()):
            problem = "a node splits on a feature the model does not have"
        elif ((self.roots < 0) | (self.roots >= max(n, 1))).any() and self.roots.size:
            problem = "a root points outside the nodes"
        else:
            inner = self.feature >= 0
            children = np.concatenate((self.left[inner], self.right[inner]))
            nodes = np.flatnonzero(inner)
            if ((children < 0) | (children >= n)).any() or (
                children.size and (children <= np.concatenate((nodes, nodes))).any()
            ):
                problem = "children must point forward to existing nodes"
        if problem:
            raise ModelFormatError(
                f"not a valid tree ensemble: {problem}",
                field="trees",
                fix="rebuild the model; do not edit its arrays by hand",
            )

    # --- prediction ------------------------------------------------------------------------------

    def predict_margin(self, x: np.ndarray) -> np.ndarray:
        """Margins of the rows of the (n, n_features) matrix ``x``."""
        return self._margin(np.asarray(x, dtype=np.float64).T, self.threshold)

    def predict_margin_codes(self, codes: np.ndarray) -> np.ndarray:
        """Margins from ``(n_features, n)`` bin codes (the training layout)."""
        return self._margin(np.asarray(codes), self.threshold_bin)

    def _margin(self, columns: np.ndarray, threshold: np.ndarray) -> np.ndarray:
        """``columns`` is feature-major ``(n_features, n)`` (a Fortran matrix's transpose is,
        without a copy). One tree at a time, ``depth`` steps of 1-d gathers over all rows:
        leaves are self-loops (threshold +inf on feature 0), so no row needs masking."""
        n = columns.shape[1]
        out = np.full(n, self.base_score, dtype=np.float64)
        if self.n_trees == 0 or n == 0:
            return out
        flat = np.ascontiguousarray(columns).ravel()
        leaf = self.feature < 0
        nodes = np.arange(self.feature.size)
        offset = np.where(leaf, 0, self.feature).astype(np.intp) * n
        limit = np.where(leaf, np.inf, threshold.astype(np.float64))
        left = np.where(leaf, nodes, self.left).astype(np.intp)
        right = np.where(leaf, nodes, self.right).astype(np.intp)
        rows = np.arange(n)
        for root in self.roots:
            node = np.full(n, root, dtype=np.intp)
            for _ in range(self.depth):
                go_right = flat[offset[node] + rows] > limit[node]
                node = np.where(go_right, right[node], left[node])
            out += self.value[node]
        return out

    # --- plain data ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature": self.feature.tolist(),
            "threshold": self.threshold.tolist(),
            "threshold_bin": self.threshold_bin.tolist(),
            "left": self.left.tolist(),
            "right": self.right.tolist(),
            "value": self.value.tolist(),
            "roots": self.roots.tolist(),
            "base_score": float(self.base_score),
            "n_features": int(self.n_features),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TreeEnsemble:
        try:
            ints = {
                k: np.asarray(data[k], dtype=np.int32)
                for k in ("feature", "threshold_bin", "left", "right", "roots")
            }
            floats = {k: np.asarray(data[k], dtype=np.float64) for k in ("threshold", "value")}
            return cls(
                **ints,
                **floats,
                base_score=float(data["base_score"]),
                n_features=int(data["n_features"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ModelFormatError):
                raise
            raise ModelFormatError(
                f"tree ensemble document is incomplete or malformed: {exc!r}",
                field="trees",
                fix="restore model.json from the registry",
            ) from exc


@dataclass
class TreeBuilder:
    """Collects trees grown in heap order (root 0, children ``2k+1``/``2k+2``) into flat arrays."""

    n_features: int
    base_score: float
    _nodes: list[tuple[int, float, int, int, int, float]] = field(default_factory=list)
    _roots: list[int] = field(default_factory=list)

    def add_tree(
        self,
        splits: dict[int, tuple[int, int, float]],
        leaves: dict[int, float],
    ) -> None:
        """``splits``: heap id -> (feature, bin, edge value); ``leaves``: heap id -> value."""
        start = len(self._nodes)
        order = sorted([*splits, *leaves])
        position = {heap: start + i for i, heap in enumerate(order)}
        for heap in order:
            if heap in splits:
                f, b, t = splits[heap]
                self._nodes.append((f, t, b, position[2 * heap + 1], position[2 * heap + 2], 0.0))
            else:
                self._nodes.append((-1, 0.0, -1, -1, -1, leaves[heap]))
        self._roots.append(start)

    def build(self) -> TreeEnsemble:
        cols = list(zip(*self._nodes, strict=True)) if self._nodes else [()] * 6
        return TreeEnsemble(
            feature=np.asarray(cols[0], dtype=np.int32),
            threshold=np.asarray(cols[1], dtype=np.float64),
            threshold_bin=np.asarray(cols[2], dtype=np.int32),
            left=np.asarray(cols[3], dtype=np.int32),
            right=np.asarray(cols[4], dtype=np.int32),
            value=np.asarray(cols[5], dtype=np.float64),
            roots=np.asarray(self._roots, dtype=np.int32),
            base_score=float(self.base_score),
            n_features=self.n_features,
        )
