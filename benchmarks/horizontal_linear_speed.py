"""Horizontal logistic regression: ours against a plain numpy loop and Flower, side by side. JSON out.

    .venv/bin/python benchmarks/horizontal_linear_speed.py          # 10 x 100,000 and 100 x 10,000
    .venv/bin/python benchmarks/horizontal_linear_speed.py --configs 10x20000 --no-flower
    .venv/bin/python benchmarks/horizontal_linear_speed.py --configs 10x20000 --profile
    .venv/bin/python benchmarks/horizontal_linear_speed.py --threads 1   # one BLAS thread each (busy machine)

The job: 50 features, ``--rounds`` (20) rounds of FedAvg weighted by sample counts, each party
taking ``--local-steps`` (5) full-batch gradient steps per round from the global model, L2 with
scikit-learn's ``C``. Every contender does the same arithmetic:

1. global mean and population standard deviation from the parties' pooled moments;
2. the preconditioner ``P = B^-1`` with ``B = [[cov(z)/4 + I/(C N), 0], [0, 1/4]]`` (the
   product's curvature bound: see ``cdp_federated.learning.logreg.preconditioner``);
3. per round and party, ``local_steps`` times ``theta -= P grad`` on
   ``mean logloss(z theta) + ||w||^2 / (2 C N)``, then the average weighted by rows.

Contenders, each in its own child process, timed inside it once its data is in memory:

* **ours**: :func:`cdp_federated.coordinator.runner.run_horizontal` over
  :class:`~cdp_federated.federation.transport.InProcessTransport` (every message through the binary
  codec), one :class:`~cdp_federated.participant.ParticipantAgent` per party fed a polars frame.
  The time includes the agents' polars -> numpy conversion, the moments stage and the final
  evaluation of the test split (score histograms; the train split too with
  ``--evaluate-train``), which the others do not do;
  ``participant_seconds`` splits it by request type, the rest is coordinator and codec.
* **plain**: one numpy loop over in-memory arrays (steps 1-3 and the test scores), the
  standardised matrices in numpy's default C order; **plain_fortran**: the same loop over
  Fortran-ordered copies (the layout the product's agent keeps), which is faster for the
  matrix-vector products while a party's rows fit in cache. Ours is compared with the faster.
* **flower**: ``flwr[simulation]==1.42.*`` in ``benchmarks/.venvs/flower`` (created on first use),
  running ``_flower_job.py``: Message-API ClientApps and Flower's ``FedAvg``, one virtual SuperNode
  per party. It is handed the mean, scale and preconditioner (no moments pass) and skips
  evaluation; its time is ``run_simulation``'s wall time, Ray start-up included.

AUCs are on a held-out test set (a tenth as many rows again per party, pooled), computed by
scikit-learn from each contender's final model. The data are synthetic and seeded: correlated,
differently scaled features with a per-party shift and base rate (non-IID). The machine may be
shared: the load average is reported before and after each configuration, and so is each
contender's process CPU time (``cpu_seconds``; ``ratio_ours_over_best_plain_cpu`` compares the
fewest of the runs), which contention moves far less than wall time. With ``--threads 1`` it
stands for the wall time of a quiet machine; with several BLAS threads it adds theirs up.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENVS = HERE / ".venvs"
FLOWER_PIN = "flwr[simulation]==1.42.*"
FEATURES = 50
C = 1.0


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- data ----------------------------------------------------------------------------------------


def write_data(directory: Path, parties: int, rows: int, seed: int) -> None:
    """Party ``k``: ``x_k``/``y_k`` (train) and ``xt_k``/``yt_k`` (test, rows // 10) as .npy."""
    rng = np.random.default_rng(seed)
    d = FEATURES
    mixing = np.linalg.cholesky(0.3 * np.ones((d, d)) + 0.7 * np.eye(d))
    beta = rng.normal(0.0, 0.35, d)
    units = rng.lognormal(1.0, 1.5, d)  # scales from ~0.1 to ~100: standardisation matters
    offsets = rng.normal(0.0, 50.0, d)
    for k in range(parties):
        shift = rng.normal(0.0, 0.5, d)
        base = rng.normal(-1.0, 0.5)
        for prefix, n in (("", rows), ("t", max(rows // 10, 10))):
            latent = rng.standard_normal((n, d)) @ mixing.T + shift
            p = 1.0 / (1.0 + np.exp(-(latent @ beta + base)))
            y = (rng.random(n) < p).astype(np.float64)
            np.save(directory / f"x{prefix}_{k}.npy", offsets + units * latent)
            np.save(directory / f"y{prefix}_{k}.npy", y)


def party_files(directory: Path, parties: int, prefix: str = "") -> list[tuple[Path, Path]]:
    return [
        (directory / f"x{prefix}_{k}.npy", directory / f"y{prefix}_{k}.npy") for k in range(parties)
    ]


# --- the arithmetic, in plain numpy ---------------------------------------------------------------


def standardisation(xs: list[np.ndarray], c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Global mean, population std (1 for constant columns) and the preconditioner, from each
    party's count, sums and centred scatter (the parallel-variance identity)."""
    counts = [x.shape[0] for x in xs]
    total = sum(counts)
    sums = [x.sum(axis=0) for x in xs]
    mean = np.sum(sums, axis=0) / total
    scatter = np.zeros((mean.size, mean.size))
    for x, n, s in zip(xs, counts, sums, strict=True):
        centred = x - s / n
        delta = s / n - mean
        scatter += centred.T @ centred + n * np.outer(delta, delta)
    cov = scatter / total
    variance = np.diag(cov).copy()
    scale = np.where(variance > 0, np.sqrt(np.clip(variance, 0, None)), 1.0)
    d = mean.size
    bound = np.zeros((d + 1, d + 1))
    bound[:d, :d] = 0.25 * cov / np.outer(scale, scale) + np.eye(d) / (c * total)
    bound[d, d] = 0.25
    return mean, scale, np.linalg.inv(bound)


def plain_run(
    xs: list[np.ndarray],
    ys: list[np.ndarray],
    x_test: np.ndarray,
    *,
    rounds: int,
    local_steps: int,
    c: float,
    learning_rate: float,
    order: str = "C",
) -> tuple[np.ndarray, np.ndarray]:
    """The whole job as one loop: returns the final parameters and the test scores."""
    mean, scale, precond = standardisation(xs, c)
    zs = [np.asarray((x - mean) / scale, order=order) for x in xs]
    total = sum(z.shape[0] for z in zs)
    lam = 1.0 / (c * total)
    theta = np.zeros(FEATURES + 1)
    for _ in range(rounds):
        average = np.zeros_like(theta)
        for z, y in zip(zs, ys, strict=True):
            local, n = theta.copy(), z.shape[0]
            for step in range(local_steps):
                s = z @ local[:-1] + local[-1]
                if step == 0:  # the round's training loss, as ours reports it
                    _ = np.logaddexp(0.0, (1.0 - 2.0 * y) * s).mean()
                r = 0.5 * (1.0 + np.tanh(0.5 * s)) - y
                grad = np.empty_like(local)
                grad[:-1] = z.T @ r / n + lam * local[:-1]
                grad[-1] = r.sum() / n
                local -= learning_rate * (precond @ grad)
            average += n * local
        theta = average / total
    return theta, ((x_test - mean) / scale) @ theta[:-1] + theta[-1]


# --- children ------------------------------------------------------------------------------------


def child_plain(directory: Path, cfg: dict, order: str) -> dict:
    xs = [np.load(x) for x, _ in party_files(directory, cfg["parties"])]
    ys = [np.load(y) for _, y in party_files(directory, cfg["parties"])]
    x_test = np.concatenate([np.load(x) for x, _ in party_files(directory, cfg["parties"], "t")])
    started, cpu = time.perf_counter(), time.process_time()
    theta, scores = plain_run(
        xs,
        ys,
        x_test,
        rounds=cfg["rounds"],
        local_steps=cfg["local_steps"],
        c=cfg["C"],
        learning_rate=cfg["learning_rate"],
        order=order,
    )
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    name = "plain" if order == "C" else "plain_fortran"
    np.save(directory / f"theta_{name}.npy", theta)
    np.save(directory / f"scores_{name}.npy", scores)
    return {"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3)}


class _TimedHandler:
    """Wraps a participant's handler to add up its own compute time per request type."""

    def __init__(self, handle, totals: dict[str, float]) -> None:
        self.handle, self.totals = handle, totals

    def __call__(self, message):
        started = time.perf_counter()
        try:
            return self.handle(message)
        finally:
            key = message.TYPE
            self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - started


def child_ours(directory: Path, cfg: dict, profile: bool) -> dict:
    import polars as pl

    from cdp_federated.coordinator.runner import run_horizontal
    from cdp_federated.federation.transport import InProcessTransport
    from cdp_federated.jobs import JobSpec
    from cdp_federated.participant import ParticipantAgent

    names = [f"f{j:02d}" for j in range(FEATURES)]

    def frame(x_path: Path, y_path: Path) -> pl.DataFrame:
        return pl.from_numpy(np.load(x_path), schema=names).with_columns(
            label=pl.Series(np.load(y_path))
        )

    frames = {
        f"party{k:03d}": {
            "train": frame(*train),
            "test": frame(*test),
        }
        for k, (train, test) in enumerate(
            zip(
                party_files(directory, cfg["parties"]),
                party_files(directory, cfg["parties"], "t"),
                strict=True,
            )
        )
    }
    job = JobSpec(
        job_id="speed-bench",
        kind="horizontal",
        model="logreg",
        purpose="model_training",
        features=tuple(names),
        label="label",
        rounds=cfg["rounds"],
        params={
            "C": cfg["C"],
            "local_steps": cfg["local_steps"],
            "learning_rate": cfg["learning_rate"],
            "evaluate_train": cfg["evaluate_train"],
        },
    )
    totals: dict[str, float] = {}
    handlers = {
        name: _TimedHandler(
            ParticipantAgent(name, lambda _job, split, f=f: f[split]).handle, totals
        )
        for name, f in frames.items()
    }
    transport = InProcessTransport(handlers)
    profiler = cProfile.Profile() if profile else None
    started, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    result = run_horizontal(job, transport)
    if profiler:
        profiler.disable()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    x_test = np.concatenate([np.load(x) for x, _ in party_files(directory, cfg["parties"], "t")])
    np.save(directory / "theta_ours.npy", np.asarray(result.parameters, dtype=np.float64))
    np.save(directory / "scores_ours.npy", result.estimator.predict_proba(x_test)[:, 1])
    participant = sum(totals.values())
    out = {
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "participant_seconds": {k: round(v, 3) for k, v in sorted(totals.items())},
        "coordinator_and_codec_seconds": round(seconds - participant, 3),
        "auc_from_histograms": round(result.auc, 6),
        "rounds": result.rounds,
    }
    if profiler:
        out["profile"] = _top_functions(profiler)
    return out


def _top_functions(profiler: cProfile.Profile, limit: int = 30) -> list[str]:
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(limit)
    lines = [line.rstrip() for line in text.getvalue().splitlines()]
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return [line for line in lines[start:] if line.strip()]


# --- the parent ----------------------------------------------------------------------------------


def flower_python() -> Path:
    """``benchmarks/.venvs/flower`` with flwr 1.42 installed (created once)."""
    root = VENVS / "flower"
    python = root / "bin" / "python"
    check = "import importlib.metadata as m, ray; print(m.version('flwr'))"
    if python.exists():
        found = subprocess.run([python, "-c", check], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip().startswith("1.42."):
            return python
        shutil.rmtree(root)
    VENVS.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", root], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", FLOWER_PIN], check=True)
    subprocess.run([python, "-c", check], check=True)
    return python


def run_child(cmd: list, env: dict | None = None) -> dict:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_seconds"] = round(wall, 3)
    return out


def run_config(args: argparse.Namespace, parties: int, rows: int) -> dict:
    from sklearn.metrics import roc_auc_score

    cfg = {
        "parties": parties,
        "rows_per_party": rows,
        "features": FEATURES,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "C": C,
        "learning_rate": 1.0,
        "total": parties * rows,
        "evaluate_train": args.evaluate_train,
    }
    report: dict = {"config": cfg, "threads": args.threads, "load_average_before": load()}
    with tempfile.TemporaryDirectory(prefix="hspeed-") as tmp:
        directory = Path(tmp)
        write_data(directory, parties, rows, args.seed)
        (directory / "job.json").write_text(json.dumps(cfg))
        me = [sys.executable, __file__, "--child"]
        contenders: dict[str, list[dict]] = {"plain": [], "plain_fortran": [], "ours": []}
        flower_cmd = None
        if args.flower:
            xs = [np.load(x) for x, _ in party_files(directory, parties)]
            for name, array in zip(
                ("mean", "scale", "precond"), standardisation(xs, C), strict=True
            ):
                np.save(directory / f"{name}.npy", array)
            del xs
            (directory / "flower_job.json").write_text(json.dumps(cfg))
            flower_cmd = [
                flower_python(),
                "-c",
                "import _flower_job; _flower_job.cli()",
                directory,
            ]
            if args.flower_client_cpus is not None:
                flower_cmd += ["--client-cpus", str(args.flower_client_cpus)]
            contenders["flower"] = []
        env = dict(os.environ)
        if args.threads is not None:  # every contender, Flower's Ray actors included
            for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[var] = str(args.threads)
        flower_env = {**env, "PYTHONPATH": str(HERE), "FLOWER_BENCH_DATA": str(directory)}
        for _ in range(args.repeat):  # interleaved, so all see the same background load
            contenders["plain"].append(run_child([*me, "plain", directory], env))
            contenders["plain_fortran"].append(run_child([*me, "plain_fortran", directory], env))
            ours_cmd = [*me, "ours", directory] + (["--profile"] if args.profile else [])
            contenders["ours"].append(run_child(ours_cmd, env))
            if flower_cmd is not None:
                contenders["flower"].append(run_child(flower_cmd, flower_env))
        y_test = np.concatenate([np.load(y) for _, y in party_files(directory, parties, "t")])
        x_test = np.concatenate([np.load(x) for x, _ in party_files(directory, parties, "t")])
        thetas = {name: np.load(directory / f"theta_{name}.npy") for name in contenders}
        if "flower" in thetas:
            mean, scale = np.load(directory / "mean.npy"), np.load(directory / "scale.npy")
            np.save(
                directory / "scores_flower.npy",
                ((x_test - mean) / scale) @ thetas["flower"][:-1] + thetas["flower"][-1],
            )
        for name, runs in contenders.items():
            best = min(runs, key=lambda r: r["seconds"])
            report[name] = {
                **best,
                "seconds_all_runs": [r["seconds"] for r in runs],
                "cpu_seconds_all_runs": [r.get("cpu_seconds") for r in runs],
                "test_auc": round(
                    float(roc_auc_score(y_test, np.load(directory / f"scores_{name}.npy"))), 6
                ),
            }
    for name in thetas:
        if name != "plain" and thetas[name].shape == thetas["plain"].shape:
            report[name]["max_abs_parameter_diff_vs_plain"] = float(
                np.max(np.abs(thetas[name] - thetas["plain"]))
            )
    ours = report["ours"]["seconds"]
    plain = min(report["plain"]["seconds"], report["plain_fortran"]["seconds"])
    report["ratio_ours_over_plain"] = round(ours / report["plain"]["seconds"], 3)
    report["ratio_ours_over_best_plain"] = round(ours / plain, 3)
    # Process CPU time, fewest of the runs: on a shared machine it moves far less than wall time
    # (with one BLAS thread, --threads 1, it is the wall time of a quiet machine).
    cpu = {k: min(report[k]["cpu_seconds_all_runs"]) for k in ("ours", "plain", "plain_fortran")}
    report["ratio_ours_over_best_plain_cpu"] = round(
        cpu["ours"] / min(cpu["plain"], cpu["plain_fortran"]), 3
    )
    aucs = [report[name]["test_auc"] for name in contenders]
    report["auc_spread"] = round(max(aucs) - min(aucs), 6)
    if "flower" in report:
        report["ratio_flower_over_ours"] = round(report["flower"]["seconds"] / ours, 3)
    target_speedup = 4.0 if parties >= 100 else 2.0
    report["targets"] = {
        "ours_within_1.25x_of_best_plain": ours <= 1.25 * plain,
        f"flower_at_least_{target_speedup:g}x_slower": (
            None if "flower" not in report else report["ratio_flower_over_ours"] >= target_speedup
        ),
        "auc_within_0.002": report["auc_spread"] <= 0.002,
    }
    report["load_average_after"] = load()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--configs",
        default="10x100000,100x10000",
        help="comma-separated PARTIESxROWS_PER_PARTY (default: the issue's two)",
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the fastest counts")
    parser.add_argument("--flower", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--flower-client-cpus",
        type=float,
        default=None,
        help="Ray CPUs per Flower client (default: Flower's own, 2 = one client at a time here)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="BLAS/OpenMP threads for every contender (default: the libraries' own)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile ours (top by tottime)")
    parser.add_argument(
        "--evaluate-train",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="ours also scores the train split at the end (params.evaluate_train; plain does not)",
    )
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        which, directory = args.child[0], Path(args.child[1])
        cfg = json.loads((directory / "job.json").read_text())
        if which == "ours":
            out = child_ours(directory, cfg, args.profile)
        else:
            out = child_plain(directory, cfg, "C" if which == "plain" else "F")
        print(json.dumps(out))
        return
    report: dict = {
        "benchmark": "horizontal_linear_speed",
        "cpus": os.cpu_count(),
        "reference_seconds_issue_6": {
            "10x100000": {"plain": 9.1, "flower": 21.0},
            "100x10000": {"plain": 4.9, "flower": 26.3},
        },
        "runs": [],
    }
    for item in args.configs.split(","):
        parties, rows = (int(v) for v in item.lower().split("x"))
        report["runs"].append(run_config(args, parties, rows))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
