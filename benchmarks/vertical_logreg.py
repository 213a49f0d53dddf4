"""Vertical logistic regression benchmark: end-to-end HE + masking gradient descent, as JSON.

    .venv/bin/python benchmarks/vertical_logreg.py                       # small (shared machine)
    .venv/bin/python benchmarks/vertical_logreg.py --schemes ou --rows 100000 --epochs 10 \
        --workers 2                                                      # the issue's OU target

Synthetic data: ``--rows`` aligned rows, 15 active + 15 passive features, a logistic label.
Per scheme (Paillier-2048, OU-2048): key generation, the whole fit through the in-process
channel (the codec frames and parses every message, but no network) with ``--workers``
encryption processes at the active party, seconds per epoch, and the split of the fit's time
(``split_s``): ``encrypt`` (the residuals, incl. workers), ``bucket_sums`` (the passive party's
digit bucket sums), ``combine_and_mask`` (digit sums, place values, masks), ``decrypt``
(the masked gradients), ``codec`` (framing and parsing), ``other`` = the rest (logits,
sigmoid, the active party's own gradient, unmasking). ``extrapolated_s`` scales the per-epoch
time linearly to ``--target-rows`` x ``--target-epochs`` (every per-epoch cost is linear in the
rows except combine and decrypt, taken as constant); it is an estimate, not a measurement, and
is omitted when the run already is that size. Also the federated model's AUC against
centralized gradient descent on the joined data. CPU seconds include finished worker
processes; the load average (1, 5, 15 min) is taken before and after: figures measured on a
busy machine are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from _timing import Timers, cpu_seconds, load_average

from cdp_federated.crypto import generate_keypair
from cdp_federated.crypto.he_workers import HEWorkers
from cdp_federated.learning.vertical import (
    VERTICAL_CODEC,
    LogRegParams,
    VerticalLogRegPassive,
    fit_vertical_logreg,
)
from cdp_federated.simulate_vertical import native_stdout_to_stderr


def _timed(fn):
    cpu, start = cpu_seconds(), time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 3), round(cpu_seconds() - cpu, 3)


def _auc(score: np.ndarray, y: np.ndarray) -> float:
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _data(rows: int, rng: np.random.Generator):
    xa = rng.normal(size=(rows, 15))
    xp = rng.normal(size=(rows, 15)) * rng.uniform(0.5, 20, 15) + rng.uniform(-5, 5, 15)
    beta_a, beta_p = rng.normal(scale=0.4, size=15), rng.normal(scale=0.4, size=15)
    logit = xa @ beta_a + ((xp - xp.mean(0)) / xp.std(0)) @ beta_p - 1.0
    y = (rng.uniform(size=rows) < 1 / (1 + np.exp(-logit))).astype(float)
    return xa, xp, y


def _centralized(xs, y, params: LogRegParams) -> np.ndarray:
    x = np.hstack(xs)
    z = (x - x.mean(0)) / x.std(0)
    w, b = np.zeros(x.shape[1]), 0.0
    for _ in range(params.epochs):
        d = 1 / (1 + np.exp(-(z @ w + b))) - y
        w = w - params.learning_rate * (z.T @ d / len(y) + params.l2 * w)
        b -= params.learning_rate * d.mean()
    return z @ w + b


def run(scheme: str, args, rng: np.random.Generator) -> dict:
    keys, keygen_s, _ = _timed(lambda: generate_keypair(scheme, 2048))
    xa, xp, y = _data(args.rows, rng)
    params = LogRegParams(epochs=args.epochs, learning_rate=args.learning_rate, digits=args.digits)
    timers = Timers()
    timers.wrap(keys.public, "encrypt", "encrypt")
    timers.wrap(HEWorkers, "encrypt_chunks", "encrypt")
    timers.wrap(keys, "decrypt", "decrypt")
    timers.wrap(type(keys.public), "bucket_sums", "bucket_sums")  # only the passive party
    timers.wrap(VerticalLogRegPassive, "_masked_gradient", "combine_and_mask")
    timers.wrap(VERTICAL_CODEC, "encode", "codec")
    timers.wrap(VERTICAL_CODEC, "decode", "codec")
    timers.count_bytes(VERTICAL_CODEC)
    load_before = load_average()
    try:
        (active, parties, channel), fit_s, cpu = _timed(
            lambda: fit_vertical_logreg(
                xa, y, {"passive": xp}, params, keys=keys, workers=args.workers
            )
        )
    finally:
        timers.restore()
    split = timers.report()
    top = ("encrypt", "bucket_sums", "combine_and_mask", "decrypt", "codec")
    split["other_s"] = round(fit_s - sum(timers.seconds[k] for k in top), 3)
    parties["passive"].set_scoring_features(xp)
    federated = active.decision_function(xa, channel, ["passive"])
    central = _centralized([xa, xp], y, params)
    per_epoch = fit_s / args.epochs
    out = {
        "scheme": scheme,
        "key_bits": 2048,
        "keygen_s": keygen_s,
        "workers": args.workers,
        "fit_s": fit_s,
        "cpu_s": cpu,
        "epoch_s": round(per_epoch, 3),
        "split_s": split,
        "wire_bytes": timers.bytes,
        "auc": round(_auc(federated, y), 5),
        "centralized_auc": round(_auc(central, y), 5),
        "max_logit_diff_vs_centralized": float(np.abs(federated - central).max()),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    if (args.rows, args.epochs) != (args.target_rows, args.target_epochs):
        constant = (timers.seconds["combine_and_mask"] + timers.seconds["decrypt"]) / args.epochs
        scale = args.target_rows / args.rows
        seconds = args.target_epochs * ((per_epoch - constant) * scale + constant)
        out["extrapolated_s"] = {
            "rows": args.target_rows,
            "epochs": args.target_epochs,
            "seconds": round(seconds, 1),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=0.5)
    parser.add_argument("--schemes", default="ou,paillier")
    parser.add_argument("--digits", type=int, default=3, help="passive feature quantisation")
    parser.add_argument("--target-rows", type=int, default=100_000)
    parser.add_argument("--target-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="active-party encryption processes")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    out = {
        "benchmark": "vertical_logreg",
        "rows": args.rows,
        "features": {"active": 15, "passive": 15},
        "epochs": args.epochs,
        "digits": args.digits,
        "cpu_count": os.cpu_count(),
    }
    with native_stdout_to_stderr():  # HEU logs to fd 1: keep stdout pure JSON
        out["runs"] = [run(s, args, rng) for s in args.schemes.split(",")]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
