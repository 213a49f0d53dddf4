"""Peak memory of one party training logistic regression in float32 on a large Parquet file. JSON out.

    .venv/bin/python benchmarks/horizontal_memory.py                    # 5,000,000 x 50
    .venv/bin/python benchmarks/horizontal_memory.py --rows 500000 --rounds 2

The parent writes ``train.parquet`` (``--rows`` x 50 float32 features, an int8 label and a string
``profile_id``, in chunks of ``--chunk-rows`` through pyarrow's writer, so the parent never holds
the whole table) and a 50,000-row ``test.parquet`` into a temporary directory. Each measured
child then runs the whole job (one participant, in-process transport, ``params.dtype =
"float32"``, ``--rounds`` rounds) and is measured by ``/usr/bin/time -v`` (its "Maximum resident
set size"; with no ``/usr/bin/time`` the script falls back to ``psutil`` polling every 50 ms and
says so in ``measured_by``). Variants:

* ``connector``: the product path, the first-party Parquet connector's ``scan()`` (the schema
  contract, ``profile_id`` included) handed to the agent as a LazyFrame;
* ``scan``: ``polars.scan_parquet`` of the file handed to the agent directly (no connector);
* ``baseline``: the same interpreter importing everything and reading nothing, for the floor.

Target (issue 6): peak RSS under 2.5x the float32 matrix (rows x 50 x 4 bytes: 1 GB at 5M rows).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FEATURES = tuple(f"f{j:02d}" for j in range(50))
TEST_ROWS = 50_000
TIME = "/usr/bin/time"


def write_parquet(path: Path, rows: int, chunk_rows: int, seed: int, part: int) -> None:
    """``rows`` rows of correlated float32 features and a logistic label, chunk by chunk. The
    model (weights, scales) comes from ``seed`` alone, the rows from ``(seed, part)``."""
    import polars as pl
    import pyarrow.parquet as pq

    model = np.random.default_rng(seed)
    d = len(FEATURES)
    beta = model.normal(0.0, 0.3, d).astype(np.float32)
    units = model.lognormal(0.5, 1.0, d).astype(np.float32)
    rng = np.random.default_rng([seed, part])
    writer = None
    try:
        for start in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - start)
            common = rng.standard_normal((n, 1), dtype=np.float32)
            latent = rng.standard_normal((n, d), dtype=np.float32) + 0.5 * common
            y = rng.random(n, dtype=np.float32) < 1 / (1 + np.exp(-(latent @ beta - 1.0)))
            frame = pl.DataFrame(
                {
                    "profile_id": pl.int_range(start, start + n, eager=True).cast(pl.String),
                    **{name: latent[:, j] * units[j] for j, name in enumerate(FEATURES)},
                    "label": y.astype(np.int8),
                }
            )
            table = frame.to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


# --- the measured child ---------------------------------------------------------------------------


def child(variant: str, train: Path, test: Path, rounds: int, dtype: str) -> dict:
    started = time.perf_counter()
    import polars as pl

    from cdp_federated.connector import ConnectorConfig, ConnectorRegistry
    from cdp_federated.coordinator.runner import run_horizontal
    from cdp_federated.federation.transport import InProcessTransport
    from cdp_federated.jobs import JobSpec
    from cdp_federated.participant import ParticipantAgent
    from cdp_federated.plugins import make_plugin_manager

    if variant == "baseline":
        return {"seconds": round(time.perf_counter() - started, 3)}
    paths = {"train": train, "test": test}
    if variant == "connector":
        registry = ConnectorRegistry(make_plugin_manager())
        connectors = {
            split: registry.open(
                ConnectorConfig(
                    type="parquet", name=split, path=str(p), features=FEATURES, label="label"
                )
            )
            for split, p in paths.items()
        }

        def provider(_job, split):
            return connectors[split].scan()
    else:

        def provider(_job, split):
            return pl.scan_parquet(paths[split])

    job = JobSpec(
        job_id="memory-bench",
        kind="horizontal",
        model="logreg",
        purpose="model_training",
        features=FEATURES,
        label="label",
        rounds=rounds,
        params={"C": 1.0, "dtype": dtype},
    )
    agent = ParticipantAgent("big-party", provider)
    result = run_horizontal(job, InProcessTransport({"big-party": agent.handle}))
    held = getattr(agent, "_data", {}).get("train")  # diagnostic only: what the agent kept
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "auc": round(float(result.auc), 6),
        "rounds": result.rounds,
        "train_rows": result.rows_per_party["big-party"]["train"],
        "agent_matrix": None
        if held is None
        else {"dtype": str(held.x.dtype), "mb": round(held.x.nbytes / 2**20, 1)},
    }


# --- the parent ------------------------------------------------------------------------------------


def measured(cmd: list[str]) -> tuple[dict, int, str]:
    """Run ``cmd``; returns its JSON, its peak RSS in KiB and how that was measured."""
    if os.access(TIME, os.X_OK):
        proc = subprocess.run([TIME, "-v", *cmd], capture_output=True, text=True)
        found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        if proc.returncode != 0 or not found:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1]), int(found.group(1)), TIME + " -v"
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1]), peak // 1024, "psutil polling, 50 ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--chunk-rows", type=int, default=250_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--variants", default="baseline,scan,connector", help="comma-separated, run in order"
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("VARIANT", "TRAIN", "TEST"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        variant, train, test = args.child
        print(json.dumps(child(variant, Path(train), Path(test), args.rounds, args.dtype)))
        return

    matrix_bytes = args.rows * len(FEATURES) * 4
    report: dict = {
        "benchmark": "horizontal_memory",
        "rows": args.rows,
        "features": len(FEATURES),
        "dtype": args.dtype,
        "rounds": args.rounds,
        "float32_matrix_mb": round(matrix_bytes / 2**20, 1),
        "target_peak_rss_mb": round(2.5 * matrix_bytes / 2**20, 1),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    tmp = Path(tempfile.mkdtemp(prefix="hmemory-"))
    try:
        started = time.perf_counter()
        write_parquet(tmp / "train.parquet", args.rows, args.chunk_rows, args.seed, 0)
        write_parquet(tmp / "test.parquet", TEST_ROWS, args.chunk_rows, args.seed, 1)
        report["parquet_mb"] = round((tmp / "train.parquet").stat().st_size / 2**20, 1)
        report["write_seconds"] = round(time.perf_counter() - started, 1)
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--child", variant, str(tmp / "train.parquet")]
            cmd += [str(tmp / "test.parquet"), "--rounds", str(args.rounds), "--dtype", args.dtype]
            out, peak_kib, how = measured(cmd)
            peak = peak_kib * 1024
            report[variant] = {
                **out,
                "peak_rss_mb": round(peak / 2**20, 1),
                "peak_over_matrix": round(peak / matrix_bytes, 3),
            }
            report["measured_by"] = how
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    floor = report.get("baseline", {}).get("peak_rss_mb")
    for variant in ("scan", "connector"):
        if variant in report:
            report[variant]["under_2.5x_matrix"] = report[variant]["peak_over_matrix"] < 2.5
            if floor is not None:  # what reading and training add on top of the imports
                extra = (report[variant]["peak_rss_mb"] - floor) * 2**20
                report[variant]["above_baseline_over_matrix"] = round(extra / matrix_bytes, 3)
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
