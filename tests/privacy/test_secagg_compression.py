"""Compression inside the secure-aggregation ring: shared-scale int8/int4 codes summed in the
narrowest ring that cannot wrap (a product of rings with the 64-bit fixed-point extras), the
masked vector sent at that width, FedAvg close to the uncompressed run, over HTTP too."""

from __future__ import annotations

import numpy as np
import pytest

from cdp_federated.coordinator import run_horizontal
from cdp_federated.errors import ConfigError
from cdp_federated.federation import InProcessTransport, decode
from cdp_federated.federation.envelope import RelayKeyPair
from cdp_federated.federation.messages import SecAggRes
from cdp_federated.learning.strategy import FedAvg
from cdp_federated.participant import ParticipantAgent
from cdp_federated.participant.relay import http_relay_channel
from cdp_federated.participant.secagg_tasks import SecAggTasks, with_secure_aggregation
from cdp_federated.privacy.secagg import SecAggClient, SecAggConfig, SecAggServer
from cdp_federated.privacy.secagg_ring import QuantisedRing, RingEncoder, code_ring_bits
from cdp_federated.privacy.secagg_rounds import from_params
from tests.runtime.conftest import start_service
from tests.test_horizontal_run import make_job, make_parties, provider

ROUNDS = 8


def seeded(seed: int):
    rng = np.random.default_rng(seed)  # tests only: deterministic rounding draws
    return lambda n: rng.bytes(n)


def test_the_code_ring_is_the_narrowest_that_cannot_wrap():
    assert code_ring_bits(20, 8) == 16  # 20 * 255 = 5100 < 2^16
    assert code_ring_bits(257, 8) == 16 and code_ring_bits(258, 8) == 32
    assert code_ring_bits(17, 4) == 8 and code_ring_bits(18, 4) == 16  # 17 * 15 = 255
    with pytest.raises(ConfigError, match="wrap"):
        code_ring_bits(2**32 // 255 + 1, 8)


def run_protocol(inputs: dict[str, np.ndarray], segments, threshold: int, drop=()):
    config = SecAggConfig(threshold, "job/round-1", 64, segments)
    clients = {n: SecAggClient(n, v, config) for n, v in inputs.items()}
    server = SecAggServer(list(inputs), config, 0)
    roster = server.receive_keys({n: c.advertise() for n, c in clients.items()})
    dealt = {n: c.share_keys(roster) for n, c in clients.items()}
    shared = server.receive_commitments({n: d[1] for n, d in dealt.items()})
    masked = {}
    for n in shared:
        packets = {o: dealt[o][0][n] for o in shared if o != n}
        vector = clients[n].masked_input(shared, packets)
        if n not in drop:
            masked[n] = vector
    alive = server.receive_masked(masked)
    return server.receive_reveals({n: clients[n].unmask(alive) for n in alive}), alive


def test_a_product_of_rings_sums_each_segment_in_its_own_ring_with_dropouts():
    rng = np.random.default_rng(3)
    n, size, count = 7, 50, 3
    extras = RingEncoder(bits=64, frac_bits=32, bound=1e3, parties=n)
    ring = QuantisedRing(code_bits=8, scale=0.5, size=size, extras=extras, count=count)
    assert ring.segments == ((16, size), (64, count))
    values = {f"p{i}": rng.uniform(-0.6, 0.6, size + count) for i in range(n)}
    encoded = {k: ring.encode(v, random_bytes=seeded(i)) for i, (k, v) in enumerate(values.items())}
    assert all(e.dtype == np.uint8 and e.size == 2 * size + 8 * count for e in encoded.values())
    total, alive = run_protocol(encoded, ring.segments, threshold=4, drop={"p2", "p5"})
    got = ring.decode(total, len(alive))
    want = sum(np.clip(values[k], -0.5, 0.5) for k in alive)
    step = 2 * ring.scale / 255
    assert np.abs(got[:size] - want[:size]).max() <= len(alive) * step  # each code within a step
    extras_sum = sum(values[k][size:] for k in alive)
    np.testing.assert_allclose(got[size:], extras_sum, atol=len(alive) * 2.0**-32)


def test_stochastic_codes_are_unbiased_in_the_ring():
    size, n = 4000, 20
    extras = RingEncoder(bits=64, frac_bits=32, bound=1.0, parties=n)
    ring = QuantisedRing(code_bits=4, scale=1.0, size=size, extras=extras, count=0)
    value = np.full(size, 0.3)
    codes = sum(
        ring.encode(value, random_bytes=seeded(i)).view("<u2").astype(np.int64) for i in range(n)
    )
    decoded = ring.decode(codes.astype("<u2").view(np.uint8), n)
    # 20 parties x 4000 coordinates: the mean of unbiased rounding is within a few sigma of 6.0
    sigma = np.sqrt(n * 0.25) * 2 / 15 / np.sqrt(size)
    assert abs(decoded.mean() - n * 0.3) < 5 * sigma
    assert np.abs(decoded - n * 0.3).max() <= n * 2 / 15


@pytest.fixture(scope="module")
def parties():
    return make_parties()


def handlers(parties):
    return {n: ParticipantAgent(n, provider(f)).handle for n, f in parties.items()}


@pytest.fixture(scope="module")
def runs(parties):
    plain = run_horizontal(make_job(rounds=ROUNDS), InProcessTransport(handlers(parties)))
    out = {"plain": (plain, [])}
    for scheme in ("int8", "int4"):
        frames: list = []
        result = run_horizontal(
            make_job(rounds=ROUNDS, secure_aggregation=True, compression=scheme),
            InProcessTransport(
                with_secure_aggregation(handlers(parties)),
                recorder=lambda *f, frames=frames: frames.append(f),
            ),
        )
        out[scheme] = (result, frames)
    return out


def masked_replies(frames):
    replies = [decode(frame) for direction, _, frame in frames if direction == "reply"]
    return [m for m in replies if isinstance(m, SecAggRes) and m.stage == "mask"]


@pytest.mark.parametrize(("scheme", "code_bytes"), [("int8", 2), ("int4", 1)])
def test_compressed_rounds_send_codes_at_the_rings_width(runs, scheme, code_bytes):
    result, frames = runs[scheme]
    d = result.parameters.size
    masked = masked_replies(frames)
    assert len(masked) == 3 * ROUNDS
    first, later = masked[:3], masked[3:]
    # round 1 learns the scale (uncompressed, 64-bit ring); then 3 parties' codes: 2^16 for
    # int8 (3 x 255), 2^8 for int4 (3 x 15); weight, loss and two statistics stay 64-bit
    assert all(m.masked.dtype == np.uint64 for m in first)
    assert all(m.masked.dtype == np.uint8 for m in later)
    assert {m.masked.size for m in later} == {code_bytes * d + 8 * 4}


@pytest.mark.parametrize(("scheme", "tolerance"), [("int8", 0.002), ("int4", 0.01)])
def test_compressed_secure_fedavg_stays_close_to_plain(runs, scheme, tolerance):
    plain, _ = runs["plain"]
    result, _ = runs[scheme]
    assert abs(result.auc - plain.auc) < tolerance
    for a, b in zip(plain.history, result.history, strict=True):
        assert a.participants == b.participants and a.num_examples == b.num_examples
    assert np.abs(result.parameters - plain.parameters).max() < 0.2 * np.abs(plain.parameters).max()


def test_a_first_round_scale_compresses_from_round_one(parties):
    frames: list = []
    run_horizontal(
        make_job(rounds=2, secure_aggregation={"compression_scale": 0.5}, compression="int8"),
        InProcessTransport(
            with_secure_aggregation(handlers(parties)), recorder=lambda *f: frames.append(f)
        ),
    )
    assert all(m.masked.dtype == np.uint8 for m in masked_replies(frames))


def test_a_resumed_job_keeps_the_measured_scale(parties):
    from cdp_federated.coordinator.checkpoint import decode_checkpoint, encode_checkpoint

    job = make_job(rounds=3, secure_aggregation=True, compression="int8")
    stored: list = []
    run_horizontal(
        job,
        InProcessTransport(with_secure_aggregation(handlers(parties))),
        on_checkpoint=lambda checkpoint, record: stored.append(encode_checkpoint(checkpoint)),
    )
    after_round_1 = decode_checkpoint(stored[1])  # stored[0] is the job's start
    assert after_round_1.runner_state["compression_scale"] > 0
    frames: list = []
    run_horizontal(  # a coordinator restarted after round 1
        job,
        InProcessTransport(
            with_secure_aggregation(handlers(parties)), recorder=lambda *f: frames.append(f)
        ),
        resume=after_round_1,
    )
    masked = masked_replies(frames)
    assert len(masked) == 3 * 2  # rounds 2 and 3, both already compressed: no relearning round
    assert all(m.masked.dtype == np.uint8 for m in masked)


def test_top_k_and_bad_scales_are_refused_with_secure_aggregation():
    with pytest.raises(ConfigError, match="top-k"):
        from_params("j", {"secure_aggregation": True, "compression": "topk:10"}, FedAvg())
    with pytest.raises(ConfigError, match="compression scale"):
        from_params(
            "j",
            {"secure_aggregation": {"compression_scale": -1}, "compression": "int8"},
            FedAvg(),
        )
    made = from_params("j", {"secure_aggregation": True, "compression": "int4"}, FedAvg())
    assert made is not None and made.compression_bits == 4 and made.compression_scale is None


@pytest.fixture
def live(tmp_path):
    service = start_service(f"sqlite:///{tmp_path / 'coordinator.sqlite'}", tmp_path / "keys")
    try:
        yield service
    finally:
        service.close()


def test_int8_in_the_ring_over_http(live, parties):
    rounds = 3
    plain = run_horizontal(make_job(rounds=rounds), InProcessTransport(handlers(parties)))
    clients, bodies = {}, []
    for name, frames in parties.items():
        keys, channels = RelayKeyPair.generate(), {}

        def channel_for(job_id, name=name, keys=keys, channels=channels):
            if job_id not in channels:
                channels[job_id] = http_relay_channel(clients[name], job_id, keys)
            return channels[job_id]

        tasks = SecAggTasks(name, ParticipantAgent(name, provider(frames)).handle, channel_for)
        clients[name] = live.participant(
            name, tasks.handle, recorder=lambda d, path, body: bodies.append((d, path, body))
        )
    admin = live.client("ops", role="admin")
    job = make_job(rounds=rounds, secure_aggregation=True, compression="int8").to_dict()
    job["job_id"] = "secagg-int8-http"
    job_id = admin.submit_job(job, sorted(parties), {})
    status = admin.job_status(job_id, wait=60)
    assert status["status"] == "succeeded", status
    assert abs(status["metrics"]["auc"] - plain.auc) < 0.01
    sent = [body for direction, _, body in bodies if direction == "request"]
    assert not any(b'"fit_res"' in body or b'"quantised_fit_res"' in body for body in sent)
    # rounds 2 and 3 carry codes in the 2^16 ring: uint8 masked vectors of 2 bytes per weight
    replies = [decode(body) for body in sent if b'"type":"secagg_res"' in body[:64]]
    masked = [m for m in replies if isinstance(m, SecAggRes) and m.stage == "mask"]
    assert [m.masked.dtype for m in masked] == [np.uint64] * 3 + [np.uint8] * 3 * (rounds - 1)
    assert {m.masked.size for m in masked[3:]} == {2 * plain.parameters.size + 8 * 4}


def test_under_dp_the_decoded_update_stays_within_the_clip_norm():
    from cdp_federated.errors import TrainingError

    size, clip = 1000, 1.0
    extras = RingEncoder(bits=64, frac_bits=32, bound=10.0, parties=5)
    ring = QuantisedRing(code_bits=8, scale=0.2, size=size, extras=extras, count=1)
    rng = np.random.default_rng(4)
    step = 2 * ring.scale / 255
    for i in range(20):
        update = rng.normal(0, 1, size)
        update *= clip / np.linalg.norm(update)  # clipped to exactly C, as DP-FedAvg does
        raw = ring.encode(np.append(update, 1.0), random_bytes=seeded(i), norm_bound=clip)
        codes = raw[: 2 * size].view("<u2").astype(np.float64)
        decoded = -ring.scale + codes * step
        assert np.linalg.norm(decoded) <= clip
        assert np.abs(decoded - np.clip(update, -0.2, 0.2)).max() <= step + 0.05  # still close
        unbounded = ring.encode(np.append(update, 1.0), random_bytes=seeded(i))
        free = -ring.scale + unbounded[: 2 * size].view("<u2") * step
        assert np.abs(free - np.clip(update, -0.2, 0.2)).max() <= step
    coarse = QuantisedRing(code_bits=4, scale=5.0, size=size, extras=extras, count=1)
    with pytest.raises(TrainingError, match="within the DP clip norm"):  # steps of 0.67 each
        coarse.encode(np.append(update, 1.0), norm_bound=clip)
