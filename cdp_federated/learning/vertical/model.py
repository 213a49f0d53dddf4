"""A trained vertical GBM, split by owner, and cooperative scoring.

The active party's part (:class:`ActiveModel`) holds the base margin, every tree's structure,
all leaf weights and the thresholds of *its own* splits; a passive party's split appears only as
``(owner, record)``. Each passive party keeps its lookup table ``record -> (feature, threshold)``
(:attr:`PassiveParty.records`).

Scoring (:meth:`ActiveModel.decision_function` with the passives' responses): each passive party
evaluates all of its records on the aligned scoring rows and returns the booleans; the active
party walks the trees. The active party learns, per scored row, the side of each passive
threshold (not the thresholds or features); a passive party learns which rows are scored and
nothing about the scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ...errors import ProtocolError, TrainingError

__all__ = ["ActiveModel", "Split", "Tree"]


@dataclass(frozen=True)
class Split:
    owner: str  # the active party's name or a passive party's
    ref: int  # own split index (active) or the owner's lookup record
    left: int
    right: int


@dataclass
class Tree:
    splits: dict[int, Split] = field(default_factory=dict)
    leaves: dict[int, float] = field(default_factory=dict)


@dataclass
class ActiveModel:
    owner: str
    objective: str
    base_margin: float
    own_splits: list[tuple[int, float]]  # (feature, threshold) of the active party's splits
    trees: list[Tree]

    def passive_records(self) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for tree in self.trees:
            for s in tree.splits.values():
                if s.owner != self.owner:
                    out.setdefault(s.owner, set()).add(s.ref)
        return out

    def decision_function(
        self, features: np.ndarray, decisions: Mapping[str, Mapping[int, np.ndarray]]
    ) -> np.ndarray:
        """Margins for aligned rows: ``features`` are the active party's, ``decisions[owner][record]``
        the owner's booleans (go left) for the same rows."""
        x = np.asarray(features, dtype=np.float64)
        n = x.shape[0]
        margin = np.full(n, self.base_margin)
        for tree in self.trees:
            node = np.zeros(n, dtype=np.int64)
            for _ in range(len(tree.splits) + 1):
                active = np.isin(node, list(tree.splits))
                if not active.any():
                    break
                for nid in np.unique(node[active]).tolist():
                    s = tree.splits[nid]
                    rows = node == nid
                    if s.owner == self.owner:
                        feature, threshold = self.own_splits[s.ref]
                        left = x[:, feature] <= threshold
                    else:
                        left = self._lookup(decisions, s, n)
                    node[rows & left] = s.left
                    node[rows & ~left] = s.right
            missing = set(np.unique(node).tolist()) - set(tree.leaves)
            if missing:
                raise TrainingError(
                    "tree walk ended outside a leaf", field="tree", value=sorted(missing)
                )
            margin += np.array([tree.leaves[i] for i in node.tolist()]) if n else 0.0
        return margin

    @staticmethod
    def _lookup(decisions: Mapping[str, Mapping[int, np.ndarray]], s: Split, n: int) -> np.ndarray:
        got = decisions.get(s.owner, {}).get(s.ref)
        if got is None or np.shape(got) != (n,):
            raise ProtocolError(
                "missing or malformed split decisions", field="decisions", value=(s.owner, s.ref)
            )
        return np.asarray(got, dtype=bool)

    def predict_proba_from_margin(self, margin: np.ndarray) -> np.ndarray:
        p = 1.0 / (1.0 + np.exp(-margin))
        return np.column_stack([1.0 - p, p])
