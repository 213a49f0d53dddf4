"""``cdp-fl simulate vertical``: a vertical federation of in-process parties over the relay, compared
with scikit-learn on the joined rows (which a real federation cannot do) and with the label party
alone (the value of federating).

Each party file (CSV or Parquet) holds an identifier column (``key``) and that party's own
columns, in its own row order and identifier format. Identifiers are normalised per party
(:mod:`.identity.normalize`), then aligned: ECDH PSI (:func:`.identity.psi.align_many`: the label
party learns each pairwise overlap, every passive party only its own rows of the set common to
all, in a random common order) or salted hashing (one organisation only: each passive party
learns its pairwise overlap with the label party). The test files are aligned the same way, in a
separate session. SecureBoost then runs with every party on a thread of its own, each message
sealed end to end through an :class:`~.federation.relay.InProcessRelay` (the coordinator's checks,
in-process).

Policy in the simulation: the label column may exist at the label party only (anywhere else is a
:class:`~.errors.PolicyViolation`: the label must not leave the active party).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .errors import (
    ConfigError,
    IdentifierError,
    MissingColumnError,
    NoTrainingDataError,
    PolicyViolation,
    ProtocolError,
    SourceUnavailableError,
)
from .governance.pii import pii_term
from .results import make_result

__all__ = [
    "VERTICAL_MODELS",
    "ALIGN_METHODS",
    "VerticalSettings",
    "simulate_vertical",
    "native_stdout_to_stderr",
]

VERTICAL_MODELS = ("secureboost", "logreg")
ALIGN_METHODS = ("psi", "salted-hash")
HE_SCHEMES = ("paillier", "ou")
_SESSION = "simulate-vertical/secureboost"


@contextlib.contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr meanwhile: HEU's C++ thread pool logs an info line
    straight to fd 1, which would corrupt ``--json`` output. Python's ``sys.stdout`` is flushed
    before and after, so what Python prints keeps its order."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@dataclass(frozen=True)
class VerticalSettings:
    """Model settings shared by the federated run and both baselines."""

    model: str = "secureboost"
    objective: str = "binary"
    trees: int = 10
    depth: int = 5
    learning_rate: float = 0.3
    max_bins: int = 32
    reg_lambda: float = 1.0
    he: str = "paillier"
    key_bits: int = 2048
    insecure_keys: bool = False  # keys under 2048 bits: tests and quick benchmarks only
    he_workers: int = 1  # local processes per party for HE work; a resource choice, not a model one

    def __post_init__(self) -> None:
        if not isinstance(self.he_workers, int) or not 1 <= self.he_workers <= 64:
            raise ConfigError(
                "HE workers must be an integer from 1 to 64",
                field="--he-workers",
                value=self.he_workers,
                fix="use 1 (default) or the number of cores to spare, e.g. 2",
            )
        if self.model not in VERTICAL_MODELS:
            raise ConfigError(
                "unknown vertical model",
                field="--model",
                value=self.model,
                fix=f"use one of {VERTICAL_MODELS}",
            )
        if self.objective not in ("binary", "regression"):
            raise ConfigError(
                "unknown objective",
                field="--objective",
                value=self.objective,
                fix="use binary or regression",
            )
        if self.he not in HE_SCHEMES:
            raise ConfigError(
                "unknown HE scheme", field="--he", value=self.he, fix=f"use one of {HE_SCHEMES}"
            )


@dataclass
class _Party:
    name: str
    ids: pl.Series  # normalised (null where invalid)
    x: np.ndarray
    columns: list[str]
    y: np.ndarray | None
    invalid: int


# --- reading and checking the party files -----------------------------------------------------------


def _scan(name: str, path: Path, key: str) -> pl.LazyFrame:
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            frame = pl.scan_parquet(path)
        elif suffix in (".csv", ".txt"):
            frame = pl.scan_csv(path, schema_overrides={key: pl.String})  # ids are text
        else:
            raise ConfigError(
                f"party {name!r}: unsupported file type",
                field="--party",
                value=str(path),
                fix="give a .csv or .parquet file",
            )
        frame.collect_schema()
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise SourceUnavailableError(
            f"cannot read {path}: {exc}", field="--party", value=str(path), fix="check the file"
        ) from exc
    return frame


def _read_party(
    name: str,
    path: Path,
    *,
    key: str,
    label: str,
    is_label_party: bool,
    columns: list[str] | None,
    id_options: Mapping[str, Any],
) -> _Party:
    from .identity.normalize import normalize_ids

    frame = _scan(name, path, key)
    schema = frame.collect_schema()
    if key not in schema:
        raise MissingColumnError(
            f"party {name!r} has no identifier column {key!r} (it has {schema.names()})",
            field="--key",
            value=key,
            fix="name the identifier column every party file holds with --key",
        )
    if label in schema and not is_label_party:
        raise PolicyViolation(
            f"party {name!r} holds the label column {label!r}: the label must not leave the "
            "active party",
            reasons=("vertical.label: only the label party may hold the label",),
            field="--party",
            value=name,
            fix="drop the label column from the passive party's file, or make it --label-party",
        )
    if is_label_party and label not in schema:
        raise MissingColumnError(
            f"the label party {name!r} has no label column {label!r}",
            field="--label",
            value=label,
            fix="name the label column of the --label-party file",
        )
    if columns is None:
        numeric = ("Int", "UInt", "Float")
        columns = [
            c
            for c, dtype in schema.items()
            if c not in (key, label)
            and pii_term(c) is None
            and (str(dtype).startswith(numeric) or dtype == pl.Boolean)
        ]
    missing = [c for c in columns if c not in schema]
    if missing:
        raise MissingColumnError(
            f"party {name!r} lacks the training columns {missing}",
            field="--test-party",
            value=name,
            fix="give the test file the training file's columns",
        )
    wanted = [pl.col(key).cast(pl.String), *(pl.col(c).cast(pl.Float64) for c in columns)]
    if is_label_party:
        wanted.append(pl.col(label).cast(pl.Float64).alias("__label__"))
    data = frame.select(wanted).collect()
    ids = normalize_ids(data[key], **id_options)
    if ids.valid == 0:
        raise IdentifierError(
            f"party {name!r}: none of its {len(data)} identifiers normalise as "
            f"{id_options['kind']!r} ({ids.invalid} invalid, {ids.missing} missing)",
            field="--key",
            value=name,
            fix="check --key and --kind: the parties' identifiers must be the same kind",
        )
    if ids.duplicates:
        raise IdentifierError(
            f"party {name!r}: {ids.duplicates} identifiers appear on several rows, so their "
            "rows cannot be aligned to one customer",
            field="--key",
            value=name,
            fix="keep one row per customer in each party file",
        )
    x = data.select(columns).to_numpy().astype(np.float64) if columns else np.zeros((len(data), 0))
    if x.size and not np.isfinite(x).all():
        raise ConfigError(
            f"party {name!r} has missing or infinite feature values",
            field="--party",
            value=name,
            fix="impute missing values before training",
        )
    y = data["__label__"].to_numpy() if is_label_party else None
    if y is not None and not np.isfinite(y).all():
        raise ConfigError(
            f"the label party {name!r} has rows without a label",
            field="--label",
            value=label,
            fix="drop unlabelled rows",
        )
    return _Party(name, ids.values, x, columns, y, ids.invalid)


# --- alignment ---------------------------------------------------------------------------------------


def _align(parties: Mapping[str, _Party], label_party: str, method: str) -> dict[str, np.ndarray]:
    """Each party's rows in one common order (``rows[k]`` of every party is the same customer)."""
    passives = [n for n in parties if n != label_party]
    label_ids = parties[label_party].ids
    if method == "psi":
        from .identity.psi import align_many

        aligned = align_many(
            label_ids, {n: parties[n].ids for n in passives}, label_name=label_party
        )
        rows = {n: a.rows for n, a in aligned.items()}
    else:
        rows = _align_salted(parties, label_party, passives)
    if len(rows[label_party]) == 0:
        empty = _without_overlap(parties, label_party, passives, method)
        raise NoTrainingDataError(
            f"no customer is in every party's file; no overlap with the label party: {empty}",
            field="--party",
            value=empty or passives,
            fix="check that the parties hold the same customers under the same --key and --kind",
        )
    # a simulation holds every file, so it can verify what no real party could: same customers
    reference = label_ids.gather(rows[label_party])
    for name in passives:
        if not parties[name].ids.gather(rows[name]).equals(reference):
            raise ProtocolError(
                f"the alignment put different customers side by side for party {name!r}",
                field="alignment",
                value=name,
                fix="report this: the alignment protocol is broken",
            )
    return rows


def _align_salted(
    parties: Mapping[str, _Party], label_party: str, passives: list[str]
) -> dict[str, np.ndarray]:
    from .identity.keyed_hash import derive_key, new_federation_secret
    from .identity.psi_crypto import secure_permutation
    from .identity.salted import run_salted_hash

    key = derive_key(new_federation_secret(), "simulate-vertical")
    n = len(parties[label_party].ids)
    maps = {}
    for name in passives:
        result = run_salted_hash(
            parties[label_party].ids, parties[name].ids, key, reveal_to=("left", "right")
        )
        mapping = np.full(n, -1, dtype=np.int64)
        mapping[result.left_rows] = result.right_rows
        maps[name] = mapping
    common = np.flatnonzero(np.all([m >= 0 for m in maps.values()], axis=0))
    common = common[secure_permutation(len(common))]
    return {label_party: common, **{name: maps[name][common] for name in passives}}


def _without_overlap(
    parties: Mapping[str, _Party], label_party: str, passives: list[str], method: str
) -> list[str]:
    """Error path only: which passive parties share no customer with the label party (sizes the
    label party learns in any case)."""
    from .identity.keyed_hash import derive_key, new_federation_secret
    from .identity.psi import run_psi
    from .identity.salted import run_salted_hash

    empty = []
    for name in passives:
        left, right = parties[label_party].ids, parties[name].ids
        if method == "psi":
            size = run_psi(left, right, mode="cardinality").intersection_size
        else:
            key = derive_key(new_federation_secret(), "simulate-vertical-check")
            size = run_salted_hash(left, right, key).intersection_size
        if size == 0:
            empty.append(name)
    return empty


# --- training ------------------------------------------------------------------------------------------


def _secureboost(
    train: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
    test: Mapping[str, np.ndarray],
    label_party: str,
    settings: VerticalSettings,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Federated margins on the test rows, label-party-only margins, relay bytes."""
    from .learning.vertical import ActiveParty, PassiveParty, SecureBoostParams

    params = SecureBoostParams(
        objective=settings.objective,
        n_trees=settings.trees,
        max_depth=settings.depth,
        learning_rate=settings.learning_rate,
        max_bins=settings.max_bins,
        reg_lambda=settings.reg_lambda,
    )
    return _over_relay(
        train,
        test,
        label_party,
        settings,
        make_active=lambda x, y, keys: ActiveParty(
            label_party, x, y, params, keys, workers=settings.he_workers
        ),
        make_passive=lambda n, x: PassiveParty(
            n, x, allow_insecure_keys=settings.insecure_keys, workers=settings.he_workers
        ),
    )


def _logreg(
    train: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
    test: Mapping[str, np.ndarray],
    label_party: str,
    settings: VerticalSettings,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Vertical logistic/linear regression (``--trees`` counts epochs); as :func:`_secureboost`."""
    from .learning.vertical import LogRegParams, VerticalLogRegActive, VerticalLogRegPassive

    params = LogRegParams(
        objective=settings.objective,
        epochs=settings.trees,
        learning_rate=settings.learning_rate,
    )
    return _over_relay(
        train,
        test,
        label_party,
        settings,
        make_active=lambda x, y, keys: VerticalLogRegActive(
            label_party, x, y, params, keys, workers=settings.he_workers
        ),
        make_passive=lambda n, x: VerticalLogRegPassive(
            n, x, allow_insecure_keys=settings.insecure_keys
        ),
    )


def _over_relay(
    train: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
    test: Mapping[str, np.ndarray],
    label_party: str,
    settings: VerticalSettings,
    *,
    make_active: Any,
    make_passive: Any,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Every party on its own thread, talking through sealed envelopes of an in-process relay:
    federated margins on the test rows, label-party-only margins, and relay bytes."""
    from .crypto import generate_keypair
    from .federation.envelope import RelayKeyPair
    from .federation.relay import InProcessRelay
    from .learning.vertical import VERTICAL_CODEC, InProcessChannel
    from .learning.vertical.messages import Failure
    from .learning.vertical.relay_channel import RelayPartyChannel, serve_passive

    keys = generate_keypair(settings.he, settings.key_bits, insecure=settings.insecure_keys)
    passives = [n for n in train if n != label_party]
    metered = {"bytes": 0}

    def meter(direction: str, _participant: str, frame: bytes) -> None:
        if direction == "post":
            metered["bytes"] += len(frame)

    relay = InProcessRelay(list(train), recorder=meter)
    channels = {n: relay.channel(n, RelayKeyPair.generate(), codec=VERTICAL_CODEC) for n in train}
    parties = {n: make_passive(n, train[n][0]) for n in passives}
    for n in passives:
        parties[n].set_scoring_features(test[n])
    stop, failures = threading.Event(), []

    def serve(name: str) -> None:
        try:
            serve_passive(
                parties[name], channels[name], active=label_party, session=_SESSION, stop=stop
            )
        except Exception as exc:  # a bug, not a refusal: tell the active party, report it after
            failures.append(exc)
            failed = Failure(
                participant=name, stage="serve", error_type=type(exc).__name__, message=str(exc)
            )
            try:
                channels[name].send(label_party, failed, _SESSION)
            finally:
                stop.set()

    threads = [
        threading.Thread(target=serve, args=(n,), name=f"party-{n}", daemon=True) for n in passives
    ]
    for thread in threads:
        thread.start()
    x_active, y = train[label_party]
    assert y is not None
    try:
        active = make_active(x_active, y, keys)
        channel = RelayPartyChannel(channels[label_party], _SESSION)
        active.fit(channel, passives)
        margin = active.decision_function(test[label_party], channel, passives)
    except Exception as exc:
        if failures:  # the passive party's own error says more than "party refused"
            raise failures[0] from exc
        raise
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        for party in parties.values():
            if hasattr(party, "close"):
                party.close()
    alone = make_active(x_active, y, keys)  # no passive: nothing encrypted
    alone.fit(InProcessChannel({}, active=label_party), [])
    alone_margin = alone.decision_function(test[label_party], InProcessChannel({}), [])
    return margin, alone_margin, metered["bytes"]


def _centralized_logreg(x_train, y, x_test, settings: VerticalSettings) -> np.ndarray:
    """The same full-batch gradient descent (epochs, learning rate, no L2) on the joined,
    column-standardised rows: margins (binary) or predictions (regression) on the test rows."""
    mean, sd = x_train.mean(axis=0), x_train.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    z, zt = (x_train - mean) / sd, (x_test - mean) / sd
    w, b = np.zeros(z.shape[1]), 0.0
    for _ in range(settings.trees):
        margin = z @ w + b
        d = 1 / (1 + np.exp(-margin)) - y if settings.objective == "binary" else margin - y
        w = w - settings.learning_rate * (z.T @ d / len(y))
        b -= settings.learning_rate * float(d.mean())
    return zt @ w + b


def _centralized(x_train, y, x_test, settings: VerticalSettings) -> np.ndarray:
    """scikit-learn's histogram GBM with the same trees, depth, learning rate, bins and L2:
    probabilities (binary) or predictions (regression) on the joined test rows."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    common = dict(
        max_iter=settings.trees,
        max_depth=settings.depth,
        learning_rate=settings.learning_rate,
        max_bins=min(settings.max_bins, 255),
        l2_regularization=settings.reg_lambda,
        max_leaf_nodes=None,
        early_stopping=False,
    )
    if x_train.shape[1] == 0:  # a label-only party: the base rate is all it has
        return np.full(len(x_test), y.mean())
    if settings.objective == "binary":
        model = HistGradientBoostingClassifier(**common).fit(x_train, y)
        return model.predict_proba(x_test)[:, 1]
    return HistGradientBoostingRegressor(**common).fit(x_train, y).predict(x_test)


def _score(objective: str, y: np.ndarray, pred: np.ndarray) -> float:
    """AUC (binary; rank-based, so margins and probabilities give the same) or RMSE."""
    from sklearn.metrics import roc_auc_score

    if objective == "binary":
        if len(np.unique(y)) < 2:
            raise NoTrainingDataError(
                "the aligned test rows hold one class only: AUC is undefined",
                field="--test-party",
                fix="give test files whose aligned rows hold both classes",
            )
        return round(float(roc_auc_score(y, pred)), 6)
    return round(float(np.sqrt(np.mean((pred - y) ** 2))), 6)


# --- the command -----------------------------------------------------------------------------------------


def simulate_vertical(
    parties: Mapping[str, Path],
    *,
    key: str,
    label: str,
    label_party: str,
    test_parties: Mapping[str, Path],
    align: str = "psi",
    settings: VerticalSettings | None = None,
    kind: str = "email",
    scheme: str = "uid2",
    region: str | None = None,
) -> dict[str, Any]:
    """Align, train, score; returns the shared result schema (see ``docs/vertical.md``)."""
    started = time.perf_counter()
    settings = settings or VerticalSettings()
    if label_party not in parties:
        raise ConfigError(
            "unknown --label-party",
            field="--label-party",
            value=label_party,
            fix=f"name one of the parties: {sorted(parties)}",
        )
    if len(parties) < 2:
        raise ConfigError(
            "a vertical federation needs the label party and at least one passive party",
            field="--party",
            value=sorted(parties),
        )
    if set(test_parties) != set(parties):
        raise ConfigError(
            "every party needs a test file, and only the parties do",
            field="--test-party",
            value=sorted(test_parties),
            fix=f"give --test-party for each of {sorted(parties)}",
        )
    if align not in ALIGN_METHODS:
        raise ConfigError(
            "unknown alignment", field="--align", value=align, fix=f"use one of {ALIGN_METHODS}"
        )
    ids = {"kind": kind, "scheme": scheme, "default_region": region}
    train = {
        n: _read_party(
            n,
            p,
            key=key,
            label=label,
            is_label_party=n == label_party,
            columns=None,
            id_options=ids,
        )
        for n, p in parties.items()
    }
    if not any(train[n].columns for n in parties if n != label_party):
        raise NoTrainingDataError(
            "the passive parties hold no numeric feature column",
            field="--party",
            fix="give the passive parties numeric feature columns",
        )
    test = {
        n: _read_party(
            n,
            p,
            key=key,
            label=label,
            is_label_party=n == label_party,
            columns=train[n].columns,
            id_options=ids,
        )
        for n, p in test_parties.items()
    }
    rows = _align(train, label_party, align)
    test_rows = _align(test, label_party, align)
    order = [label_party, *(n for n in parties if n != label_party)]
    fit_data = {
        n: (train[n].x[rows[n]], None if train[n].y is None else train[n].y[rows[n]]) for n in order
    }
    test_x = {n: test[n].x[test_rows[n]] for n in order}
    y_train = fit_data[label_party][1]
    y_test = test[label_party].y[test_rows[label_party]]  # type: ignore[index]
    if settings.objective == "binary" and not np.isin(y_train, (0.0, 1.0)).all():
        raise ConfigError(
            "binary labels must be 0 or 1",
            field="--label",
            value=label,
            fix="encode the label as 0/1, or use --objective regression",
        )
    train_model = _logreg if settings.model == "logreg" else _secureboost
    margin, alone, relay_bytes = train_model(fit_data, test_x, label_party, settings)
    joined_train = np.hstack([fit_data[n][0] for n in order])
    joined_test = np.hstack([test_x[n] for n in order])
    baseline = _centralized_logreg if settings.model == "logreg" else _centralized
    central = baseline(joined_train, y_train, joined_test, settings)
    metric = "auc" if settings.objective == "binary" else "rmse"
    return make_result(
        command="simulate vertical",
        status="ok",
        method=align,
        he=f"{settings.he}-{settings.key_bits}" + ("-insecure" if settings.insecure_keys else ""),
        intersection_size=int(len(rows[label_party])),
        test_intersection_size=int(len(test_rows[label_party])),
        rows_per_party={n: int(len(train[n].ids)) for n in order},
        test_rows_per_party={n: int(len(test[n].ids)) for n in order},
        invalid={n: train[n].invalid for n in order},
        features={n: train[n].columns for n in order},
        rounds=settings.trees,
        bytes_exchanged=relay_bytes,
        seconds=round(time.perf_counter() - started, 3),
        **{
            metric: _score(settings.objective, y_test, margin),
            f"centralized_{metric}": _score(settings.objective, y_test, central),
            f"label_party_only_{metric}": _score(settings.objective, y_test, alone),
        },
    )
