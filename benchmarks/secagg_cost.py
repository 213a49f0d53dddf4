"""Cost of secure aggregation against plain aggregation, in process. JSON out.

    .venv/bin/python benchmarks/secagg_cost.py                          # 20 x 100,000, 3 repeats
    .venv/bin/python benchmarks/secagg_cost.py --participants 5 --parameters 1000 --repeats 1

Both sides run one aggregation of ``--participants`` update vectors of ``--parameters`` values
over the in-process transport, with every message going through the real codec (and, for secure
aggregation, the share packets through :class:`~cdp_federated.federation.relay.InProcessRelay`
in sealed envelopes). The participants' "training" is a no-op returning a precomputed vector,
so only aggregation is measured.

* **plain**: the coordinator sends each participant a ``FitIns`` and sums the float64
  ``FitRes`` parameters it gets back (what ``run_horizontal`` does without secure aggregation).
* **secure**: :func:`~cdp_federated.privacy.secagg_rounds.secure_sum` with the same ``FitIns``,
  participants behind :class:`~cdp_federated.participant.secagg_tasks.SecAggTasks`; a 32-bit
  ring (16 fractional bits) and a 64-bit ring (32 fractional bits, what the runner uses).

**Bytes** are every frame crossing the coordinator (transport requests and replies, relay posts
and deliveries). **Time**: ``total_s`` is the wall time of the whole in-process aggregation, in
which the participants' work runs one after another; ``critical_path_s`` replaces the
participants' summed time in each stage by the slowest participant's, which is what a deployment
with participants on their own machines waits for. Medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdp_federated.federation import FitIns, FitRes, InProcessTransport  # noqa: E402
from cdp_federated.participant.secagg_tasks import SecAggTasks, in_process_channels  # noqa: E402
from cdp_federated.privacy.secagg_rounds import secure_sum  # noqa: E402


class Clock:
    """Per (stage, participant) time spent inside participants' handlers."""

    def __init__(self) -> None:
        self.spent: dict[str, dict[str, float]] = defaultdict(dict)

    def wrap(self, name, handler):
        def timed(message):
            started = time.perf_counter()
            try:
                return handler(message)
            finally:
                stage = getattr(message, "stage", message.TYPE)
                self.spent[stage][name] = time.perf_counter() - started

        return timed

    def critical(self, total: float) -> float:
        summed = sum(sum(v.values()) for v in self.spent.values())
        slowest = sum(max(v.values()) for v in self.spent.values())
        return total - summed + slowest


def vectors(n: int, d: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)  # benchmark data only
    return {f"p{i:02d}": rng.normal(0, 1, d) for i in range(n)}


def request(d: int) -> FitIns:
    return FitIns({"job_id": "bench"}, 1, np.zeros(d), np.zeros(0), np.zeros(0), {})


def local_task(vector: np.ndarray):
    return lambda message: FitRes(vector, num_examples=1)


def plain(updates: dict[str, np.ndarray], d: int) -> dict[str, float]:
    sizes, clock = [], Clock()
    handlers = {n: clock.wrap(n, local_task(v)) for n, v in updates.items()}
    transport = InProcessTransport(handlers, recorder=lambda _d, _p, f: sizes.append(len(f)))
    started = time.perf_counter()
    replies = transport.request_many(dict.fromkeys(updates, request(d)))
    total = np.zeros(d)
    for reply in replies.values():
        total += reply.parameters
    seconds = time.perf_counter() - started
    assert np.allclose(total, sum(updates.values()))
    return {"total_s": seconds, "critical_path_s": clock.critical(seconds), "bytes": sum(sizes)}


def secure(updates: dict[str, np.ndarray], d: int, bits: int, frac_bits: int) -> dict[str, float]:
    sizes, clock = [], Clock()
    record = lambda _d, _p, f: sizes.append(len(f))  # noqa: E731
    channels = in_process_channels(updates, recorder=record)
    handlers = {
        n: clock.wrap(
            n,
            SecAggTasks(
                n,
                local_task(v),
                channels[n],
                contribution=lambda q, r, c: (r.parameters, [f"parameters[{d}]"]),
            ).handle,
        )
        for n, v in updates.items()
    }
    transport = InProcessTransport(handlers, recorder=record)
    n = len(updates)
    started = time.perf_counter()
    result = secure_sum(
        transport,
        dict.fromkeys(updates, request(d)),
        job_id="bench",
        session=f"bench/{bits}/{time.perf_counter_ns()}",
        threshold=n // 2 + 1,
        ring={"bits": bits, "frac_bits": frac_bits, "bound": 64.0, "parties": n},
    )
    seconds = time.perf_counter() - started
    error = float(np.abs(result.total - sum(updates.values())).max())
    assert error <= n * 2.0 ** -(frac_bits + 1), error
    return {
        "total_s": seconds,
        "critical_path_s": clock.critical(seconds),
        "bytes": sum(sizes),
        "max_abs_error": error,
    }


def median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--participants", type=int, default=20)
    parser.add_argument("--parameters", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n, d = args.participants, args.parameters
    updates = vectors(n, d, seed=1)
    load_before = os.getloadavg()[0]
    base = median([plain(updates, d) for _ in range(args.repeats)])
    out: dict[str, object] = {
        "participants": n,
        "parameters": d,
        "repeats": args.repeats,
        "threshold": n // 2 + 1,
        "plain": base,
    }
    for bits, frac in ((32, 16), (64, 32)):
        run = median([secure(updates, d, bits, frac) for _ in range(args.repeats)])
        out[f"secure_ring{bits}"] = {
            **run,
            "time_ratio_total": run["total_s"] / base["total_s"],
            "time_ratio_critical_path": run["critical_path_s"] / base["critical_path_s"],
            "bytes_ratio": run["bytes"] / base["bytes"],
        }
    out["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
