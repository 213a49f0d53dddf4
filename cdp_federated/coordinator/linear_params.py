"""Settings of horizontal linear jobs and the coordinator-side maths that goes with them.

:class:`HorizontalParams` validates ``job.params`` once, before anything is sent: the objective,
the penalties, the strategy and its hyper-parameters, client sampling, early stopping and
personalisation. The helpers turn aggregated replies into label standardisation and regression
metrics. :mod:`.runner` drives the stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..federation.messages import RegressionEvaluateRes, StatsRes
from ..jobs import JobSpec
from ..learning import linear
from ..learning.aggregate import Moments
from ..learning.metrics import pooled_scatter, regression_metrics
from ..learning.rounds import ClientSampler, EarlyStopping, validation_fraction
from ..learning.strategy import STRATEGY_PARAM_NAMES, FedAvg, Strategy, strategy_from_params
from ..privacy.compression import Compression, parse_compression
from ..privacy.dp_fedavg import DPConfig, DPFedAvg
from ..privacy.robust import RobustAggregation, RobustSettings, robust_settings

__all__ = [
    "HorizontalParams",
    "label_standardisation",
    "regression_summary",
    "training_preconditioner",
]

_FLOAT_TYPES = ("float64", "float32")


@dataclass(frozen=True)
class HorizontalParams:
    """``job.params`` of a horizontal linear job, validated.

    ``learning_rate`` scales the preconditioned step (1.0 is the curvature-bound step, which never
    increases the objective); ``local_steps`` > 1 saves rounds on IID data but drifts towards each
    party's own optimum on non-IID data; ``C`` is scikit-learn's inverse L2 strength and
    ``l1_ratio`` its elastic-net mix (L1 by a proximal step); ``min_fit_participants`` defaults to
    every participant asked in a round; ``histogram_bins`` must be even so that 0.5 is a bin edge
    for accuracy. ``objective`` follows ``job.model`` (``logreg``: binary, ``linear``:
    regression). ``strategy`` and its hyper-parameters are checked by
    :func:`~cdp_federated.learning.strategy.strategy_from_params`; ``fraction_fit`` or
    ``clients_per_round`` sample participants per round (keyed by ``seed`` when given);
    ``patience``/``min_delta`` stop early on the federated validation loss of a
    ``validation_fraction`` hold-out; ``personalize_steps`` > 0 fine-tunes the final model locally
    at each participant; ``dtype`` is the participants' matrix float type.
    """

    learning_rate: float = 1.0
    local_steps: int = 1
    C: float = 1.0
    min_fit_participants: int | None = None
    histogram_bins: int = 1000
    objective: str = "binary"
    l1_ratio: float = 0.0
    strategy: str = "fedavg"
    fraction_fit: float | None = None
    clients_per_round: int | None = None
    seed: int | str | None = None
    patience: int | None = None
    min_delta: float = 0.0
    validation_fraction: float = 0.0
    personalize_steps: int = 0
    dtype: str = "float64"
    strategy_options: tuple[tuple[str, Any], ...] = ()  # the job params the strategy reads
    # params.compression (participants compress their updates; see privacy/compression.py) and
    # params.aggregation / trim_fraction / norm_bound (privacy/robust.py).
    compression: Compression = Compression()
    robust: RobustSettings = RobustSettings()
    dp: DPConfig | None = None  # params.dp_* (client-level DP-FedAvg, privacy/dp_fedavg.py)

    @classmethod
    def from_job(cls, job: JobSpec) -> HorizontalParams:
        p = job.params
        objective = linear.objective_of(job.model, p.get("objective"))
        optional_int = {
            key: None if p.get(key) is None else int(_number(p, key, 1, integer=True))
            for key in ("min_fit_participants", "clients_per_round", "patience")
        }
        out = cls(
            learning_rate=_number(p, "learning_rate", cls.learning_rate),
            local_steps=int(_number(p, "local_steps", cls.local_steps, integer=True)),
            C=_number(p, "C", cls.C),
            histogram_bins=int(_number(p, "histogram_bins", cls.histogram_bins, integer=True)),
            objective=objective,
            l1_ratio=_fraction(p, "l1_ratio", 0.0),
            strategy=str(p.get("strategy", "fedavg")),
            fraction_fit=None
            if p.get("fraction_fit") is None
            else _fraction(p, "fraction_fit", 1.0),
            seed=_seed(p.get("seed")),
            min_delta=_fraction(p, "min_delta", 0.0, upper=float("inf")),
            validation_fraction=validation_fraction(p),
            personalize_steps=(
                0
                if p.get("personalize_steps") in (None, 0)
                else int(_number(p, "personalize_steps", 1, integer=True))
            ),
            dtype=str(p.get("dtype", "float64")),
            strategy_options=tuple(sorted((k, p[k]) for k in STRATEGY_PARAM_NAMES if k in p)),
            compression=parse_compression(p.get("compression"), block=p.get("compression_block")),
            robust=robust_settings(p),
            dp=DPConfig.from_params(p, job.rounds),
            **optional_int,
        )
        if out.histogram_bins % 2 or out.histogram_bins > 1_000_000:
            raise ConfigError(
                "histogram_bins must be even and at most 1,000,000",
                field="params.histogram_bins",
                value=out.histogram_bins,
                fix="use an even number such as 1000",
            )
        if out.dtype not in _FLOAT_TYPES:
            raise ConfigError(
                "unknown float type",
                field="params.dtype",
                value=out.dtype,
                fix="use 'float64' (default) or 'float32' (half the memory)",
            )
        if out.fraction_fit is not None and out.clients_per_round is not None:
            raise ConfigError(
                "client sampling takes a fraction or a count, not both",
                field="params.clients_per_round",
                value=out.clients_per_round,
                fix="keep params.fraction_fit or params.clients_per_round",
            )
        out.build_strategy(min_fit_participants=1)  # hyper-parameters checked up front
        if out.patience is not None:
            out.early_stopping()
        return out

    def sampler(self) -> ClientSampler | None:
        """The per-round participant draw, if the job samples."""
        if self.fraction_fit is None and self.clients_per_round is None:
            return None
        return ClientSampler(
            fraction=self.fraction_fit, count=self.clients_per_round, seed=self.seed
        )

    def sample_size(self, available: int) -> int:
        """How many participants each round asks."""
        sampler = self.sampler()
        return available if sampler is None else sampler.size(available)

    def early_stopping(self) -> EarlyStopping | None:
        if self.patience is None:
            return None
        return EarlyStopping(patience=self.patience, min_delta=self.min_delta)

    def build_strategy(
        self,
        *,
        min_fit_participants: int,
        fit_config: Mapping[str, Any] | None = None,
    ) -> Strategy:
        """The strategy ``params.strategy`` selects, with its hyper-parameters and this job's
        sampler, wrapped by robust aggregation when ``params.aggregation``/``norm_bound`` ask, or
        by client-level DP-FedAvg when ``params.dp_epsilon``/``dp_noise_multiplier`` ask."""
        central = self.dp is not None and not self.dp.local  # local DP: participants add noise
        strategy: FedAvg = strategy_from_params(
            dict(self.strategy_options),
            min_fit_participants=min_fit_participants,
            fit_config=fit_config,
            sampler=None if central else self.sampler(),  # central DP samples by Poisson itself
        )
        if central:
            if self.robust.active:
                raise ConfigError(
                    "robust aggregation and DP-FedAvg cannot be combined: DP's noise is "
                    "calibrated to a clipped sum",
                    field="params.aggregation",
                    value=self.robust.aggregation,
                    fix="drop params.aggregation/norm_bound or the dp_* parameters",
                )
            # With Poisson sampling a round may draw fewer than the runner's default minimum.
            explicit = self.min_fit_participants is not None or self.dp.sampling_rate >= 1.0
            return DPFedAvg(
                strategy,
                self.dp,
                min_fit_participants=min_fit_participants if explicit else 1,
                seed=self.seed,
            )
        return RobustAggregation(strategy, self.robust) if self.robust.active else strategy


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


def _fraction(params: Mapping[str, Any], key: str, default: float, *, upper: float = 1.0) -> float:
    value = params.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or not 0 <= value <= upper:
        raise ConfigError(
            f"job parameter {key!r} must be a number in [0, {upper}]",
            field=f"params.{key}",
            value=value,
            fix=f"set params.{key} within [0, {upper}] or leave it out (default {default})",
        )
    return float(value)


def _seed(value: Any) -> int | str | None:
    if value is None or (isinstance(value, int | str) and not isinstance(value, bool)):
        return value
    raise ConfigError(
        "seed must be an integer or a string",
        field="params.seed",
        value=value,
        fix="use for example 42, or leave it out for fresh randomness",
    )


def label_standardisation(replies: Sequence[StatsRes]) -> tuple[float, float]:
    """Global mean and population standard deviation of the label (1.0 for a constant label),
    from each party's count, label sum and label scatter."""
    counts = [r.count for r in replies]
    sums = [r.label_positives for r in replies]
    total = sum(counts)
    mean = float(sum(sums)) / total
    scatter = pooled_scatter(counts, sums, [r.label_scatter for r in replies])
    std = float(np.sqrt(max(scatter, 0.0) / total))
    return mean, (std if std > 1e-12 * max(1.0, abs(mean)) else 1.0)


def training_preconditioner(
    moments: Moments, params: HorizontalParams, *, label_scale: float, mu: float
) -> np.ndarray:
    """The curvature-bound preconditioner every participant applies (see :mod:`..learning.linear`)."""
    pen = linear.penalty(params.C, moments.count, l1_ratio=params.l1_ratio, label_scale=label_scale)
    return linear.preconditioner(
        moments.standardised_covariance(), objective=params.objective, penalty=pen, mu=mu
    )


def regression_summary(replies: Sequence[RegressionEvaluateRes]) -> dict[str, float]:
    """Pooled RMSE, MAE and R^2 from each party's error sums and label moments."""
    count = sum(r.count for r in replies)
    scatter = pooled_scatter(
        [r.count for r in replies],
        [r.label_sum for r in replies],
        [r.label_scatter for r in replies],
    )
    return regression_metrics(
        count,
        sum(r.squared_error_sum for r in replies),
        sum(r.absolute_error_sum for r in replies),
        scatter,
    )
