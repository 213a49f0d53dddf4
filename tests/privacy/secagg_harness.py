"""Shared helpers for the secure-aggregation tests: 20 integer inputs, participants behind the
in-process transport and relay, dropouts injected per stage, every frame recorded."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cdp_federated.errors import TransportError
from cdp_federated.federation import FitIns, FitRes, InProcessTransport
from cdp_federated.participant.secagg_tasks import SecAggTasks, in_process_channels
from cdp_federated.privacy.secagg_rounds import SecureSum, secure_sum

STAGES = ("advertise", "share", "mask", "unmask")
BOUND = 2**20


def integer_contribution(request, reply, config):
    """Sum the raw integer-valued parameters (ring with frac_bits=0): the exact-sum check."""
    return np.asarray(reply.parameters), [f"parameters[{reply.parameters.size}]"]


def make_inputs(n: int, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"p{i:02d}": rng.integers(-BOUND, BOUND, size=length).astype(np.float64) for i in range(n)
    }


class Federation:
    """``inputs`` behind SecAggTasks; ``drops[stage]`` go offline at that stage; ``frames``
    holds (channel, direction, participant, frame) for everything the coordinator touched."""

    def __init__(self, inputs: Mapping[str, np.ndarray], drops: Mapping[str, set[str]]) -> None:
        self.inputs = dict(inputs)
        self.drops = {stage: set(drops.get(stage, ())) for stage in STAGES}
        self.frames: list[tuple[str, str, str, bytes]] = []
        relay_record = lambda d, p, f: self.frames.append(("relay", d, p, f))  # noqa: E731
        channels = in_process_channels(self.inputs, recorder=relay_record)
        self.tasks = {
            name: SecAggTasks(
                name, self._local_task(name), channels[name], contribution=integer_contribution
            )
            for name in self.inputs
        }
        handlers = {name: self._handler(name) for name in self.inputs}
        self.transport = InProcessTransport(
            handlers, recorder=lambda d, p, f: self.frames.append(("transport", d, p, f))
        )

    def _local_task(self, name: str):
        def fit(message):
            assert isinstance(message, FitIns)
            return FitRes(self.inputs[name], num_examples=1)

        return fit

    def _handler(self, name: str):
        def handle(message):
            stage = getattr(message, "stage", None)
            if name in self.drops.get(stage, ()):
                raise TransportError(f"{name} went offline at {stage}")
            return self.tasks[name].handle(message)

        return handle

    def run(self, threshold: int, *, session: str = "job/secagg/round-1") -> SecureSum:
        length = next(iter(self.inputs.values())).size
        request = FitIns({"job_id": "job"}, 1, np.zeros(length), np.zeros(0), np.zeros(0), {})
        return secure_sum(
            self.transport,
            dict.fromkeys(self.inputs, request),
            job_id="job",
            session=session,
            threshold=threshold,
            ring={"bits": 32, "frac_bits": 0, "bound": BOUND, "parties": len(self.inputs)},
        )


def survivors_after(names: list[str], drops: Mapping[str, set[str]]) -> list[str]:
    gone = set().union(*(drops.get(s, set()) for s in ("advertise", "share", "mask")))
    return [n for n in names if n not in gone]


def run_direct(
    vectors: Mapping[str, np.ndarray], threshold: int, drops: Mapping[str, set[str]], bits: int = 32
) -> np.ndarray:
    """The two stage machines wired together without transport or relay (the fast path of the
    many-run matrix): returns the ring sum, or raises what the server raises."""
    from cdp_federated.privacy.secagg import SecAggClient, SecAggConfig, SecAggServer

    names = sorted(vectors)
    config = SecAggConfig(threshold, "direct", bits)
    clients = {n: SecAggClient(n, vectors[n], config) for n in names}
    server = SecAggServer(names, config, next(iter(vectors.values())).size)
    roster = server.receive_keys(
        {n: c.advertise() for n, c in clients.items() if n not in drops.get("advertise", ())}
    )
    sent, commitments = {}, {}
    for n in roster:
        if n not in drops.get("share", ()):
            sent[n], commitments[n] = clients[n].share_keys(roster)
    shared = server.receive_commitments(commitments)
    masked = {
        n: clients[n].masked_input(shared, {o: sent[o][n] for o in shared if o != n})
        for n in shared
        if n not in drops.get("mask", ())
    }
    alive = server.receive_masked(masked)
    reveals = {n: clients[n].unmask(alive) for n in alive if n not in drops.get("unmask", ())}
    return server.receive_reveals(reveals)
