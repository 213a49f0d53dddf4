"""Horizontal federated linear models (logistic and least-squares regression), driven from the
coordinator over any transport.

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
on the pooled, identically standardised rows, however non-IID the parties are. Regression
(``model="linear"``) standardises the label with federated moments too and, with L2 only,
lands on the centralised least-squares optimum after one such round. ``job.params`` select the
strategy, client sampling, early stopping and personalisation (see :mod:`.linear_params`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pluggy

from ..errors import (
    ConfigError,
    TrainingError,
)
from ..federation.messages import (
    EvaluateIns,
    EvaluateRes,
    Failure,
    FitIns,
    FitRes,
    Message,
    PersonalizeIns,
    PersonalizeRes,
    RegressionEvaluateRes,
    StatsIns,
    StatsRes,
    setup_digest,
)
from ..federation.transport import Transport
from ..jobs import JobSpec
from ..learning import linear
from ..learning.aggregate import Moments, combine_moments
from ..learning.calibration import ReliabilityBin, expected_calibration_error, reliability_table
from ..learning.estimators import FederatedLinearRegression, FederatedLogisticRegression
from ..learning.metrics import accuracy_from_histograms, mean_log_loss, roc_auc_from_histograms
from ..learning.rounds import EarlyStopping
from ..learning.strategy import Strategy
from ..privacy.compression import expand_fit_reply
from ..privacy.dp_fedavg import DPFedAvg
from ..privacy.secagg_rounds import from_params as secure_aggregation_for
from .linear_params import (
    HorizontalParams,
    label_standardisation,
    regression_summary,
    training_preconditioner,
)
from .stages import as_failure, ask_all, raise_failure

__all__ = [
    "HorizontalParams",
    "RoundRecord",
    "Evaluation",
    "HorizontalResult",
    "Checkpoint",
    "run_horizontal",
]


@dataclass(frozen=True)
class RoundRecord:
    """One committed round: who contributed, who failed (``"ErrorType: message"``), the total
    examples and the training loss of the global model that entered the round (log loss, or half
    the squared error of the standardised label). ``sampled`` is the round's draw of participants
    (everyone when the job does not sample); ``val_loss`` the same loss on the validation
    hold-out (None without one)."""

    round: int
    participants: tuple[str, ...]
    failures: Mapping[str, str]
    num_examples: int
    train_loss: float
    sampled: tuple[str, ...] = ()
    val_loss: float | None = None


@dataclass(frozen=True)
class Evaluation:
    """Metrics of the final model on one split, from histograms (binary) or error sums
    (regression: ``rmse``, ``mae``, ``r2``; the binary metrics are NaN) summed across
    ``participants``."""

    split: str
    auc: float
    logloss: float
    accuracy: float
    count: int
    participants: tuple[str, ...]
    failures: Mapping[str, str]
    rmse: float = float("nan")
    mae: float = float("nan")
    r2: float = float("nan")
    # Binary only, from the same histograms (bin centres stand in for scores; see calibration.py).
    ece: float = float("nan")
    reliability: tuple[ReliabilityBin, ...] = ()


@dataclass(frozen=True, eq=False)
class HorizontalResult:
    """Outcome of :func:`run_horizontal`. ``auc``/``logloss``/``accuracy`` (binary) and
    ``rmse``/``r2`` (regression) are the test split's; ``rows_per_party`` maps each participant to
    ``{"train": n, "test": m}``. ``excluded`` maps participants left out for lack of training rows
    to the reason; ``best_round`` is the round whose model early stopping kept (None without
    early stopping); ``personalisation`` maps each participant to the aggregate test metrics of
    the global and its locally fine-tuned model."""

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
    estimator: FederatedLogisticRegression | FederatedLinearRegression
    objective: str = "binary"
    rmse: float = float("nan")
    r2: float = float("nan")
    excluded: Mapping[str, str] = field(default_factory=dict)
    best_round: int | None = None
    personalisation: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        """Rounds committed."""
        return len(self.history)


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """What a job needs to go on after ``round`` committed rounds (0: standardisation done):
    the global ``parameters``, the standardisation ``moments`` and ``preconditioner`` (reused, so
    participants are not asked for their moments again and the maths stays bit-identical), the
    participants' training row counts, the strategy's :meth:`~Strategy.state_dict`, the rounds
    committed so far and the runner's own state (early stopping: best model, patience, whether
    training stopped). :mod:`.checkpoint` stores it without pickle."""

    round: int
    parameters: np.ndarray
    moments: Moments
    preconditioner: np.ndarray
    train_rows: Mapping[str, int]
    strategy_state: Mapping[str, Any]
    history: tuple[RoundRecord, ...] = ()
    runner_state: Mapping[str, Any] = field(default_factory=dict)  # early stopping's, if any


def run_horizontal(
    job: JobSpec,
    transport: Transport,
    *,
    strategy: Strategy | None = None,
    pm: pluggy.PluginManager | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    resume: Checkpoint | None = None,
    on_checkpoint: Callable[[Checkpoint, RoundRecord | None], None] | None = None,
) -> HorizontalResult:
    """Train ``job`` across ``transport.participants()`` and evaluate it; see the module docstring.

    Crash-resume: ``on_checkpoint(checkpoint, record)`` is called once standardisation is done
    (``record`` None, round 0) and after each round, before the round's hooks, so a caller can
    commit the round and its checkpoint together. ``resume`` continues from such a checkpoint:
    parameters, standardisation, preconditioner and strategy state are restored (the strategy
    must be the one that wrote it) and training goes on with the next round, then evaluates.

    Raises :class:`SchemaMismatchError`, :class:`NoTrainingDataError` or :class:`PolicyViolation`
    when a participant refuses the statistics stage with that error, :class:`TrainingError` when
    a round gets fewer results than ``min_fit_participants``, :class:`ConfigError` for bad params.
    """
    if job.kind != "horizontal" or job.model not in linear.MODELS or not job.features:
        raise ConfigError(
            "run_horizontal trains horizontal logistic regression or linear regression over at "
            "least one feature",
            field="job",
            value={"kind": job.kind, "model": job.model, "features": list(job.features)},
            fix="use kind='horizontal', model='logreg' or 'linear', and list the features",
        )
    if job.rounds < 1:
        raise ConfigError("rounds must be at least 1", field="rounds", value=job.rounds)
    params = HorizontalParams.from_job(job)
    splits = ("test", "train") if _evaluates_train(job) else ("test",)
    participants = transport.participants()
    per_round = params.sample_size(len(participants))  # everyone unless the job samples
    min_fit = params.min_fit_participants or per_round
    if not participants or min_fit > per_round:
        raise ConfigError(
            f"job needs {min_fit} participants per round, the transport reaches "
            f"{len(participants)} and each round asks {per_round}",
            field="params.min_fit_participants",
            value=min_fit,
            fix="add participants, sample more per round or lower params.min_fit_participants",
        )
    wire_job = job.to_dict()
    d = len(job.features)

    mu = float(dict(params.strategy_options).get("mu", 0.0))  # FedProx's proximal weight
    excluded: dict[str, str] = {}
    label_mean, label_scale = 0.0, 1.0
    if resume is None:
        moments, train_rows, replies, excluded = _standardisation(
            transport, participants, wire_job, d, min_fit
        )
        if params.objective == "regression":
            label_mean, label_scale = label_standardisation(replies)
        precond = training_preconditioner(moments, params, label_scale=label_scale, mu=mu)
    else:  # the checkpoint's standardisation: the participants are not asked again
        moments, train_rows, precond = _resumed_setup(resume, participants, d, job.rounds)
        if params.objective == "regression":  # kept in the strategy's state (PERSISTED_CONFIG)
            label_mean = float(resume.strategy_state.get("label_mean", 0.0))
            label_scale = float(resume.strategy_state.get("label_scale", 1.0))
    active = [p for p in participants if train_rows.get(p, 0) > 0]
    task_config: dict[str, Any] = {
        "C": params.C,
        "total_examples": moments.count,
        "learning_rate": params.learning_rate,
        "local_steps": params.local_steps,
    }
    if params.l1_ratio > 0:  # the server applies the L1 prox after averaging: exact with 1 step
        task_config.update(l1_ratio=params.l1_ratio, server_prox=True)
    if params.objective == "regression":
        task_config.update(label_mean=label_mean, label_scale=label_scale)
    prox = linear.prox_thresholds(
        precond,
        params.learning_rate,
        linear.penalty(
            params.C, moments.count, l1_ratio=params.l1_ratio, label_scale=label_scale
        ).l1,
        d + 1,
    )
    if strategy is not None and params.dp is not None and not params.dp.local:
        if not isinstance(strategy, DPFedAvg):  # the budget would be charged, no noise added
            raise ConfigError(
                "the job asks for DP but the strategy given does not add its noise",
                field="strategy",
                value=type(strategy).__name__,
                fix="leave strategy out (params build the DP wrapper) or pass a DPFedAvg",
            )
    strategy = strategy or params.build_strategy(
        min_fit_participants=min_fit, fit_config=task_config
    )
    stopper = params.early_stopping()
    # params.secure_aggregation: the coordinator sees masked inputs and their sum only
    secagg = secure_aggregation_for(job.job_id, job.params, strategy)
    parameters = strategy.initialize(d)
    history: list[RoundRecord] = []
    first_round = 1
    if resume is not None:
        strategy.load_state_dict(resume.strategy_state)
        parameters = resume.parameters.copy()
        history = list(resume.history)
        stopped = _load_stopper(stopper, resume.runner_state)
        excluded = dict(resume.runner_state.get("excluded", {}))
        first_round = job.rounds + 1 if stopped else resume.round + 1
        if secagg is not None and resume.runner_state.get("compression_scale") is not None:
            # the shared quantisation scale measured last round: no uncompressed round again
            secagg.compression_scale = float(resume.runner_state["compression_scale"])
    else:
        if on_checkpoint is not None:
            on_checkpoint(
                _checkpoint(
                    0,
                    parameters,
                    moments,
                    precond,
                    train_rows,
                    strategy,
                    history,
                    runner_state={"excluded": excluded},
                ),
                None,
            )
        if pm is not None:  # a resumed job started before the restart
            pm.hook.cdp_job_started(job=job, participants=list(participants))

    # Job spec, mean, scale and preconditioner go to each participant once (FitIns.setup).
    setup = _FitSetup(wire_job, moments.mean, moments.scale, precond)
    for round_number in range(first_round, job.rounds + 1):
        incoming = parameters
        instructions = strategy.configure_fit(round_number, parameters, active)
        requests = {
            name: setup.request(
                name, round_number, instr.parameters, {**task_config, **instr.config}
            )
            for name, instr in sorted(instructions.items())
        }
        if secagg is not None:
            results, failures = secagg.collect_fits(transport, requests, round_number)
        else:
            results, failures = _collect_fits(transport, requests, parameters.shape, setup)
        parameters = strategy.aggregate_fit(round_number, results, failures)
        if params.l1_ratio > 0:
            parameters = linear.soft_threshold(parameters, prox)
        record = RoundRecord(
            round=round_number,
            participants=tuple(sorted(results)),
            failures={n: f"{f.error_type}: {f.message}" for n, f in sorted(failures.items())},
            num_examples=sum(r.num_examples for r in results.values()),
            train_loss=float(strategy.aggregate_fit_metrics(results).get("loss", float("nan"))),
            sampled=tuple(sorted(instructions)),
            val_loss=_validation_loss(results),
        )
        history.append(record)
        # Early stopping judges the model that entered this round (after round_number - 1).
        stop = stopper is not None and stopper.update(
            round_number - 1, _or_nan(record.val_loss), incoming
        )
        if on_checkpoint is not None:
            on_checkpoint(
                _checkpoint(
                    round_number,
                    parameters,
                    moments,
                    precond,
                    train_rows,
                    strategy,
                    history,
                    runner_state={
                        "excluded": excluded,
                        **_stopper_state(stopper, stop),
                        **_secagg_state(secagg),
                    },
                ),
                record,
            )
        if pm is not None:
            pm.hook.cdp_round_ended(
                job=job, round_number=round_number, metrics=_hook_metrics(record)
            )
        if on_round is not None:
            on_round(record)
        if stop:
            break

    def label_units(theta: np.ndarray) -> np.ndarray:
        if params.objective == "binary":
            return theta
        return linear.to_label_units(theta, label_mean, label_scale)

    def evaluate(split: str, theta: np.ndarray) -> tuple[Evaluation, dict[str, int]]:
        return _evaluate(
            transport, active, wire_job, split, label_units(theta), moments, params.histogram_bins
        )

    evaluations = {}
    best_round = None
    if stopper is not None:  # the last model is judged too; keep the best one seen
        evaluations["validation"], _ = evaluate("validation", parameters)
        last = evaluations["validation"]
        last_loss = (
            last.logloss if params.objective == "binary" else 0.5 * (last.rmse / label_scale) ** 2
        )
        stopper.update(len(history), last_loss, parameters)
        if stopper.best_parameters is not None:
            parameters, best_round = stopper.best_parameters, stopper.best_round
            if best_round != len(history):
                evaluations["validation"], _ = evaluate("validation", parameters)
    counts: dict[str, dict[str, int]] = {}
    for split in splits:
        evaluations[split], counts[split] = evaluate(split, parameters)
    personalisation = (
        _personalise(transport, active, wire_job, parameters, moments, precond, task_config, params)
        if params.personalize_steps
        else {}
    )
    exported = label_units(parameters)
    if params.objective == "regression":
        estimator = FederatedLinearRegression.from_parameters(
            exported,
            mean=moments.mean,
            scale=moments.scale,
            feature_names=job.features,
            C=params.C,
            l1_ratio=params.l1_ratio,
        )
    else:
        estimator = FederatedLogisticRegression.from_parameters(
            exported,
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
        objective=params.objective,
        rmse=test.rmse,
        r2=test.r2,
        excluded=excluded,
        best_round=best_round,
        personalisation=personalisation,
    )


# --- stages --------------------------------------------------------------------------------------


def _standardisation(
    transport: Transport,
    participants: list[str],
    wire_job: dict[str, Any],
    d: int,
    min_fit: int,
) -> tuple[Moments, dict[str, int], list[StatsRes], dict[str, str]]:
    """Every participant must report its moments: standardisation needs all of them. One
    without training rows (none consented, an empty source) is excluded from the job instead,
    with its reason, as long as ``min_fit`` participants remain; any other failure stops the job.
    Returns the moments, training rows per participant (0 when excluded), the replies and the
    exclusions."""
    request = StatsIns(job=wire_job, split="train")
    answers = ask_all(transport, dict.fromkeys(participants, request))
    replies: dict[str, StatsRes] = {}
    empty: dict[str, Failure] = {}
    for name in participants:
        reply = answers[name]
        if isinstance(reply, Failure) and reply.error_type == "NoTrainingDataError":
            empty[name] = reply
            continue
        if (
            not isinstance(reply, StatsRes)
            or reply.sums.shape != (d,)
            or reply.scatter.shape != (d, d)
            or reply.count < 1
        ):
            raise_failure(as_failure(name, request, reply, f"moments of {d} features"))
        replies[name] = reply
    if empty and len(replies) < min_fit:
        raise_failure(next(iter(empty.values())))
    moments = combine_moments(
        [r.count for r in replies.values()],
        [r.sums for r in replies.values()],
        [r.scatter for r in replies.values()],
    )
    rows = {name: replies[name].count if name in replies else 0 for name in participants}
    excluded = {
        name: f"excluded: no training rows ({failure.message})" for name, failure in empty.items()
    }
    return moments, rows, list(replies.values()), excluded


def _resumed_setup(
    resume: Checkpoint, participants: list[str], d: int, rounds: int
) -> tuple[Moments, dict[str, int], np.ndarray]:
    """The checkpoint's standardisation, once it is checked to belong to this job."""
    problem = None
    if sorted(resume.train_rows) != sorted(participants):
        problem = "it was written for other participants"
    elif resume.parameters.shape != (d + 1,) or resume.moments.mean.shape != (d,):
        problem = f"it holds a model of another size (job: {d} features)"
    elif not 0 <= resume.round <= rounds or len(resume.history) != resume.round:
        problem = f"its round {resume.round} does not fit a {rounds}-round job"
    if problem:
        raise ConfigError(
            f"cannot resume from this checkpoint: {problem}",
            field="checkpoint",
            value=resume.round,
            fix="resume a job only from its own checkpoint",
        )
    return resume.moments, dict(resume.train_rows), resume.preconditioner


def _checkpoint(
    round_number: int,
    parameters: np.ndarray,
    moments: Moments,
    precond: np.ndarray,
    train_rows: Mapping[str, int],
    strategy: Strategy,
    history: list[RoundRecord],
    *,
    runner_state: Mapping[str, Any] | None = None,
) -> Checkpoint:
    state = {
        k: v.copy() if isinstance(v, np.ndarray) else v for k, v in strategy.state_dict().items()
    }
    return Checkpoint(
        round_number,
        parameters.copy(),
        moments,
        precond,
        dict(train_rows),
        state,
        tuple(history),
        dict(runner_state or {}),
    )


def _secagg_state(secagg: Any) -> dict[str, Any]:
    """Secure aggregation's state after a round: the compression scale it announces next."""
    scale = getattr(secagg, "compression_scale", None)
    return {} if scale is None else {"compression_scale": float(scale)}


def _stopper_state(stopper: EarlyStopping | None, stopped: bool) -> dict[str, Any]:
    """Early stopping's state after a round (nothing without early stopping)."""
    if stopper is None:
        return {}
    state: dict[str, Any] = {
        "stopped": bool(stopped),
        "best_loss": float(stopper.best_loss),
        "best_round": int(stopper.best_round),
        "waited": int(stopper.waited),
    }
    if stopper.best_parameters is not None:
        state["best_parameters"] = stopper.best_parameters.copy()
    return state


def _load_stopper(stopper: EarlyStopping | None, state: Mapping[str, Any]) -> bool:
    """Restore early stopping from a checkpoint; whether training had stopped already."""
    if stopper is None or "stopped" not in state:
        return False
    stopper.best_loss = float(state["best_loss"])
    stopper.best_round = int(state["best_round"])
    stopper.waited = int(state["waited"])
    best = state.get("best_parameters")
    stopper.best_parameters = None if best is None else np.array(best, dtype=np.float64)
    return bool(state["stopped"])


@dataclass
class _FitSetup:
    """The part of a job's fit requests that never changes between rounds. A participant gets it
    in its first (full) request and is then sent short ones naming it by digest; one that lost
    it (a restart) answers ``SetupRequiredError`` and gets the full request again."""

    job: dict[str, Any]
    mean: np.ndarray
    scale: np.ndarray
    preconditioner: np.ndarray
    holders: set[str] = field(default_factory=set)  # participants known to keep it

    def __post_init__(self) -> None:
        self.name = setup_digest(self.job, self.mean, self.scale, self.preconditioner)
        self._reference = {"job_id": self.job["job_id"]}
        self._none = np.zeros(0)

    def request(
        self,
        participant: str,
        round_number: int,
        parameters: np.ndarray,
        config: dict[str, Any],
        *,
        full: bool = False,
    ) -> FitIns:
        if full or participant not in self.holders:
            return FitIns(
                self.job,
                round_number,
                parameters,
                self.mean,
                self.scale,
                config,
                self.preconditioner,
                setup=self.name,
            )
        none = self._none
        return FitIns(
            self._reference, round_number, parameters, none, none, config, none, setup=self.name
        )


def _collect_fits(
    transport: Transport,
    requests: Mapping[str, FitIns],
    shape: tuple[int, ...],
    setup: _FitSetup | None = None,
) -> tuple[dict[str, FitRes], dict[str, Failure]]:
    """Ask each participant; a reply that is not a usable ``FitRes`` counts as a failure. A
    participant without the ``setup`` its short request names is asked again, in full, once."""
    results: dict[str, FitRes] = {}
    failures: dict[str, Failure] = {}
    answers = ask_all(transport, requests)
    if setup is not None:
        lost = [
            n for n, a in answers.items() if getattr(a, "error_type", "") == "SetupRequiredError"
        ]
        if lost:
            setup.holders.difference_update(lost)
            requests = dict(requests)
            for name in lost:
                r = requests[name]
                requests[name] = setup.request(name, r.round, r.parameters, r.config, full=True)
            answers.update(ask_all(transport, {name: requests[name] for name in lost}))
    for name, request in sorted(requests.items()):
        # A compressed update (params.compression) comes back as the FitRes it stands for.
        reply = expand_fit_reply(name, answers[name], request.parameters)
        if isinstance(reply, FitRes) and reply.parameters.shape == shape and reply.num_examples > 0:
            results[name] = reply
            if setup is not None and request.setup == setup.name:
                setup.holders.add(name)
        else:
            failures[name] = as_failure(name, request, reply, f"{shape[0]} parameters")
    return results, failures


def _evaluates_train(job: JobSpec) -> bool:
    """``params.evaluate_train`` (default true): also score the training split at the end."""
    value = job.params.get("evaluate_train", True)
    if not isinstance(value, bool):
        raise ConfigError(
            "evaluate_train must be true or false",
            field="params.evaluate_train",
            value=value,
            fix="leave it unset (evaluate the train split too) or set false to skip it",
        )
    return value


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
    answers = ask_all(transport, dict.fromkeys(participants, request))
    regression: dict[str, RegressionEvaluateRes] = {}
    for name in participants:
        reply = answers[name]
        if _valid_histograms(reply, bins):
            positives += reply.positives.astype(np.int64)
            negatives += reply.negatives.astype(np.int64)
            log_loss_sum += reply.log_loss_sum
            counts[name] = reply.count
        elif _valid_regression_sums(reply):
            regression[name] = reply
            counts[name] = reply.count
        else:
            failure = as_failure(name, request, reply, f"{bins}-bin histograms")
            failures[name] = f"{failure.error_type}: {failure.message}"
    if not counts:
        raise TrainingError(
            f"no participant could evaluate the {split} split: {failures}",
            field="split",
            value=split,
            fix="check the participants' errors above",
        )
    total = sum(counts.values())
    if regression:
        if len(regression) != len(counts):
            raise TrainingError(
                f"participants answered the {split} split with different kinds of metrics",
                field="split",
                value=split,
                fix="every participant must run the same release",
            )
        nan = float("nan")
        summary = regression_summary(list(regression.values()))
        evaluation = Evaluation(
            split, nan, nan, nan, total, tuple(sorted(counts)), failures, **summary
        )
        return evaluation, counts
    table = reliability_table(positives, negatives)
    evaluation = Evaluation(
        split=split,
        auc=roc_auc_from_histograms(positives, negatives),
        logloss=mean_log_loss(log_loss_sum, total),
        accuracy=accuracy_from_histograms(positives, negatives, 0.5),
        count=total,
        participants=tuple(sorted(counts)),
        failures=failures,
        ece=expected_calibration_error(table),
        reliability=tuple(table),
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


def _valid_regression_sums(reply: Message) -> bool:
    return (
        isinstance(reply, RegressionEvaluateRes)
        and reply.count >= 0
        and reply.squared_error_sum >= 0
        and reply.absolute_error_sum >= 0
        and reply.label_scatter >= 0
    )


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _validation_loss(results: Mapping[str, FitRes]) -> float | None:
    """Mean loss of the round's incoming model on the pooled validation hold-outs (None if none:
    a record must compare equal to itself after a checkpoint round trip, which NaN does not)."""
    total = sum(float(r.metrics.get("val_loss_sum", 0.0)) for r in results.values())
    count = sum(int(r.metrics.get("val_count", 0)) for r in results.values())
    return total / count if count > 0 else None


def _personalise(
    transport: Transport,
    participants: list[str],
    wire_job: dict[str, Any],
    parameters: np.ndarray,
    moments: Moments,
    precond: np.ndarray,
    task_config: Mapping[str, Any],
    params: HorizontalParams,
) -> dict[str, dict[str, Any]]:
    """Each participant fine-tunes the final model on its own rows and reports the aggregate test
    metrics of both models; the fine-tuned parameters stay with it. A participant that cannot is
    reported with its error instead: personalisation is optional, the job stands."""
    config = {k: v for k, v in task_config.items() if k != "server_prox"}  # the prox is local
    request = PersonalizeIns(
        job=wire_job,
        parameters=parameters,
        mean=moments.mean,
        scale=moments.scale,
        config=config,
        steps=params.personalize_steps,
        preconditioner=precond,
    )
    answers = ask_all(transport, dict.fromkeys(participants, request))
    out: dict[str, dict[str, Any]] = {}
    for name in participants:
        reply = answers[name]
        if isinstance(reply, PersonalizeRes):
            out[name] = {"count": reply.count, **reply.metrics}
        else:
            failure = as_failure(name, request, reply, "personalisation metrics")
            out[name] = {"error": f"{failure.error_type}: {failure.message}"}
    return out
