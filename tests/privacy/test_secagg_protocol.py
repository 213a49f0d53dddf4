"""Secure aggregation end to end (stage machines behind the in-process transport and relay):
exact sums under dropouts at every stage, clean aborts below threshold, and a coordinator that
never sees an individual input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from cdp_federated.errors import ConfigError, ProtocolError
from cdp_federated.federation import decode
from cdp_federated.federation.envelope import RELAY_CODEC
from cdp_federated.federation.messages import FitRes, SecAggRes
from cdp_federated.privacy.secagg import (
    PAIRWISE,
    SELF,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    SecureAggregationAborted,
)
from cdp_federated.privacy.secagg_ring import RingEncoder

from .secagg_harness import BOUND, STAGES, Federation, make_inputs, run_direct, survivors_after

N, T, LENGTH = 20, 11, 16


def _drops(names: list[str], counts: dict[str, int]) -> dict[str, set[str]]:
    """Drop ``counts[stage]`` distinct participants at each stage, taken in order."""
    pool = iter(names)
    return {stage: set(itertools.islice(pool, counts.get(stage, 0))) for stage in STAGES}


@pytest.mark.parametrize(
    "counts",
    [
        {},
        {"advertise": 9},
        {"share": 9},
        {"mask": 9},  # nine private keys rebuilt, nine sets of pairwise masks removed
        {"unmask": 9},
        {"advertise": 2, "share": 3, "mask": 4},
        {"advertise": 1, "share": 2, "mask": 3, "unmask": 3},
    ],
    ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) or "none",
)
def test_the_sum_is_exact_with_up_to_nine_dropouts(counts):
    inputs = make_inputs(N, LENGTH, seed=sum(counts.values()))
    names = sorted(inputs)
    drops = _drops(names, counts)
    result = Federation(inputs, drops).run(T)
    alive = survivors_after(names, drops)
    assert list(result.survivors) == alive
    assert np.array_equal(result.total, sum(inputs[n] for n in alive))
    assert sorted(result.dropped) == sorted(set(names) - set(alive))


def test_a_participant_that_drops_after_sending_its_shares_is_left_out_exactly():
    inputs = make_inputs(N, LENGTH, seed=3)
    names = sorted(inputs)
    federation = Federation(inputs, {})
    late = set(names[:4])

    def after_sending(name, inner):
        def handle(message):
            reply = inner(message)  # its share packets are already on the relay
            if name in late and getattr(message, "stage", "") == "share":
                raise ConnectionError("went offline before answering")
            return reply

        return handle

    federation.transport._handlers = {
        n: after_sending(n, h) for n, h in federation.transport._handlers.items()
    }
    result = federation.run(T)
    assert set(result.survivors) == set(names) - late
    assert np.array_equal(result.total, sum(inputs[n] for n in result.survivors))


@pytest.mark.parametrize("stage", STAGES)
def test_n_minus_t_plus_one_dropouts_abort_cleanly(stage):
    inputs = make_inputs(N, LENGTH, seed=9)
    names = sorted(inputs)
    with pytest.raises(SecureAggregationAborted, match=r"10 .* left, the threshold is 11"):
        Federation(inputs, {stage: set(names[: N - T + 1])}).run(T)


def test_the_coordinator_never_sees_an_individual_input():
    inputs = make_inputs(N, LENGTH, seed=21)
    names = sorted(inputs)
    federation = Federation(inputs, {"mask": {names[0]}, "unmask": {names[1]}})
    result = federation.run(T)
    ring = RingEncoder(bits=32, frac_bits=0, bound=BOUND, parties=N)
    encoded = {n: ring.encode(v) for n, v in inputs.items()}
    forbidden = list(encoded.values())
    forbidden += [a + b for a, b in itertools.combinations(encoded.values(), 2)]  # wraps mod 2^32
    forbidden_bytes = [v.tobytes() for v in forbidden] + [v.tobytes() for v in inputs.values()]
    seen_masked = 0
    for channel, _direction, _, frame in federation.frames:
        for needle in forbidden_bytes:  # not as raw bytes anywhere, in any frame
            assert needle not in frame
        message = decode(frame) if channel == "transport" else RELAY_CODEC.decode(frame)
        assert not isinstance(message, FitRes)  # the local result never travels
        if isinstance(message, SecAggRes) and message.stage == "mask":
            seen_masked += 1
            assert not any(np.array_equal(message.masked, v) for v in forbidden)
    assert seen_masked == N - 1
    assert np.array_equal(result.total, sum(inputs[n] for n in result.survivors))


def test_a_tampered_share_is_left_out_and_its_holder_named():
    names = [f"p{i:02d}" for i in range(5)]
    config = SecAggConfig(3, "tamper", 32)
    vectors = {n: np.full(4, i, dtype=np.uint32) for i, n in enumerate(names)}
    clients = {n: SecAggClient(n, vectors[n], config) for n in names}
    server = SecAggServer(names, config, 4)
    roster = server.receive_keys({n: c.advertise() for n, c in clients.items()})
    sent, commitments = {}, {}
    for n in names:
        sent[n], commitments[n] = clients[n].share_keys(roster)
    server.receive_commitments(commitments)
    server.receive_masked(
        {n: clients[n].masked_input(names, {o: sent[o][n] for o in names if o != n}) for n in names}
    )
    reveals = {n: clients[n].unmask(names) for n in names}
    bad = reveals["p04"][0]
    forged = type(bad.share)(bad.share.x, bad.share.y ^ 1, bad.share.salt)
    reveals["p04"] = [type(bad)(bad.owner, bad.kind, forged), *reveals["p04"][1:]]
    total = server.receive_reveals(reveals)
    assert np.array_equal(total, sum(vectors.values()))
    assert list(server.state.rejected) == ["p04"]


def test_stage_order_and_single_unmasking_are_enforced():
    names = ["a", "b", "c"]
    config = SecAggConfig(2, "order", 32)
    clients = {n: SecAggClient(n, np.zeros(3, np.uint32), config) for n in names}
    with pytest.raises(ProtocolError, match="stage"):
        clients["a"].masked_input(names, {})
    roster = {n: c.advertise() for n, c in clients.items()}
    sent = {n: clients[n].share_keys(roster)[0] for n in names}
    clients["a"].masked_input(names, {o: sent[o]["a"] for o in ("b", "c")})
    reveals = clients["a"].unmask(["a", "b"])
    assert {(r.owner, r.kind) for r in reveals} == {("a", SELF), ("b", SELF), ("c", PAIRWISE)}
    with pytest.raises(ProtocolError, match="stage"):  # never a second answer: c's seed stays
        clients["a"].unmask(["a", "b", "c"])


def test_a_roster_without_the_clients_own_key_is_refused():
    config = SecAggConfig(2, "roster", 32)
    client = SecAggClient("a", np.zeros(2, np.uint32), config)
    client.advertise()
    other = SecAggClient("b", np.zeros(2, np.uint32), config).advertise()
    with pytest.raises(ProtocolError, match="own public key"):
        client.share_keys({"a": other, "b": other})


def test_the_threshold_must_be_a_majority():
    with pytest.raises(ConfigError, match="majority"):
        SecAggServer([f"p{i}" for i in range(20)], SecAggConfig(10, "s", 32), 4)
    with pytest.raises(ConfigError):
        SecAggConfig(1, "s", 32)
    # a client refuses to deal shares under a minority threshold, whatever the server says
    config = SecAggConfig(2, "minority", 32)
    clients = {n: SecAggClient(n, np.zeros(2, np.uint32), config) for n in "abcde"}
    roster = {n: c.advertise() for n, c in clients.items()}
    with pytest.raises(ConfigError, match="majority"):
        clients["a"].share_keys(roster)


def test_the_ring_encoder_refuses_sums_that_could_wrap():
    with pytest.raises(ConfigError, match="wraps the signed 2\\^32 ring") as info:
        RingEncoder(bits=32, frac_bits=16, bound=2000.0, parties=20)
    assert info.value.field == "bound"
    ring = RingEncoder(bits=32, frac_bits=16, bound=1000.0, parties=20)
    with pytest.raises(ConfigError, match="exceeds the encoder's bound 1000"):
        ring.encode(np.array([0.5, -1000.5]))
    values = np.random.default_rng(0).uniform(-1000, 1000, size=(20, 50))
    total = np.zeros(50, np.uint32)
    for row in values:
        total += ring.encode(row)
    assert np.abs(ring.decode(total) - values.sum(axis=0)).max() <= 20 * 2**-17
    ints = RingEncoder(bits=64, frac_bits=0, bound=2**40, parties=3)
    assert np.array_equal(ints.decode(ints.encode(np.array([-(2**40), 7]))), [-(2**40), 7])


def _random_drops(rng: np.random.Generator, names: list[str]) -> dict[str, set[str]]:
    """Half the runs: 0-9 dropouts at each stage independently (often over the n - t = 9 the
    protocol survives); the other half: 0-9 in all, spread over the stages at random."""
    if rng.random() < 0.5:
        counts = rng.integers(0, 10, size=len(STAGES))
    else:
        counts = np.bincount(
            rng.integers(0, len(STAGES), size=int(rng.integers(0, 10))), minlength=4
        )
    pool = list(rng.permutation(names))
    drops = {}
    for stage, k in zip(STAGES, counts, strict=True):
        drops[stage], pool = set(pool[: int(k)]), pool[int(k) :]
    return drops


@pytest.mark.slow
def test_matrix_of_1000_runs_with_random_dropouts():
    """1,000 seeded runs of the stage machines, 0-9 dropouts drawn at each stage: every run
    either gives exactly the plaintext sum or, when a stage fell below 11, aborts cleanly."""
    rng = np.random.default_rng(2026)
    names = [f"p{i:02d}" for i in range(N)]
    wrong = aborted = exact = 0
    for _ in range(1000):
        vectors = {n: rng.integers(0, 2**32, size=LENGTH, dtype=np.uint32) for n in names}
        drops = _random_drops(rng, names)
        alive_counts = np.cumsum([len(drops[s]) for s in STAGES])
        should_abort = bool((N - alive_counts < T).any())
        try:
            total = run_direct(vectors, T, drops)
        except SecureAggregationAborted:
            aborted += 1
            assert should_abort
            continue
        assert not should_abort
        alive = survivors_after(names, drops)
        expected = np.zeros(LENGTH, np.uint32)
        for n in alive:
            expected += vectors[n]
        exact += 1
        wrong += int(not np.array_equal(total, expected))
    assert wrong == 0
    assert exact > 400 and aborted > 300  # both branches were exercised
    print(f"1000 runs: {exact} exact sums, {aborted} clean aborts, {wrong} wrong")


@pytest.mark.slow
def test_matrix_through_transport_and_relay():
    """100 seeded runs of the full path (transport, relay envelopes, codec) with 0-9 random
    dropouts per stage: exact sums or clean aborts."""
    rng = np.random.default_rng(7)
    for run in range(100):
        inputs = make_inputs(N, 8, seed=run)
        drops = _random_drops(rng, sorted(inputs))
        left = N - np.cumsum([len(drops[s]) for s in STAGES])
        try:
            result = Federation(inputs, drops).run(T, session=f"job/secagg/run-{run}")
        except SecureAggregationAborted:
            assert (left < T).any()
            continue
        assert (left >= T).all()
        assert np.array_equal(result.total, sum(inputs[n] for n in result.survivors))
