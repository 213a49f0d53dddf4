"""Horizontal histogram gradient-boosted trees, driven from the coordinator over any transport.

1. **Sketch.** Every participant summarises each feature of its training rows (distinct values
   with counts, or chunk means with counts; see :mod:`cdp_federated.learning.gbm.binning`) and
   reports its row count and label sum. The coordinator merges the summaries into shared bin
   edges and the base score. A participant with no (consented) training rows is excluded here,
   with its reason kept in the result, when enough others remain.
2. **Trees.** For each tree, level by level, every participant applies the previous level's
   splits to its rows and returns gradient/hessian histograms (nodes x features x bins) of the
   nodes asked for; with subtraction only the smaller child of each split is asked for. The
   coordinator sums the histograms, derives the siblings, picks the splits and leaf values.
3. **Evaluate.** Participants score their test and train rows with the final ensemble and
   return per-class score histograms (binary) or error sums (regression).

The coordinator sees each participant's summaries and per-node histograms (not only their sum)
unless ``params.secure_aggregation`` is set: then each level's histograms are summed through
secure aggregation (:mod:`cdp_federated.privacy.secagg_gbm`) and only the sum is seen; it never
sees a row, a per-row gradient or an identifier. A participant failing during training stops the job (histogram
subtraction needs every party's histograms at every level), except a participant that restarted
and lost its state: it answers ``SetupRequiredError``, gets a catch-up (the edges, base score and
the model so far, :class:`~cdp_federated.federation.messages.GBMCatchUpIns`) and the level is
asked of it again, once (through secure aggregation, the level's whole sum is run again).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pluggy

from ..errors import (
    ConfigError,
    NoTrainingDataError,
    TrainingError,
)
from ..federation.messages import (
    Failure,
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
from ..federation.transport import Transport
from ..jobs import JobSpec
from ..learning.gbm import (
    FeatureSketch,
    FederatedGBMClassifier,
    FederatedGBMRegressor,
    GBMParams,
    Step,
    TreeEnsemble,
    TreeRecord,
    bin_edges,
    boost,
    merge_sketches,
)
from ..learning.gbm.binning import pack_edges
from ..learning.gbm.catchup import ModelSoFar
from ..learning.gbm.draws import fresh_seed
from ..learning.gbm.loss import base_score as pooled_base_score
from ..learning.metrics import accuracy_from_histograms, mean_log_loss, roc_auc_from_histograms
from ..privacy.dp_gbm import gbm_histogram_dp
from ..privacy.secagg_gbm import SecureHistograms, histograms_from_params
from .stages import as_failure, ask_all, raise_failure

__all__ = ["GBMEvaluation", "GBMResult", "run_horizontal_gbm"]


@dataclass(frozen=True)
class GBMEvaluation:
    """Metrics of the final model on one split, from aggregates summed across ``participants``:
    ``auc``/``logloss``/``accuracy`` (binary) or ``rmse``/``mae`` (regression); others ``nan``."""

    split: str
    count: int
    participants: tuple[str, ...]
    failures: Mapping[str, str]
    auc: float = float("nan")
    logloss: float = float("nan")
    accuracy: float = float("nan")
    rmse: float = float("nan")
    mae: float = float("nan")


@dataclass(frozen=True, eq=False)
class GBMResult:
    """Outcome of :func:`run_horizontal_gbm`. ``history`` has one :class:`TreeRecord` per tree;
    ``rows_per_party`` maps each participant that trained to ``{"train": n, "test": m}``;
    ``excluded`` maps a participant left out at the sketch stage to its reason."""

    job_id: str
    params: GBMParams
    seed: int
    edges: tuple[np.ndarray, ...]
    ensemble: TreeEnsemble
    estimator: FederatedGBMClassifier | FederatedGBMRegressor
    history: tuple[TreeRecord, ...]
    rows_per_party: Mapping[str, Mapping[str, int]]
    excluded: Mapping[str, str]
    evaluations: Mapping[str, GBMEvaluation]

    @property
    def rounds(self) -> int:
        """Boosting rounds (trees) grown."""
        return len(self.history)

    @property
    def test(self) -> GBMEvaluation:
        return self.evaluations["test"]

    @property
    def auc(self) -> float:
        return self.test.auc

    @property
    def logloss(self) -> float:
        return self.test.logloss

    @property
    def rmse(self) -> float:
        return self.test.rmse


def run_horizontal_gbm(
    job: JobSpec,
    transport: Transport,
    *,
    pm: pluggy.PluginManager | None = None,
    on_round: Callable[[TreeRecord], None] | None = None,
) -> GBMResult:
    """Train ``job`` (``kind='horizontal'``, ``model='gbm'``) across the transport's
    participants and evaluate it; see the module docstring. ``params.n_trees`` defaults to
    ``job.rounds``; ``params.min_participants`` (default 1) is how many must remain after
    exclusions. Raises :class:`SchemaMismatchError`/:class:`PolicyViolation` when a participant
    refuses the sketch stage with that error, :class:`NoTrainingDataError` when too few
    participants have rows, :class:`TrainingError` when a participant fails during training,
    :class:`ConfigError` for bad params."""
    if job.kind != "horizontal" or job.model != "gbm" or not job.features:
        raise ConfigError(
            "run_horizontal_gbm trains horizontal GBM over at least one feature",
            field="job",
            value={"kind": job.kind, "model": job.model, "features": list(job.features)},
            fix="use kind='horizontal', model='gbm' and list the features",
        )
    params = GBMParams.from_mapping(job.params, n_trees=max(job.rounds, 1))
    histogram_dp = gbm_histogram_dp(job)  # params.dp_*: noise on the summed histograms
    # params.secure_aggregation: each level's histograms arrive masked, only their sum is seen
    secure = histograms_from_params(job.job_id, job.params, params.objective)
    min_participants = job.params.get("min_participants", 1)
    participants = transport.participants()
    if not isinstance(min_participants, int) or not 1 <= min_participants:
        raise ConfigError(
            "min_participants must be a positive integer",
            field="params.min_participants",
            value=min_participants,
        )
    if len(participants) < min_participants:
        raise ConfigError(
            f"job needs {min_participants} participants, the transport reaches {len(participants)}",
            field="params.min_participants",
            value=min_participants,
            fix="add participants or lower params.min_participants",
        )
    d = len(job.features)
    node_cells = 2 ** (params.max_depth - 1) * d * params.max_bins
    if 2 * node_cells > 8_000_000:  # the codec's default element limit per message
        raise ConfigError(
            f"a level's histograms ({2 * node_cells} values) exceed one message",
            field="params.max_bins",
            value=params.max_bins,
            fix="lower max_depth, max_bins or the number of features",
        )
    wire_job = job.to_dict()
    sketches, counts, label_sums, excluded = _sketch(transport, participants, wire_job, params, d)
    trained = sorted(counts)
    if len(trained) < min_participants:
        raise NoTrainingDataError(
            f"only {len(trained)} participants have training rows, the job needs "
            f"{min_participants}: {dict(excluded)}",
            field="params.min_participants",
            value=min_participants,
            fix="check the participants' sources and consent, or lower params.min_participants",
        )
    edges = [bin_edges(merge_sketches(per_party), params.max_bins) for per_party in sketches]
    base = pooled_base_score(params.objective, sum(label_sums.values()), sum(counts.values()))
    seed = params.seed if params.seed is not None else fresh_seed()
    if secure is not None:
        # Every participant is needed at every level anyway: with all of them as the threshold
        # a level sums everyone or aborts before anything is unmasked, so a restarted one can be
        # caught up and the level run again without a partial sum to subtract.
        secure.threshold = len(trained)
    if pm is not None:
        pm.hook.cdp_job_started(job=job, participants=list(trained))

    history: list[TreeRecord] = []
    flat_edges, edge_counts = pack_edges(edges)
    first = [True]
    so_far = ModelSoFar()  # what a restarted participant needs to catch up

    def ask(step: Step) -> tuple[np.ndarray, np.ndarray]:
        extra = {"edges": flat_edges, "edge_counts": edge_counts} if first[0] else {}
        first[0] = False
        so_far.record(step)

        def catch_up(names: list[str]) -> None:
            message = GBMCatchUpIns(
                job=wire_job,
                tree=step.tree,
                depth=step.depth,
                seed=seed,
                base_score=base,
                edges=flat_edges,
                edge_counts=edge_counts,
                **so_far.arrays(),
            )
            answers = ask_all(transport, dict.fromkeys(names, message))
            for name in names:
                reply = answers[name]
                where = (step.tree, step.depth)
                if not (isinstance(reply, GBMCatchUpRes) and (reply.tree, reply.depth) == where):
                    wanted = f"gbm_catch_up_res for tree {step.tree} depth {step.depth}"
                    raise_failure(as_failure(name, message, reply, wanted))

        request = GBMHistogramIns(
            job=wire_job,
            tree=step.tree,
            depth=step.depth,
            seed=seed,
            base_score=base,
            build_nodes=step.build,
            features=step.features,
            split_nodes=step.split_nodes,
            split_features=step.split_features,
            split_bins=step.split_bins,
            leaf_nodes=step.leaf_nodes,
            leaf_values=step.leaf_values,
            **extra,
        )
        if secure is None:
            grad, hess = _sum_histograms(transport, trained, request, params.max_bins, catch_up)
        else:
            grad, hess = _secure_sum(secure, transport, counts, request, params.max_bins, catch_up)
        return (grad, hess) if histogram_dp is None else histogram_dp.noisy(grad, hess)

    def tree_done(record: TreeRecord) -> None:
        history.append(record)
        if on_round is not None:  # committed first, as run_horizontal does
            on_round(record)
        if pm is not None:
            pm.hook.cdp_round_ended(
                job=job,
                round_number=record.tree + 1,
                metrics={
                    "round": record.tree + 1,
                    "leaves": record.leaves,
                    "splits": record.splits,
                    "participants": list(trained),
                },
            )

    ensemble = boost(params, edges, base_score=base, seed=seed, ask=ask, on_tree=tree_done)
    evaluations, test_counts = {}, {}
    for split in ("test", "train"):
        evaluations[split], split_counts = _evaluate(
            transport, trained, wire_job, split, ensemble, params
        )
        if split == "test":
            test_counts = split_counts
    estimator_class = (
        FederatedGBMClassifier if params.objective == "binary" else FederatedGBMRegressor
    )
    estimator = estimator_class.from_ensemble(
        ensemble, params=params, edges=edges, feature_names=job.features
    )
    return GBMResult(
        job_id=job.job_id,
        params=params,
        seed=seed,
        edges=tuple(edges),
        ensemble=ensemble,
        estimator=estimator,
        history=tuple(history),
        rows_per_party={p: {"train": counts[p], "test": test_counts.get(p, 0)} for p in trained},
        excluded=excluded,
        evaluations=evaluations,
    )


# --- stages --------------------------------------------------------------------------------------


def _sketch(
    transport: Transport,
    participants: list[str],
    wire_job: dict[str, Any],
    params: GBMParams,
    d: int,
) -> tuple[list[list[FeatureSketch]], dict[str, int], dict[str, float], dict[str, str]]:
    """Per feature, the sketches of every participant with rows; counts and label sums."""
    request = GBMSketchIns(
        job=wire_job, sketch_size=params.sketch_size, exact_limit=params.max_bins
    )
    answers = ask_all(transport, dict.fromkeys(participants, request))
    per_feature: list[list[FeatureSketch]] = [[] for _ in range(d)]
    counts: dict[str, int] = {}
    label_sums: dict[str, float] = {}
    excluded: dict[str, str] = {}
    for name in participants:
        reply = answers[name]
        if isinstance(reply, Failure) and reply.error_type == "NoTrainingDataError":
            excluded[name] = reply.message  # no rows: left out, the others go on
            continue
        if not _valid_sketch(reply, d):
            raise_failure(as_failure(name, request, reply, f"sketches of {d} features"))
        counts[name], label_sums[name] = reply.count, reply.label_sum
        starts = np.concatenate(([0], np.cumsum(reply.lengths)))
        for j in range(d):
            part = slice(int(starts[j]), int(starts[j + 1]))
            per_feature[j].append(
                FeatureSketch(reply.values[part], reply.weights[part], bool(reply.exact[j]))
            )
    return per_feature, counts, label_sums, excluded


def _valid_sketch(reply: Message, d: int) -> bool:
    if not isinstance(reply, GBMSketchRes):
        return False
    return (
        reply.count >= 1
        and reply.lengths.shape == (d,)
        and reply.exact.shape == (d,)
        and (reply.lengths >= 0).all()
        and int(reply.lengths.sum()) == reply.values.size == reply.weights.size
        and (reply.weights >= 0).all()
        and reply.values.ndim == 1
    )


# A participant asked for a later stage of a secure aggregation it has no session for was
# restarted after advertising (the server only asks those who advertised): it lost its GBM
# state too. The level aborts before unmasking (the threshold is everyone), so a rerun is safe.
_NO_SESSION = "ProtocolError: no secure aggregation in progress"


def _lost_state(answers: Mapping[str, str]) -> list[str]:
    """The participants whose answer (``error_type: message`` or a secure-aggregation drop
    reason ``stage: error_type: message``) says they restarted and lost the job's state."""
    return sorted(
        name
        for name, why in answers.items()
        if "SetupRequiredError" in why.split(": ")[:2] or _NO_SESSION in why
    )


def _sum_histograms(
    transport: Transport,
    participants: list[str],
    request: GBMHistogramIns,
    bins: int,
    catch_up: Callable[[list[str]], None],
) -> tuple[np.ndarray, np.ndarray]:
    """Every participant's histograms of ``request.build_nodes``, summed; any failure stops,
    but one that lost its state is caught up and asked once more."""
    shape = (request.build_nodes.size, request.features.size, bins)
    answers = ask_all(transport, dict.fromkeys(participants, request))
    lost = _lost_state({n: a.error_type for n, a in answers.items() if isinstance(a, Failure)})
    if lost:
        catch_up(lost)
        answers.update(ask_all(transport, dict.fromkeys(lost, request)))
    grad, hess = np.zeros(shape), np.zeros(shape)
    for name in participants:
        reply = answers[name]
        valid = (
            isinstance(reply, GBMHistogramRes)
            and reply.grad.shape == reply.hess.shape == shape
            and np.array_equal(reply.nodes, request.build_nodes)
            and (reply.tree, reply.depth) == (request.tree, request.depth)
            and (reply.hess >= 0).all()
        )
        if not valid:
            raise_failure(as_failure(name, request, reply, f"histograms of shape {shape}"))
        grad += reply.grad
        hess += reply.hess
    return grad, hess


def _secure_sum(
    secure: SecureHistograms,
    transport: Transport,
    rows: Mapping[str, int],
    request: GBMHistogramIns,
    bins: int,
    catch_up: Callable[[list[str]], None],
) -> tuple[np.ndarray, np.ndarray]:
    """The level through secure aggregation; when participants dropped out because they lost
    their state, they are caught up and the whole aggregation runs once more (a fresh session:
    the others answer the level again with the same histograms, under new masks)."""
    outcome = _secure_attempt(secure, transport, rows, request, bins)
    if isinstance(outcome, dict) and (lost := _lost_state(outcome)):
        catch_up(lost)
        outcome = _secure_attempt(secure, transport, rows, request, bins)
    if isinstance(outcome, dict):
        gone = "; ".join(f"{n}: {why}" for n, why in sorted(outcome.items())[:3])
        raise TrainingError(
            f"GBM needs every participant's histograms at every level; {len(outcome)} dropped "
            f"out of tree {request.tree} depth {request.depth} ({gone})",
            field="participants",
            value=sorted(outcome),
            fix="check the participants' errors and rerun the job",
        )
    return outcome


def _secure_attempt(
    secure: SecureHistograms,
    transport: Transport,
    rows: Mapping[str, int],
    request: GBMHistogramIns,
    bins: int,
) -> tuple[np.ndarray, np.ndarray] | dict[str, str]:
    """The level's sum, or who dropped out (and why) when it aborted before anything was
    unmasked. A failure after a sum was revealed is raised as it is: a rerun would let the
    coordinator subtract the two sums."""
    secure.last = None
    try:
        return secure.sum(transport, rows, request, bins)
    except TrainingError as exc:
        dropped = exc.context.get("dropped")
        if secure.last is not None or not dropped:
            raise
        return dict(dropped)


def _evaluate(
    transport: Transport,
    participants: list[str],
    wire_job: dict[str, Any],
    split: str,
    ensemble: TreeEnsemble,
    params: GBMParams,
) -> tuple[GBMEvaluation, dict[str, int]]:
    bins = params.histogram_bins
    binary = params.objective == "binary"
    request = GBMEvaluateIns(
        job=wire_job,
        split=split,
        objective=params.objective,
        base_score=ensemble.base_score,
        bins=bins,
        feature=ensemble.feature,
        threshold=ensemble.threshold,
        left=ensemble.left,
        right=ensemble.right,
        value=ensemble.value,
        roots=ensemble.roots,
    )
    answers = ask_all(transport, dict.fromkeys(participants, request))
    positives, negatives = np.zeros(bins, dtype=np.int64), np.zeros(bins, dtype=np.int64)
    log_loss = squared = absolute = 0.0
    counts: dict[str, int] = {}
    failures: dict[str, str] = {}
    for name in participants:
        reply = answers[name]
        width = bins if binary else 0
        valid = (
            isinstance(reply, GBMEvaluateRes)
            and reply.count >= 0
            and reply.positives.shape == reply.negatives.shape == (width,)
            and (not binary or int(reply.positives.sum() + reply.negatives.sum()) == reply.count)
        )
        if not valid:
            failure = as_failure(name, request, reply, "evaluation aggregates")
            failures[name] = f"{failure.error_type}: {failure.message}"
            continue
        counts[name] = reply.count
        log_loss += reply.log_loss_sum
        squared += reply.squared_error_sum
        absolute += reply.absolute_error_sum
        if binary:
            positives += reply.positives.astype(np.int64)
            negatives += reply.negatives.astype(np.int64)
    if not counts:
        raise TrainingError(
            f"no participant could evaluate the {split} split: {failures}",
            field="split",
            value=split,
            fix="check the participants' errors above",
        )
    total = sum(counts.values())
    common = {
        "split": split,
        "count": total,
        "participants": tuple(sorted(counts)),
        "failures": failures,
    }
    if binary:
        evaluation = GBMEvaluation(
            **common,
            auc=roc_auc_from_histograms(positives, negatives),
            logloss=mean_log_loss(log_loss, total),
            accuracy=accuracy_from_histograms(positives, negatives, 0.5),
        )
    else:
        evaluation = GBMEvaluation(
            **common,
            rmse=float(np.sqrt(squared / total)) if total else float("nan"),
            mae=float(absolute / total) if total else float("nan"),
        )
    return evaluation, counts
