"""Catching a restarted party up: the model so far as flat arrays, and its replay on the rows.

A party's training state (margins, the current tree's row draw and node of every row) is a pure
function of its rows, the bin edges, the base score, the shared seed and the splits and leaves
decided so far. The coordinator records those from the steps it sends (:class:`ModelSoFar`);
a party that lost its state rebuilds it with :func:`replay`, bit for bit what it would hold had
it never stopped (same rows), so the job ends with the same trees. Nothing per row is sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .boosting import Step
from .draws import row_sample
from .histograms import LocalBooster

__all__ = ["ModelSoFar", "replay"]


@dataclass
class ModelSoFar:
    """Splits and leaves decided before the current step, per tree, recorded by :meth:`record`
    from the steps as they are sent (each carries the previous level's splits and, on a tree's
    first step, the previous tree's leaves)."""

    tree: int = 0
    depth: int = 0
    _splits: list[list[np.ndarray]] = field(default_factory=lambda: [[]])  # per tree: (3, k)
    _leaves: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def record(self, step: Step) -> None:
        """Take in ``step``, once, when it is first sent."""
        if step.split_nodes.size:
            self._splits[-1].append(
                np.stack([step.split_nodes, step.split_features, step.split_bins])
            )
        if step.depth == 0 and step.tree > len(self._leaves):
            self._leaves.append((step.leaf_nodes.copy(), step.leaf_values.copy()))
            self._splits.append([])
        self.tree, self.depth = step.tree, step.depth

    def arrays(self) -> dict[str, np.ndarray]:
        """The model so far as the catch-up message's arrays (see ``GBMCatchUpIns``)."""
        per_tree = [
            np.concatenate(levels, axis=1) if levels else np.zeros((3, 0), dtype=np.int64)
            for levels in self._splits
        ]
        splits = np.concatenate(per_tree, axis=1).astype(np.int64)
        leaf_nodes = [nodes for nodes, _ in self._leaves]
        leaf_values = [values for _, values in self._leaves]
        return {
            "split_counts": np.array([t.shape[1] for t in per_tree], dtype=np.int64),
            "split_nodes": splits[0],
            "split_features": splits[1],
            "split_bins": splits[2],
            "leaf_counts": np.array([n.size for n in leaf_nodes], dtype=np.int64),
            "leaf_nodes": np.concatenate(leaf_nodes or [np.zeros(0)]).astype(np.int64),
            "leaf_values": np.concatenate(leaf_values or [np.zeros(0)]).astype(np.float64),
        }


def replay(
    booster: LocalBooster,
    *,
    tree: int,
    split_counts: np.ndarray,
    splits: tuple[np.ndarray, np.ndarray, np.ndarray],
    leaf_counts: np.ndarray,
    leaves: tuple[np.ndarray, np.ndarray],
    seed: int,
    party: str,
    subsample: float,
    max_depth: int,
) -> None:
    """Bring a fresh ``booster`` to where it stands after the step that started tree ``tree``
    and applied that tree's splits so far. Counts must already be checked against the arrays
    (``split_counts`` has ``tree + 1`` entries, ``leaf_counts`` ``tree``)."""
    split_ends = np.cumsum(split_counts)
    leaf_ends = np.cumsum(leaf_counts)
    for t in range(tree + 1):
        part = slice(int(split_ends[t] - split_counts[t]), int(split_ends[t]))
        booster.node.fill(0)
        if t == tree:  # the current tree: its row draw, at the margins of the trees before
            booster.start_tree(row_sample(seed, t, party, booster.n_rows, subsample))
        # Every split of the tree at once: each pass moves a row one level down.
        for _ in range(max_depth):
            booster.apply_splits(splits[0][part], splits[1][part], splits[2][part])
        if t < tree:
            done = slice(int(leaf_ends[t] - leaf_counts[t]), int(leaf_ends[t]))
            booster.finish_tree(leaves[0][done], leaves[1][done])
