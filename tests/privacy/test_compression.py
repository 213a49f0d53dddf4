"""Update compression: unbiased stochastic rounding, packing, top-k error feedback, wire bytes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import polars as pl
import pytest

from cdp_federated.coordinator.runner import run_horizontal
from cdp_federated.errors import ConfigError
from cdp_federated.federation.codec import Codec
from cdp_federated.federation.messages import Failure, FitRes, QuantisedFitRes, SparseFitRes
from cdp_federated.federation.transport import InProcessTransport
from cdp_federated.jobs import JobSpec
from cdp_federated.participant import ParticipantAgent
from cdp_federated.privacy.compression import (
    Compression,
    ErrorFeedback,
    compress_fit,
    decode_code_sum,
    dequantise,
    expand_fit_reply,
    pack_codes,
    parse_compression,
    quantise,
    stochastic_round,
    top_k,
    unpack_codes,
)


def seeded(seed: int):
    """A deterministic random-bytes source (tests only; the product uses secrets)."""
    counter = iter(range(1 << 30))

    def draw(n: int) -> bytes:
        return hashlib.shake_256(f"{seed}:{next(counter)}".encode()).digest(n)

    return draw


# --- stochastic rounding and quantisation ---------------------------------------------------------


def test_stochastic_rounding_is_unbiased():
    levels = np.repeat([0.1, 0.5, 2.3, 7.9, -1.25], 40_000)
    rounded = stochastic_round(levels, seeded(1))
    assert set(np.unique(rounded)) <= {0.0, 1.0, 2.0, 3.0, 7.0, 8.0, -2.0, -1.0}
    means = rounded.reshape(5, -1).mean(axis=1)
    # Bernoulli std <= 0.5; 40,000 draws: 5 sigma is 0.0125.
    np.testing.assert_allclose(means, [0.1, 0.5, 2.3, 7.9, -1.25], atol=0.0125)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantisation_is_unbiased_and_bounded(bits):
    rng = np.random.default_rng(7)
    vector = rng.normal(size=300) * np.repeat([1e-3, 1.0, 50.0], 100)
    draws = 2000
    source = seeded(bits)
    decoded = np.stack(
        [dequantise(quantise(vector, bits, block=100, random_bytes=source)) for _ in range(draws)]
    )
    q = quantise(vector, bits, block=100, random_bytes=source)
    step = np.repeat(q.scales.astype(np.float64), 100) * 2 / (2**bits - 1)
    assert (np.abs(decoded - vector) <= step * (1 + 1e-9)).all()  # one level at most
    assert q.codes.dtype == np.uint8 and q.codes.max() <= 2**bits - 1
    # Per coordinate the error has std <= step / 2: 5 sigma of the mean over the draws.
    assert (np.abs(decoded.mean(axis=0) - vector) <= 5 * step / 2 / np.sqrt(draws)).all()


def test_block_scales_cover_every_coordinate_and_zero_stays_zero():
    vector = np.array([0.0, 0.0, 0.1 + 1e-12, -3.3, 0.0, 0.0])
    q = quantise(vector, 8, block=2, random_bytes=seeded(0))
    assert q.scales.dtype == np.float32
    assert q.scales[0] == 0 and q.scales[1] >= 3.3 and q.scales[1] >= 0.1
    assert (np.abs(vector).reshape(3, 2).max(axis=1) <= q.scales).all()
    np.testing.assert_array_equal(dequantise(q)[[0, 1, 4, 5]], 0.0)


@pytest.mark.parametrize("size", [0, 1, 6, 7, 1001])
def test_four_bit_codes_pack_two_per_byte_and_round_trip(size):
    codes = (np.arange(size) * 7 % 16).astype(np.uint8)
    packed = pack_codes(codes, 4)
    assert packed.dtype == np.uint8 and packed.size == (size + 1) // 2
    np.testing.assert_array_equal(unpack_codes(packed, 4, size), codes)
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes, 8), 8, size), codes)
    if size:
        assert packed[0] == codes[0] | ((codes[1] if size > 1 else 0) << 4)


def test_four_bit_packing_refuses_wide_codes():
    with pytest.raises(ConfigError):
        pack_codes(np.array([3, 16], dtype=np.uint8), 4)


def test_shared_scale_codes_sum_like_the_updates():
    """Quantise before masking: with one scale per round the code sum (as a secure-aggregation
    ring would add it, mod 2^32) decodes to the sum of the decoded updates."""
    rng = np.random.default_rng(3)
    updates = [rng.normal(scale=0.2, size=50) for _ in range(7)]
    scale = 1.0
    quantised = [
        quantise(u, 8, block=16, shared_scale=scale, random_bytes=seeded(i))
        for i, u in enumerate(updates)
    ]
    ring_sum = np.zeros(50, dtype=np.uint32)
    for q in quantised:
        ring_sum += q.codes.astype(np.uint32)  # wraps mod 2^32, as the ring does
    total = decode_code_sum(ring_sum, len(updates), scale, 8)
    np.testing.assert_allclose(total, sum(dequantise(q) for q in quantised), atol=1e-12)
    step = 2 * scale / 255
    assert np.abs(total - sum(updates)).max() < 7 * step  # each code is within one level


def test_shared_scale_clips_coordinates_beyond_it():
    q = quantise(np.array([5.0, -5.0, 0.25]), 8, shared_scale=0.5, random_bytes=seeded(0))
    np.testing.assert_allclose(dequantise(q)[:2], [0.5, -0.5])
    with pytest.raises(ConfigError):
        quantise(np.ones(3), 8, shared_scale=0.0)


# --- top-k with error feedback --------------------------------------------------------------------


def test_top_k_keeps_the_largest_magnitudes():
    indices, values = top_k(np.array([0.1, -5.0, 0.3, 4.0, -0.2]), 2)
    assert indices.dtype == np.int32 and values.dtype == np.float32
    np.testing.assert_array_equal(indices, [1, 3])
    np.testing.assert_array_equal(values, [-5.0, 4.0])


def test_error_feedback_sends_what_top_k_dropped_later():
    rng = np.random.default_rng(11)
    feedback = ErrorFeedback()
    updates = [rng.normal(size=20) for _ in range(30)]
    sent = np.zeros(20)
    for update in updates:
        indices, values = feedback.sparsify("job", update, 3)
        assert indices.size == 3
        sent[indices] += values
    residual = feedback.residuals["job"]
    # Nothing is lost: what was sent plus what is still owed is exactly the sum of the updates.
    np.testing.assert_allclose(sent + residual, np.sum(updates, axis=0), atol=1e-9)
    # The residual stays bounded (it does not grow with the rounds) and only accumulates drops.
    assert np.linalg.norm(residual) < np.linalg.norm(np.sum(updates, axis=0)) + 20


def test_error_feedback_is_per_job():
    feedback = ErrorFeedback()
    feedback.sparsify("a", np.array([1.0, 0.5]), 1)
    indices, values = feedback.sparsify("b", np.array([1.0, 0.5]), 1)
    np.testing.assert_array_equal(indices, [0])  # job b does not inherit a's residual 0.5
    _, values = feedback.sparsify("a", np.array([0.0, 0.6]), 1)
    np.testing.assert_allclose(values, [1.1])  # a's residual 0.5 plus the new 0.6


# --- parsing, wire messages and the two seams ----------------------------------------------------


def test_parse_compression():
    assert parse_compression(None) == Compression()
    assert parse_compression("int4").bits == 4
    assert parse_compression("topk:10").kept(1000) == 10
    assert parse_compression("topk:0.05").kept(1000) == 50
    for bad in ("int16", "topk:", "topk:-3", "topk:2.5", 8):
        with pytest.raises(ConfigError) as info:
            parse_compression(bad)
        assert info.value.field == "params.compression"
    with pytest.raises(ConfigError):
        parse_compression("int8", block=0)


def _frame_bytes(message) -> int:
    return len(Codec().encode(message))


@pytest.mark.parametrize(("scheme", "at_least"), [("int8", 3.5), ("int4", 6.5)])
def test_compressed_fit_reply_is_smaller_on_the_wire(scheme, at_least):
    rng = np.random.default_rng(5)
    global_ = rng.normal(size=10_000)
    local = global_ + rng.normal(scale=0.01, size=10_000)
    metrics = {"loss": 0.5}
    plain32 = FitRes(local.astype(np.float32), num_examples=100, metrics=metrics)
    reply = compress_fit(
        "j", {"compression": scheme}, {}, global_, local, 100, metrics, ErrorFeedback()
    )
    assert isinstance(reply, QuantisedFitRes)
    ratio = _frame_bytes(plain32) / _frame_bytes(reply)
    assert ratio >= at_least
    decoded = expand_fit_reply("p", Codec().decode(Codec().encode(reply)), global_)
    assert isinstance(decoded, FitRes) and decoded.num_examples == 100
    step = 2 * np.abs(local - global_).max() / (2**reply.bits - 1)
    assert np.abs(decoded.parameters - local).max() <= step * 1.001


def test_sparse_reply_round_trips_and_plain_without_compression():
    global_ = np.zeros(6)
    local = np.array([0.0, 3.0, 0.1, -2.0, 0.0, 0.0])
    feedback = ErrorFeedback()
    reply = compress_fit("j", {"compression": "topk:2"}, {}, global_, local, 9, {}, feedback)
    assert isinstance(reply, SparseFitRes)
    decoded = expand_fit_reply("p", Codec().decode(Codec().encode(reply)), global_ + 1.0)
    np.testing.assert_allclose(decoded.parameters, [1, 4, 1, -1, 1, 1])
    plain = compress_fit("j", {}, {}, global_, local, 9, {}, feedback)
    assert isinstance(plain, FitRes) and plain.parameters is local


@pytest.mark.parametrize(
    "reply",
    [
        SparseFitRes(np.array([7], dtype=np.int32), np.ones(1, np.float32), 4, 1),
        SparseFitRes(np.array([1, 1], dtype=np.int32), np.ones(2, np.float32), 4, 1),
        SparseFitRes(np.array([1], dtype=np.int32), np.ones(1, np.float32), 5, 1),
        QuantisedFitRes(np.zeros(3, np.uint8), np.ones(1, np.float32), 8, 256, 4, 1),
        QuantisedFitRes(np.zeros(2, np.uint8), np.ones(1, np.float32), 5, 256, 4, 1),
        QuantisedFitRes(np.zeros(2, np.uint8), -np.ones(1, np.float32), 4, 256, 4, 1),
    ],
)
def test_malformed_compressed_reply_becomes_a_failure(reply):
    out = expand_fit_reply("mallory", reply, np.zeros(4))
    assert isinstance(out, Failure) and out.error_type == "ProtocolError"
    assert out.participant == "mallory"


def _federation(seed: int = 0):
    rng = np.random.default_rng(seed)
    frames = {}
    for i in range(3):
        x = rng.normal(size=(400, 4)) + i * 0.3
        y = (x @ np.array([1.0, -0.5, 0.25, 0.0]) + rng.logistic(size=400) > 0).astype(float)
        frames[f"p{i}"] = pl.DataFrame({**{f"f{j}": x[:, j] for j in range(4)}, "y": y})
    agents = {
        n: ParticipantAgent(n, lambda _job, split, f=f: f if split == "train" else f.head(200))
        for n, f in frames.items()
    }
    return agents, InProcessTransport({n: a.handle for n, a in agents.items()})


def _job(**params) -> JobSpec:
    return JobSpec(
        job_id="compress",
        kind="horizontal",
        model="logreg",
        purpose="model_training",
        features=("f0", "f1", "f2", "f3"),
        label="y",
        rounds=8,
        params=params,
    )


@pytest.mark.parametrize("scheme", ["int8", "int4", "topk:2"])
def test_compressed_training_tracks_plain_training(scheme):
    _, plain_transport = _federation()
    plain = run_horizontal(_job(), plain_transport)
    agents, transport = _federation()
    frames: list[bytes] = []
    transport._recorder = lambda d, _p, frame: frames.append(frame) if d == "reply" else None
    compressed = run_horizontal(_job(compression=scheme), transport)
    kind = b"sparse_fit_res" if scheme.startswith("topk") else b"quantised_fit_res"
    assert sum(kind in f[:60] for f in frames) == 3 * 8  # every update went compressed
    assert abs(compressed.auc - plain.auc) < 0.01
    tolerance = 0.05 if scheme != "topk:2" else 0.3
    assert np.abs(compressed.parameters - plain.parameters).max() < tolerance
    has_residual = all("compress" in a.error_feedback.residuals for a in agents.values())
    assert has_residual == scheme.startswith("topk")


def test_bad_compression_param_is_refused_before_training():
    _, transport = _federation()
    with pytest.raises(ConfigError) as info:
        run_horizontal(_job(compression="zip"), transport)
    assert info.value.field == "params.compression"


# --- cdp-fl simulate horizontal --compress / --aggregation -----------------------------------------


@pytest.fixture(scope="module")
def party_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compress-parties")
    rng = np.random.default_rng(4)
    paths = {}
    for name, shift in (("eu", -0.5), ("us", 0.5), ("test", 0.0)):
        x = rng.normal(shift, 1.0, size=(600, 40))
        churn = (x[:, :3] @ np.array([1.0, -0.7, 0.4]) + rng.logistic(size=600) > 0).astype(int)
        paths[name] = folder / f"{name}.csv"
        columns = {f"x{j}": x[:, j] for j in range(40)}
        pl.DataFrame({**columns, "churn": churn}).write_csv(paths[name])
    return paths


def _simulate(monkeypatch, capsys, files, registry, *extra):
    from tests.cli_helpers import run

    args = ["--party", f"eu={files['eu']}", "--party", f"us={files['us']}"]
    return run(
        monkeypatch,
        capsys,
        "simulate",
        "horizontal",
        *args,
        "--test",
        str(files["test"]),
        "--label",
        "churn",
        "--rounds",
        "5",
        "--registry",
        str(registry),
        "--json",
        *extra,
    )


def test_simulate_reports_bytes_sent_and_compresses(monkeypatch, capsys, party_files, tmp_path):
    code, out, _ = _simulate(monkeypatch, capsys, party_files, tmp_path)
    assert code == 0
    plain = json.loads(out)
    extra = ("--compress", "int8", "--aggregation", "median")
    code, out, _ = _simulate(monkeypatch, capsys, party_files, tmp_path, *extra)
    assert code == 0
    compressed = json.loads(out)
    # 41 parameters: the frames' JSON headers weigh as much as the payload, so the saving on
    # the wire is well below the 8x of the arrays (float64 -> uint8) but real.
    assert 0 < compressed["bytes_sent"] < 0.75 * plain["bytes_sent"]
    assert abs(compressed["auc"] - plain["auc"]) < 0.01


def test_simulate_refuses_an_unknown_compression(monkeypatch, capsys, party_files, tmp_path):
    code, _, err = _simulate(monkeypatch, capsys, party_files, tmp_path, "--compress", "zip")
    assert code == 2 and "--compress" in err
