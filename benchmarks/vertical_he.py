"""Vertical HE benchmark: HEU primitive speeds and a small end-to-end SecureBoost, as JSON.

    .venv/bin/python benchmarks/vertical_he.py                     # small (shared machine)
    .venv/bin/python benchmarks/vertical_he.py --rows 100000 --e2e-rows 100000 --trees 20

Primitives per scheme (Paillier-2048, OU-2048): encrypting ``--rows`` packed (g, h); one
histogram level (``--rows`` x 15 features x 32 bins, root node, cumulative bucket sums);
decrypting 480 bin sums unpacked (480 ciphertexts) vs packed (several sums per ciphertext).
End to end: ``--e2e-rows`` rows, 15 active + 15 passive features, ``--trees`` trees of depth
``--depth``, through the in-process channel (codec on every message), once per passive-party
worker count in ``--workers``. Reports the 1-minute load
average: numbers taken on a busy machine are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from cdp_federated.crypto import generate_keypair, slot_capacity, unpack_slots
from cdp_federated.learning.vertical import (
    ActiveParty,
    InProcessChannel,
    PassiveParty,
    SecureBoostParams,
)
from cdp_federated.learning.vertical.encoding import GHLayout, encode_fixed, pack_gh


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 3)


def primitives(scheme: str, rows: int, rng: np.random.Generator) -> dict:
    keys, keygen_s = _timed(lambda: generate_keypair(scheme, 2048))
    pk = keys.public
    g = encode_fixed(rng.uniform(-1, 1, rows), 24)
    h = encode_fixed(rng.uniform(0, 0.25, rows), 24)
    layout = GHLayout.for_tree(g, h)
    packed = pack_gh(g, h, layout.shift)
    enc, encrypt_s = _timed(lambda: pk.encrypt(packed))
    codes = rng.integers(0, 32, size=(rows, 15)).astype(np.uint8)
    (hist,), hist_s = _timed(
        lambda: pk.bucket_sums(enc, [np.ones(rows, bool)], codes, 32, cumulative=True)
    )
    sums = pk.take(hist, np.arange(480))
    _, dec_unpacked_s = _timed(lambda: keys.decrypt(sums))
    slots = slot_capacity(pk.plaintext_bits, layout.slot_bits)
    packed_sums, pack_s = _timed(lambda: pk.pack(sums, layout.slot_bits, slots))
    values, dec_packed_s = _timed(
        lambda: unpack_slots(keys.decrypt(packed_sums), layout.slot_bits, slots, 480)
    )
    assert values == keys.decrypt(sums)
    return {
        "keygen_s": keygen_s,
        f"encrypt_{rows}_packed_s": encrypt_s,
        f"histogram_level_{rows}x15x32_s": hist_s,
        "decrypt_480_unpacked_s": dec_unpacked_s,
        "pack_480_s": pack_s,
        "decrypt_480_packed_s": dec_packed_s,
        "slots_per_ciphertext": slots,
        "ciphertext_bytes": len(pk.dumps(pk.take(enc, np.arange(100)))) / 100,
    }


def end_to_end(
    scheme: str, rows: int, trees: int, depth: int, workers: int, rng: np.random.Generator
) -> dict:
    xa, xp = rng.normal(size=(rows, 15)), rng.normal(size=(rows, 15))
    y = ((xa[:, 0] + xp[:, 0] - xp[:, 1] + rng.normal(size=rows)) > 0).astype(float)
    keys = generate_keypair(scheme, 2048)
    # Chunks are the unit of parallel work: at least two per worker on the passive side.
    chunk = max(1, -(-rows // (2 * workers)))
    passive = PassiveParty("passive", xp, workers=workers)
    channel = InProcessChannel({"passive": passive}, active="active")
    params = SecureBoostParams(n_trees=trees, max_depth=depth, max_bins=32, chunk_rows=chunk)
    active = ActiveParty("active", xa, y, params, keys)
    try:
        _, seconds = _timed(lambda: active.fit(channel, ["passive"]))
    finally:
        passive.close()
    return {
        "rows": rows,
        "features": "15+15",
        "trees": trees,
        "depth": depth,
        "seconds": seconds,
        "seconds_per_tree": round(seconds / trees, 3),
        "workers": workers,
        "messages": len(channel.log),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--e2e-rows", type=int, default=10_000)
    parser.add_argument("--trees", type=int, default=3)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--schemes", default="paillier,ou")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workers", default="1,2", help="end-to-end runs with these passive-party worker counts"
    )
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    out: dict = {"cpus": os.cpu_count()}
    for scheme in args.schemes.split(","):
        out[scheme] = {
            "primitives": primitives(scheme, args.rows, rng),
            "end_to_end": [
                end_to_end(scheme, args.e2e_rows, args.trees, args.depth, int(w), rng)
                for w in args.workers.split(",")
            ],
        }
    out["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
