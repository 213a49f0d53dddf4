"""Ingest throughput: N Segment events through `cdp-fl ingest` into SQLite (or --db URL).

Generates the demo's realistic scenario (identify/track/page/group/alias events, consent in
several formats, a few invalid lines and duplicates) scaled to at least --events events, then runs
the real command in a child process and reports events/s and the child's peak RSS as JSON:

    .venv/bin/python benchmarks/ingest.py --events 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cdp_federated.demo_data import generate_scenario


def build_input(directory: Path, events: int) -> tuple[Path, int]:
    customers = 2000
    while True:
        scenario = generate_scenario(directory / f"gen{customers}", customers=customers, seed=11)
        total = sum(scenario.events_per_region.values())
        if total >= events:
            break
        customers = int(customers * events / max(total, 1) * 1.05) + 1
    path = directory / "events.jsonl"
    with path.open("wb") as out:
        for region_file in scenario.region_files.values():
            out.write(region_file.read_bytes())
    lines = sum(1 for line in path.open("rb") if line.strip())
    return path, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--db", help="SQLAlchemy URL (default: a fresh SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        started = time.perf_counter()
        path, lines = build_input(tmpdir, args.events)
        generate_seconds = time.perf_counter() - started
        db = args.db or f"sqlite:///{tmpdir / 'bench.sqlite'}"
        cli = Path(sys.executable).with_name("cdp-fl")
        started = time.perf_counter()
        proc = subprocess.run(
            [str(cli), "ingest", str(path), "--db", db, "--json"], capture_output=True, text=True
        )
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            sys.exit(f"ingest failed: {proc.stderr}")
        result = json.loads(proc.stdout)
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        print(
            json.dumps(
                {
                    "benchmark": "ingest",
                    "events": lines,
                    "input_bytes": path.stat().st_size,
                    "database": "sqlite" if db.startswith("sqlite") else db.split(":", 1)[0],
                    "generate_seconds": round(generate_seconds, 2),
                    "wall_seconds": round(wall, 2),
                    "events_per_second": round(lines / wall, 1),
                    "command_seconds": result["seconds"],
                    "applied": result["applied"],
                    "duplicates": result["duplicates"],
                    "dead_lettered": result["dead_lettered"],
                    "profiles": result["profiles"],
                    "peak_rss_mb": round(peak_kb / 1024, 1),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
