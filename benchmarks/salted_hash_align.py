"""Salted-hash alignment: two Parquet files of N emails each, 50% overlap, to their intersection.

    .venv/bin/python benchmarks/salted_hash_align.py              # 10,000,000 x 10,000,000
    .venv/bin/python benchmarks/salted_hash_align.py --rows 1000000

First (not timed, in a child process so that this process's peak RSS is the alignment's own) it
writes two Parquet files of realistic emails: first/last-name local parts with digits, common
providers (35% gmail.com), mixed case, stray padding, Gmail dots and ``+newsletter`` tags, a
few malformed addresses, rows shuffled. Half of the left side's people are also on the right,
written differently. Then it times, and prints as JSON:

- ``read``: both files from disk (``pl.read_parquet``);
- ``normalize``: both sides under the ``uid2`` scheme (polars expressions);
- ``hmac``: HMAC-SHA256 tokens of both sides with a per-job HKDF key (polars-hash, Rust);
- ``exchange``: the right side's tokens through the federation codec, encoded and decoded in
  messages of ``--batch-rows`` rows (default 250,000: the default codec's 8M-element limit is
  250,000 x 32 bytes);
- ``join``: the exact intersection (polars join on the first 8 token bytes, then the rest).

It checks the intersection against the generator's ground truth, and reports rows/s, the HMAC
rate on its own, this process's peak RSS and the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from cdp_federated.federation.codec import DEFAULT_MAX_ELEMENTS, Codec
from cdp_federated.federation.messages import Message, register
from cdp_federated.identity.keyed_hash import (
    TOKEN_BYTES,
    KeyedTokens,
    derive_key,
    hmac_tokens,
    intersect_tokens,
    new_federation_secret,
)
from cdp_federated.identity.normalize import normalize_ids

GOAL_SECONDS = 20.0

FIRST = ["james", "mary", "john", "patricia", "robert", "jennifer", "michael", "linda", "william",
         "elizabeth", "david", "barbara", "richard", "susan", "joseph", "jessica", "thomas",
         "sarah", "charles", "karen", "chloe", "noah", "amelie", "lukas", "sofia", "mateo", "yuki",
         "wei", "aarav", "fatima"]  # fmt: skip
LAST = ["smith", "johnson", "williams", "brown", "jones", "garcia", "miller", "davis",
        "rodriguez", "martinez", "hernandez", "lopez", "gonzalez", "wilson", "anderson", "thomas",
        "taylor", "moore", "jackson", "martin", "dubois", "muller", "rossi", "tanaka", "wang",
        "singh", "khan", "silva", "novak", "kowalski"]  # fmt: skip
DOMAINS = ["gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com", "aol.com",
           "proton.me", "example.org", "company.co.uk", "web.de"]  # fmt: skip
DOMAIN_WEIGHTS = [0.35, 0.12, 0.10, 0.08, 0.08, 0.04, 0.03, 0.07, 0.07, 0.06]
INVALID_SHARE = 0.002

# The wire message for tokens; registered in a private registry (the codec below accepts it).
_TYPES: dict[str, type[Message]] = {}


@register("salted_tokens", version=1, arrays={"tokens": "iu"}, registry=_TYPES)
@dataclasses.dataclass(frozen=True, eq=False)
class SaltedTokens(Message):
    """HMAC tokens (``(n, 32)`` uint8) of rows ``offset .. offset + n`` under key ``key_id``."""

    key_id: str
    offset: int
    tokens: np.ndarray


# --- data generation (not timed) -------------------------------------------------------------


def people_emails(person: np.ndarray, rng: np.random.Generator) -> pl.Series:
    """One raw email per person id, written the messy way a CRM export writes it.

    Person ``p`` is (first, last, number) = (p % 30, p // 30 % 30, p // 900): distinct people get
    distinct mailboxes, and the same person gets the same normalised address whatever the mess.
    """
    n = len(person)
    domain_of = np.searchsorted(
        np.cumsum(DOMAIN_WEIGHTS), (person * 2654435761 % 1000) / 1000.0, side="right"
    ).clip(0, len(DOMAINS) - 1)
    frame = pl.DataFrame(
        {
            "f": pl.Series(FIRST).gather(person % len(FIRST)),
            "l": pl.Series(LAST).gather(person // len(FIRST) % len(LAST)),
            "num": pl.Series(person // (len(FIRST) * len(LAST))).cast(pl.String),
            "sep": pl.Series(["", ".", "_"]).gather(person % 3),  # part of a non-Gmail mailbox
            "d": pl.Series(DOMAINS).gather(domain_of),
            "case": rng.integers(0, 4, n),
            "gdot": rng.random(n) < 0.5,
            "plus": rng.random(n) < 0.15,
        }
    )
    gmail = pl.col("d") == "gmail.com"
    sep = (
        pl.when(gmail & pl.col("gdot"))
        .then(pl.lit("."))
        .when(gmail)
        .then(pl.lit(""))
        .otherwise(pl.col("sep"))
    )
    local = pl.concat_str([pl.col("f"), sep, pl.col("l"), pl.col("num")])
    local = pl.when(gmail & pl.col("plus")).then(local + "+newsletter").otherwise(local)
    email = pl.concat_str([local, pl.lit("@"), pl.col("d")])
    email = (
        pl.when(pl.col("case") == 1)
        .then(email.str.to_uppercase())
        .when(pl.col("case") == 2)
        .then(email.str.to_titlecase())
        .when(pl.col("case") == 3)
        .then(pl.concat_str([pl.lit(" "), email, pl.lit("\t")]))
        .otherwise(email)
    )
    return frame.select(email.alias("email")).to_series()


def write_side(path: Path, person: np.ndarray, only_mine: np.ndarray, seed: int) -> None:
    """Write ``person``'s emails shuffled, breaking a few that belong to this side only."""
    rng = np.random.default_rng(seed)
    emails = people_emails(person, rng)
    broken = only_mine & (rng.random(len(person)) < INVALID_SHARE / 0.5)
    emails = pl.select(
        pl.when(pl.Series(broken)).then(emails.str.replace("@", " at ")).otherwise(emails)
    ).to_series()
    order = rng.permutation(len(person))
    pl.DataFrame({"email": emails.gather(order)}).write_parquet(path)


def generate(directory: Path, rows: int, seed: int) -> None:
    half = rows // 2
    left = np.arange(rows, dtype=np.int64)  # people 0 .. rows-1
    right = np.arange(half, half + rows, dtype=np.int64)  # overlap: people half .. rows-1
    write_side(directory / "left.parquet", left, left < half, seed)
    write_side(directory / "right.parquet", right, right >= rows, seed + 1)


def generate_in_child(directory: Path, rows: int, seed: int) -> None:
    subprocess.run(
        [sys.executable, __file__, "--generate-only", str(directory), "--rows", str(rows),
         "--seed", str(seed)],
        check=True,
    )  # fmt: skip


# --- the timed alignment ---------------------------------------------------------------------


def exchange(tokens: KeyedTokens, batch_rows: int, codec: Codec) -> tuple[KeyedTokens, int, int]:
    """Encode the tokens in batches, decode them as the receiver would; (received, bytes, msgs)."""
    frames = [
        codec.encode(
            SaltedTokens(key_id=tokens.key_id, offset=i, tokens=tokens.tokens[i : i + batch_rows])
        )
        for i in range(0, len(tokens.tokens), batch_rows)
    ]
    received = [codec.decode(frame) for frame in frames]
    if any(m.key_id != tokens.key_id for m in received):  # type: ignore[attr-defined]
        raise SystemExit("key id changed in transit")
    parts = [m.tokens for m in sorted(received, key=lambda m: m.offset)]  # type: ignore[attr-defined]
    merged = np.concatenate(parts) if parts else np.empty((0, TOKEN_BYTES), np.uint8)
    return KeyedTokens(tokens.key_id, merged), sum(map(len, frames)), len(frames)


def align(directory: Path, rows: int, batch_rows: int) -> dict:
    phases: dict[str, float] = {}
    started = time.perf_counter()

    t = time.perf_counter()
    left_raw = pl.read_parquet(directory / "left.parquet", columns=["email"]).to_series()
    right_raw = pl.read_parquet(directory / "right.parquet", columns=["email"]).to_series()
    phases["read"] = time.perf_counter() - t

    t = time.perf_counter()
    left = normalize_ids(left_raw, kind="email", scheme="uid2")
    right = normalize_ids(right_raw, kind="email", scheme="uid2")
    phases["normalize"] = time.perf_counter() - t
    del left_raw, right_raw

    t = time.perf_counter()
    key = derive_key(new_federation_secret(), "bench-salted-hash-align")
    left_rows = np.flatnonzero(left.values.is_not_null().to_numpy())
    right_rows = np.flatnonzero(right.values.is_not_null().to_numpy())
    left_tokens = KeyedTokens(key.key_id, hmac_tokens(left.values.drop_nulls(), key))
    right_tokens = KeyedTokens(key.key_id, hmac_tokens(right.values.drop_nulls(), key))
    phases["hmac"] = time.perf_counter() - t
    hashed = len(left_rows) + len(right_rows)

    t = time.perf_counter()
    codec = Codec(types=_TYPES)  # the default limits: 64 MB and 8M array elements a message
    received, wire_bytes, messages = exchange(right_tokens, batch_rows, codec)
    phases["exchange"] = time.perf_counter() - t
    del right_tokens

    t = time.perf_counter()
    li, ri = intersect_tokens(left_tokens, received)
    matched_left, matched_right = left_rows[li], right_rows[ri]
    phases["join"] = time.perf_counter() - t

    total = time.perf_counter() - started
    if len(matched_left) != rows // 2 or len(np.unique(matched_left)) != len(matched_left):
        raise SystemExit(f"wrong intersection: {len(matched_left)} rows, expected {rows // 2}")
    if not left.values.gather(matched_left).equals(right.values.gather(matched_right)):
        raise SystemExit("matched rows do not hold the same normalised email")
    return {
        "matched": int(len(matched_left)),
        "expected_matches": rows // 2,
        "invalid": {"left": left.invalid, "right": right.invalid},
        "duplicates": {"left": left.duplicates, "right": right.duplicates},
        "phases_s": {k: round(v, 3) for k, v in phases.items()},
        "total_s": round(total, 3),
        "rows_per_s": round(2 * rows / total),
        "hmac_rows_per_s": round(hashed / phases["hmac"]),
        "normalize_rows_per_s": round(2 * rows / phases["normalize"]),
        "exchange": {
            "messages": messages,
            "batch_rows": batch_rows,
            "bytes": wire_bytes,
            "max_elements": DEFAULT_MAX_ELEMENTS,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="emails per side")
    parser.add_argument("--batch-rows", type=int, default=DEFAULT_MAX_ELEMENTS // TOKEN_BYTES)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dir", type=Path, help="keep the Parquet files here (reused if present)")
    parser.add_argument("--generate-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rows < 2 or args.rows % 2:
        parser.error("--rows must be an even number >= 2")
    if args.generate_only:
        generate(args.generate_only, args.rows, args.seed)
        return

    with tempfile.TemporaryDirectory(prefix="cdp-salted-align-") as tmp:
        directory = args.dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        gen_started = time.perf_counter()
        marker = directory / f"generated-{args.rows}-{args.seed}"
        if not marker.exists():
            generate_in_child(directory, args.rows, args.seed)
            marker.touch()
        generated_s = time.perf_counter() - gen_started
        sizes = {p.name: p.stat().st_size for p in sorted(directory.glob("*.parquet"))}
        load_before = os.getloadavg()
        result = align(directory, args.rows, args.batch_rows)
        load_after = os.getloadavg()

    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {
        "benchmark": "salted_hash_align",
        "rows_per_side": args.rows,
        "overlap": 0.5,
        **result,
        "goal_s": GOAL_SECONDS,
        "goal_met": result["total_s"] < GOAL_SECONDS,
        "peak_rss_mib": round(peak_rss_mib),
        "parquet_bytes": sizes,
        "generate_s_untimed": round(generated_s, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "polars_threads": pl.thread_pool_size(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
