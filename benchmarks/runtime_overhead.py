"""Federation runtime overhead per round over loopback HTTP, against raw HTTP of the same bytes. JSON out.

    .venv/bin/python benchmarks/runtime_overhead.py                 # 10 participants, 100,000 params
    .venv/bin/python benchmarks/runtime_overhead.py --participants 3 --parameters 1000 --rounds 30

The real coordinator service (FastAPI under uvicorn on 127.0.0.1, port 0, in a thread of this
process, SQLite in a temporary directory) and ``--participants`` participant threads, each enrolled
and polling with the real client (:class:`~cdp_federated.participant.http_client.CoordinatorClient`
and :func:`~cdp_federated.participant.runner.serve_tasks`), answering every ``FitIns`` at once with
a ``FitRes`` of the same ``--parameters`` float64 values (no-op training). The coordinator side
drives ``--rounds`` fit rounds straight through
:meth:`~cdp_federated.coordinator.queue_transport.QueueTransport.request_many` (encoding, task
rows, long-poll delivery, result upload and validation, decoding: everything but the aggregation
maths), after ``--warmup`` untimed rounds.

Two modes are timed: ``concurrent`` (``QueueTransport.request_many``: every task queued at once,
replies awaited together, as ``run_horizontal`` does now) and ``sequential`` (``request`` for one
participant after another, as it did before; also runs against a tree without ``request_many``).

The **raw** baseline is one HTTP round trip per participant carrying the same bytes: a POST of the
reply frame's size to a trivial ASGI endpoint (uvicorn on loopback, in this process as well) that
answers with the request frame's size, each participant on its own thread and ``httpx.Client``.
``raw.concurrent`` is the wall time of all participants' round trips started together,
``raw.sequential`` of them one after another. Overhead per round = the round's wall time minus the
median raw round of the same mode; median and p90 over the timed rounds, in milliseconds;
``overhead_to_raw`` is the median overhead over the median raw round. Because the machine may be
shared, CPU is reported as well: ``process_cpu_per_round`` is this process's CPU time per round
(with ``--processes``, the coordinator's alone: the figure that least depends on the load) and
``participants_cpu_per_round_ms`` the participant processes' together (Linux ``/proc``).

By default everything runs in one Python process, so the participants' threads compete with the
coordinator for the GIL and the round's work is mostly serialised; ``--processes`` runs each
participant as its own child process (enrolled with a secret passed over a pipe), as deployed. The machine may be shared: the load average is
reported before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn

from cdp_federated.coordinator.queue_transport import QueueTransport
from cdp_federated.coordinator.service import Coordinator, ServiceConfig, create_app
from cdp_federated.federation import encode
from cdp_federated.federation.messages import FitIns, FitRes, Message
from cdp_federated.jobs import JobSpec
from cdp_federated.participant.http_client import CoordinatorClient
from cdp_federated.participant.runner import serve_tasks

JOB_ID = "runtime-overhead"


def serve(app: Any, http: str = "auto") -> tuple[uvicorn.Server, threading.Thread, str]:
    """``app`` under uvicorn on 127.0.0.1 (a free port), in a daemon thread; returns its URL.
    ``http``: uvicorn's HTTP parser (``auto`` is httptools when installed, else h11)."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", http=http)
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


async def raw_endpoint(scope: dict, receive: Callable, send: Callable) -> None:
    """A trivial ASGI app: reads the whole body, answers ``?n=N`` bytes."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    size = int(scope["query_string"].decode().removeprefix("n=") or 0)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/octet-stream")],
        }
    )
    await send({"type": "http.response.body", "body": bytes(size)})


def no_op(message: Message) -> Message:
    """No-op training: the parameters go back unchanged."""
    assert isinstance(message, FitIns)
    return FitRes(parameters=message.parameters, num_examples=1)


SHORT_FRAMES = True  # set from --frames: what run_horizontal sends after a job's first round


def fit_requests(names: list[str], round_number: int, parameters: np.ndarray) -> dict[str, FitIns]:
    if SHORT_FRAMES:  # FitIns v2 after the first round: the model and config, setup named only
        return {
            name: FitIns(
                job={"job_id": JOB_ID},
                round=round_number,
                parameters=parameters,
                mean=np.zeros(0),
                scale=np.zeros(0),
                config={},
                setup="0" * 64,
            )
            for name in names
        }
    features = np.zeros(parameters.size - 1)
    return {
        name: FitIns(
            job={"job_id": JOB_ID},
            round=round_number,
            parameters=parameters,
            mean=features,
            scale=features + 1.0,
            config={},
        )
        for name in names
    }


def stats(values: list[float]) -> dict[str, float]:
    ms = np.array(values) * 1000.0
    return {
        "median_ms": round(float(np.median(ms)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "min_ms": round(float(ms.min()), 2),
        "max_ms": round(float(ms.max()), 2),
    }


def time_rounds(
    ask: Callable[[dict[str, FitIns]], dict[str, Message]],
    names: list[str],
    parameters: np.ndarray,
    rounds: int,
    warmup: int,
    cpu: list[float],
    children: Sequence[int] = (),
    children_cpu: list[float] | None = None,
) -> list[float]:
    """Each timed round's wall time; appends its CPU time in this process to ``cpu``, and that
    of the ``children`` processes (participants) to ``children_cpu``."""
    walls = []
    for r in range(1, warmup + rounds + 1):
        requests = fit_requests(names, r, parameters)
        started, cpu_started = time.perf_counter(), time.process_time()
        others = cpu_seconds(children)
        replies = ask(requests)
        wall = time.perf_counter() - started
        spent = time.process_time() - cpu_started
        others = cpu_seconds(children) - others
        bad = [n for n, reply in replies.items() if not isinstance(reply, FitRes)]
        if bad:
            raise RuntimeError(f"round {r}: no FitRes from {bad}: {replies[bad[0]]}")
        if r > warmup:
            walls.append(wall)
            cpu.append(spent)
            if children_cpu is not None and children:
                children_cpu.append(others)
    return walls


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of processes ``pids`` so far (Linux /proc; 0 elsewhere)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK") if total else 0.0


def time_raw(
    url: str, names: list[str], up: int, down: int, rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Raw round trips: a POST of ``up`` bytes answered with ``down`` bytes, per participant."""
    clients = {name: httpx.Client(base_url=url, timeout=60) for name in names}
    body = bytes(up)

    def trip(name: str) -> None:
        response = clients[name].post("/raw", params={"n": down}, content=body)
        response.raise_for_status()
        assert len(response.content) == down

    out: dict[str, list[float]] = {"concurrent": [], "sequential": []}
    try:
        with ThreadPoolExecutor(len(names)) as pool:
            for r in range(warmup + rounds):
                started = time.perf_counter()
                list(pool.map(trip, names))
                concurrent = time.perf_counter() - started
                started = time.perf_counter()
                for name in names:
                    trip(name)
                sequential = time.perf_counter() - started
                if r >= warmup:
                    out["concurrent"].append(concurrent)
                    out["sequential"].append(sequential)
    finally:
        for client in clients.values():
            client.close()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    names = [f"p{i:02d}" for i in range(args.participants)]
    parameters = np.linspace(-1.0, 1.0, args.parameters)
    sample = fit_requests(names[:1], 1, parameters)[names[0]]
    request_bytes = len(encode(sample))
    reply_bytes = len(encode(no_op(sample)))
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="cdp-fl-overhead-") as tmp:
        config = ServiceConfig(
            db_url=f"sqlite:///{Path(tmp) / 'coordinator.sqlite'}",
            key_dir=Path(tmp) / "keys",
            recheck_seconds=0.5,
        )
        coordinator = Coordinator.open(config)
        server, thread, url = serve(create_app(coordinator=coordinator), args.http)
        raw_server, raw_thread, raw_url = serve(raw_endpoint, args.http)
        stop = threading.Event()
        clients, workers, children = [], [], []
        try:
            for name in names:
                secret = coordinator.registry.create(name, "participant")
                if args.processes:  # the secret goes over a pipe, never on a command line
                    child = subprocess.Popen(
                        [sys.executable, __file__, "--child", url, name],
                        stdin=subprocess.PIPE,
                    )
                    assert child.stdin is not None
                    child.stdin.write(secret.encode() + b"\n")
                    child.stdin.flush()
                    children.append(child)
                    continue
                client = CoordinatorClient(url, timeout=60.0)
                client.enrol(secret)
                clients.append(client)
                worker = threading.Thread(
                    target=serve_tasks,
                    args=(client, name, no_op),
                    kwargs={"stop": stop, "poll_wait": 5.0},
                    name=f"participant-{name}",
                    daemon=True,
                )
                worker.start()
                workers.append(worker)
            spec = JobSpec(
                job_id=JOB_ID,
                kind="horizontal",
                model="logreg",
                purpose="model_training",
                features=("x",),
                label="y",
                rounds=args.rounds,
                params={},
            )
            coordinator.state.create_job(spec, names, {}, submitted_by="benchmark")
            coordinator.state.job_started(JOB_ID)
            transport = QueueTransport(coordinator.state, JOB_ID, names, deadline=120.0, stop=stop)

            modes = set(args.modes.split(","))
            walls: dict[str, list[float]] = {}
            cpu: dict[str, list[float]] = {"sequential": [], "concurrent": []}
            participants_cpu: list[float] = []  # concurrent mode, --processes only
            if "sequential" in modes:
                walls["sequential"] = time_rounds(
                    lambda requests: {n: transport.request(n, m) for n, m in requests.items()},
                    names,
                    parameters,
                    args.rounds,
                    args.warmup,
                    cpu["sequential"],
                )
            # request_many is absent before it was added ("before" runs)
            if "concurrent" in modes and hasattr(transport, "request_many"):
                walls["concurrent"] = time_rounds(
                    transport.request_many,
                    names,
                    parameters,
                    args.rounds,
                    args.warmup,
                    cpu["concurrent"],
                    [child.pid for child in children],
                    participants_cpu,
                )
            raw = time_raw(raw_url, names, reply_bytes, request_bytes, args.rounds, args.warmup)
            coordinator.state.job_finished(JOB_ID, result={})
        finally:
            stop.set()
            coordinator.runner.shutdown(timeout=5)
            for worker in workers:
                worker.join(10)
            for child in children:  # closing its stdin stops it
                assert child.stdin is not None
                child.stdin.close()
            for child in children:
                try:
                    child.wait(15)
                except subprocess.TimeoutExpired:
                    child.kill()  # this benchmark's own child, by its handle
                    child.wait()
            for client in clients:
                client.close()
            for s, t in ((server, thread), (raw_server, raw_thread)):
                s.should_exit = True
                t.join(10)
            coordinator.store.dispose()

    modes = {}
    for mode in sorted(walls):
        baseline = float(np.median(raw[mode]))
        modes[mode] = {
            "round_wall": stats(walls[mode]),
            "raw_round": stats(raw[mode]),
            "overhead": stats([w - baseline for w in walls[mode]]),
            # with --processes: the coordinator's CPU per round (the participants' is not in it)
            "process_cpu_per_round": stats(cpu[mode]),
            # with --processes: all participants' CPU per round, mean (/proc counts in 10 ms ticks)
            **(
                {
                    "participants_cpu_per_round_ms": round(
                        1000.0 * sum(participants_cpu) / len(participants_cpu), 1
                    )
                }
                if mode == "concurrent" and participants_cpu
                else {}
            ),
            "overhead_to_raw": round(
                float(np.median(walls[mode]) - baseline) / baseline if baseline else 0.0, 2
            ),
        }
    return {
        "benchmark": "runtime_overhead",
        "participants": args.participants,
        "parameters": args.parameters,
        "rounds": args.rounds,
        "warmup_rounds": args.warmup,
        "request_frame_bytes": request_bytes,
        "reply_frame_bytes": reply_bytes,
        "store": "sqlite",
        "participants_as": "processes" if args.processes else "threads",
        "http_parser": http_parser(args.http),
        "frames": args.frames,
        "goal_overhead_median_ms": 50.0,
        "goal_met": min(m["overhead"]["median_ms"] for m in modes.values()) < 50.0,
        **modes,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
    }


def http_parser(choice: str) -> str:
    if choice != "auto":
        return choice
    try:
        import httptools  # noqa: F401  (what uvicorn's "auto" picks when it is installed)
    except ImportError:
        return "h11"
    return "httptools"


def child(url: str, name: str) -> None:
    """A participant process: enrol with the secret on stdin, answer tasks until stdin closes."""
    stop = threading.Event()
    secret = sys.stdin.readline().strip()

    def watch() -> None:
        sys.stdin.read()  # returns at EOF: the parent closed the pipe
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    with CoordinatorClient(url, timeout=60.0) as client:
        client.enrol(secret)
        serve_tasks(client, name, no_op, stop=stop, poll_wait=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--participants", type=int, default=10)
    parser.add_argument("--parameters", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--processes",
        action="store_true",
        help="participants as separate processes (default: threads of this process)",
    )
    parser.add_argument(
        "--http",
        choices=("auto", "h11", "httptools"),
        default="auto",
        help="uvicorn's HTTP parser for both servers (auto: httptools when installed)",
    )
    parser.add_argument(
        "--modes",
        default="sequential,concurrent",
        help="comma-separated modes to time (sequential, concurrent)",
    )
    parser.add_argument(
        "--frames",
        choices=("short", "full"),
        default="short",
        help="short: FitIns as sent after a job's first round (model only); full: with the "
        "job's mean and scale (the first round, or FitIns v1)",
    )
    parser.add_argument("--child", nargs=2, metavar=("URL", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    global SHORT_FRAMES
    SHORT_FRAMES = args.frames == "short"
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
