"""The boosting loop, shared by federated training and single-party fitting.

One function drives every tree level by level through ``ask(step)``, which must apply the
step to the parties' rows and return the *summed* histograms of ``step.build``: over a
transport in :mod:`cdp_federated.coordinator.gbm_runner`, in memory in :func:`fit_local`. A
step also carries what the parties need to keep their rows in step with the model: the previous
level's splits, and, on a tree's first step, the previous tree's leaf values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .binning import bin_codes
from .draws import feature_sample, row_sample
from .grower import TreeGrower
from .histograms import LocalBooster
from .loss import base_score as compute_base_score
from .model import TreeBuilder, TreeEnsemble
from .params import GBMParams

__all__ = ["Step", "TreeRecord", "boost", "apply_step", "fit_local"]

_EMPTY_INT = np.zeros(0, dtype=np.int64)
_EMPTY_FLOAT = np.zeros(0, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class Step:
    """One request to every party. Parties apply ``split_*`` (the previous level's splits, or the
    previous tree's last ones when ``depth == 0``), then add ``leaf_values`` to the margins of the
    rows in ``leaf_nodes`` (a finished tree), then, when ``depth == 0``, start tree ``tree``; then
    they return histograms of ``build`` over ``features``."""

    tree: int
    depth: int
    split_nodes: np.ndarray
    split_features: np.ndarray
    split_bins: np.ndarray
    leaf_nodes: np.ndarray
    leaf_values: np.ndarray
    build: np.ndarray
    features: np.ndarray


@dataclass(frozen=True)
class TreeRecord:
    """A finished tree: its index, leaf and split counts, and its depth."""

    tree: int
    leaves: int
    splits: int
    depth: int


Ask = Callable[[Step], tuple[np.ndarray, np.ndarray]]


def boost(
    params: GBMParams,
    edges: list[np.ndarray],
    *,
    base_score: float,
    seed: int,
    ask: Ask,
    on_tree: Callable[[TreeRecord], None] | None = None,
) -> TreeEnsemble:
    """Grow ``params.n_trees`` trees through ``ask`` and return the ensemble."""
    n_features = len(edges)
    builder = TreeBuilder(n_features=n_features, base_score=base_score)
    carry_splits = (_EMPTY_INT, _EMPTY_INT, _EMPTY_INT)
    carry_leaves = (_EMPTY_INT, _EMPTY_FLOAT)
    for tree in range(params.n_trees):
        features = feature_sample(seed, tree, n_features, params.colsample)
        grower = TreeGrower(params, features, edges)
        step = Step(tree, 0, *carry_splits, *carry_leaves, grower.build, features)
        while True:
            grad, hess = ask(step)
            grower.receive(grad, hess)
            if grower.done:
                break
            step = Step(
                tree,
                grower.depth,
                *grower.new_splits,
                _EMPTY_INT,
                _EMPTY_FLOAT,
                grower.build,
                features,
            )
        carry_splits = grower.new_splits
        carry_leaves = grower.leaf_arrays()
        builder.add_tree(grower.splits, grower.leaves)
        if on_tree is not None:
            on_tree(TreeRecord(tree, len(grower.leaves), len(grower.splits), grower.depth))
    return builder.build()


def apply_step(
    booster: LocalBooster, step: Step, *, seed: int, party: str, subsample: float
) -> tuple[np.ndarray, np.ndarray]:
    """A party's answer to ``step`` (see :class:`Step`)."""
    booster.apply_splits(step.split_nodes, step.split_features, step.split_bins)
    booster.finish_tree(step.leaf_nodes, step.leaf_values)
    if step.depth == 0:
        booster.start_tree(row_sample(seed, step.tree, party, booster.n_rows, subsample))
    return booster.histograms(step.build, step.features)


def fit_local(
    x: np.ndarray,
    y: np.ndarray,
    edges: list[np.ndarray],
    params: GBMParams,
    *,
    seed: int = 0,
    party: str = "",
    on_tree: Callable[[TreeRecord], None] | None = None,
) -> TreeEnsemble:
    """Train on one party's rows in memory: the federated protocol with a single party."""
    y = np.asarray(y, dtype=np.float64)
    base = compute_base_score(params.objective, float(y.sum()), int(y.size))
    booster = LocalBooster(
        bin_codes(np.asarray(x, dtype=np.float64), edges),
        y,
        objective=params.objective,
        base_score=base,
        n_bins=params.max_bins,
        max_depth=params.max_depth,
    )
    return boost(
        params,
        edges,
        base_score=base,
        seed=seed,
        ask=lambda step: apply_step(
            booster, step, seed=seed, party=party, subsample=params.subsample
        ),
        on_tree=on_tree,
    )
