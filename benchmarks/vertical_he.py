"""Vertical HE benchmark: HEU primitive speeds and end-to-end SecureBoost with a time split, as JSON.

    .venv/bin/python benchmarks/vertical_he.py                      # small (shared machine)
    .venv/bin/python benchmarks/vertical_he.py --schemes ou --rows 100000 --e2e-rows 100000 \\
        --trees 20 --active-workers 2                                # the issue's OU target

Primitives per scheme (Paillier-2048, OU-2048), each with wall and CPU seconds (CPU above wall
means HEU used several cores): encrypting ``--rows`` packed (g, h) in this process and in two
spawned worker processes; one histogram level (``--rows`` x 15 features x 32 bins, the root,
one multi-feature cumulative bucket-sum call); decrypting 480 bin sums unpacked vs packed;
serialising and parsing the ``--rows`` ciphertexts.

End to end: ``--e2e-rows`` rows, 15 active + 15 passive features, ``--trees`` trees of depth
``--depth``, 32 bins, through the in-process channel (the codec frames and parses every message,
as on a wire, but no network), with ``--active-workers`` encryption processes and
``--passive-workers`` bucket-sum processes. The split (``split_s``): ``encrypt`` (active, incl.
workers), ``passive_histograms`` (the passive party's whole histogram answer, which *contains*
``bucket_sums`` and ``pack``), ``passive_gradients`` (parsing the gradient chunks),
``decrypt`` (active, incl. unpacking), ``active_plaintext`` (own histograms, gains),
``codec`` (framing and parsing, what a network transport would add on top of the bytes),
``other`` = the rest. ``tree_seconds`` lists every tree. CPU seconds include finished worker
processes. The load average (1, 5, 15 min) is taken before and after: figures measured on a
busy machine are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from _timing import Timers, cpu_seconds, load_average

from cdp_federated.crypto import generate_keypair, slot_capacity, unpack_slots
from cdp_federated.crypto.he_workers import HEWorkers
from cdp_federated.learning.vertical import (
    VERTICAL_CODEC,
    ActiveParty,
    InProcessChannel,
    PassiveParty,
    SecureBoostParams,
)
from cdp_federated.learning.vertical.encoding import GHLayout, encode_fixed, pack_gh
from cdp_federated.simulate_vertical import native_stdout_to_stderr


def _timed(fn):
    cpu, start = cpu_seconds(), time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 3), round(cpu_seconds() - cpu, 3)


def primitives(scheme: str, rows: int, rng: np.random.Generator) -> dict:
    keys, keygen_s, _ = _timed(lambda: generate_keypair(scheme, 2048))
    pk = keys.public
    g = encode_fixed(rng.uniform(-1, 1, rows), 24)
    h = encode_fixed(rng.uniform(0, 0.25, rows), 24)
    layout = GHLayout.for_tree(g, h)
    packed = pack_gh(g, h, layout.shift)
    out: dict = {"keygen_s": keygen_s}
    enc, *out[f"encrypt_{rows}"] = _timed(lambda: pk.encrypt(packed))
    with HEWorkers(pk, 2) as pool:
        pool.encrypt_chunks(packed[:64], 32)  # start the processes outside the timing
        _, *out[f"encrypt_{rows}_2_workers"] = _timed(
            lambda: pool.encrypt_chunks(packed, -(-rows // 2))
        )
    codes = rng.integers(0, 32, size=(rows, 15)).astype(np.uint8)
    (hist,), *out[f"histogram_level_{rows}x15x32"] = _timed(
        lambda: pk.bucket_sums(enc, [np.ones(rows, bool)], codes, 32, cumulative=True)
    )
    blob, *out[f"serialise_{rows}"] = _timed(lambda: pk.dumps(enc))
    _, *out[f"parse_{rows}"] = _timed(lambda: pk.loads(blob, rows))
    sums = pk.take(hist, np.arange(480))
    plain, *out["decrypt_480_unpacked"] = _timed(lambda: keys.decrypt(sums))
    slots = slot_capacity(pk.plaintext_bits, layout.slot_bits)
    packed_sums, *out["pack_480"] = _timed(lambda: pk.pack(sums, layout.slot_bits, slots))
    values, *out["decrypt_480_packed"] = _timed(
        lambda: unpack_slots(keys.decrypt(packed_sums), layout.slot_bits, slots, 480)
    )
    assert values == plain
    out = {
        k: v if not isinstance(v, list) else {"wall_s": v[0], "cpu_s": v[1]} for k, v in out.items()
    }
    out["slots_per_ciphertext"] = slots
    out["ciphertext_bytes"] = round(len(blob) / rows, 1)
    return out


def _instrument(timers: Timers, active: ActiveParty, passive: PassiveParty) -> None:
    keys = active.keys
    timers.wrap(keys.public, "encrypt", "encrypt")
    timers.wrap(HEWorkers, "encrypt_chunks", "encrypt")
    timers.wrap(keys, "decrypt", "decrypt")
    timers.wrap(active, "_own_offers", "active_plaintext")
    timers.wrap(active, "_best", "active_plaintext")
    timers.wrap(passive, "_on_histograms", "passive_histograms")
    timers.wrap(passive, "_on_gradients", "passive_gradients")
    timers.wrap(passive, "_bucket_sums", "bucket_sums")
    timers.wrap(type(keys.public), "pack", "pack")  # only the passive party packs
    timers.wrap(VERTICAL_CODEC, "encode", "codec")
    timers.wrap(VERTICAL_CODEC, "decode", "codec")
    timers.count_bytes(VERTICAL_CODEC)


def end_to_end(scheme: str, args, rng: np.random.Generator) -> dict:
    rows = args.e2e_rows
    xa, xp = rng.normal(size=(rows, 15)), rng.normal(size=(rows, 15))
    y = ((xa[:, 0] + xp[:, 0] - xp[:, 1] + rng.normal(size=rows)) > 0).astype(float)
    keys = generate_keypair(scheme, 2048)
    passive = PassiveParty("passive", xp, workers=args.passive_workers)
    channel = InProcessChannel({"passive": passive}, active="active")
    params = SecureBoostParams(
        n_trees=args.trees, max_depth=args.depth, max_bins=32, chunk_rows=args.chunk_rows
    )
    active = ActiveParty("active", xa, y, params, keys, workers=args.active_workers)
    timers, tree_seconds = Timers(), []
    _instrument(timers, active, passive)
    grow = active._grow

    def timed_grow(*a, **k):
        start = time.perf_counter()
        try:
            return grow(*a, **k)
        finally:
            tree_seconds.append(round(time.perf_counter() - start, 2))

    active._grow = timed_grow
    load_before = load_average()
    try:
        model, seconds, cpu = _timed(lambda: active.fit(channel, ["passive"]))
    finally:
        passive.close()
        timers.restore()
    split = timers.report()
    top = ("encrypt", "passive_histograms", "passive_gradients", "decrypt")
    top += ("active_plaintext", "codec")
    split["other_s"] = round(seconds - sum(timers.seconds[k] for k in top), 3)
    return {
        "scheme": scheme,
        "rows": rows,
        "features": "15+15",
        "trees": args.trees,
        "depth": args.depth,
        "chunk_rows": args.chunk_rows,
        "active_workers": args.active_workers,
        "passive_workers": args.passive_workers,
        "seconds": seconds,
        "cpu_s": cpu,
        "seconds_per_tree": round(seconds / args.trees, 3),
        "tree_seconds": tree_seconds,
        "split_s": split,
        "wire_bytes": timers.bytes,
        "messages": len(channel.log),
        "passive_splits": sum(s.owner == "passive" for t in model.trees for s in t.splits.values()),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="rows for the primitives")
    parser.add_argument("--e2e-rows", type=int, default=10_000)
    parser.add_argument("--trees", type=int, default=3)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--schemes", default="paillier,ou")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-rows", type=int, default=16384)
    parser.add_argument("--active-workers", type=int, default=1)
    parser.add_argument("--passive-workers", type=int, default=1)
    parser.add_argument("--no-primitives", action="store_true")
    parser.add_argument("--no-e2e", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    out: dict = {"benchmark": "vertical_he", "cpus": os.cpu_count()}
    with native_stdout_to_stderr():  # HEU logs to fd 1: keep stdout pure JSON
        for scheme in args.schemes.split(","):
            out[scheme] = {}
            if not args.no_primitives:
                out[scheme]["primitives"] = primitives(scheme, args.rows, rng)
            if not args.no_e2e:
                out[scheme]["end_to_end"] = end_to_end(scheme, args, rng)
    out["load_average_end"] = load_average()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
