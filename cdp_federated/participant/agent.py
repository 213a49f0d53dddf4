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
from ..errors import NoTrainingDataError, SchemaMismatchError, TrainingError
from ..federation.messages import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Message,
    StatsIns,
    StatsRes,
)
from ..jobs import JobSpec
from ..learning import logreg
from ..learning.aggregate import local_moments
from ..learning.metrics import score_histograms
from .pipeline import check_policy

__all__ = ["ParticipantAgent", "DataProvider", "ConsentGate", "IMPUTE_OPTIONS"]

DataProvider = Callable[[JobSpec, str], pl.DataFrame]
ConsentGate = Callable[[JobSpec], "pl.Series | Collection[str]"]
IMPUTE_OPTIONS = (None, "mean")
SPLITS = ("train", "test")


@dataclass
class _LocalData:
    x: np.ndarray  # (n, d) raw features, float64
    y: np.ndarray  # (n,) labels in {0.0, 1.0}
    ids: np.ndarray  # (n,) profile ids: stay on this participant, used only by the consent gate
    fill: np.ndarray | None = None  # per-feature imputation values (train split only)
    standardised: dict[bytes, np.ndarray] = field(default_factory=dict)
    lipschitz: dict[bytes, float] = field(default_factory=dict)


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
        self._current_job: JobSpec | None = None
        self._data: dict[str, _LocalData] = {}

    def handle(self, message: Message) -> Message:
        """Answer one request. Errors propagate; the transport turns them into ``Failure``."""
        if isinstance(message, StatsIns):
            return self._stats(message)
        if isinstance(message, FitIns):
            return self._fit(message)
        if isinstance(message, EvaluateIns):
            return self._evaluate(message)
        raise TrainingError(
            f"participant {self.name!r} does not serve {type(message).__name__} requests",
            field="type",
            value=message.TYPE,
            fix="send stats_ins, fit_ins or evaluate_ins",
        )

    # --- requests --------------------------------------------------------------------------------

    def _stats(self, message: StatsIns) -> StatsRes:
        job = self._job(message.job)
        data = self._gated(job, message.split)
        count, sums, scatter = local_moments(data.x)
        return StatsRes(count, sums, scatter, label_positives=float(data.y.sum()))

    def _fit(self, message: FitIns) -> FitRes:
        job = self._job(message.job)
        data = self._gated(job, "train")
        d = data.x.shape[1]
        self._check_shapes(message.parameters, message.mean, message.scale, d)
        precond = message.preconditioner
        if precond.size and precond.shape != (d + 1, d + 1):
            raise self._shape_error("preconditioner", precond.shape, (d + 1, d + 1))
        config = message.config
        c = float(self._positive(config, "C"))
        total = int(self._positive(config, "total_examples", integer=True))
        steps = int(self._positive(config, "local_steps", integer=True, default=1))
        rate = float(self._positive(config, "learning_rate", default=1.0))
        z, key = self._standardised(data, message.mean, message.scale)
        loss = float(logreg.log_losses(logreg.logits(z, message.parameters), data.y).mean())
        if not precond.size:  # plain gradient steps: scale the rate by this party's curvature
            if key not in data.lipschitz:
                data.lipschitz[key] = logreg.lipschitz_constant(z, c=c, total_examples=total)
            rate = rate / data.lipschitz[key]
        theta = logreg.gradient_descent(
            message.parameters,
            z,
            data.y,
            steps=steps,
            learning_rate=rate,
            c=c,
            total_examples=total,
            preconditioner=precond if precond.size else None,
        )
        if not np.isfinite(theta).all():
            raise TrainingError(
                f"participant {self.name!r}: local training diverged in round {message.round}",
                field="learning_rate",
                value=config.get("learning_rate"),
                fix="lower params.learning_rate or params.local_steps",
            )
        return FitRes(theta, num_examples=int(z.shape[0]), metrics={"loss": loss})

    def _evaluate(self, message: EvaluateIns) -> EvaluateRes:
        job = self._job(message.job)
        data = self._gated(job, message.split)
        self._check_shapes(message.parameters, message.mean, message.scale, data.x.shape[1])
        if message.bins < 1:
            raise TrainingError("bins must be positive", field="bins", value=message.bins)
        z, _ = self._standardised(data, message.mean, message.scale)
        logits = logreg.logits(z, message.parameters)
        positives, negatives = score_histograms(logreg.sigmoid(logits), data.y, message.bins)
        log_loss_sum = float(logreg.log_losses(logits, data.y).sum())
        return EvaluateRes(positives, negatives, log_loss_sum, count=int(z.shape[0]))

    # --- local data ------------------------------------------------------------------------------

    def _job(self, raw: dict) -> JobSpec:
        try:
            job = JobSpec.from_dict(raw)
        except (KeyError, TypeError) as exc:
            raise TrainingError(
                f"participant {self.name!r} cannot read the job spec: {exc}",
                field="job",
                fix="send JobSpec.to_dict()",
            ) from exc
        # The whole spec, not just its id: a job whose features or params change under the same
        # id is a new job, so it is re-checked by governance and its rows are re-read.
        if job != self._current_job:
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
            data.standardised, data.lipschitz = {}, {}
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
            fill = self._local(job, "train").fill if split == "test" else None
            self._data[split] = self._load(job, split, fill)
        return self._data[split]

    def _load(self, job: JobSpec, split: str, train_fill: np.ndarray | None) -> _LocalData:
        frame = self.data_provider(job, split)
        if isinstance(frame, pl.LazyFrame):
            frame = frame.collect()
        if not isinstance(frame, pl.DataFrame):
            raise TrainingError(
                f"participant {self.name!r}: data provider returned {type(frame).__name__}",
                field="data_provider",
                fix="return a polars DataFrame under the connector contract",
            )
        features, label = list(job.features), job.label
        missing = [c for c in [*features, label] if c not in frame.columns]
        if missing:
            extra = [c for c in frame.columns if c not in (*features, label, "profile_id")]
            raise SchemaMismatchError(
                f"participant {self.name!r} lacks columns {missing} required by job "
                f"{job.job_id!r} (columns it has beyond the job's: {extra})",
                field="columns",
                value=missing,
                fix="make the participant's connector declare the job's features and label",
            )
        for col in [*features, label]:
            dtype = frame.schema[col]
            if not (dtype.is_numeric() or dtype == pl.Boolean):
                raise SchemaMismatchError(
                    f"participant {self.name!r}: column {col!r} is {dtype}, not numeric",
                    field=col,
                    value=str(dtype),
                    fix="encode it numerically in the connector",
                )
        if split == "train" and frame.height == 0:
            raise NoTrainingDataError(
                f"participant {self.name!r} has no training rows for job {job.job_id!r}",
                field="rows",
                value=0,
                fix="check the source and the consent filter for the job's purpose",
            )
        x = frame.select(pl.col(c).cast(pl.Float64) for c in features).to_numpy()
        x = np.ascontiguousarray(x, dtype=np.float64).reshape(frame.height, len(features))
        y = frame.get_column(label).cast(pl.Float64).to_numpy().astype(np.float64)
        self._check_labels(y, label)
        fill = self._clean(x, features, job, train_fill if split == "test" else None)
        ids = (
            frame.get_column(PROFILE_ID).cast(pl.String).to_numpy()
            if PROFILE_ID in frame.columns
            else np.empty(0, dtype=object)
        )
        if self.consent_gate is not None and ids.size != frame.height:
            raise SchemaMismatchError(
                f"participant {self.name!r}: a consent gate needs the {PROFILE_ID!r} column",
                field=PROFILE_ID,
                fix="return the connector's profile_id column from the data provider",
            )
        return _LocalData(x, y, ids, fill if split == "train" else None)

    def _clean(
        self, x: np.ndarray, features: list[str], job: JobSpec, train_fill: np.ndarray | None
    ) -> np.ndarray | None:
        """Refuse non-finite features, or impute missing ones in place; returns the fill values."""
        impute = job.params.get("impute")
        if impute not in IMPUTE_OPTIONS:
            raise TrainingError(
                "unknown imputation",
                field="params.impute",
                value=impute,
                fix="leave it unset (refuse missing values) or use 'mean'",
            )
        infinite = np.isinf(x).sum(axis=0)
        missing = np.isnan(x).sum(axis=0)
        bad = infinite + (missing if impute is None else 0)
        if bad.any():
            counts = {f: int(n) for f, n in zip(features, bad, strict=True) if n}
            raise TrainingError(
                f"participant {self.name!r}: features have missing or non-finite values "
                f"(rows per column: {counts})",
                field="features",
                value=counts,
                fix="clean or drop those rows upstream, or set params.impute='mean' for missing values",
            )
        if impute is None:
            return None
        fill = train_fill
        if fill is None:
            present = (~np.isnan(x)).sum(axis=0)
            empty = [f for f, n in zip(features, present, strict=True) if n == 0]
            if empty:
                raise TrainingError(
                    f"participant {self.name!r}: cannot impute columns without values {empty}",
                    field="features",
                    value=empty,
                    fix="drop those features from the job",
                )
            fill = np.nansum(x, axis=0) / present
        rows, cols = np.nonzero(np.isnan(x))
        x[rows, cols] = fill[cols]
        return fill

    def _check_labels(self, y: np.ndarray, label: str) -> None:
        bad = ~np.isin(y, (0.0, 1.0))
        if bad.any():
            raise TrainingError(
                f"participant {self.name!r}: label {label!r} must be 0 or 1 "
                f"({int(bad.sum())} rows are missing or have other values)",
                field=label,
                value=int(bad.sum()),
                fix="encode the label as 0/1 and drop unlabelled rows upstream",
            )

    def _standardised(
        self, data: _LocalData, mean: np.ndarray, scale: np.ndarray
    ) -> tuple[np.ndarray, bytes]:
        key = mean.tobytes() + scale.tobytes()
        if key not in data.standardised:
            if (scale <= 0).any():
                raise TrainingError("scale must be positive", field="scale", fix="coordinator bug")
            data.standardised = {key: (data.x - mean) / scale}  # one standardisation per job
        return data.standardised[key], key

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
