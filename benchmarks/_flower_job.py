"""Flower's side of benchmarks/horizontal_linear_speed.py: the same FedAvg logistic regression.

Runs only inside ``benchmarks/.venvs/flower`` (``flwr[simulation]==1.42.*``), never in the
product's environment, and imports nothing from ``cdp_federated``. It reads what the parent wrote
into ``DATA`` as ``.npy`` files:

* ``x_<k>.npy`` / ``y_<k>.npy``: party ``k``'s raw training features and 0/1 labels;
* ``mean.npy``, ``scale.npy``, ``precond.npy``: the global standardisation and the preconditioner
  (inverse curvature bound), computed by the parent from the pooled moments. Flower gets them for
  free: its timed run leaves out the moments pass that ours and the plain loop pay for.

Each ClientApp (Message API, one virtual SuperNode per party) standardises its rows once, caches
them in its Ray actor, and per round takes ``local_steps`` full-batch preconditioned gradient
steps on ``mean logloss + ||w||^2 / (2 C N)``; the server is Flower's own ``FedAvg`` weighted by
``num-examples``. Federated evaluation is off (``fraction_evaluate=0``). The final parameters
go to ``OUT/theta.npy``; one JSON line on stdout gives the wall seconds of ``run_simulation``
(Ray start-up included, as a user would pay it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

# Ray actors import this module by name and read the data directory from the environment.
DATA = Path(os.environ.get("FLOWER_BENCH_DATA", "."))
_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _party(pid: int) -> tuple[np.ndarray, np.ndarray]:
    """Party ``pid``'s standardised rows, computed once per actor process."""
    if pid not in _cache:
        x = np.load(DATA / f"x_{pid}.npy")
        mean, scale = np.load(DATA / "mean.npy"), np.load(DATA / "scale.npy")
        _cache[pid] = ((x - mean) / scale, np.load(DATA / f"y_{pid}.npy"))
    return _cache[pid]


client_app = ClientApp()


@client_app.train()
def train(message: Message, context: Context) -> Message:
    z, y = _party(int(context.node_config["partition-id"]))
    config = message.content["config"]
    steps, c, total = int(config["local-steps"]), float(config["C"]), int(config["total"])
    rate = float(config["learning-rate"])
    precond = np.load(DATA / "precond.npy", mmap_mode="r")
    theta = message.content["arrays"].to_numpy_ndarrays()[0].astype(np.float64)
    lam, n = 1.0 / (c * total), z.shape[0]
    loss = float("nan")
    for step in range(steps):
        s = z @ theta[:-1] + theta[-1]
        if step == 0:
            loss = float(np.logaddexp(0.0, (1.0 - 2.0 * y) * s).mean())
        r = 0.5 * (1.0 + np.tanh(0.5 * s)) - y
        grad = np.empty_like(theta)
        grad[:-1] = z.T @ r / n + lam * theta[:-1]
        grad[-1] = r.sum() / n
        theta -= rate * (precond @ grad)
    reply = RecordDict(
        {
            "arrays": ArrayRecord([theta]),
            "metrics": MetricRecord({"num-examples": n, "train_loss": loss}),
        }
    )
    return Message(reply, reply_to=message)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = json.loads((DATA / "flower_job.json").read_text())
    parties = cfg["parties"]
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=parties,
        min_available_nodes=parties,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord([np.zeros(cfg["features"] + 1)]),
        num_rounds=cfg["rounds"],
        train_config=ConfigRecord(
            {
                "local-steps": cfg["local_steps"],
                "C": cfg["C"],
                "total": cfg["total"],
                "learning-rate": cfg["learning_rate"],
            }
        ),
    )
    np.save(DATA / "theta_flower.npy", result.arrays.to_numpy_ndarrays()[0])


def cli() -> None:
    parser = argparse.ArgumentParser(description="Flower side of the horizontal speed benchmark")
    parser.add_argument("data", type=Path)
    parser.add_argument("--client-cpus", type=float, default=None, help="Ray CPUs per client")
    args = parser.parse_args()
    cfg = json.loads((args.data / "flower_job.json").read_text())
    backend = None
    if args.client_cpus is not None:
        backend = {"client_resources": {"num_cpus": args.client_cpus, "num_gpus": 0.0}}
    logging.getLogger("flwr").setLevel(logging.WARNING)
    started = time.perf_counter()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=cfg["parties"],
        backend_config=backend,
    )
    seconds = time.perf_counter() - started
    if not (args.data / "theta_flower.npy").exists():
        raise SystemExit("Flower finished without writing the final parameters")
    print(json.dumps({"seconds": round(seconds, 3), "flwr_backend": backend or "default"}))


if __name__ == "__main__":
    cli()
