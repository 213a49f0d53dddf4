"""Cost of secure aggregation against plain aggregation, in process. JSON out.

    .venv/bin/python benchmarks/secagg_cost.py                          # 20 x 100,000, 3 repeats
    .venv/bin/python benchmarks/secagg_cost.py --participants 5 --parameters 1000 --repeats 1

Every variant runs one aggregation of ``--participants`` update vectors of ``--parameters``
values over the in-process transport, every message through the real codec (for secure
aggregation the share packets too, sealed, through
:class:`~cdp_federated.federation.relay.InProcessRelay`). The participants' "training" is a
no-op returning a precomputed vector, so only aggregation is measured. One warm-up run of each
variant is discarded (imports, first allocations); then each repeat runs every variant back to
back, and a time ratio is the median over repeats of the variant's time over the plain run's
in the same repeat (the machine may be shared; load moves the baseline between minutes).

* **plain** (the baseline): the coordinator sends each participant the same ``FitIns`` (the
  float64 global parameters) and sums the float64 ``FitRes`` parameters it gets back: what
  ``run_horizontal`` sends and receives without secure aggregation, same codec, same frames.
  ``plain_float32`` is the same with float32 replies (the usual "float32 update" yardstick).
* **secure_ring32 / secure_ring64**: :func:`~cdp_federated.privacy.secagg_rounds.secure_sum`
  with the same ``FitIns``, participants behind
  :class:`~cdp_federated.participant.secagg_tasks.SecAggTasks`: 2^32 ring (16 fractional bits)
  and 2^64 ring (32 fractional bits, what the runner uses).
* **secure_int8 / secure_int4**: the runner's in-ring compression (``params.compression``):
  shared-scale stochastic codes summed in the narrowest ring the participants' codes cannot wrap
  (2^16 for 20 x int8 and 20 x int4), weight and statistics in the 2^64 ring.

**Bytes**: ``bytes`` is every frame crossing the coordinator (transport requests and replies,
relay posts and deliveries); ``bytes_up`` the participants' side of it (replies and relay posts),
where compression acts; the downlink (the global parameters in ``FitIns``) is the same for all.

**Time**: ``total_s`` is the wall time of the whole in-process aggregation, in which the
participants' work runs one after another; ``critical_path_s`` replaces the participants' summed
time in each stage by the slowest participant's, which is what a deployment with participants on
their own machines waits for. ``modelled_s`` adds what the in-process run leaves out, as a model
(not a measurement): ``round_trips * --rtt-ms`` plus ``bytes`` over one coordinator link of
``--link-mbit-s``; plain has 1 round trip, secure aggregation 4 stages + 2 relay trips.
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
from cdp_federated.participant.secagg_tasks import (  # noqa: E402
    SecAggTasks,
    fit_contribution,
    in_process_channels,
)
from cdp_federated.privacy.secagg_rounds import secure_sum  # noqa: E402

SCALE = 4.0  # the shared quantisation scale: N(0, 1) updates, |x| > 4 clipped (6e-5 of them)
ROUND_TRIPS = {"plain": 1, "secure": 6}  # 4 stages + relay post and fetch


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


class Bytes:
    """Frame sizes by direction: ``up`` is what participants send (replies, relay posts)."""

    def __init__(self) -> None:
        self.up = self.down = 0

    def __call__(self, direction: str, _participant: str, frame: bytes) -> None:
        if direction in ("reply", "post"):
            self.up += len(frame)
        else:
            self.down += len(frame)


def vectors(n: int, d: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)  # benchmark data only
    return {f"p{i:02d}": rng.normal(0, 1, d) for i in range(n)}


def request(d: int) -> FitIns:
    return FitIns({"job_id": "bench"}, 1, np.zeros(d), np.zeros(0), np.zeros(0), {})


def local_task(vector: np.ndarray):
    return lambda message: FitRes(vector, num_examples=1)


def plain(updates: dict[str, np.ndarray], d: int, dtype=np.float64) -> dict[str, float]:
    sizes, clock = Bytes(), Clock()
    handlers = {n: clock.wrap(n, local_task(v.astype(dtype))) for n, v in updates.items()}
    transport = InProcessTransport(handlers, recorder=sizes)
    started = time.perf_counter()
    replies = transport.request_many(dict.fromkeys(updates, request(d)))
    total = np.zeros(d)
    for reply in replies.values():
        total += reply.parameters
    seconds = time.perf_counter() - started
    assert np.allclose(total, sum(v.astype(dtype).astype(np.float64) for v in updates.values()))
    return {
        "total_s": seconds,
        "critical_path_s": clock.critical(seconds),
        "bytes": sizes.up + sizes.down,
        "bytes_up": sizes.up,
    }


def secure(
    updates: dict[str, np.ndarray], d: int, bits: int, frac_bits: int, code_bits: int = 0
) -> dict[str, float]:
    sizes, clock = Bytes(), Clock()
    channels = in_process_channels(updates, recorder=sizes)
    if code_bits:  # the runner's contribution: weighted update, weight, statistics
        contribution = fit_contribution
        ring = {"bits": 64, "frac_bits": 32, "bound": 1e6}
    else:
        contribution = lambda q, r, c: (r.parameters, [f"parameters[{d}]"])  # noqa: E731
        ring = {"bits": bits, "frac_bits": frac_bits, "bound": 64.0}
    handlers = {
        n: clock.wrap(
            n, SecAggTasks(n, local_task(v), channels[n], contribution=contribution).handle
        )
        for n, v in updates.items()
    }
    transport = InProcessTransport(handlers, recorder=sizes)
    n = len(updates)
    started = time.perf_counter()
    result = secure_sum(
        transport,
        dict.fromkeys(updates, request(d)),
        job_id="bench",
        session=f"bench/{bits}/{code_bits}/{time.perf_counter_ns()}",
        threshold=n // 2 + 1,
        ring={**ring, "parties": n},
        quantise={"bits": code_bits, "scale": SCALE} if code_bits else None,
    )
    seconds = time.perf_counter() - started
    expected = sum(np.clip(v, -SCALE, SCALE) if code_bits else v for v in updates.values())
    error = float(np.abs(result.total[:d] - expected).max())
    step = 2 * SCALE / (2**code_bits - 1) if code_bits else 2.0 ** -(frac_bits + 1)
    assert error <= n * step, error
    return {
        "total_s": seconds,
        "critical_path_s": clock.critical(seconds),
        "bytes": sizes.up + sizes.down,
        "bytes_up": sizes.up,
        "max_abs_error": error,
    }


def measure(runs: dict[str, object], repeats: int) -> dict[str, list[dict[str, float]]]:
    """Every variant once as a warm-up (discarded), then ``repeats`` rounds that run every
    variant back to back, so each secure run has a plain run next to it under the same load
    (the machine is shared: load moves the plain baseline 2-4x between minutes)."""
    for run in runs.values():
        run()
    out: dict[str, list[dict[str, float]]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            out[label].append(run())
    return out


def median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def paired(runs: list[dict[str, float]], base: list[dict[str, float]], key: str) -> float:
    """The median over repeats of this variant's ``key`` over plain's in the same repeat."""
    return statistics.median(r[key] / b[key] for r, b in zip(runs, base, strict=True))


def modelled(run: dict[str, float], kind: str, rtt_ms: float, link_mbit_s: float) -> float:
    return (
        run["critical_path_s"]
        + ROUND_TRIPS[kind] * rtt_ms / 1e3
        + run["bytes"] * 8 / (link_mbit_s * 1e6)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--participants", type=int, default=20)
    parser.add_argument("--parameters", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--link-mbit-s", type=float, default=1000.0)
    args = parser.parse_args()
    n, d = args.participants, args.parameters
    updates = vectors(n, d, seed=1)
    load_before = os.getloadavg()[0]
    variants = {
        "secure_ring32": (32, 16, 0),
        "secure_ring64": (64, 32, 0),
        "secure_int8": (64, 32, 8),
        "secure_int4": (64, 32, 4),
    }
    runs = measure(
        {
            "plain": lambda: plain(updates, d),
            "plain_float32": lambda: plain(updates, d, np.float32),
            **{
                label: (lambda b=bits, f=frac, c=code: secure(updates, d, b, f, c))
                for label, (bits, frac, code) in variants.items()
            },
        },
        args.repeats,
    )
    for label, results in runs.items():
        kind = "plain" if label.startswith("plain") else "secure"
        for result in results:
            result["modelled_s"] = modelled(result, kind, args.rtt_ms, args.link_mbit_s)
    base, float32 = median(runs["plain"]), median(runs["plain_float32"])
    out: dict[str, object] = {
        "participants": n,
        "parameters": d,
        "repeats": args.repeats,
        "threshold": n // 2 + 1,
        "definitions": {
            "plain": "FitIns (float64 global parameters) out, FitRes (float64) back, summed; "
            "same codec and frames as secure aggregation's inner task",
            "time_ratio_total": "in-process wall time, participants run one after another",
            "time_ratio_critical_path": "coordinator's own time + the slowest participant "
            "per stage (participants on their own machines)",
            "time_ratio_modelled": f"critical path + round trips x {args.rtt_ms} ms + bytes "
            f"over a {args.link_mbit_s} Mbit/s coordinator link (a model, not measured)",
            "time_ratio_*": "median over repeats of the ratio to the plain run of the same "
            "repeat (run back to back); times are medians",
            "bytes_up": "participants' replies and relay posts (the update direction)",
        },
        "plain": base,
        "plain_float32": float32,
    }
    for label in variants:
        run = median(runs[label])
        out[label] = {
            **run,
            "time_ratio_total": paired(runs[label], runs["plain"], "total_s"),
            "time_ratio_critical_path": paired(runs[label], runs["plain"], "critical_path_s"),
            "time_ratio_modelled": paired(runs[label], runs["plain"], "modelled_s"),
            "bytes_ratio": run["bytes"] / base["bytes"],
            "bytes_up_ratio": run["bytes_up"] / base["bytes_up"],
            "bytes_up_vs_float32": run["bytes_up"] / float32["bytes_up"],
        }
    out["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
