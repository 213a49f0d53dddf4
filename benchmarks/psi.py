"""Private set intersection: ours (ECDH over X25519) against OpenMined PSI, side by side. JSON out.

    .venv/bin/python benchmarks/psi.py                       # 100,000 x 100,000 emails, 50% overlap
    .venv/bin/python benchmarks/psi.py --rows 1000000 --no-competitor

Both sides get the same two files of normalised emails (one per line). Each contender runs as its
own child process and is timed from the parent, interpreter start-up and imports included:

* **ours**: the whole ``cdp-fl align --method psi`` command (reading the CSVs, normalising the
  emails, both parties' PSI, the JSON summary) when it exists, ``--command`` overriding it; else
  a child interpreter that imports ``cdp_federated``, reads the files and calls
  :func:`cdp_federated.identity.psi.run_psi` (both parties, two worker processes). The output
  says which was timed, and reports interpreter start-up on its own as well.
* **openmined**: ``_openmined_psi.py`` inside ``benchmarks/.venvs/openmined-psi`` (created once,
  ``openmined-psi==2.0.6`` pinned, never in the product's environment).

``bytes`` are the protocol messages, each counted once (ours: the codec frames each party
produced; OpenMined: the serialised setup, request and response). ``--micro`` (default on) also
measures single-core scalar multiplications per second of X25519 (``cryptography``) and of
ristretto255 (libsodium through ``rbcl``, in a throwaway ``benchmarks/.venvs/rbcl``). The machine
may be shared: the load average is reported before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENVS = HERE / ".venvs"
OPENMINED_PIN = "openmined-psi==2.0.6"
RBCL_PIN = "rbcl==1.1.2"
ALIGN_TEMPLATE = (
    "{cdp_fl} align --method psi --left left={left} --right right={right} --key email --json"
)

FIRST = ["anna", "ben", "chloe", "dev", "elena", "farid", "grace", "hugo", "ines", "jamal"]
LAST = ["smith", "garcia", "ng", "okafor", "rossi", "kowalski", "tanaka", "dubois", "silva"]
DOMAINS = ["gmail.com", "yahoo.com", "outlook.com", "example.org", "shop.co.uk", "mail.de"]


def email(i: int) -> str:
    h = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=8).digest()
    first, last, domain = FIRST[h[0] % 10], LAST[h[1] % 9], DOMAINS[h[2] % 6]
    return f"{first}.{last}{i}@{domain}"


def write_inputs(directory: Path, rows: int) -> tuple[Path, Path, int]:
    """Left holds ids 0..rows-1, right rows/2..rows*3/2-1 (50% overlap), each in a hashed order."""
    left_ids = sorted(range(rows), key=lambda i: email(i)[::-1])
    right_ids = sorted(range(rows // 2, rows // 2 + rows), key=lambda i: email(i)[::-1])
    left, right = directory / "left.csv", directory / "right.csv"
    left.write_text("email\n" + "\n".join(map(email, left_ids)) + "\n", encoding="utf-8")
    right.write_text("email\n" + "\n".join(map(email, right_ids)) + "\n", encoding="utf-8")
    return left, right, rows - rows // 2


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(cmd: list) -> dict:
    """Run ``cmd``: wall and CPU seconds (user + system, the child and every process it waited
    for, such as its worker pool), its peak RSS in MB, its stdout and the load average after."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise SystemExit(
            f"{shlex.join(map(str, cmd))} failed ({proc.returncode}):\n{stderr[-3000:]}"
        )
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss_mb": usage.ru_maxrss // 1024,
        "stdout": stdout,
        "load": load()[0],
    }


def summarise(runs: list[dict]) -> dict:
    """Median wall (and the CPU of that run), fastest wall, every run's wall and 1-min load."""
    ordered = sorted(runs, key=lambda r: r["wall"])
    median = ordered[len(ordered) // 2]
    return {
        "wall_seconds": round(median["wall"], 3),
        "cpu_seconds": round(median["cpu"], 3),
        "wall_seconds_min": round(ordered[0]["wall"], 3),
        "runs": [{"wall": round(r["wall"], 2), "load_1min_after": r["load"]} for r in runs],
        "peak_rss_mb": max(r["rss_mb"] for r in runs),
    }


def venv(name: str, pin: str, module: str) -> Path:
    """``benchmarks/.venvs/<name>`` with exactly ``pin`` installed; returns its python."""
    root = VENVS / name
    python = root / "bin" / "python"
    package, version = pin.split("==")
    check = f"import importlib.metadata as m; print(m.version({package!r}))"
    if python.exists():
        found = subprocess.run([python, "-c", check], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == version:
            return python
        shutil.rmtree(root)
    VENVS.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", root], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", pin], check=True)
    subprocess.run([python, "-c", f"import {module}"], check=True)
    return python


# --- ours ----------------------------------------------------------------------------------------


def child_run(left: str, right: str, reveal: str, workers: int, batch_size: int) -> None:
    """Inside the timed child: what ``cdp-fl align --method psi`` would do, minus its CLI."""
    started = time.perf_counter()
    import polars as pl

    from cdp_federated.identity.psi import run_psi

    imported = time.perf_counter()
    left_ids, right_ids = (
        pl.read_csv(path, schema={"email": pl.String})["email"] for path in (left, right)
    )
    result = run_psi(
        left_ids,
        right_ids,
        reveal_to=tuple(reveal.split(",")),
        workers=workers,
        batch_size=batch_size,
    )
    print(
        json.dumps(
            {
                "intersection_size": result.intersection_size,
                "bytes": result.bytes_exchanged,
                "frames": result.frames,
                "protocol_seconds": round(result.seconds, 3),
                "import_seconds": round(imported - started, 3),
            }
        )
    )


def ours_command(args: argparse.Namespace, left: Path, right: Path) -> tuple[list, str, bool]:
    cdp_fl = Path(sys.executable).parent / "cdp-fl"
    has_align = (
        cdp_fl.exists()
        and subprocess.run([cdp_fl, "align", "--help"], capture_output=True).returncode == 0
    )
    if args.command or has_align:
        template = args.command or ALIGN_TEMPLATE
        cmd = shlex.split(template.format(cdp_fl=cdp_fl, left=left, right=right))
        return cmd, f"command: {shlex.join(cmd)}", True
    cmd = [sys.executable, __file__, "--child", left, right, "--reveal", args.reveal]
    cmd += ["--workers", str(args.workers), "--batch-size", str(args.batch_size)]
    what = (
        "run_psi in a child interpreter (cdp-fl align is not available): start-up, imports, "
        "reading both files and the whole protocol with both parties"
    )
    return cmd, what, False


def ours_report(runs: list[dict], what: str, is_command: bool) -> dict:
    try:
        detail = json.loads(runs[-1]["stdout"])
    except ValueError:
        detail = {"stdout": runs[-1]["stdout"][-500:]}
    if "bytes_exchanged" in detail:  # the command's own summary
        detail["bytes"] = detail.pop("bytes_exchanged")
        detail["command_seconds"] = detail.pop("seconds", None)
    report = {"timed": what, **summarise(runs)}
    startup = timed([sys.executable, "-c", "import cdp_federated.identity.psi"])["wall"]
    report["interpreter_startup_and_psi_import_seconds"] = round(startup, 3)
    if is_command:
        cdp_fl = Path(sys.executable).parent / "cdp-fl"
        report["cdp_fl_align_help_seconds"] = round(timed([cdp_fl, "align", "--help"])["wall"], 3)
    return {**report, **detail}


def openmined_command(left: Path, right: Path, fpr: float) -> list:
    python = venv("openmined-psi", OPENMINED_PIN, "private_set_intersection.python")
    return [python, HERE / "_openmined_psi.py", left, right, "--header", "--fpr", str(fpr)]


def openmined_report(runs: list[dict]) -> dict:
    detail = json.loads(runs[-1]["stdout"].strip().splitlines()[-1])
    detail["bytes_by_message"] = detail["bytes"]
    detail["bytes"] = detail["bytes"]["total"]
    return {"timed": "_openmined_psi.py in its own venv", **summarise(runs), **detail}


# --- micro-benchmarks ------------------------------------------------------------------------------

X25519_MICRO = """
import hashlib, json, os, time
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
n = {n}
us = [hashlib.sha256(b"u%d" % i).digest() for i in range(n)]
exchange = X25519PrivateKey.from_private_bytes(os.urandom(32)).exchange
point = X25519PublicKey.from_public_bytes
best = 0.0
for _ in range(3):
    t = time.perf_counter()
    out = [exchange(point(u)) for u in us]
    best = max(best, n / (time.perf_counter() - t))
print(json.dumps({{"mults_per_second": round(best)}}))
"""

RISTRETTO_MICRO = """
import hashlib, json, time
import rbcl
n = {n}
points = [rbcl.crypto_core_ristretto255_from_hash(hashlib.sha512(b"u%d" % i).digest())
          for i in range(n)]
scalar = rbcl.crypto_core_ristretto255_scalar_random()
mult = rbcl.crypto_scalarmult_ristretto255
best = hash_best = 0.0
for _ in range(3):
    t = time.perf_counter()
    out = [mult(scalar, p) for p in points]
    best = max(best, n / (time.perf_counter() - t))
    t = time.perf_counter()
    out = [rbcl.crypto_core_ristretto255_from_hash(hashlib.sha512(b"u%d" % i).digest())
           for i in range(n)]
    hash_best = max(hash_best, n / (time.perf_counter() - t))
print(json.dumps({{"mults_per_second": round(best), "from_hash_per_second": round(hash_best)}}))
"""


def micro(n: int) -> dict:
    rbcl_python = venv("rbcl", RBCL_PIN, "rbcl")
    out: dict = {"n": n, "note": "single core, best of 3, alternating X25519 and ristretto255"}
    for name, python, code in (
        ("x25519_cryptography", sys.executable, X25519_MICRO),
        ("ristretto255_rbcl", str(rbcl_python), RISTRETTO_MICRO),
    ):
        out[name] = json.loads(timed([python, "-c", code.format(n=n)])["stdout"])
    out["x25519_over_ristretto255"] = round(
        out["x25519_cryptography"]["mults_per_second"]
        / out["ristretto255_rbcl"]["mults_per_second"],
        2,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--competitor", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--micro", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, interleaved")
    parser.add_argument("--reveal", default="left", help="left, right or left,right")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--fpr", type=float, default=1e-9)
    parser.add_argument(
        "--command", help=f"override the timed command (default {ALIGN_TEMPLATE!r})"
    )
    parser.add_argument("--child", nargs=2, metavar=("LEFT", "RIGHT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_run(*args.child, args.reveal, args.workers, args.batch_size)
        return

    report: dict = {
        "benchmark": "psi",
        "rows": args.rows,
        "overlap": 0.5,
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "load_average_before": load(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        left, right, overlap = write_inputs(Path(tmp), args.rows)
        report["expected_intersection"] = overlap
        if args.micro:
            report["micro"] = micro(20_000)
        ours_cmd, what, is_command = ours_command(args, left, right)
        theirs_cmd = openmined_command(left, right, args.fpr) if args.competitor else None
        ours_runs, theirs_runs = [], []
        for _ in range(args.repeat):  # interleaved, so both see the same background load
            if theirs_cmd is not None:
                theirs_runs.append(timed(theirs_cmd))
            ours_runs.append(timed(ours_cmd))
        if theirs_runs:
            report["openmined"] = openmined_report(theirs_runs)
        report["ours"] = ours = ours_report(ours_runs, what, is_command)
    if ours.get("intersection_size") not in (None, overlap):
        raise SystemExit(f"wrong intersection size: {ours.get('intersection_size')} != {overlap}")
    if theirs_runs:
        theirs = report["openmined"]
        if theirs["intersection_size"] != overlap:
            raise SystemExit(f"OpenMined found {theirs['intersection_size']} != {overlap}")
        report["speedup_wall"] = round(theirs["wall_seconds"] / ours["wall_seconds"], 2)
        report["speedup_wall_min"] = round(theirs["wall_seconds_min"] / ours["wall_seconds_min"], 2)
        report["cpu_ratio_openmined_over_ours"] = round(
            theirs["cpu_seconds"] / ours["cpu_seconds"], 2
        )
        if ours.get("bytes"):
            report["bytes_ratio_ours_over_openmined"] = round(ours["bytes"] / theirs["bytes"], 3)
    report["load_average_after"] = load()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
