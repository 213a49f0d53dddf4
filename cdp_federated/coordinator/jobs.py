"""The service's job runner: one background thread per submitted job, driving the same strategy as
the in-process simulation (:func:`.runner.run_horizontal`) over a :class:`.QueueTransport`.

A job's row moves queued -> running -> succeeded | failed. Each committed round is appended to
its history (aggregates and participant names only, never a per-party value); on success the
result holds the test metrics (AUC, log loss, accuracy), the per-split evaluations and the model
(parameters, standardisation); on failure the typed error as ``{error, message, field, fix}``.

Crash-resume: each round's history entry and the job's checkpoint (:mod:`.checkpoint`: global
parameters, standardisation, preconditioner, strategy state) are written in one transaction. On
start, :meth:`JobRunner.recover` resumes every job a previous process left queued or running: the
tasks it left pending expire (a late result for one is a 409), a ``resumes`` entry is recorded,
and a new thread goes on from the checkpoint's round -- or from the start when the job had none.
The participants' replies are deterministic, so the final model equals an uninterrupted run's.
A graceful stop leaves running jobs to be resumed the same way (:class:`.JobInterrupted`).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pluggy

from ..errors import CDPFederatedError, ConfigError
from ..jobs import JobSpec
from ..learning.gbm.params import GBMParams
from ..vertical_job import VerticalJob
from .checkpoint import decode_checkpoint, encode_checkpoint
from .enrolment import EnrolmentRegistry, check_participant_id
from .gbm_runner import GBMResult, run_horizontal_gbm
from .queue_transport import JobInterrupted, QueueTransport
from .runner import Checkpoint, HorizontalParams, HorizontalResult, RoundRecord, run_horizontal
from .state import QUEUED, RUNNING, CoordinatorState
from .vertical_runner import (
    check_vertical_participants,
    commit_progress,
    not_resumable,
    run_vertical,
)

__all__ = ["JobOptions", "JobRunner", "job_from_dict", "result_summary"]

log = logging.getLogger(__name__)

SERVICE_MODELS = ("logreg", "linear", "gbm")
DEFAULT_DEADLINE_SECONDS = 60.0
MAX_DEADLINE_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class JobOptions:
    """How the service runs a job. ``min_participants``: results a training round needs
    (default: every participant; becomes ``params.min_fit_participants``).
    ``round_deadline_seconds``: how long each participant's reply to one request of a round is
    awaited before it counts as a dropout."""

    min_participants: int | None = None
    round_deadline_seconds: float = DEFAULT_DEADLINE_SECONDS

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> JobOptions:
        data = dict(data or {})
        unknown = sorted(set(data) - {"min_participants", "round_deadline_seconds"})
        if unknown:
            raise ConfigError(
                f"unknown job option(s): {', '.join(unknown)}",
                field="options",
                value=unknown[0],
                fix="use min_participants and round_deadline_seconds",
            )
        minimum = data.get("min_participants")
        if minimum is not None and (
            not isinstance(minimum, int) or isinstance(minimum, bool) or minimum < 1
        ):
            raise ConfigError(
                "min_participants must be a positive integer",
                field="options.min_participants",
                value=minimum,
                fix="set it to how many results a round needs, or leave it out (all)",
            )
        deadline = data.get("round_deadline_seconds", DEFAULT_DEADLINE_SECONDS)
        if (
            not isinstance(deadline, int | float)
            or isinstance(deadline, bool)
            or not 0 < deadline <= MAX_DEADLINE_SECONDS
        ):
            raise ConfigError(
                "round_deadline_seconds must be a positive number of seconds (at most a day)",
                field="options.round_deadline_seconds",
                value=deadline,
                fix=f"use for example {DEFAULT_DEADLINE_SECONDS:g}",
            )
        return cls(minimum, float(deadline))

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_participants": self.min_participants,
            "round_deadline_seconds": self.round_deadline_seconds,
        }


def job_from_dict(data: Mapping[str, Any]) -> JobSpec:
    """A job spec from submitted JSON (``job_id`` optional: generated when absent), checked the
    way the strategy will check it, so a bad job is refused at submission."""
    if not isinstance(data, Mapping):
        raise ConfigError("job must be an object", field="job", fix="send a JobSpec as JSON")
    raw = dict(data)
    raw.setdefault("job_id", f"job-{secrets.token_hex(6)}")
    try:
        check_participant_id(raw["job_id"])  # same alphabet: safe in paths and logs
    except ConfigError:
        raise ConfigError(
            "invalid job id",
            field="job.job_id",
            value=raw["job_id"],
            fix="use letters, digits, '.', '_' and '-' (at most 128)",
        ) from None
    try:
        spec = JobSpec.from_dict(raw)
    except (KeyError, TypeError) as exc:
        raise ConfigError(
            f"job is not a valid JobSpec: {exc}",
            field="job",
            fix="give job_id (optional), kind, model, purpose, features, label, rounds, params",
        ) from None
    vertical = spec.kind == "vertical"  # run by .vertical_runner between the parties
    if not vertical and (spec.kind != "horizontal" or spec.model not in SERVICE_MODELS):
        raise ConfigError(
            "the service runs horizontal logistic regression, linear regression and GBM jobs, "
            "and vertical secureboost and logreg jobs",
            field="job.kind",
            value={"kind": spec.kind, "model": spec.model},
            fix="use kind: horizontal and model: " + ", ".join(SERVICE_MODELS) + ", or kind: "
            "vertical and model: secureboost or logreg",
        )
    if not spec.features or not all(isinstance(f, str) for f in spec.features):
        raise ConfigError("job needs a list of feature names", field="job.features")
    if not isinstance(spec.rounds, int) or isinstance(spec.rounds, bool) or spec.rounds < 1:
        raise ConfigError("rounds must be a positive integer", field="job.rounds")
    if not isinstance(spec.params, dict):
        raise ConfigError("params must be an object", field="job.params")
    if vertical:
        VerticalJob.from_spec(spec)
    elif spec.model == "gbm":
        GBMParams.from_mapping(spec.params, n_trees=spec.rounds)
    else:
        HorizontalParams.from_job(spec)
    return spec


def _round_record(record: RoundRecord) -> dict[str, Any]:
    """A round as the status shows it: aggregates and names, no per-party value or message."""
    loss = record.train_loss
    return {
        "round": record.round,
        "participants": list(record.participants),
        "failed": sorted(record.failures),
        "num_examples": record.num_examples,
        "train_loss": loss if loss == loss else None,  # NaN -> null
    }


def _finite(value: float) -> float | None:
    return value if value == value else None  # NaN -> null: neither JSON nor PostgreSQL has NaN


def result_summary(result: HorizontalResult) -> dict[str, Any]:
    """What the job row keeps of a finished run: aggregate metrics and the model. Binary jobs
    report AUC, log loss and accuracy; regression jobs RMSE, MAE (per split) and R^2."""
    names = (
        ("rmse", "mae", "r2")
        if result.objective == "regression"
        else ("auc", "logloss", "accuracy")
    )
    metrics: dict[str, Any] = {
        **{k: _finite(getattr(result, k)) for k in names if hasattr(result, k)},
        "rounds": result.rounds,
        "evaluations": {
            split: {
                **{k: _finite(getattr(e, k)) for k in names},
                # Binary calibration from the same histograms (null for regression).
                "ece": _finite(getattr(e, "ece", float("nan"))),
                "count": e.count,
                "participants": list(e.participants),
                "failed": sorted(e.failures),
            }
            for split, e in result.evaluations.items()
        },
    }
    if result.objective != "binary":
        metrics["objective"] = result.objective
    if result.excluded:
        metrics["excluded"] = sorted(result.excluded)
    if result.best_round is not None:
        metrics["best_round"] = result.best_round
    if result.personalisation:
        metrics["personalisation"] = dict(result.personalisation)
    return {
        "metrics": metrics,
        "model": {
            "feature_names": list(result.feature_names),
            "parameters": result.parameters.tolist(),
            "mean": result.mean.tolist(),
            "scale": result.scale.tolist(),
            "estimator": result.estimator.to_dict(),
        },
    }


def _tree_record(tree: Any) -> dict[str, Any]:
    """A boosting round (one tree) as the status shows it: its shape only."""
    return {"round": tree.tree + 1, "leaves": tree.leaves, "splits": tree.splits}


def gbm_summary(result: GBMResult) -> dict[str, Any]:
    """What the job row keeps of a finished GBM: aggregate metrics and the model as JSON."""
    names = (
        ("rmse", "mae")
        if result.params.objective == "regression"
        else ("auc", "logloss", "accuracy")
    )
    evaluations = {
        split: {
            **{k: _finite(getattr(e, k)) for k in names},
            "count": e.count,
            "participants": list(e.participants),
            "failed": sorted(e.failures),
        }
        for split, e in result.evaluations.items()
    }
    metrics: dict[str, Any] = {
        **evaluations["test"],
        "rounds": result.rounds,
        "objective": result.params.objective,
        "evaluations": evaluations,
    }
    if result.excluded:
        metrics["excluded"] = sorted(result.excluded)
    return {"metrics": metrics, "model": {"estimator": result.estimator.to_dict()}}


def _error_dict(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, CDPFederatedError):
        return exc.to_dict()
    return {"error": type(exc).__name__, "message": "internal error in the job runner"}


class JobRunner:
    """Starts and tracks job threads for a service. ``registry`` checks that a job's participants
    are enrolled participants; ``pm`` receives the strategy's hooks."""

    def __init__(
        self,
        state: CoordinatorState,
        *,
        registry: EnrolmentRegistry | None = None,
        pm: pluggy.PluginManager | None = None,
    ) -> None:
        self.state = state
        self.registry = registry
        self.pm = pm
        self.stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def recover(self) -> list[str]:
        """Resume every job a previous process left queued or running, each in a new thread,
        from its last checkpoint; returns their ids. A job whose checkpoint cannot be read is
        marked failed instead."""
        orphans = self.state.jobs_with_status(QUEUED, RUNNING)
        for job_id in orphans:
            try:
                record = self.state.job(job_id)
                if record.spec.kind == "vertical":  # protocol state lived in the parties' memory
                    self.state.job_finished(job_id, error=_error_dict(not_resumable(job_id)))
                    continue
                if record.spec.model == "gbm":
                    # Trees are not checkpointed yet: the job starts again from its first tree
                    # (deterministic, so it reaches the same model) with a fresh history.
                    self.state.job_resumed(job_id, 0)
                    self.state.reset_history(job_id)
                    self._start(
                        record.spec,
                        list(record.participants),
                        JobOptions.from_dict(record.options),
                        started=record.status == RUNNING,
                    )
                    continue
                stored = self.state.checkpoint(job_id)
                resume = None if stored is None else decode_checkpoint(stored[1])
                self.state.job_resumed(job_id, 0 if resume is None else resume.round)
                self._start(
                    record.spec,
                    list(record.participants),
                    JobOptions.from_dict(record.options),
                    resume=resume,
                    started=record.status == RUNNING,
                )
            except Exception as exc:  # noqa: BLE001 - one unreadable job must not stop the others
                log.warning("job %s cannot resume: %s", job_id, exc)
                self.state.job_finished(job_id, error=_error_dict(exc))
        return orphans

    def submit(
        self,
        job: Mapping[str, Any],
        participants: Sequence[str],
        options: Mapping[str, Any] | None = None,
        *,
        submitted_by: str,
    ) -> str:
        """Validate and record the job, then start its thread; returns the job id."""
        spec = job_from_dict(job)
        opts = JobOptions.from_dict(options)
        names = self._check_participants(participants)
        if spec.kind == "vertical":
            check_vertical_participants(spec, names, min_participants=opts.min_participants)
        if opts.min_participants is not None:
            if opts.min_participants > len(names):
                raise ConfigError(
                    f"min_participants is {opts.min_participants} but the job has "
                    f"{len(names)} participants",
                    field="options.min_participants",
                    value=opts.min_participants,
                    fix="lower min_participants or add participants",
                )
            key = "min_participants" if spec.model == "gbm" else "min_fit_participants"
            spec = JobSpec.from_dict(
                spec.to_dict() | {"params": spec.params | {key: opts.min_participants}}
            )
        self.state.create_job(spec, names, opts.to_dict(), submitted_by=submitted_by)
        self._start(spec, names, opts)
        return spec.job_id

    def _start(
        self,
        spec: JobSpec,
        participants: list[str],
        options: JobOptions,
        *,
        resume: Checkpoint | None = None,
        started: bool = False,
    ) -> None:
        thread = threading.Thread(
            target=self._run,
            args=(spec, participants, options),
            kwargs={"resume": resume, "started": started},
            name=f"job-{spec.job_id}",
            daemon=True,
        )
        with self._lock:
            self._threads[spec.job_id] = thread
        thread.start()

    def _check_participants(self, participants: Sequence[str]) -> list[str]:
        if isinstance(participants, str) or not participants:
            raise ConfigError(
                "a job needs a list of participant ids",
                field="participants",
                fix="list the enrolled participants that train together",
            )
        names = sorted({check_participant_id(p) for p in participants})
        if len(names) != len(participants):
            raise ConfigError("participants are listed twice", field="participants")
        if self.registry is not None:
            for name in names:
                record = self.registry.participant(name)
                if record is None or not record.active or record.role != "participant":
                    raise ConfigError(
                        "not an enrolled, active participant",
                        field="participants",
                        value=name,
                        fix="enrol it with `cdp-fl coordinator enrol NAME --role participant`",
                    )
        return names

    def _run(
        self,
        spec: JobSpec,
        participants: list[str],
        options: JobOptions,
        *,
        resume: Checkpoint | None = None,
        started: bool = False,
    ) -> None:
        """The job's thread: run (or resume) it and record how it ended. A job interrupted by a
        graceful stop is left running in the database, for the next start to resume."""
        job_id = spec.job_id

        def commit(checkpoint: Checkpoint, record: RoundRecord | None) -> None:
            state = encode_checkpoint(checkpoint)
            if record is None:
                self.state.save_checkpoint(job_id, checkpoint.round, state)
            else:
                self.state.round_committed(job_id, _round_record(record), checkpoint=state)

        try:
            if not started:
                self.state.job_started(job_id)
            transport = QueueTransport(
                self.state,
                job_id,
                participants,
                options.round_deadline_seconds,
                stop=self.stop,
            )
            if spec.kind == "vertical":
                summary = run_vertical(
                    spec,
                    self.state,
                    participants,
                    options.round_deadline_seconds,
                    stop=self.stop,
                    on_progress=lambda done: commit_progress(self.state, job_id, done),
                )
                self.state.job_finished(job_id, result=summary)
            elif spec.model == "gbm":
                gbm = run_horizontal_gbm(
                    spec,
                    transport,
                    pm=self.pm,
                    on_round=lambda t: self.state.round_committed(job_id, _tree_record(t)),
                )
                self.state.job_finished(job_id, result=gbm_summary(gbm))
            else:
                result = run_horizontal(
                    spec, transport, pm=self.pm, resume=resume, on_checkpoint=commit
                )
                self.state.job_finished(job_id, result=result_summary(result))
        except JobInterrupted as exc:  # a stop, or a lost lease (LeaseLostError: logged)
            log.info(
                "job %s interrupted (%s); it resumes from its last commit", job_id, exc.message
            )
        except Exception as exc:  # noqa: BLE001 - every failure is recorded in the job row
            log.warning("job %s failed: %s", job_id, exc)
            try:
                self.state.job_finished(job_id, error=_error_dict(exc))
            except JobInterrupted as lost:  # the lease went meanwhile: the new leader decides
                log.warning("job %s: failure not recorded (%s)", job_id, lost.message)
            except Exception:  # noqa: BLE001 - the store itself failed; nothing more to record
                log.exception("could not record the failure of job %s", job_id)
        finally:
            with self._lock:
                self._threads.pop(job_id, None)

    def running(self) -> list[str]:
        with self._lock:
            return sorted(self._threads)

    def stop_jobs(self, timeout: float = 10.0) -> None:
        """Stop every job thread (pending waits give up at once) and join them, leaving the
        state open: a coordinator that lost its lease serves on as a standby."""
        self.stop.set()
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask every job to stop (pending waits give up at once) and join their threads."""
        self.stop.set()
        self.state.close()
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout)
