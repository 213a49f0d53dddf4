"""Ingest throughput: N Segment events through `cdp-fl ingest` into SQLite (or --db URL).

Generates the demo's realistic scenario (identify/track/page/group/alias events, consent in
several formats, a few invalid lines and duplicates) scaled to at least --events events, then runs
the real command in a child process and reports events/s and the command's peak RSS as JSON:

    .venv/bin/python benchmarks/ingest.py --events 1000000

The input is generated in a separate process, so that this process stays small: a child's peak
RSS as the kernel reports it includes the memory of the process that spawned it, so spawning the
command from a process holding the generator's ~2 GB would report that instead of the command's.
The command's own peak RSS is read from ``wait4`` for that child alone. With ``--repeat N`` the
command runs N times (a fresh database each time) and the median run is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_input(directory: Path, events: int) -> tuple[Path, int]:
    from cdp_federated.demo_data import generate_scenario

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


def _generate_in_child(directory: Path, events: int) -> tuple[Path, int]:
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[3]); "
        "from ingest import build_input; "
        "p, n = build_input(Path(sys.argv[1]), int(sys.argv[2])); print(json.dumps([str(p), n]))"
    )
    here = str(Path(__file__).resolve().parent)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(directory), str(events), here],
        capture_output=True,
        text=True,
        check=True,
    )
    path, lines = json.loads(proc.stdout.strip().splitlines()[-1])
    return Path(path), int(lines)


def _run_and_measure(argv: list[str]) -> tuple[float, dict, float]:
    """Run ``argv``; wall seconds, its JSON output and its own peak RSS (MiB, from wait4)."""
    read_fd, write_fd = os.pipe()
    started = time.perf_counter()
    pid = os.posix_spawn(
        argv[0],
        argv,
        os.environ,
        file_actions=[(os.POSIX_SPAWN_DUP2, write_fd, 1), (os.POSIX_SPAWN_CLOSE, read_fd)],
    )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as out:
        stdout = out.read()
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"ingest failed with status {status}")
    return wall, json.loads(stdout), usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--db", help="SQLAlchemy URL (default: a fresh SQLite file per run)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs (the median one is reported); with --db they all ingest into that database",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        started = time.perf_counter()
        path, lines = _generate_in_child(tmpdir, args.events)
        generate_seconds = time.perf_counter() - started
        # The generator just wrote ~1.2 GB; let the kernel flush it now rather than during the
        # timed run, whose own database writes would queue behind it.
        os.sync()
        cli = str(Path(sys.executable).with_name("cdp-fl"))
        runs = []
        for i in range(max(1, args.repeat)):
            db = args.db or f"sqlite:///{tmpdir / f'bench{i}.sqlite'}"
            wall, result, peak_mb = _run_and_measure(
                [cli, "ingest", str(path), "--db", db, "--json"]
            )
            runs.append((wall, result, peak_mb))
            if not args.db:
                for suffix in ("", "-wal", "-shm"):
                    (tmpdir / f"bench{i}.sqlite{suffix}").unlink(missing_ok=True)
        walls = [run[0] for run in runs]
        wall, result, peak_mb = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
        report = {
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
            "peak_rss_mb": round(peak_mb, 1),
        }
        if len(runs) > 1:
            report["runs_wall_seconds"] = [round(w, 2) for w in walls]
            report["median_wall_seconds"] = round(statistics.median(walls), 2)
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
