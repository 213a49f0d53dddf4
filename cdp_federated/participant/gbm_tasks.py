"""The participant's side of horizontal histogram GBM: sketches, level histograms, evaluation.

Served through :meth:`ParticipantAgent.handle`, so the agent's governance check (once per job,
before any row is read), consent gate, schema checks and missing-value policy apply unchanged:
missing features are refused unless the job sets ``params.missing = "impute"`` (local training
mean); GBM has no missing-value bin of its own.

Per job the participant keeps its binned training rows (uint8 codes), each row's margin and,
for the tree being grown, the node each row sits in. It checks that requests arrive in order
(each level after the previous, each tree after the last) and re-applies the consent gate at the
start of every tree: a revoked row leaves training from the next tree on. A participant that
restarted holds none of this: it answers a histogram request with ``SetupRequiredError`` and is
sent a catch-up (edges, base score, the model so far) from which it rebuilds the same state on
its rows, read through the gate again (:mod:`cdp_federated.learning.gbm.catchup`); a repeated
level is answered from the state as it is.

Replies carry summaries, histograms (nodes x features x bins) and aggregate metrics, never a row,
a per-row gradient or an identifier.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, SetupRequiredError, TrainingError
from ..federation.messages import (
    GBMCatchUpIns,
    GBMCatchUpRes,
    GBMEvaluateIns,
    GBMEvaluateRes,
    GBMHistogramIns,
    GBMHistogramRes,
    GBMSketchIns,
    GBMSketchRes,
    Message,
)
from ..jobs import JobSpec
from ..learning.gbm import LocalBooster, Step, TreeEnsemble, apply_step, bin_codes, sketch_columns
from ..learning.gbm.binning import unpack_edges
from ..learning.gbm.catchup import replay
from ..learning.gbm.loss import link_inverse, loss_sum
from ..learning.gbm.params import MAX_BINS_LIMIT, GBMParams
from ..learning.metrics import score_histograms

__all__ = ["GBM_REQUESTS", "serve_gbm", "gbm_objective"]

GBM_REQUESTS = (GBMSketchIns, GBMHistogramIns, GBMCatchUpIns, GBMEvaluateIns)
MAX_SKETCH_SIZE = 65_536


@dataclass
class _Training:
    job: JobSpec
    params: GBMParams
    booster: LocalBooster
    ids: np.ndarray  # profile ids of the booster's rows (consent re-checks); may be empty
    n_features: int
    position: tuple[int, int] = (0, 0)  # (tree, depth) of the last request served


_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def gbm_objective(job: JobSpec) -> str:
    """The objective of a GBM job (``params.objective``, default ``binary``)."""
    objective = job.params.get("objective", "binary")
    if objective not in ("binary", "regression"):
        raise ConfigError(
            "unknown GBM objective",
            field="params.objective",
            value=objective,
            fix="use 'binary' or 'regression'",
        )
    return objective


def serve_gbm(agent, message: Message) -> Message:
    """Answer one GBM request for ``agent`` (a :class:`~.agent.ParticipantAgent`)."""
    job = agent._job(message.job)
    if job.model != "gbm":
        raise TrainingError(
            f"participant {agent.name!r}: {message.TYPE} belongs to GBM jobs, not {job.model!r}",
            field="job.model",
            value=job.model,
            fix="send GBM requests only for jobs with model 'gbm'",
        )
    params = GBMParams.from_mapping(job.params, n_trees=max(job.rounds, 1))
    if isinstance(message, GBMSketchIns):
        return _sketch(agent, job, params, message)
    if isinstance(message, GBMHistogramIns):
        return _histograms(agent, job, params, message)
    if isinstance(message, GBMCatchUpIns):
        return _catch_up(agent, job, params, message)
    return _evaluate(agent, job, message)


def _sketch(agent, job: JobSpec, params: GBMParams, message: GBMSketchIns) -> GBMSketchRes:
    if not (
        16 <= message.sketch_size <= MAX_SKETCH_SIZE and 2 <= message.exact_limit <= MAX_BINS_LIMIT
    ):
        # Bounds the participant enforces itself: a larger exact_limit would ask for every
        # distinct value of a column, i.e. the column itself.
        raise TrainingError(
            f"participant {agent.name!r}: sketch settings out of range",
            field="sketch_size",
            value={"sketch_size": message.sketch_size, "exact_limit": message.exact_limit},
            fix=f"sketch_size in [16, {MAX_SKETCH_SIZE}], exact_limit in [2, {MAX_BINS_LIMIT}]",
        )
    data = agent._gated(job, "train")
    sketches = sketch_columns(
        data.x, sketch_size=message.sketch_size, exact_limit=message.exact_limit
    )
    return GBMSketchRes(
        count=int(data.y.size),
        label_sum=float(data.y.sum(dtype=np.float64)),
        values=np.concatenate([s.values for s in sketches]),
        weights=np.concatenate([s.weights for s in sketches]),
        lengths=np.array([s.values.size for s in sketches], dtype=np.int64),
        exact=np.array([s.exact for s in sketches], dtype=bool),
    )


def _histograms(
    agent, job: JobSpec, params: GBMParams, message: GBMHistogramIns
) -> GBMHistogramRes:
    state = _STATE.get(agent)
    if message.edge_counts.size:  # the job's first request: bin the training rows
        state = _start(agent, job, params, message)
    elif state is None or state.job != job:
        # Lost with a restart: the coordinator answers with a catch-up (GBMCatchUpIns).
        raise SetupRequiredError(
            f"participant {agent.name!r} holds no training state for GBM job {job.job_id!r} "
            f"(tree {message.tree}, depth {message.depth}): it restarted since the job began",
            field="job",
            value=job.job_id,
            fix="send a gbm_catch_up_ins with the edges and the model so far, then this request",
        )
    elif (message.tree, message.depth) == state.position:
        # The level again (after a catch-up, a secure-aggregation retry or a redelivery): its
        # splits and leaves are applied already, so only the histograms are computed again.
        step = _step(agent, state, message)
        grad, hess = state.booster.histograms(step.build, step.features)
        return GBMHistogramRes(message.tree, message.depth, step.build, grad, hess)
    else:
        _check_order(agent, state, message)
        if message.depth == 0:
            _resync_consent(agent, job, state)
    step = _step(agent, state, message)
    state.position = (message.tree, message.depth)
    grad, hess = apply_step(
        state.booster, step, seed=message.seed, party=agent.name, subsample=params.subsample
    )
    return GBMHistogramRes(message.tree, message.depth, step.build, grad, hess)


def _start(agent, job: JobSpec, params: GBMParams, message: GBMHistogramIns) -> _Training:
    if message.tree != 0 or message.depth != 0:
        raise TrainingError(
            f"participant {agent.name!r}: bins must come with tree 0, depth 0",
            field="tree",
            value=[message.tree, message.depth],
        )
    state = _training(agent, job, params, message)
    _STATE[agent] = state
    return state


def _training(
    agent, job: JobSpec, params: GBMParams, message: GBMHistogramIns | GBMCatchUpIns
) -> _Training:
    """Fresh state: the job's training rows (through the consent gate, now), binned."""
    data = agent._gated(job, "train")
    d = data.x.shape[1]
    try:
        edges = unpack_edges(message.edges, message.edge_counts)
    except ValueError as exc:
        raise TrainingError(
            f"participant {agent.name!r}: bad bin edges: {exc}",
            field="edges",
            fix="coordinator bug",
        ) from exc
    if len(edges) != d or any(e.size > params.max_bins - 1 for e in edges):
        raise TrainingError(
            f"participant {agent.name!r}: edges for {len(edges)} features, it has {d} "
            f"(at most {params.max_bins - 1} edges each)",
            field="edge_counts",
            value=len(edges),
            fix="participants and coordinator must use the same job features and max_bins",
        )
    booster = LocalBooster(
        bin_codes(data.x, edges),
        data.y,
        objective=params.objective,
        base_score=message.base_score,
        n_bins=params.max_bins,
        max_depth=params.max_depth,
    )
    return _Training(job, params, booster, data.ids.copy(), d, position=(0, -1))


def _catch_up(agent, job: JobSpec, params: GBMParams, message: GBMCatchUpIns) -> GBMCatchUpRes:
    """Rebuild the state of a participant that restarted mid-job (see ``GBMCatchUpIns``). Its
    rows are read through the consent gate now: revocations since the job began apply at once."""
    tree, depth = message.tree, message.depth
    if not (0 <= tree < params.n_trees and 0 <= depth < params.max_depth):
        raise TrainingError(
            f"participant {agent.name!r}: catch-up to tree {tree} depth {depth} is outside the "
            f"job's {params.n_trees} trees of depth {params.max_depth}",
            field="tree",
            value=[tree, depth],
            fix="coordinator bug",
        )
    counts = (
        ("split_counts", message.split_counts, tree + 1, message.split_nodes.size),
        ("leaf_counts", message.leaf_counts, tree, message.leaf_nodes.size),
    )
    for name, array, length, total in counts:
        if array.shape != (length,) or (array < 0).any() or int(array.sum()) != total:
            raise TrainingError(
                f"participant {agent.name!r}: {name} must hold {length} counts summing to {total}",
                field=name,
                value=array.shape,
                fix="coordinator bug: one count per tree, matching the flat arrays",
            )
    state = _training(agent, job, params, message)
    d, table = state.n_features, state.booster.table_size
    checks = (
        ("split_nodes", message.split_nodes, table, message.split_nodes.size),
        ("split_features", message.split_features, d, message.split_nodes.size),
        ("split_bins", message.split_bins, params.max_bins - 1, message.split_nodes.size),
        ("leaf_nodes", message.leaf_nodes, table, message.leaf_nodes.size),
        ("leaf_values", message.leaf_values, None, message.leaf_nodes.size),
    )
    for name, array, bound, size in checks:
        bad = array.ndim != 1 or array.size != size
        if not bad and bound is not None and array.size:
            bad = bool(array.min() < 0 or array.max() >= bound)
        if bad:
            raise TrainingError(
                f"participant {agent.name!r}: catch-up {name} malformed or out of range",
                field=name,
                value=array.shape,
                fix="coordinator bug: node ids, features and bins must fit the job",
            )
    replay(
        state.booster,
        tree=tree,
        split_counts=message.split_counts.astype(np.int64),
        splits=(
            message.split_nodes.astype(np.int64),
            message.split_features.astype(np.int64),
            message.split_bins.astype(np.int64),
        ),
        leaf_counts=message.leaf_counts.astype(np.int64),
        leaves=(message.leaf_nodes.astype(np.int64), message.leaf_values),
        seed=message.seed,
        party=agent.name,
        subsample=params.subsample,
        max_depth=params.max_depth,
    )
    state.position = (tree, depth)
    _STATE[agent] = state
    return GBMCatchUpRes(tree, depth)


def _check_order(agent, state: _Training, message: GBMHistogramIns) -> None:
    tree, depth = state.position
    if (message.tree, message.depth) not in ((tree, depth + 1), (tree + 1, 0)):
        raise TrainingError(
            f"participant {agent.name!r}: request for tree {message.tree} depth "
            f"{message.depth} after tree {tree} depth {depth}",
            field="depth",
            value=[message.tree, message.depth],
            fix="restart the job: levels must arrive in order",
        )


def _resync_consent(agent, job: JobSpec, state: _Training) -> None:
    """Drop the rows whose consent was revoked since the last tree (no-op without a gate)."""
    if agent.consent_gate is None or state.ids.size == 0:
        return
    data = agent._gated(job, "train")
    if data.ids.size != state.ids.size:
        keep = np.isin(state.ids, data.ids)
        state.booster.keep_rows(keep)
        state.ids = state.ids[keep]


def _step(agent, state: _Training, message: GBMHistogramIns) -> Step:
    table = state.booster.table_size
    d = state.n_features
    checks = (
        ("build_nodes", message.build_nodes, table),
        ("split_nodes", message.split_nodes, table),
        ("leaf_nodes", message.leaf_nodes, table),
        ("features", message.features, d),
        ("split_features", message.split_features, d),
        ("split_bins", message.split_bins, state.params.max_bins - 1),
    )
    for name, array, bound in checks:
        if array.ndim != 1 or (array.size and (array.min() < 0 or array.max() >= bound)):
            raise TrainingError(
                f"participant {agent.name!r}: {name} out of range [0, {bound})",
                field=name,
                fix="coordinator bug: node ids, features and bins must fit the job",
            )
    same_length = (
        message.split_nodes.size == message.split_features.size == message.split_bins.size
        and message.leaf_nodes.size == message.leaf_values.size
    )
    if not same_length:
        raise TrainingError(
            f"participant {agent.name!r}: split or leaf arrays differ in length",
            field="split_nodes",
            fix="coordinator bug",
        )
    return Step(
        tree=message.tree,
        depth=message.depth,
        split_nodes=message.split_nodes.astype(np.int64),
        split_features=message.split_features.astype(np.int64),
        split_bins=message.split_bins.astype(np.int64),
        leaf_nodes=message.leaf_nodes.astype(np.int64),
        leaf_values=message.leaf_values,
        build=message.build_nodes.astype(np.int64),
        features=message.features.astype(np.int64),
    )


def _evaluate(agent, job: JobSpec, message: GBMEvaluateIns) -> GBMEvaluateRes:
    if message.objective != gbm_objective(job):
        raise TrainingError(
            f"participant {agent.name!r}: evaluation objective {message.objective!r} does not "
            "match the job's",
            field="objective",
            value=message.objective,
            fix="coordinator bug",
        )
    if not 2 <= message.bins <= 1_000_000:
        raise TrainingError("bins out of range", field="bins", value=message.bins)
    data = agent._gated(job, message.split)
    d = data.x.shape[1]
    ensemble = TreeEnsemble(
        feature=message.feature.astype(np.int32),
        threshold=message.threshold.astype(np.float64),
        threshold_bin=np.zeros(message.feature.size, dtype=np.int32),
        left=message.left.astype(np.int32),
        right=message.right.astype(np.int32),
        value=message.value.astype(np.float64),
        roots=message.roots.astype(np.int32),
        base_score=message.base_score,
        n_features=d,
    )
    y = data.y.astype(np.float64)
    margin = ensemble.predict_margin(data.x)
    if message.objective == "binary":
        positives, negatives = score_histograms(link_inverse("binary", margin), y, message.bins)
        return GBMEvaluateRes(
            count=int(y.size),
            log_loss_sum=loss_sum("binary", margin, y),
            squared_error_sum=0.0,
            absolute_error_sum=0.0,
            label_sum=float(y.sum()),
            positives=positives,
            negatives=negatives,
        )
    errors = margin - y
    empty = np.zeros(0, dtype=np.int64)
    return GBMEvaluateRes(
        count=int(y.size),
        log_loss_sum=0.0,
        squared_error_sum=float(errors @ errors),
        absolute_error_sum=float(np.abs(errors).sum()),
        label_sum=float(y.sum()),
        positives=empty,
        negatives=empty,
    )
