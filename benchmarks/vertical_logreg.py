"""Vertical logistic regression benchmark: end-to-end HE + masking gradient descent, as JSON.

    .venv/bin/python benchmarks/vertical_logreg.py                       # small (shared machine)
    .venv/bin/python benchmarks/vertical_logreg.py --rows 100000 --epochs 10

Synthetic data: ``--rows`` aligned rows, 15 active + 15 passive features, a logistic label.
Per scheme (Paillier-2048, OU-2048): key generation, the whole fit through the in-process
channel (codec on every message), seconds per epoch, and one epoch's parts timed on their own
(encrypting the residuals, the passive party's encrypted gradient: digit bucket sums and the
place-value combination, decrypting the masked gradients). ``extrapolated_s`` scales the
per-epoch time linearly to ``--target-rows`` x ``--target-epochs`` (every per-epoch cost is
linear in the rows, except the combination and the decryption, which are constant); it is an
estimate, not a measurement. Also the federated model's AUC against centralized gradient
descent on the joined data. Reports the 1-minute load average: numbers taken on a busy machine
are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from cdp_federated.crypto import generate_keypair
from cdp_federated.learning.vertical import LogRegParams, fit_vertical_logreg
from cdp_federated.learning.vertical.encoding import encode_fixed
from cdp_federated.learning.vertical.logreg_passive import DIGIT_BASE


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 3)


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


def _parts(keys, rows: int, rng: np.random.Generator, digits: int) -> dict:
    """One epoch's HE work, each part alone (one passive party of 15 features)."""
    pk = keys.public
    d = encode_fixed(rng.uniform(-1, 1, rows), 24)
    enc, encrypt_s = _timed(lambda: pk.encrypt(d))
    codes = rng.integers(0, DIGIT_BASE, size=(rows, 15 * digits)).astype(np.int8)
    (sums,), bucket_s = _timed(
        lambda: pk.bucket_sums(enc, [np.ones(rows, bool)], codes, DIGIT_BASE, cumulative=False)
    )
    weights = np.zeros((15 * digits * DIGIT_BASE, 16), dtype=object)
    for p in range(digits):
        for j in range(15):
            start = (p * 15 + j) * DIGIT_BASE
            weights[start : start + DIGIT_BASE, j] = np.arange(DIGIT_BASE) * DIGIT_BASE**p
    weights[:DIGIT_BASE, 15] = (DIGIT_BASE**digits - 1) // 2
    combined, combine_s = _timed(lambda: pk.weighted_sums(sums, weights))
    _, decrypt_s = _timed(lambda: keys.decrypt(pk.take(combined, np.arange(15))))
    return {
        "encrypt_residuals_s": encrypt_s,
        "digit_bucket_sums_s": bucket_s,
        "combine_s": combine_s,
        "decrypt_15_s": decrypt_s,
    }


def run(scheme: str, args, rng: np.random.Generator) -> dict:
    keys, keygen_s = _timed(lambda: generate_keypair(scheme, 2048))
    xa, xp, y = _data(args.rows, rng)
    params = LogRegParams(epochs=args.epochs, learning_rate=args.learning_rate, digits=args.digits)
    (active, parties, channel), fit_s = _timed(
        lambda: fit_vertical_logreg(xa, y, {"passive": xp}, params, keys=keys)
    )
    parties["passive"].set_scoring_features(xp)
    federated = active.decision_function(xa, channel, ["passive"])
    central = _centralized([xa, xp], y, params)
    parts = _parts(keys, args.rows, rng, params.digits)
    per_epoch = fit_s / args.epochs
    constant = parts["combine_s"] + parts["decrypt_15_s"]
    scale = args.target_rows / args.rows
    extrapolated = args.target_epochs * ((per_epoch - constant) * scale + constant)
    wire = sum(len(bytes(getattr(m, "ciphertexts", b""))) for _, _, m in channel.log)
    return {
        "scheme": scheme,
        "key_bits": 2048,
        "keygen_s": keygen_s,
        "fit_s": fit_s,
        "epoch_s": round(per_epoch, 3),
        "one_epoch_parts": parts,
        "ciphertext_bytes_on_wire": wire,
        "auc": round(_auc(federated, y), 5),
        "centralized_auc": round(_auc(central, y), 5),
        "max_logit_diff_vs_centralized": float(np.abs(federated - central).max()),
        "extrapolated_s": {
            "rows": args.target_rows,
            "epochs": args.target_epochs,
            "seconds": round(extrapolated, 1),
        },
    }


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
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    out = {
        "benchmark": "vertical_logreg",
        "rows": args.rows,
        "features": {"active": 15, "passive": 15},
        "epochs": args.epochs,
        "digits": args.digits,
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "runs": [run(s, args, rng) for s in args.schemes.split(",")],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
