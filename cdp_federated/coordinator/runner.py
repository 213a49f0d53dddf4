"""Horizontal federated logistic regression, driven from the coordinator over any transport.

1. **Standardise.** Every participant reports the moments of its training rows (count, sums,
   scatter); the coordinator combines them into the global mean, scale and the curvature bound
   that preconditions local steps. It never sees a row.
2. **Train.** ``job.rounds`` rounds of ``configure_fit`` -> ``FitIns`` to each participant ->
   ``aggregate_fit`` (failures passed explicitly; the strategy decides if the round holds).
3. **Evaluate.** Participants return per-class score histograms for the test and train splits;
   their sums give AUC, log loss and accuracy of the pooled data.

With the defaults (one local step, preconditioned by the global curvature bound, FedAvg weighted by
sample counts) every round is exactly one monotone majorise-minimise step on scikit-learn's
centralised objective, so the model converges to the same optimum as ``LogisticRegression(C=C)``
on the pooled, identically standardised rows, however non-IID the parties are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pluggy

from ..errors import (
    CDPFederatedError,
    ConfigError,
    NoTrainingDataError,
    PolicyViolation,
    SchemaMismatchError,
    TrainingError,
    TransportError,
)
from ..federation.messages import (
    EvaluateIns,
    EvaluateRes,
    Failure,
    FitIns,
    FitRes,
    Message,
    StatsIns,
    StatsRes,
)
from ..federation.transport import Transport, stage_of, undelivered
from ..jobs import JobSpec
from ..learning import logreg
from ..learning.aggregate import Moments, combine_moments
from ..learning.estimators import FederatedLogisticRegression
from ..learning.metrics import accuracy_from_histograms, mean_log_loss, roc_auc_from_histograms
from ..learning.strategy import FedAvg, Strategy

__all__ = [
    "HorizontalParams",
    "RoundRecord",
    "Evaluation",
    "HorizontalResult",
    "run_horizontal",
]

# Participant-side error types the coordinator re-raises as themselves (others: TrainingError).
_TYPED_FAILURES: dict[str, type[CDPFederatedError]] = {
    "SchemaMismatchError": SchemaMismatchError,
    "NoTrainingDataError": NoTrainingDataError,
    "PolicyViolation": PolicyViolation,
}


@dataclass(frozen=True)
class HorizontalParams:
    """``job.params`` of a horizontal logistic regression, validated.

    ``learning_rate`` scales the preconditioned step (1.0 is the curvature-bound step, which never
    increases the objective); ``local_steps`` > 1 saves rounds on IID data but drifts towards each
    party's own optimum on non-IID data; ``C`` is scikit-learn's inverse L2 strength;
    ``min_fit_participants`` defaults to every participant; ``histogram_bins`` must be even so that
    0.5 is a bin edge for accuracy.
    """

    learning_rate: float = 1.0
    local_steps: int = 1
    C: float = 1.0
    min_fit_participants: int | None = None
    histogram_bins: int = 1000

    @classmethod
    def from_job(cls, job: JobSpec) -> HorizontalParams:
        p = job.params
        out = cls(
            learning_rate=_number(p, "learning_rate", cls.learning_rate),
            local_steps=int(_number(p, "local_steps", cls.local_steps, integer=True)),
            C=_number(p, "C", cls.C),
            min_fit_participants=(
                None
                if p.get("min_fit_participants") is None
                else int(_number(p, "min_fit_participants", 1, integer=True))
            ),
            histogram_bins=int(_number(p, "histogram_bins", cls.histogram_bins, integer=True)),
        )
        if out.histogram_bins % 2 or out.histogram_bins > 1_000_000:
            raise ConfigError(
                "histogram_bins must be even and at most 1,000,000",
                field="params.histogram_bins",
                value=out.histogram_bins,
                fix="use an even number such as 1000",
            )
        return out


def _number(params: Mapping[str, Any], key: str, default: float, *, integer: bool = False) -> float:
    value = params.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or value <= 0 or (integer and value != int(value)):
        raise ConfigError(
            f"job parameter {key!r} must be a positive {'integer' if integer else 'number'}",
            field=f"params.{key}",
            value=value,
            fix=f"set params.{key} to a positive value or leave it out (default {default})",
        )
    return float(value)


@dataclass(frozen=True)
class RoundRecord:
    """One committed round: who contributed, who failed (``"ErrorType: message"``), the total
    examples and the training log loss of the global model that entered the round."""

    round: int
    participants: tuple[str, ...]
    failures: Mapping[str, str]
    num_examples: int
    train_loss: float


@dataclass(frozen=True)
class Evaluation:
    """Metrics of the final model on one split, from histograms summed across ``participants``."""

    split: str
    auc: float
    logloss: float
    accuracy: float
    count: int
    participants: tuple[str, ...]
    failures: Mapping[str, str]


@dataclass(frozen=True, eq=False)
class HorizontalResult:
    """Outcome of :func:`run_horizontal`. ``auc``/``logloss``/``accuracy`` are the test split's;
    ``rows_per_party`` maps each participant to ``{"train": n, "test": m}``."""

    job_id: str
    parameters: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    feature_names: tuple[str, ...]
    history: tuple[RoundRecord, ...]
    rows_per_party: Mapping[str, Mapping[str, int]]
    auc: float
    logloss: float
    accuracy: float
    evaluations: Mapping[str, Evaluation]
    estimator: FederatedLogisticRegression

    @property
    def rounds(self) -> int:
        """Rounds committed."""
        return len(self.history)


def run_horizontal(
    job: JobSpec,
    transport: Transport,
    *,
    strategy: Strategy | None = None,
    pm: pluggy.PluginManager | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> HorizontalResult:
    """Train ``job`` across ``transport.participants()`` and evaluate it; see the module docstring.

    Raises :class:`SchemaMismatchError`, :class:`NoTrainingDataError` or :class:`PolicyViolation`
    when a participant refuses the statistics stage with that error, :class:`TrainingError` when
    a round gets fewer results than ``min_fit_participants``, :class:`ConfigError` for bad params.
    """
    if job.kind != "horizontal" or job.model != "logreg" or not job.features:
        raise ConfigError(
            "run_horizontal trains horizontal logistic regression over at least one feature",
            field="job",
            value={"kind": job.kind, "model": job.model, "features": list(job.features)},
            fix="use kind='horizontal', model='logreg' and list the features",
        )
    if job.rounds < 1:
        raise ConfigError("rounds must be at least 1", field="rounds", value=job.rounds)
    params = HorizontalParams.from_job(job)
    participants = transport.participants()
    min_fit = params.min_fit_participants or len(participants)
    if not participants or min_fit > len(participants):
        raise ConfigError(
            f"job needs {min_fit} participants, the transport reaches {len(participants)}",
            field="params.min_fit_participants",
            value=min_fit,
            fix="add participants or lower params.min_fit_participants",
        )
    wire_job = job.to_dict()
    d = len(job.features)

    moments, train_rows = _standardisation(transport, participants, wire_job, d)
    precond = logreg.preconditioner(
        moments.standardised_covariance(), c=params.C, total_examples=moments.count
    )
    task_config = {
        "C": params.C,
        "total_examples": moments.count,
        "learning_rate": params.learning_rate,
        "local_steps": params.local_steps,
    }
    strategy = strategy or FedAvg(min_fit_participants=min_fit, fit_config=task_config)
    parameters = strategy.initialize(d)
    if pm is not None:
        pm.hook.cdp_job_started(job=job, participants=list(participants))

    history: list[RoundRecord] = []
    for round_number in range(1, job.rounds + 1):
        instructions = strategy.configure_fit(round_number, parameters, participants)
        requests = {
            name: FitIns(
                job=wire_job,
                round=round_number,
                parameters=instr.parameters,
                mean=moments.mean,
                scale=moments.scale,
                config={**task_config, **instr.config},
                preconditioner=precond,
            )
            for name, instr in sorted(instructions.items())
        }
        results, failures = _collect_fits(transport, requests, parameters.shape)
        parameters = strategy.aggregate_fit(round_number, results, failures)
        record = RoundRecord(
            round=round_number,
            participants=tuple(sorted(results)),
            failures={n: f"{f.error_type}: {f.message}" for n, f in sorted(failures.items())},
            num_examples=sum(r.num_examples for r in results.values()),
            train_loss=float(strategy.aggregate_fit_metrics(results).get("loss", float("nan"))),
        )
        history.append(record)
        if pm is not None:
            pm.hook.cdp_round_ended(
                job=job, round_number=round_number, metrics=_hook_metrics(record)
            )
        if on_round is not None:
            on_round(record)

    evaluations = {}
    counts: dict[str, dict[str, int]] = {}
    for split in ("test", "train"):
        evaluations[split], counts[split] = _evaluate(
            transport, participants, wire_job, split, parameters, moments, params.histogram_bins
        )
    estimator = FederatedLogisticRegression.from_parameters(
        parameters,
        mean=moments.mean,
        scale=moments.scale,
        feature_names=job.features,
        C=params.C,
    )
    test = evaluations["test"]
    return HorizontalResult(
        job_id=job.job_id,
        parameters=parameters,
        mean=moments.mean,
        scale=moments.scale,
        feature_names=tuple(job.features),
        history=tuple(history),
        rows_per_party={
            p: {"train": train_rows[p], "test": counts["test"].get(p, 0)} for p in participants
        },
        auc=test.auc,
        logloss=test.logloss,
        accuracy=test.accuracy,
        evaluations=evaluations,
        estimator=estimator,
    )


# --- stages --------------------------------------------------------------------------------------


def _standardisation(
    transport: Transport, participants: list[str], wire_job: dict[str, Any], d: int
) -> tuple[Moments, dict[str, int]]:
    """Every participant must report its moments: standardisation needs all of them."""
    request = StatsIns(job=wire_job, split="train")
    answers = _ask_all(transport, dict.fromkeys(participants, request))
    replies: dict[str, StatsRes] = {}
    for name in participants:
        reply = answers[name]
        if (
            not isinstance(reply, StatsRes)
            or reply.sums.shape != (d,)
            or reply.scatter.shape != (d, d)
            or reply.count < 1
        ):
            _raise_failure(_as_failure(name, request, reply, f"moments of {d} features"))
        replies[name] = reply
    moments = combine_moments(
        [r.count for r in replies.values()],
        [r.sums for r in replies.values()],
        [r.scatter for r in replies.values()],
    )
    return moments, {name: r.count for name, r in replies.items()}


def _collect_fits(
    transport: Transport, requests: Mapping[str, FitIns], shape: tuple[int, ...]
) -> tuple[dict[str, FitRes], dict[str, Failure]]:
    """Ask each participant; a reply that is not a usable ``FitRes`` counts as a failure."""
    results: dict[str, FitRes] = {}
    failures: dict[str, Failure] = {}
    answers = _ask_all(transport, requests)
    for name, request in sorted(requests.items()):
        reply = answers[name]
        if isinstance(reply, FitRes) and reply.parameters.shape == shape and reply.num_examples > 0:
            results[name] = reply
        else:
            failures[name] = _as_failure(name, request, reply, f"{shape[0]} parameters")
    return results, failures


def _hook_metrics(record: RoundRecord) -> dict[str, Any]:
    """What ``cdp_round_ended`` plugins see: aggregates and participant names, no per-party value."""
    return {
        "round": record.round,
        "train_loss": record.train_loss,
        "participants": list(record.participants),
        "failed": sorted(record.failures),
        "num_examples": record.num_examples,
    }


def _evaluate(
    transport: Transport,
    participants: list[str],
    wire_job: dict[str, Any],
    split: str,
    parameters: np.ndarray,
    moments: Moments,
    bins: int,
) -> tuple[Evaluation, dict[str, int]]:
    positives = np.zeros(bins, dtype=np.int64)
    negatives = np.zeros(bins, dtype=np.int64)
    log_loss_sum, counts, failures = 0.0, {}, {}
    request = EvaluateIns(
        job=wire_job,
        split=split,
        parameters=parameters,
        mean=moments.mean,
        scale=moments.scale,
        bins=bins,
    )
    answers = _ask_all(transport, dict.fromkeys(participants, request))
    for name in participants:
        reply = answers[name]
        if _valid_histograms(reply, bins):
            positives += reply.positives.astype(np.int64)
            negatives += reply.negatives.astype(np.int64)
            log_loss_sum += reply.log_loss_sum
            counts[name] = reply.count
        else:
            failure = _as_failure(name, request, reply, f"{bins}-bin histograms")
            failures[name] = f"{failure.error_type}: {failure.message}"
    if not counts:
        raise TrainingError(
            f"no participant could evaluate the {split} split: {failures}",
            field="split",
            value=split,
            fix="check the participants' errors above",
        )
    total = sum(counts.values())
    evaluation = Evaluation(
        split=split,
        auc=roc_auc_from_histograms(positives, negatives),
        logloss=mean_log_loss(log_loss_sum, total),
        accuracy=accuracy_from_histograms(positives, negatives, 0.5),
        count=total,
        participants=tuple(sorted(counts)),
        failures=failures,
    )
    return evaluation, counts


def _valid_histograms(reply: Message, bins: int) -> bool:
    return (
        isinstance(reply, EvaluateRes)
        and reply.positives.shape == reply.negatives.shape == (bins,)
        and (reply.positives >= 0).all()
        and (reply.negatives >= 0).all()
        and int(reply.positives.sum() + reply.negatives.sum()) == reply.count
    )


# --- replies -------------------------------------------------------------------------------------


def _ask_all(transport: Transport, requests: Mapping[str, Message]) -> dict[str, Message]:
    """Every participant's reply, asked together and keyed by name (sorted, whatever order they
    came back in); a delivery failure becomes a :class:`Failure` like any other, and so does a
    reply the transport left out."""
    ordered = dict(sorted(requests.items()))
    try:
        replies = transport.request_many(ordered)
    except TransportError as exc:  # the whole batch could not be sent
        replies = {name: undelivered(name, message, exc) for name, message in ordered.items()}
    return {
        name: replies.get(name) or undelivered(name, message, TransportError("no reply returned"))
        for name, message in ordered.items()
    }


def _as_failure(participant: str, request: Message, reply: Message, wanted: str) -> Failure:
    if isinstance(reply, Failure):
        return reply
    return Failure(
        participant,
        stage_of(request),
        "ProtocolError",
        f"replied {reply.TYPE} instead of {wanted}",
    )


def _raise_failure(failure: Failure) -> None:
    error = _TYPED_FAILURES.get(failure.error_type)
    detail = failure.message if error else f"{failure.error_type}: {failure.message}"
    raise (error or TrainingError)(
        f"participant {failure.participant!r} failed at {failure.stage}: {detail}",
        field="participant",
        value=failure.participant,
    )
