"""The participant agent: serves the coordinator's requests from local rows, returning aggregates only.

``ParticipantAgent.handle`` is a plain ``message -> message`` function, so any transport (in-process
today, HTTP later) can deliver to it. Rows come from ``data_provider(job, split)`` as a polars frame
under the connector contract (``profile_id``, feature columns, label); the agent converts each
(job, split) to a float64 matrix once and keeps only the current job's matrices. Replies carry
counts, sums, parameters and score histograms, never a row, a score or an identifier, and error
messages name columns and counts, never values or ids.

Consent is re-checked every round when a ``consent_gate`` is given: it returns the profile ids
whose consent currently allows the job's purpose, and rows outside it are dropped from the cached
matrices before the round runs (revocation recorded before round k excludes the row from round k
onward; a dropped row does not come back within the job).

Missing or non-finite feature values are refused by default. With ``params.impute = "mean"`` the
job imputes missing (null/NaN) features with this participant's local *training* mean (also on the
test split, so test rows do not leak into it); infinities are always refused.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np
import pluggy
import polars as pl

from ..connector import PROFILE_ID
from ..errors import NoTrainingDataError, SchemaMismatchError, SetupRequiredError, TrainingError
from ..federation.messages import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    Message,
    PersonalizeIns,
    PersonalizeRes,
    RegressionEvaluateRes,
    StatsIns,
    StatsRes,
    setup_digest,
)
from ..jobs import JobSpec
from ..learning import linear
from ..learning.metrics import (
    accuracy_from_histograms,
    regression_metrics,
    roc_auc_from_histograms,
    score_histograms,
)
from ..learning.rounds import validation_fraction, validation_mask, validation_secret
from ..privacy.compression import ErrorFeedback, compress_fit
from ..privacy.dp_fedavg import clip_update
from ..privacy.dp_local import local_fit_for
from .gbm_tasks import GBM_REQUESTS, gbm_objective, serve_gbm
from .pipeline import check_policy

__all__ = ["ParticipantAgent", "DataProvider", "ConsentGate", "IMPUTE_OPTIONS"]

DataProvider = Callable[[JobSpec, str], pl.DataFrame]
ConsentGate = Callable[[JobSpec], "pl.Series | Collection[str]"]
IMPUTE_OPTIONS = (None, "mean")  # params.impute, kept as an alias of params.missing
MISSING_OPTIONS = ("reject", "impute")
FLOAT_TYPES = {"float64": np.float64, "float32": np.float32}
# "validation" is the hold-out of the training rows, never asked of the data provider.
SPLITS = ("train", "test", "validation")
PERSONAL_BINS = 1000  # score bins of a participant's own personalisation report
_COLUMN_BATCH = 8  # feature columns read per pass of a source into the matrix
_LABEL, _ID, _ORDER = "__cdp_label__", "__cdp_profile_id__", "__cdp_row_order__"
_KEPT_SETUPS = 4  # job setups kept for short fit requests (a few jobs' worth; memory only)


@dataclass(frozen=True)
class _Setup:
    """What a job's fit requests share and a short request leaves out (see ``FitIns.setup``)."""

    job: JobSpec
    mean: np.ndarray
    scale: np.ndarray
    preconditioner: np.ndarray


@dataclass
class _LocalData:
    x: np.ndarray  # (n, d) raw features, float64 or float32 (params.dtype), Fortran order
    y: np.ndarray  # (n,) labels ({0, 1} for binary jobs), same float type
    ids: np.ndarray  # (n,) profile ids: stay on this participant (consent gate, hold-out)
    fill: np.ndarray | None = None  # per-feature imputation values (train split only)
    lipschitz: dict[bytes, float] = field(default_factory=dict)
    scaled_y: dict[bytes, np.ndarray] = field(default_factory=dict)  # standardised labels


class ParticipantAgent:
    """Serves ``StatsIns``, ``FitIns`` and ``EvaluateIns`` for participant ``name``.

    With a plugin manager ``pm``, every plugin's ``cdp_policy_decision`` is asked once per job
    before any row is read; a deny is a :class:`~cdp_federated.errors.PolicyViolation`.
    ``revoked`` counts, per split, the rows the consent gate removed during the current job.
    """

    def __init__(
        self,
        name: str,
        data_provider: DataProvider,
        *,
        pm: pluggy.PluginManager | None = None,
        consent_gate: ConsentGate | None = None,
    ) -> None:
        self.name = name
        self.data_provider = data_provider
        self.pm = pm
        self.consent_gate = consent_gate
        self.revoked: dict[str, int] = {}
        self.personalised: dict[str, np.ndarray] = {}  # job id -> fine-tuned local model
        # Top-k residuals per job (params.compression): memory only, a restart starts from zero.
        self.error_feedback = ErrorFeedback()
        self._current_job: JobSpec | None = None
        self._data: dict[str, _LocalData] = {}
        # Setups of full fit requests by digest; lost on restart (then SetupRequiredError).
        self._setups: dict[str, _Setup] = {}

    def handle(self, message: Message) -> Message:
        """Answer one request. Errors propagate; the transport turns them into ``Failure``."""
        if isinstance(message, StatsIns):
            return self._stats(message)
        if isinstance(message, FitIns):
            return self._fit(message)
        if isinstance(message, EvaluateIns):
            return self._evaluate(message)
        if isinstance(message, PersonalizeIns):
            return self._personalize(message)
        if isinstance(message, GBM_REQUESTS):  # histogram GBM: participant/gbm_tasks.py
            return serve_gbm(self, message)
        raise TrainingError(
            f"participant {self.name!r} does not serve {type(message).__name__} requests",
            field="type",
            value=message.TYPE,
            fix="send stats_ins, fit_ins, evaluate_ins or personalize_ins",
        )

    # --- requests --------------------------------------------------------------------------------

    def _stats(self, message: StatsIns) -> StatsRes:
        job = self._job(message.job)
        data = self._gated(job, message.split)
        count, sums, scatter = linear.column_moments(data.x)
        label_sum = float(data.y.sum(dtype=np.float64))
        label_scatter = (
            float(np.square(data.y.astype(np.float64) - label_sum / count).sum()) if count else 0.0
        )
        return StatsRes(
            count, sums, scatter, label_positives=label_sum, label_scatter=label_scatter
        )

    def _fit(self, message: FitIns) -> Message:
        setup = self._fit_setup(message)
        job = setup.job
        data = self._gated(job, "train")
        precond = self._checked_preconditioner(message.parameters, setup, data.x.shape[1])
        config = message.config
        objective, pen, mu = self._problem(job, config)
        steps = int(self._positive(config, "local_steps", integer=True, default=1))
        rate = float(self._positive(config, "learning_rate", default=1.0))
        if precond is None:  # plain gradient steps: scale the rate by this party's curvature
            key = setup.mean.tobytes() + setup.scale.tobytes() + repr((pen, mu)).encode()
            if key not in data.lipschitz:
                data.lipschitz[key] = linear.local_curvature(
                    data.x, setup.mean, setup.scale, objective=objective, penalty=pen, mu=mu
                )
            rate = rate / data.lipschitz[key]
        theta, loss = local_fit_for(job.params, job.rounds)(  # DP-SGD when params.dp_local
            message.parameters,
            data.x,
            self._training_labels(data, objective, config),
            setup.mean,
            setup.scale,
            objective=objective,
            penalty=pen,
            steps=steps,
            learning_rate=rate,
            precond=precond,
            mu=mu,
            prox_last=not config.get("server_prox", False),
        )
        if not np.isfinite(theta).all():
            raise TrainingError(
                f"participant {self.name!r}: local training diverged in round {message.round}",
                field="learning_rate",
                value=config.get("learning_rate"),
                fix="lower params.learning_rate or params.local_steps",
            )
        metrics: dict[str, float] = {"loss": loss}
        if validation_fraction(job.params) > 0:  # loss of the incoming model on held-out rows
            held = self._gated(job, "validation")
            s = linear.scores(held.x, message.parameters, setup.mean, setup.scale)
            losses = linear.row_losses(s, self._training_labels(held, objective, config), objective)
            metrics["val_loss_sum"] = float(losses.sum(dtype=np.float64))
            metrics["val_count"] = int(held.x.shape[0])
        theta, metrics = clip_update(  # DP: clipped update, no per-party loss
            config, message.parameters, theta, metrics, job_params=job.params
        )
        # A FitRes, or the update local - global compressed as params.compression says.
        return compress_fit(
            job.job_id,
            job.params,
            config,
            message.parameters,
            theta,
            int(data.x.shape[0]),
            metrics,
            self.error_feedback,
        )

    def _evaluate(self, message: EvaluateIns) -> EvaluateRes | RegressionEvaluateRes:
        job = self._job(message.job)
        data = self._gated(job, message.split)
        self._check_shapes(message.parameters, message.mean, message.scale, data.x.shape[1])
        if message.bins < 1:
            raise TrainingError("bins must be positive", field="bins", value=message.bins)
        objective = self._objective(job)
        s = linear.scores(data.x, message.parameters, message.mean, message.scale)
        if objective == "regression":
            return self._regression_sums(s, data.y)
        return self._histograms(s, data.y, message.bins)

    def _personalize(self, message: PersonalizeIns) -> PersonalizeRes:
        """Fine-tune the global model locally, keep it, and report aggregate test metrics of both."""
        job = self._job(message.job)
        data = self._gated(job, "train")
        precond = self._checked_preconditioner(message.parameters, message, data.x.shape[1])
        if message.steps < 1:
            raise TrainingError("steps must be positive", field="steps", value=message.steps)
        config = message.config
        objective, pen, mu = self._problem(job, config)
        theta, _ = linear.local_fit(
            message.parameters,
            data.x,
            self._training_labels(data, objective, config),
            message.mean,
            message.scale,
            objective=objective,
            penalty=pen,
            steps=message.steps,
            learning_rate=float(self._positive(config, "learning_rate", default=1.0)),
            precond=precond,
            mu=mu,
        )
        if objective == "regression":  # models in label units, as the coordinator exports them
            label_mean = float(config.get("label_mean", 0.0))
            label_scale = float(self._positive(config, "label_scale", default=1.0))
            models = {
                "global": linear.to_label_units(message.parameters, label_mean, label_scale),
                "personalised": linear.to_label_units(theta, label_mean, label_scale),
            }
        else:
            models = {"global": np.asarray(message.parameters), "personalised": theta}
        self.personalised[job.job_id] = models["personalised"]
        test = self._gated(job, "test")
        metrics = {}
        for which, params in models.items():
            s = linear.scores(test.x, params, message.mean, message.scale)
            metrics[which] = (
                _regression_metrics(self._regression_sums(s, test.y))
                if objective == "regression"
                else _binary_metrics(self._histograms(s, test.y, PERSONAL_BINS))
            )
        # JSON carries no NaN: an undefined metric (one class only, constant label) is null.
        metrics = {
            which: {k: (float(v) if np.isfinite(v) else None) for k, v in values.items()}
            for which, values in metrics.items()
        }
        return PersonalizeRes(count=int(test.x.shape[0]), metrics=metrics)

    # --- local training problem -----------------------------------------------------------------

    def _objective(self, job: JobSpec) -> str:
        if job.model == "gbm":
            return gbm_objective(job)
        return linear.objective_of(job.model, job.params.get("objective"))

    def _problem(self, job: JobSpec, config: dict) -> tuple[str, linear.Penalty, float]:
        """Objective, per-row penalty weights and FedProx ``mu`` from the job and fit config."""
        objective = self._objective(job)
        c = float(self._positive(config, "C"))
        total = int(self._positive(config, "total_examples", integer=True))
        l1_ratio = config.get("l1_ratio", 0.0)
        mu = config.get("proximal_mu", 0.0)
        for key, value in (("l1_ratio", l1_ratio), ("proximal_mu", mu)):
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise TrainingError(
                    f"participant {self.name!r}: fit config {key!r} must be a number >= 0",
                    field=f"config.{key}",
                    value=value,
                    fix="the coordinator sends l1_ratio in [0, 1] and proximal_mu >= 0",
                )
        label_scale = float(self._positive(config, "label_scale", default=1.0))
        try:
            pen = linear.penalty(c, total, l1_ratio=float(l1_ratio), label_scale=label_scale)
        except ValueError as exc:
            raise TrainingError(str(exc), field="config.l1_ratio", value=l1_ratio) from None
        return objective, pen, float(mu)

    def _training_labels(self, data: _LocalData, objective: str, config: dict) -> np.ndarray:
        """Labels as training sees them: regression standardises them with the federated label
        mean and scale from the fit config (cached per job and values)."""
        if objective != "regression":
            return data.y
        label_mean = config.get("label_mean", 0.0)
        label_scale = self._positive(config, "label_scale", default=1.0)
        if not isinstance(label_mean, int | float) or not np.isfinite(label_mean):
            raise TrainingError("label_mean must be a finite number", field="config.label_mean")
        key = repr((float(label_mean), float(label_scale))).encode()
        if key not in data.scaled_y:
            scaled = (data.y.astype(np.float64) - label_mean) / label_scale
            data.scaled_y = {key: scaled.astype(data.y.dtype)}
        return data.scaled_y[key]

    def _checked_preconditioner(
        self, parameters: np.ndarray, setup: _Setup | PersonalizeIns, d: int
    ) -> np.ndarray | None:
        self._check_shapes(parameters, setup.mean, setup.scale, d)
        precond = setup.preconditioner
        if not precond.size:
            return None
        if precond.shape != (d + 1, d + 1):
            raise self._shape_error("preconditioner", precond.shape, (d + 1, d + 1))
        return precond

    @staticmethod
    def _histograms(s: np.ndarray, y: np.ndarray, bins: int) -> EvaluateRes:
        probabilities = linear.predictions(s, "binary")
        positives, negatives = score_histograms(probabilities, y, bins)
        log_loss_sum = float(linear.row_losses(s, y, "binary").sum(dtype=np.float64))
        return EvaluateRes(positives, negatives, log_loss_sum, count=int(s.shape[0]))

    @staticmethod
    def _regression_sums(s: np.ndarray, y: np.ndarray) -> RegressionEvaluateRes:
        y = y.astype(np.float64)
        errors = s.astype(np.float64) - y
        count = int(y.shape[0])
        label_sum = float(y.sum())
        return RegressionEvaluateRes(
            count=count,
            squared_error_sum=float(errors @ errors),
            absolute_error_sum=float(np.abs(errors).sum()),
            label_sum=label_sum,
            label_scatter=float(np.square(y - label_sum / count).sum()) if count else 0.0,
        )

    # --- local data ------------------------------------------------------------------------------

    def _fit_setup(self, message: FitIns) -> _Setup:
        """The job and standardisation a fit request trains under: its own (a full request,
        kept under its digest when it names one) or, for a short request, the kept setup."""
        if message.is_short:
            setup = self._setups.get(message.setup)
            if setup is None or setup.job.job_id != message.job.get("job_id"):
                raise SetupRequiredError(
                    f"participant {self.name!r} does not hold the setup of job "
                    f"{message.job.get('job_id')!r} (it restarted or never received it)",
                    field="setup",
                    value=message.setup[:16],
                    fix="send the full fit request; the coordinator does so by itself",
                )
            self._enter(setup.job)  # governance again should the agent have served another job
            return setup
        job = self._job(message.job)
        setup = _Setup(job, message.mean, message.scale, message.preconditioner)
        if message.setup:
            if message.setup != setup_digest(
                message.job, message.mean, message.scale, message.preconditioner
            ):
                raise TrainingError(
                    f"participant {self.name!r}: the fit request's setup does not match its name",
                    field="setup",
                    value=message.setup[:16],
                    fix="name a setup by federation.messages.setup_digest of what it carries",
                )
            self._setups.pop(message.setup, None)
            self._setups[message.setup] = setup
            while len(self._setups) > _KEPT_SETUPS:  # the oldest first
                self._setups.pop(next(iter(self._setups)))
        return setup

    def _job(self, raw: dict) -> JobSpec:
        try:
            job = JobSpec.from_dict(raw)
        except (KeyError, TypeError) as exc:
            raise TrainingError(
                f"participant {self.name!r} cannot read the job spec: {exc}",
                field="job",
                fix="send JobSpec.to_dict()",
            ) from exc
        return self._enter(job)

    def _enter(self, job: JobSpec) -> JobSpec:
        """Make ``job`` the current one, checking governance when it changes."""
        # The whole spec, not just its id: a job whose features or params change under the same
        # id is a new job, so it is re-checked by governance and its rows are re-read.
        if job is not self._current_job and job != self._current_job:
            if self.pm is not None:
                check_policy(self.pm, job, self.name)  # governance first: before any row is read
            self._current_job = job
            self._data = {}  # keep only the current job's matrices
            self.revoked = {}
        return job

    def _gated(self, job: JobSpec, split: str) -> _LocalData:
        """The split's rows, minus those whose consent no longer allows the job's purpose."""
        data = self._local(job, split)
        if self.consent_gate is None or data.ids.size == 0:
            return data
        allowed = self.consent_gate(job)
        allowed = (
            allowed.to_numpy() if isinstance(allowed, pl.Series) else np.asarray(list(allowed))
        )
        keep = np.isin(data.ids, allowed)
        dropped = int(keep.size - keep.sum())
        if dropped:
            data.x, data.y, data.ids = data.x[keep], data.y[keep], data.ids[keep]
            data.lipschitz, data.scaled_y = {}, {}
            self.revoked[split] = self.revoked.get(split, 0) + dropped
            if split == "train" and data.ids.size == 0:
                raise NoTrainingDataError(
                    f"participant {self.name!r}: consent was revoked for every training row",
                    field="rows",
                    value=0,
                    fix="the job cannot continue on this participant",
                )
        return data

    def _local(self, job: JobSpec, split: str) -> _LocalData:
        if split not in SPLITS:
            raise TrainingError(
                "unknown split", field="split", value=split, fix="use train or test"
            )
        if split not in self._data:
            if split == "test":
                self._data[split] = self._load(job, split, self._local(job, "train").fill)
            else:  # the training rows, minus the validation hold-out
                self._data["train"], self._data["validation"] = self._hold_out(
                    job, self._load(job, "train", None)
                )
        return self._data[split]

    def _hold_out(self, job: JobSpec, data: _LocalData) -> tuple[_LocalData, _LocalData]:
        """Split off the validation rows by a keyed hash of the profile id (of the row position
        when the source has no ids), so the split is stable for the whole job."""
        fraction = validation_fraction(job.params)
        n = data.x.shape[0]
        keys = data.ids if data.ids.size == n else np.arange(n).astype(str)
        held = (
            validation_mask(keys, fraction, validation_secret(job.job_id, job.params.get("seed")))
            if fraction > 0
            else np.zeros(n, dtype=bool)
        )
        if not held.any():
            empty = _LocalData(data.x[:0], data.y[:0], data.ids[:0])
            return data, empty
        if held.all():
            raise NoTrainingDataError(
                f"participant {self.name!r}: all {n} training rows fell into the validation split",
                field="params.validation_fraction",
                value=fraction,
                fix="lower params.validation_fraction or add rows",
            )
        ids = data.ids
        train = _LocalData(
            np.asfortranarray(data.x[~held]),
            data.y[~held],
            ids[~held] if ids.size else ids,
            data.fill,
        )
        validation = _LocalData(
            np.asfortranarray(data.x[held]), data.y[held], ids[held] if ids.size else ids
        )
        return train, validation

    def _load(self, job: JobSpec, split: str, train_fill: np.ndarray | None) -> _LocalData:
        frame = self.data_provider(job, split)
        lazy = isinstance(frame, pl.LazyFrame)
        if not (lazy or isinstance(frame, pl.DataFrame)):
            raise TrainingError(
                f"participant {self.name!r}: data provider returned {type(frame).__name__}",
                field="data_provider",
                fix="return a polars DataFrame under the connector contract",
            )
        features, label = list(job.features), job.label
        schema = frame.collect_schema() if lazy else frame.schema
        missing = [c for c in [*features, label] if c not in schema]
        if missing:
            extra = [c for c in schema.names() if c not in (*features, label, "profile_id")]
            raise SchemaMismatchError(
                f"participant {self.name!r} lacks columns {missing} required by job "
                f"{job.job_id!r} (columns it has beyond the job's: {extra})",
                field="columns",
                value=missing,
                fix="make the participant's connector declare the job's features and label",
            )
        for col in [*features, label]:
            dtype = schema[col]
            if not (dtype.is_numeric() or dtype == pl.Boolean):
                raise SchemaMismatchError(
                    f"participant {self.name!r}: column {col!r} is {dtype}, not numeric",
                    field=col,
                    value=str(dtype),
                    fix="encode it numerically in the connector",
                )
        float_type = _float_type(job)
        polars_type = pl.Float32 if float_type == np.float32 else pl.Float64
        head = [pl.col(label).cast(pl.Float64).alias(_LABEL)]
        # Ids only serve the consent gate and the validation hold-out: 5M Python strings cost
        # hundreds of MB, so they are not read otherwise.
        needs_ids = self.consent_gate is not None or validation_fraction(job.params) > 0
        if PROFILE_ID in schema and needs_ids:
            head.append(pl.col(PROFILE_ID).cast(pl.String).alias(_ID))
        if lazy and PROFILE_ID in schema:  # to check that every batch sees the rows in one order
            head.append(pl.col(PROFILE_ID).hash(seed=0).alias(_ORDER))
        first = frame.select(head).collect() if lazy else frame.select(head)
        height = first.height
        if split == "train" and height == 0:
            raise NoTrainingDataError(
                f"participant {self.name!r} has no training rows for job {job.job_id!r}",
                field="rows",
                value=0,
                fix="check the source and the consent filter for the job's purpose",
            )
        y = first.get_column(_LABEL).to_numpy().astype(np.float64)
        self._check_labels(y, label, self._objective(job))
        ids = first.get_column(_ID).to_numpy() if _ID in first.columns else np.empty(0, object)
        order = first.get_column(_ORDER).to_numpy() if _ORDER in first.columns else None
        del first
        x = np.empty((height, len(features)), dtype=float_type, order="F")
        # A few columns at a time, already in the job's float type, into one Fortran-ordered
        # matrix: peak memory stays near one matrix (never a whole frame plus the matrix, nor a
        # float64 copy of a float32 job). A lazy source is read once per batch (a Parquet scan
        # reads only the batch's columns); should its rows come back in another order (a
        # multi-threaded join), the whole frame is read once instead.
        if not lazy:  # column by column: no query plan per batch, no copy of a float column
            for j, col in enumerate(features):
                x[:, j] = frame.get_column(col).cast(polars_type).to_numpy()
            return self._finish_load(x, y, ids, job, split, train_fill)
        for start in range(0, len(features), _COLUMN_BATCH):
            batch = features[start : start + _COLUMN_BATCH]
            wanted = [pl.col(c).cast(polars_type) for c in batch]
            if order is not None:
                wanted.append(pl.col(PROFILE_ID).hash(seed=0).alias(_ORDER))
            part = frame.select(wanted).collect() if lazy else frame.select(wanted)
            if order is not None and not np.array_equal(part.get_column(_ORDER).to_numpy(), order):
                return self._load_at_once(frame, job, x, ids, y, split, train_fill)
            for j, col in enumerate(batch, start=start):
                x[:, j] = part.get_column(col).to_numpy()
            del part
        return self._finish_load(x, y, ids, job, split, train_fill)

    def _load_at_once(
        self,
        frame: pl.LazyFrame,
        job: JobSpec,
        x: np.ndarray,
        ids: np.ndarray,
        y: np.ndarray,
        split: str,
        train_fill: np.ndarray | None,
    ) -> _LocalData:
        """One collect of every needed column, for a source whose row order is not stable."""
        float_type = x.dtype.type
        polars_type = pl.Float32 if float_type == np.float32 else pl.Float64
        columns = [pl.col(c).cast(polars_type) for c in job.features]
        columns.append(pl.col(job.label).cast(pl.Float64).alias(_LABEL))
        if ids.size:
            columns.append(pl.col(PROFILE_ID).cast(pl.String).alias(_ID))
        whole = frame.select(columns).collect()
        if whole.height != x.shape[0]:
            raise TrainingError(
                f"participant {self.name!r}: the data source returned a different number of "
                "rows on a second read",
                field="data_provider",
                fix="return a frame, or a lazy frame over a stable source",
            )
        y = whole.get_column(_LABEL).to_numpy().astype(np.float64)
        self._check_labels(y, job.label, self._objective(job))
        ids = whole.get_column(_ID).to_numpy() if ids.size else ids
        for j, col in enumerate(job.features):
            x[:, j] = whole.drop_in_place(col).to_numpy()
        return self._finish_load(x, y, ids, job, split, train_fill)

    def _finish_load(
        self,
        x: np.ndarray,
        y: np.ndarray,
        ids: np.ndarray,
        job: JobSpec,
        split: str,
        train_fill: np.ndarray | None,
    ) -> _LocalData:
        features, height = list(job.features), x.shape[0]
        fill = self._clean(x, features, job, train_fill if split == "test" else None)
        if self.consent_gate is not None and ids.size != height:
            raise SchemaMismatchError(
                f"participant {self.name!r}: a consent gate needs the {PROFILE_ID!r} column",
                field=PROFILE_ID,
                fix="return the connector's profile_id column from the data provider",
            )
        return _LocalData(x, y.astype(x.dtype), ids, fill if split == "train" else None)

    def _clean(
        self, x: np.ndarray, features: list[str], job: JobSpec, train_fill: np.ndarray | None
    ) -> np.ndarray | None:
        """Refuse non-finite features, or impute missing ones in place (column by column, no
        matrix-sized temporaries); returns the fill values."""
        impute = _imputes(job)
        if np.isfinite(x.sum(axis=0, dtype=np.float64)).all():  # NaN and Inf would propagate
            infinite = missing = np.zeros(x.shape[1], dtype=np.int64)
        else:  # which columns and how many (a finite matrix lands here only if a sum overflows)
            infinite = np.array([np.isinf(x[:, j]).sum() for j in range(x.shape[1])], np.int64)
            missing = np.array([np.isnan(x[:, j]).sum() for j in range(x.shape[1])], np.int64)
        bad = infinite + (0 if impute else missing)
        if bad.any():
            counts = {f: int(n) for f, n in zip(features, bad, strict=True) if n}
            raise TrainingError(
                f"participant {self.name!r}: features have missing or non-finite values "
                f"(rows per column: {counts})",
                field="features",
                value=counts,
                fix="clean or drop those rows upstream, or set params.missing='impute' for "
                "missing values (infinities are always refused)",
            )
        if not impute:
            return None
        fill = train_fill
        if fill is None:
            present = x.shape[0] - missing
            empty = [f for f, n in zip(features, present, strict=True) if n == 0]
            if empty:
                raise TrainingError(
                    f"participant {self.name!r}: cannot impute columns without values {empty}",
                    field="features",
                    value=empty,
                    fix="drop those features from the job",
                )
            fill = np.array(
                [np.nansum(x[:, j], dtype=np.float64) / present[j] for j in range(x.shape[1])]
            )
        for j in np.flatnonzero(missing):
            column = x[:, j]
            column[np.isnan(column)] = fill[j]
        return fill

    def _check_labels(self, y: np.ndarray, label: str, objective: str) -> None:
        if objective == "regression":
            bad = ~np.isfinite(y)
            if bad.any():
                raise TrainingError(
                    f"participant {self.name!r}: label {label!r} is missing or not finite in "
                    f"{int(bad.sum())} rows",
                    field=label,
                    value=int(bad.sum()),
                    fix="drop unlabelled rows upstream",
                )
            return
        bad = ~np.isin(y, (0.0, 1.0))
        if bad.any():
            raise TrainingError(
                f"participant {self.name!r}: label {label!r} must be 0 or 1 "
                f"({int(bad.sum())} rows are missing or have other values)",
                field=label,
                value=int(bad.sum()),
                fix="encode the label as 0/1 and drop unlabelled rows upstream",
            )

    # --- validation helpers ----------------------------------------------------------------------

    def _check_shapes(
        self, parameters: np.ndarray, mean: np.ndarray, scale: np.ndarray, d: int
    ) -> None:
        for name, array, shape in (
            ("parameters", parameters, (d + 1,)),
            ("mean", mean, (d,)),
            ("scale", scale, (d,)),
        ):
            if array.shape != shape:
                raise self._shape_error(name, array.shape, shape)

    def _shape_error(self, name: str, got: tuple, want: tuple) -> SchemaMismatchError:
        return SchemaMismatchError(
            f"participant {self.name!r}: {name} has shape {got}, expected {want} for its features",
            field=name,
            value=list(got),
            fix="participants and coordinator must use the same job features",
        )

    def _positive(
        self, config: dict, key: str, *, integer: bool = False, default: float | None = None
    ) -> float:
        value = config.get(key, default)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
        if not ok or (integer and value != int(value)):
            raise TrainingError(
                f"participant {self.name!r}: fit config {key!r} must be a positive "
                f"{'integer' if integer else 'number'}",
                field=f"config.{key}",
                value=value,
                fix="the coordinator must send C, total_examples, local_steps and learning_rate",
            )
        return value


# --- job settings and metrics --------------------------------------------------------------------


def _float_type(job: JobSpec) -> type[np.floating]:
    name = job.params.get("dtype", "float64")
    if name not in FLOAT_TYPES:
        raise TrainingError(
            "unknown float type",
            field="params.dtype",
            value=name,
            fix="use 'float64' (default) or 'float32' (half the memory)",
        )
    return FLOAT_TYPES[name]


def _imputes(job: JobSpec) -> bool:
    """``params.missing``: ``reject`` (default) or ``impute`` (local training mean); the older
    ``params.impute = "mean"`` means ``impute``."""
    impute, missing = job.params.get("impute"), job.params.get("missing")
    if impute not in IMPUTE_OPTIONS:
        raise TrainingError(
            "unknown imputation",
            field="params.impute",
            value=impute,
            fix="leave it unset (refuse missing values) or use 'mean'",
        )
    if missing is not None and missing not in MISSING_OPTIONS:
        raise TrainingError(
            "unknown missing-value policy",
            field="params.missing",
            value=missing,
            fix="use 'reject' (refuse rows with missing features) or 'impute' (training mean)",
        )
    return missing == "impute" or (missing is None and impute == "mean")


def _binary_metrics(res: EvaluateRes) -> dict[str, float]:
    return {
        "auc": roc_auc_from_histograms(res.positives, res.negatives),
        "logloss": res.log_loss_sum / res.count if res.count else float("nan"),
        "accuracy": accuracy_from_histograms(res.positives, res.negatives, 0.5),
    }


def _regression_metrics(res: RegressionEvaluateRes) -> dict[str, float]:
    return regression_metrics(
        res.count, res.squared_error_sum, res.absolute_error_sum, res.label_scatter
    )
