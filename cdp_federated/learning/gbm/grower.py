"""The coordinator's side of one tree: level-wise growth from summed histograms, with subtraction.

Nodes carry heap ids (root 0, children ``2k+1`` and ``2k+2``). At each level the grower holds
the summed histogram of every node: those it asked for, plus each larger sibling derived as
``parent - smaller sibling`` (when ``subtraction`` is on, parties only ever build the child with
the smaller hessian sum). It picks each node's best split, turns the others into leaves, and asks
for the next level. Children at ``max_depth`` become leaves straight from the split's sums.
"""

from __future__ import annotations

import numpy as np

from .params import GBMParams
from .splits import best_splits, leaf_value

__all__ = ["TreeGrower"]

_EMPTY = np.zeros(0, dtype=np.int64)


class TreeGrower:
    """Grows one tree. ``features`` are the feature indices this tree may use (the histograms'
    feature axis), ``n_edges``/``edges`` describe every feature's bins."""

    def __init__(
        self,
        params: GBMParams,
        features: np.ndarray,
        edges: list[np.ndarray],
    ) -> None:
        self.params = params
        self.features = np.asarray(features, dtype=np.int64)
        self.edges = edges
        self.n_edges = np.array([edges[f].size for f in self.features], dtype=np.int64)
        self.depth = 0
        self.level = np.zeros(1, dtype=np.int64)  # heap ids of this level's nodes
        self.build = np.zeros(1, dtype=np.int64)  # the nodes whose histograms parties send
        self.splits: dict[int, tuple[int, int, float]] = {}  # heap -> (feature, bin, edge)
        self.leaves: dict[int, float] = {}
        self.new_splits = (_EMPTY, _EMPTY, _EMPTY)  # this level's splits, for the parties
        self.done = False
        self._parents: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # parent heap -> hist
        self._siblings: dict[int, int] = {}  # derived node -> its built sibling

    def receive(self, grad: np.ndarray, hess: np.ndarray) -> None:
        """Take the summed histograms of :attr:`build` and decide this level."""
        p = self.params
        built = {int(n): (grad[i], hess[i]) for i, n in enumerate(self.build)}
        hists = []
        for node in self.level:
            node = int(node)
            if node in built:
                hists.append(built[node])
            else:  # the larger child: parent minus its built sibling
                pg, ph = self._parents[(node - 1) // 2]
                sg, sh = built[self._siblings[node]]
                hists.append((pg - sg, ph - sh))
        g = np.stack([h[0] for h in hists])
        h = np.stack([h[1] for h in hists])
        choice = best_splits(
            g,
            h,
            self.n_edges,
            reg_lambda=p.reg_lambda,
            gamma=p.gamma,
            min_child_weight=p.min_child_weight,
        )
        # Node totals from the first histogram feature (every feature sums the same rows).
        total_g, total_h = g[:, 0, :].sum(axis=1), h[:, 0, :].sum(axis=1)
        last_level = self.depth + 1 >= p.max_depth
        split_nodes, split_features, split_bins = [], [], []
        next_level, build = [], []
        parents: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        siblings: dict[int, int] = {}
        for i, node in enumerate(int(n) for n in self.level):
            position = int(choice.position[i])
            if position < 0:
                self.leaves[node] = self._leaf(total_g[i], total_h[i])
                continue
            feature, b = int(self.features[position]), int(choice.bin[i])
            self.splits[node] = (feature, b, float(self.edges[feature][b]))
            split_nodes.append(node)
            split_features.append(feature)
            split_bins.append(b)
            left, right = 2 * node + 1, 2 * node + 2
            lg, lh = float(choice.left_grad[i]), float(choice.left_hess[i])
            rg, rh = total_g[i] - lg, total_h[i] - lh
            if last_level:
                self.leaves[left] = self._leaf(lg, lh)
                self.leaves[right] = self._leaf(rg, rh)
                continue
            next_level += [left, right]
            if p.subtraction:
                small, large = (left, right) if lh <= rh else (right, left)
                build.append(small)
                siblings[large] = small
                parents[node] = (g[i], h[i])
            else:
                build += [left, right]
        self.new_splits = tuple(
            np.asarray(a, dtype=np.int64) for a in (split_nodes, split_features, split_bins)
        )  # type: ignore[assignment]
        self.level = np.asarray(next_level, dtype=np.int64)
        self.build = np.asarray(sorted(build), dtype=np.int64)
        self._parents, self._siblings = parents, siblings
        self.depth += 1
        self.done = self.level.size == 0

    def _leaf(self, grad_sum: float, hess_sum: float) -> float:
        return leaf_value(
            grad_sum,
            hess_sum,
            reg_lambda=self.params.reg_lambda,
            learning_rate=self.params.learning_rate,
        )

    def leaf_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The finished tree's leaves as (heap ids, values) for the parties."""
        nodes = np.asarray(sorted(self.leaves), dtype=np.int64)
        return nodes, np.asarray([self.leaves[n] for n in nodes], dtype=np.float64)
