"""``cdp-fl simulate horizontal``: a horizontal federation of in-process participants, one per party
file, compared with scikit-learn trained on the pooled rows (which a real federation cannot do).

Each party file (CSV or Parquet, same columns) is read through the connector layer by its own
:class:`~cdp_federated.participant.ParticipantAgent`; the coordinator sees parameters, sums and
score histograms only. The ``--test`` file belongs to whoever runs the simulation, not to a party:
it is scored locally with the exported model, so no party reveals a score per row (the parties'
own test splits are empty). Metrics on it use the same histogram definitions as federated
evaluation (AUC, accuracy, calibration from 1000-bin score histograms; log loss and RMSE exact).

The files carry no consent ledger: a simulation assumes its rows are already consented for the
purpose, so its funnel records ``consented`` as unknown.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .connector import ConnectorConfig, ConnectorRegistry
from .errors import ConfigError, MissingColumnError, SchemaMismatchError, TransportError
from .governance.pii import pii_term
from .jobs import JobSpec
from .learning.calibration import expected_calibration_error, reliability_table
from .learning.metrics import (
    accuracy_from_histograms,
    roc_auc_from_histograms,
    score_histograms,
)
from .privacy.dp_fedavg import job_privacy_spend
from .results import make_result

__all__ = ["MODELS", "STRATEGIES", "simulate_horizontal"]

MODELS = ("logreg", "linear", "gbm")
STRATEGIES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi")
PURPOSE = "model_training"
BINS = 1000
_FILE_TYPES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_ID = "profile_id"


def _file_type(label: str, path: Path) -> str:
    kind = _FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(
            f"{label}: unsupported file type",
            field=label,
            value=str(path),
            fix="give a .csv or .parquet file",
        )
    return kind


def _columns(registry: ConnectorRegistry, label: str, path: Path) -> dict[str, str]:
    config = ConnectorConfig(type=_file_type(label, path), name=label, path=str(path))
    with registry.open(config) as connector:
        return connector.available_columns()


def _check_schemas(schemas: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Every party has the first party's columns, no more and no fewer."""
    first, *rest = schemas
    expected = set(schemas[first])
    for party in rest:
        columns = set(schemas[party])
        if columns != expected:
            missing, extra = sorted(expected - columns), sorted(columns - expected)
            raise SchemaMismatchError(
                f"party {party!r} does not have the columns of party {first!r} "
                f"(missing {missing}, extra {extra})",
                field=party,
                value={"missing": missing, "extra": extra},
                fix="give every party file the same columns",
            )
    return list(schemas[first])


def _default_features(schema: Mapping[str, str], label: str, id_column: str) -> list[str]:
    """Every numeric column except the label, the id and anything that looks like PII."""
    return [
        name
        for name, dtype in schema.items()
        if name not in (label, id_column)
        and pii_term(name) is None
        and (dtype.startswith(("Int", "UInt", "Float")) or dtype == "Boolean")
    ]


def _read(
    registry: ConnectorRegistry,
    label: str,
    path: Path,
    *,
    features: Sequence[str],
    target: str,
    id_column: str,
    has_ids: bool,
) -> pl.DataFrame:
    """The party's rows under the connector contract (ids made from row numbers if absent)."""
    kind = _file_type(label, path)
    if has_ids:
        config = ConnectorConfig(
            type=kind,
            name=label,
            path=str(path),
            id_column=id_column,
            features=tuple(features),
            label=target,
        )
        with registry.open(config) as connector:
            return connector.scan().collect()
    from connectors.frames import register_frame, unregister_frame

    raw = pl.read_csv(path) if kind == "csv" else pl.read_parquet(path)
    frame_name = f"simulate-{label}-{secrets.token_hex(4)}"
    register_frame(frame_name, raw.with_row_index(_ID).with_columns(pl.col(_ID).cast(pl.String)))
    try:
        config = ConnectorConfig(
            type="frame", name=label, frame=frame_name, features=tuple(features), label=target
        )
        with registry.open(config) as connector:
            return connector.scan().collect()
    finally:
        unregister_frame(frame_name)


def _test_metrics(
    estimator: Any, test: pl.DataFrame, features: list[str], label: str, objective: str
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    x = test.select(features).to_numpy().astype(np.float64)
    if not np.isfinite(x).all():
        raise ConfigError(
            "the test file has missing or non-finite feature values",
            field="--test",
            value=int((~np.isfinite(x)).any(axis=1).sum()),
            fix="clean or drop those rows",
        )
    y = test.get_column(label).to_numpy()
    frame = pl.DataFrame(x, schema=features, orient="row")
    if objective == "regression":
        error = estimator.predict(frame) - y
        return {"rmse": float(np.sqrt(np.mean(error**2)))}, []
    if not np.isin(y, (0.0, 1.0)).all():
        raise ConfigError(
            "a binary model needs 0/1 labels in the test file",
            field="--label",
            value=sorted(set(np.unique(y).tolist()))[:5],
            fix="encode the label as 0/1 or use --objective regression",
        )
    p = estimator.predict_proba(frame)[:, 1]
    positives, negatives = score_histograms(p, y, BINS)
    q = np.clip(p, 1e-15, 1 - 1e-15)
    table = reliability_table(positives, negatives)
    return {
        "auc": roc_auc_from_histograms(positives, negatives),
        "logloss": float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))),
        "accuracy": accuracy_from_histograms(positives, negatives, 0.5),
        "ece": expected_calibration_error(table),
    }, [row.to_dict() for row in table]


def centralized_score(
    model: str,
    objective: str,
    train: pl.DataFrame,
    test: pl.DataFrame,
    features: list[str],
    label: str,
    params: Mapping[str, Any],
    rounds: int,
) -> float:
    """The same model family and parameters on the pooled training rows (scikit-learn)."""
    x, y = train.select(features).to_numpy(), train.get_column(label).to_numpy()
    xt, yt = test.select(features).to_numpy(), test.get_column(label).to_numpy()
    if model == "gbm":
        from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

        from .learning.gbm.params import GBMParams

        gbm = GBMParams.from_mapping(params, n_trees=rounds)
        cls = (
            HistGradientBoostingRegressor
            if objective == "regression"
            else HistGradientBoostingClassifier
        )
        # Same trees, depth, learning rate, bins and L2; no leaf-count cap, no early stopping.
        reference = cls(
            max_iter=gbm.n_trees,
            max_depth=gbm.max_depth,
            learning_rate=gbm.learning_rate,
            max_bins=min(255, gbm.max_bins),
            l2_regularization=gbm.reg_lambda,
            max_leaf_nodes=None,
            min_samples_leaf=1,
            early_stopping=False,
        ).fit(x, y)
    else:
        mean, std = x.mean(axis=0), x.std(axis=0)
        std[std == 0] = 1.0
        x, xt = (x - mean) / std, (xt - mean) / std
        if objective == "regression":
            from sklearn.linear_model import Ridge

            reference = Ridge(alpha=1.0 / float(params["C"])).fit(x, y)  # see learning/linear.py
        else:
            from sklearn.linear_model import LogisticRegression

            reference = LogisticRegression(C=float(params["C"]), max_iter=5000).fit(x, y)
    if objective == "regression":
        return float(np.sqrt(np.mean((reference.predict(xt) - yt) ** 2)))
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(yt, reference.predict_proba(xt)[:, 1]))


def _train(job: JobSpec, transport: Any) -> Any:
    if job.model == "gbm":
        try:
            from .coordinator.gbm_runner import run_horizontal_gbm
        except ImportError as exc:
            raise ConfigError(
                "--model gbm is not available yet in this build",
                field="--model",
                value="gbm",
                fix="the federated GBM driver (coordinator.gbm_runner.run_horizontal_gbm) is "
                "still being written; use --model logreg or linear",
            ) from exc
        return run_horizontal_gbm(job, transport)
    from .coordinator.runner import run_horizontal

    return run_horizontal(job, transport)


# Requests whose replies carry training updates (parameters, or GBM histograms).
_TRAINING_REQUESTS = ("fit_ins", "gbm_histogram_ins", "secagg_ins")
_FRAME_PREFIX = struct.Struct("<4sHI")  # the codec's magic, format version, header length


class _UpdateBytes:
    """Transport recorder: codec frame bytes of the participants' replies to training requests
    (``bytes_sent``, what update compression shrinks); with secure aggregation, the replies to
    every stage and the share packets posted to the relay (:meth:`relay`)."""

    def __init__(self) -> None:
        self.total = 0
        self._asked: dict[str, str] = {}
        self._lock = threading.Lock()

    def relay(self, direction: str, participant: str, frame: bytes) -> None:
        if direction == "post":
            with self._lock:
                self.total += len(frame)

    def __call__(self, direction: str, participant: str, frame: bytes) -> None:
        if direction == "request":
            _, _, length = _FRAME_PREFIX.unpack_from(frame)
            head = frame[_FRAME_PREFIX.size : _FRAME_PREFIX.size + length]
            self._asked[participant] = json.loads(head)["type"]
        elif self._asked.pop(participant, None) in _TRAINING_REQUESTS:
            with self._lock:
                self.total += len(frame)


def _robust_job_params(model: str, compress: str, aggregation: str) -> dict[str, Any]:
    """``--compress`` and ``--aggregation`` as job parameters (linear models only)."""
    from .privacy.compression import parse_compression
    from .privacy.robust import AGGREGATIONS

    try:
        parse_compression(compress)
    except ConfigError as exc:
        raise ConfigError(exc.message, field="--compress", value=compress, fix=exc.fix) from None
    if aggregation not in AGGREGATIONS:
        raise ConfigError(
            "unknown aggregation rule",
            field="--aggregation",
            value=aggregation,
            fix=f"use one of {', '.join(AGGREGATIONS)}",
        )
    out: dict[str, Any] = {}
    if compress != "none":
        out["compression"] = compress
    if aggregation != "mean":
        out["aggregation"] = aggregation
    if out and model == "gbm":
        raise ConfigError(
            "update compression and robust aggregation apply to linear models only",
            field="--compress" if compress != "none" else "--aggregation",
            value=compress if compress != "none" else aggregation,
            fix="leave --compress and --aggregation out with --model gbm",
        )
    return out


def _dp_job_params(
    epsilon: float | None, delta: float | None, noise: float | None, clip: float | None
) -> dict[str, Any]:
    """``--dp-epsilon``/``--dp-noise``, ``--dp-delta`` and ``--dp-clip`` as job parameters."""
    if epsilon is not None and noise is not None:
        raise ConfigError(
            "give a target epsilon or a noise multiplier, not both",
            field="--dp-noise",
            value=noise,
            fix="keep --dp-epsilon or --dp-noise",
        )
    if epsilon is None and noise is None:
        if delta is not None or clip is not None:
            raise ConfigError(
                "--dp-delta and --dp-clip need a noise level",
                field="--dp-epsilon",
                fix="add --dp-epsilon E (target) or --dp-noise Z",
            )
        return {}
    named = {"dp_epsilon": epsilon, "dp_noise_multiplier": noise, "dp_delta": delta}
    return {k: v for k, v in (named | {"dp_clip": clip}).items() if v is not None}


class _Dropouts:
    """``--dropout``: in every round, ``round(fraction * n)`` of the ``n`` participants that
    shared their keys fail at the masked-input stage, chosen afresh per round by a keyed BLAKE2b
    ranking (the key from ``--seed``, else from :mod:`secrets`), so the coordinator must remove
    their pairwise masks from the survivors' Shamir shares."""

    def __init__(self, fraction: float, seed: int | None) -> None:
        self.fraction = fraction
        self._key = (
            secrets.token_bytes(32)
            if seed is None
            else hashlib.sha256(f"cdp-fl/simulate/dropout/{seed}".encode()).digest()
        )

    def count(self, n: int) -> int:
        return int(self.fraction * n + 0.5)

    def drops(self, name: str, message: Any) -> bool:
        from .federation.messages import SecAggIns

        if not isinstance(message, SecAggIns) or message.stage != "mask":
            return False
        # "<job>/secagg/round-<r>/<attempt>": the same choice for every participant of the round
        tag = message.session.rsplit("/", 2)[-2].encode()
        ranked = sorted(
            message.names,
            key=lambda n: hashlib.blake2b(tag + b"/" + n.encode(), key=self._key).digest(),
        )
        return name in ranked[: self.count(len(ranked))]

    def wrap(self, name: str, handler: Any) -> Any:
        def handle(message: Any) -> Any:
            if self.drops(name, message):
                raise TransportError(
                    "simulated dropout after key sharing", field="--dropout", value=self.fraction
                )
            return handler(message)

        return handle


def _secagg_settings(
    enabled: bool,
    dropout: float,
    *,
    model: str,
    aggregation: str,
    parties: int,
    params: Mapping[str, Any],
    compress: str = "none",
) -> dict[str, Any] | None:
    """``--secure-aggregation`` / ``--dropout`` checked against the rest of the run: the job
    parameters to add (None when secure aggregation is off). With dropouts, rounds accept the
    survivors (``min_fit_participants``) unless the caller set that itself. ``--compress
    int8|int4`` is quantised inside the ring (privacy/secagg_rounds.py); top-k cannot be."""
    enabled = enabled or params.get("secure_aggregation") not in (None, False)
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(
            "the dropout fraction is in [0, 1)",
            field="--dropout",
            value=dropout,
            fix="e.g. --dropout 0.2",
        )
    if not enabled:
        if dropout:
            raise ConfigError(
                "--dropout simulates participants lost during secure aggregation",
                field="--dropout",
                value=dropout,
                fix="add --secure-aggregation",
            )
        return None
    if model == "gbm" and dropout:
        raise ConfigError(
            "GBM needs every participant's histograms at every level: a dropout stops the job",
            field="--dropout",
            value=dropout,
            fix="leave --dropout out with --model gbm",
        )
    if aggregation != "mean":
        raise ConfigError(
            f"{aggregation} needs every update on its own, which secure aggregation hides",
            field="--aggregation",
            value=aggregation,
            fix="use --aggregation mean with --secure-aggregation",
        )
    if compress.startswith("topk"):
        raise ConfigError(
            "top-k updates cannot be summed under secure aggregation: each party keeps "
            "different coordinates",
            field="--compress",
            value=compress,
            fix="use --compress int8 or int4 with --secure-aggregation (quantised in the ring)",
        )
    setting = params.get("secure_aggregation", True)
    threshold = setting.get("threshold") if isinstance(setting, Mapping) else None
    threshold = threshold or parties // 2 + 1
    lost = int(dropout * parties + 0.5)
    if parties - lost < threshold:
        raise ConfigError(
            f"--dropout {dropout} drops {lost} of {parties} participants, leaving fewer than the "
            f"threshold {threshold}: every round would abort",
            field="--dropout",
            value=dropout,
            fix=f"drop at most {parties - threshold} participants",
        )
    out: dict[str, Any] = {"secure_aggregation": setting}
    if lost and "min_fit_participants" not in params:
        out["min_fit_participants"] = parties - lost
    return out


def _secagg_summary(
    history: Sequence[Any], parties: int, compress: str = "none", setting: Any = True
) -> dict[str, Any]:
    """``participants``, ``dropped`` (participant-rounds that dropped, at any stage) and
    ``recovered`` (of those, the ones that had shared their keys: their pairwise masks were
    rebuilt from the survivors' shares and removed from the sum); with ``--compress int8|int4``,
    ``compression``: the scheme and the width of the ring its codes are summed in."""
    reasons = [  # GBM trees record no failures: a dropout stops a GBM job instead
        why
        for record in history
        for why in getattr(record, "failures", {}).values()
        if why.startswith("SecureAggregationDropout: ")
    ]
    after_sharing = [r for r in reasons if r.split(": ", 2)[1] == "mask"]
    out: dict[str, Any] = {
        "participants": parties,
        "dropped": len(reasons),
        "recovered": len(after_sharing),
    }
    if compress in ("int8", "int4"):
        from .privacy.secagg_ring import code_ring_bits

        bits = int(compress[3:])
        out["compression"] = {
            "scheme": compress,
            "code_ring_bits": code_ring_bits(parties, bits),
            # without a first-round scale the first round measures one, uncompressed
            "uncompressed_rounds": int(
                not (isinstance(setting, Mapping) and "compression_scale" in setting)
            ),
        }
    return out


def simulate_horizontal(
    parties: Mapping[str, str | Path],
    *,
    label: str,
    test: str | Path,
    registry_root: str | Path,
    model: str = "logreg",
    objective: str | None = None,
    features: Sequence[str] | None = None,
    rounds: int = 20,
    strategy: str = "fedavg",
    seed: int | None = None,
    id_column: str = _ID,
    params: Mapping[str, Any] | None = None,
    now: datetime | None = None,
    compress: str = "none",
    aggregation: str = "mean",
    dp_epsilon: float | None = None,
    dp_delta: float | None = None,
    dp_noise: float | None = None,
    dp_clip: float | None = None,
    secure_aggregation: bool = False,
    dropout: float = 0.0,
) -> dict[str, Any]:
    """Train across ``parties`` (name -> file), evaluate on ``test``, save to the registry and
    return the shared result schema (see the module docstring for who sees what). ``compress``
    and ``aggregation`` become ``params.compression`` / ``params.aggregation`` (linear models);
    ``secure_aggregation`` sets ``params.secure_aggregation`` and wraps every participant in
    :class:`~cdp_federated.participant.secagg_tasks.SecAggTasks`, with ``dropout`` of them
    failing after key sharing in each round."""
    from .federation.transport import InProcessTransport
    from .participant.agent import ParticipantAgent
    from .plugins import make_plugin_manager
    from .registry import job_spec_hash, save_model

    started = time.perf_counter()
    if model not in MODELS:
        raise ConfigError(
            "unknown model", field="--model", value=model, fix=f"use one of {', '.join(MODELS)}"
        )
    if strategy not in STRATEGIES:
        raise ConfigError(
            "unknown strategy",
            field="--strategy",
            value=strategy,
            fix=f"use one of {', '.join(STRATEGIES)}",
        )
    if model == "gbm" and strategy != "fedavg":
        raise ConfigError(
            "server strategies apply to linear models only",
            field="--strategy",
            value=strategy,
            fix="leave --strategy out with --model gbm (trees are grown from summed histograms)",
        )
    robust_job_params = _robust_job_params(model, compress, aggregation)
    secagg = _secagg_settings(
        secure_aggregation,
        dropout,
        model=model,
        aggregation=aggregation,
        parties=len(parties),
        params=params or {},
        compress=compress,
    )
    objective = objective or ("regression" if model == "linear" else "binary")
    if objective not in ("binary", "regression") or (model == "logreg" and objective != "binary"):
        raise ConfigError(
            "objective does not fit the model",
            field="--objective",
            value=objective,
            fix="logreg is binary; linear and gbm take binary or regression",
        )
    if len(parties) < 1:
        raise ConfigError("no party given", field="--party", fix="give --party NAME=PATH")
    pm = make_plugin_manager()
    registry = ConnectorRegistry(pm)
    paths = {name: Path(p) for name, p in parties.items()}
    schemas = {name: _columns(registry, f"party {name}", p) for name, p in paths.items()}
    columns = _check_schemas(schemas)
    first = next(iter(schemas))
    test_schema = _columns(registry, "test", Path(test))
    for where, cols in ((f"party {first}", columns), ("test", list(test_schema))):
        if label not in cols:
            raise MissingColumnError(
                f"label column {label!r} not found in {where}",
                field="--label",
                value=label,
                fix=f"use one of the columns: {', '.join(cols)}",
            )
    chosen = list(features) if features else _default_features(schemas[first], label, id_column)
    unknown = [f for f in chosen if f not in columns or f not in test_schema]
    if unknown or not chosen:
        raise MissingColumnError(
            f"features not in every file: {unknown}" if unknown else "no numeric feature column",
            field="--features",
            value=unknown or None,
            fix=f"choose among: {', '.join(c for c in columns if c in test_schema and c != label)}",
        )
    has_ids = id_column in columns
    frames = {
        name: _read(
            registry, name, p, features=chosen, target=label, id_column=id_column, has_ids=has_ids
        )
        for name, p in paths.items()
    }
    test_frame = _read(
        registry,
        "test",
        Path(test),
        features=chosen,
        target=label,
        id_column=id_column,
        has_ids=id_column in test_schema,
    )
    job_params: dict[str, Any] = {"C": 1.0, "histogram_bins": BINS, **(params or {})}
    if model != "gbm":
        job_params |= {"strategy": strategy, "objective": objective, **robust_job_params}
    else:
        job_params["objective"] = objective
    if seed is not None:
        job_params["seed"] = seed
    job_params |= _dp_job_params(dp_epsilon, dp_delta, dp_noise, dp_clip)
    job_params |= secagg or {}
    job = JobSpec(
        job_id=f"simulate-{secrets.token_hex(4)}",
        kind="horizontal",
        model=model,
        purpose=PURPOSE,
        features=tuple(chosen),
        label=label,
        rounds=rounds,
        params=job_params,
    )

    def provider(frame: pl.DataFrame):
        return lambda _job, split: frame if split != "test" else frame.head(0)

    privacy = job_privacy_spend(job)  # None without DP; refuses DP on models it cannot wrap
    agents = {name: ParticipantAgent(name, provider(f)) for name, f in frames.items()}
    counter = _UpdateBytes()
    handlers = {name: agent.handle for name, agent in agents.items()}
    if secagg is not None:
        from .participant.secagg_tasks import SecAggTasks, in_process_channels

        channels = in_process_channels(handlers, recorder=counter.relay)
        plan = _Dropouts(dropout, seed)
        handlers = {
            n: plan.wrap(n, SecAggTasks(n, h, channels[n]).handle) for n, h in handlers.items()
        }
    transport = InProcessTransport(handlers, recorder=counter)
    result = _train(job, transport)
    metrics, calibration = _test_metrics(result.estimator, test_frame, chosen, label, objective)
    pooled = pl.concat([f.select([*chosen, label]) for f in frames.values()])
    reference = centralized_score(
        model, objective, pooled, test_frame, chosen, label, job_params, rounds
    )
    # A party left out for lack of rows (result.excluded) trained on none.
    rows = {name: int(result.rows_per_party.get(name, {}).get("train", 0)) for name in frames}
    lineage = {
        "job_id": job.job_id,
        "job_spec_hash": job_spec_hash(job),
        "purpose": PURPOSE,
        "label": label,
        "features": chosen,
        "parties": sorted(frames),
        "funnel": {
            name: {"rows_in": frames[name].height, "consented": None, "trained": rows[name]}
            for name in frames
        },
        "rows_per_party": rows,
        "params": job_params | {"rounds": rounds},
        "rounds": result.rounds,
        "metrics": metrics,
        "calibration": calibration,
        "test_rows": test_frame.height,
        "simulation": True,
        "epsilon": None if privacy is None else privacy.epsilon,
        "delta": None if privacy is None else privacy.delta,
    }
    model_id, model_path = save_model(
        registry_root,
        kind=model,
        objective=objective,
        model=result.estimator,
        lineage=lineage,
        name=f"simulate-{model}-{objective}",
        now=now,
        card={
            "limitations": "Simulation on local files: rows were assumed consented; the "
            "centralized baseline pooled rows that a real federation keeps apart."
        },
    )
    pm.hook.cdp_model_published(job=job, model_id=model_id, path=str(model_path), lineage=lineage)
    out = make_result(
        command="simulate horizontal",
        status="ok",
        rounds=result.rounds,
        seconds=round(time.perf_counter() - started, 2),
        rows_per_party=rows,
        test_rows_per_party={"test": test_frame.height},
        funnel=lineage["funnel"],
        features=chosen,
        model_path=str(model_path),
        model_id=model_id,
        card_path=str(Path(model_path).parent / "model_card.md"),
        bytes_sent=counter.total,
    )
    if secagg is not None:
        out |= make_result(
            secure_aggregation=_secagg_summary(
                result.history, len(frames), compress, secagg["secure_aggregation"]
            )
        )
    if privacy is not None:
        out |= make_result(
            epsilon=round(privacy.epsilon, 6),
            delta=privacy.delta,
            noise_multiplier=round(privacy.noise_multiplier, 6),
            sampling_rate=privacy.sampling_rate,
        )
    if objective == "regression":
        out |= make_result(rmse=round(metrics["rmse"], 6), centralized_rmse=round(reference, 6))
    else:
        out |= make_result(
            auc=round(metrics["auc"], 4),
            logloss=round(metrics["logloss"], 4),
            accuracy=round(metrics["accuracy"], 4),
            ece=round(metrics["ece"], 4),
            centralized_auc=round(reference, 4),
        )
    return out
