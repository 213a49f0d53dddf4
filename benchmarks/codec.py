"""Wire codec throughput: encode and decode MB/s and frame bytes against the raw array bytes. JSON out.

    .venv/bin/python benchmarks/codec.py
    .venv/bin/python benchmarks/codec.py --sizes 1000,100000 --repeat 20

For each model size (parameters, float64 and float32) it times ``encode`` and ``decode`` of the
messages a horizontal round moves: a short ``FitIns`` (the model and its config, as sent after a
job's first round), a full ``FitIns`` (with the job's mean, scale and preconditioner for small
models) and a ``FitRes``. MB/s counts the frame's bytes; ``overhead_bytes`` is frame bytes minus
the arrays' raw bytes (header, JSON metadata). Best of ``--repeat`` timings, one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from cdp_federated.federation.codec import Codec
from cdp_federated.federation.messages import FitIns, FitRes, Message


def messages(size: int, dtype: str) -> dict[str, Message]:
    rng = np.random.default_rng(size)  # benchmark data only
    params = rng.normal(size=size).astype(dtype)
    d = size - 1
    out: dict[str, Message] = {
        "fit_ins_short": FitIns(
            job={"job_id": "bench"},
            round=3,
            parameters=params,
            mean=np.zeros(0),
            scale=np.zeros(0),
            config={"C": 1.0, "learning_rate": 1.0, "local_steps": 5, "total_examples": 10**6},
            setup="0" * 64,
        ),
        "fit_res": FitRes(parameters=params, num_examples=100_000, metrics={"loss": 0.41}),
    }
    if d <= 2000:  # the preconditioner is (d+1)^2: only small models send it
        out["fit_ins_full"] = FitIns(
            job={"job_id": "bench", "kind": "horizontal", "model": "logreg", "features": []},
            round=1,
            parameters=params,
            mean=rng.normal(size=d),
            scale=rng.random(d) + 0.5,
            config={"C": 1.0},
            preconditioner=np.eye(size),
        )
    return out


def raw_bytes(message: Message) -> int:
    return sum(v.nbytes for v in vars(message).values() if isinstance(v, np.ndarray))


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def run(sizes: list[int], repeat: int) -> dict:
    codec = Codec()
    rows = []
    for size in sizes:
        for dtype in ("float64", "float32"):
            for name, message in messages(size, dtype).items():
                frame = codec.encode(message)
                enc = best(lambda m=message: codec.encode(m), repeat)
                dec = best(lambda f=frame: codec.decode(f), repeat)
                mb = len(frame) / 1e6
                rows.append(
                    {
                        "message": name,
                        "parameters": size,
                        "dtype": dtype,
                        "frame_bytes": len(frame),
                        "raw_array_bytes": raw_bytes(message),
                        "overhead_bytes": len(frame) - raw_bytes(message),
                        "bytes_vs_raw": round(len(frame) / max(1, raw_bytes(message)), 4),
                        "encode_us": round(enc * 1e6, 1),
                        "decode_us": round(dec * 1e6, 1),
                        "encode_mb_s": round(mb / enc, 1),
                        "decode_mb_s": round(mb / dec, 1),
                    }
                )
    return {
        "benchmark": "codec",
        "repeat": repeat,
        "results": rows,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="51,1000,100000,1000000")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(json.dumps(run(sizes, args.repeat), indent=2))


if __name__ == "__main__":
    main()
