"""SecureBoost over the relay: through the in-process relay and through a live coordinator
(127.0.0.1, port 0), the parties build the same model as in-process, and the coordinator only
ever carries sealed envelopes (no feature value, label, row partition or decision on the wire)."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from cdp_federated.crypto import generate_keypair
from cdp_federated.errors import CodecError, ConfigError, TrainingError
from cdp_federated.federation.envelope import RELAY_CODEC, RelayEnvelope, RelayKeyPair
from cdp_federated.federation.relay import InProcessRelay
from cdp_federated.learning.vertical import (
    VERTICAL_CODEC,
    ActiveParty,
    InProcessChannel,
    PassiveParty,
    SecureBoostParams,
)
from cdp_federated.learning.vertical.messages import (
    SBHistogramRequest,
    SBPredictResponse,
    SBSplitResult,
)
from cdp_federated.learning.vertical.relay_channel import RelayPartyChannel, serve_passive
from cdp_federated.participant.relay import http_relay_channel
from tests.runtime.test_relay_http import start
from tests.test_horizontal_run import make_job

pytest.importorskip("heu")

JOB = "vertical-job"
SESSION = f"{JOB}/secureboost"
PASSIVES = ("brand", "media")
PARAMS = SecureBoostParams(n_trees=2, max_depth=3, max_bins=8, chunk_rows=64)


def make_data(n=160, seed=11):
    rng = np.random.default_rng(seed)
    xa, xb, xm = rng.normal(size=(n, 2)), rng.normal(size=(n, 2)), rng.normal(size=(n, 1))
    y = (xa[:, 0] + 1.5 * xb[:, 1] - xm[:, 0] + rng.normal(scale=0.5, size=n) > 0).astype(float)
    return xa, {"brand": xb, "media": xm}, y


@pytest.fixture(scope="module")
def keys():
    return generate_keypair("paillier", 1024, insecure=True)


def resolved(model, parties):
    """Each tree as {node: (owner, feature, threshold)} plus its leaves."""
    out = []
    for tree in model.trees:
        splits = {}
        for node, s in tree.splits.items():
            table = model.own_splits if s.owner == "shop" else parties[s.owner].records
            splits[node] = (s.owner, *table[s.ref])
        out.append((splits, tree.leaves))
    return out


def in_process(keys, xa, xp, y):
    parties = {n: PassiveParty(n, xp[n], allow_insecure_keys=True) for n in PASSIVES}
    channel = InProcessChannel(parties, active="shop")
    active = ActiveParty("shop", xa, y, PARAMS, keys)
    model = active.fit(channel, list(PASSIVES))
    for n in PASSIVES:
        parties[n].set_scoring_features(xp[n])
    margin = active.decision_function(xa, channel, list(PASSIVES))
    return model, parties, margin, channel.log


def over_relay(channels, keys, xa, xp, y):
    """The active party on ``channels['shop']``, each passive serving on a thread of its own."""
    parties = {n: PassiveParty(n, xp[n], allow_insecure_keys=True) for n in PASSIVES}
    for n in PASSIVES:
        parties[n].set_scoring_features(xp[n])
    stop, errors = threading.Event(), []

    def serve(name):
        try:
            serve_passive(
                parties[name], channels[name], active="shop", session=SESSION, stop=stop, poll=0.2
            )
        except Exception as exc:  # surfaced in the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(n,), daemon=True) for n in PASSIVES]
    for t in threads:
        t.start()
    try:
        channel = RelayPartyChannel(channels["shop"], SESSION, timeout=30)
        active = ActiveParty("shop", xa, y, PARAMS, keys)
        model = active.fit(channel, list(PASSIVES))
        margin = active.decision_function(xa, channel, list(PASSIVES))
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors
    return model, parties, margin


def test_the_in_process_relay_builds_the_in_process_model(keys):
    xa, xp, y = make_data()
    relay = InProcessRelay(["shop", *PASSIVES])
    channels = {
        n: relay.channel(n, RelayKeyPair.generate(), codec=VERTICAL_CODEC)
        for n in ("shop", *PASSIVES)
    }
    model, parties, margin = over_relay(channels, keys, xa, xp, y)
    ref_model, ref_parties, ref_margin, _ = in_process(keys, xa, xp, y)
    assert resolved(model, parties) == resolved(ref_model, ref_parties)
    np.testing.assert_array_equal(margin, ref_margin)
    assert all(relay.pending(n) == 0 for n in ("shop", *PASSIVES))  # everything acknowledged


def test_a_silent_passive_party_fails_the_job_cleanly(keys):
    xa, xp, y = make_data(n=40)
    relay = InProcessRelay(["shop", "brand"])
    shop = relay.channel("shop", RelayKeyPair.generate(), codec=VERTICAL_CODEC)
    relay.channel("brand", RelayKeyPair.generate(), codec=VERTICAL_CODEC)  # never answers
    active = ActiveParty("shop", xa, y, PARAMS, keys)
    with pytest.raises(TrainingError, match="dropped out"):
        active.fit(RelayPartyChannel(shop, SESSION, timeout=0.2), ["brand"])
    assert active.stage == "failed"


def test_a_refusal_travels_back_as_a_failure(keys):
    xa, xp, y = make_data(n=40)
    relay = InProcessRelay(["shop", "brand"])
    shop = relay.channel("shop", RelayKeyPair.generate(), codec=VERTICAL_CODEC)
    brand = relay.channel("brand", RelayKeyPair.generate(), codec=VERTICAL_CODEC)
    strict = PassiveParty("brand", xp["brand"])  # refuses the 1024-bit key
    stop = threading.Event()
    thread = threading.Thread(
        target=serve_passive,
        args=(strict, brand),
        kwargs={"active": "shop", "session": SESSION, "stop": stop, "poll": 0.1},
        daemon=True,
    )
    thread.start()
    try:
        with pytest.raises(TrainingError, match="refused"):
            ActiveParty("shop", xa, y, PARAMS, keys).fit(
                RelayPartyChannel(shop, SESSION, timeout=10), ["brand"]
            )
    finally:
        stop.set()
        thread.join(5)


def test_channel_settings_are_checked():
    with pytest.raises(ConfigError):
        RelayPartyChannel(object(), "", timeout=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        RelayPartyChannel(object(), SESSION, timeout=0)  # type: ignore[arg-type]


# --- over HTTP ------------------------------------------------------------------------------------


@pytest.fixture
def live(tmp_path):
    live, wire = start(f"sqlite:///{tmp_path / 'cdp.sqlite'}", tmp_path / "keys")
    try:
        spec = dataclasses.replace(make_job(rounds=1), job_id=JOB)
        live.coordinator.state.create_job(spec, ["shop", *PASSIVES], {}, submitted_by="ops")
        yield live, wire
    finally:
        live.close()


def plaintext_needles(xa, xp, y, log) -> list[bytes]:
    """What the parties exchange or hold in plaintext and the coordinator must never see."""
    needles = [
        np.asarray(v, dtype=np.float64).tobytes() for v in (*xa.ravel(), *xp["brand"].ravel())
    ]
    needles.append(y.astype(np.float64).tobytes()[:64])
    needles.append(np.packbits(y.astype(bool)).tobytes()[:12])
    for _, _, m in log:  # row partitions, left/right sets, scoring decisions
        if isinstance(m, SBHistogramRequest) and m.level > 0:
            needles.append(VERTICAL_CODEC.encode(m)[-48:])
        if isinstance(m, SBSplitResult | SBPredictResponse):
            needles.append(VERTICAL_CODEC.encode(m)[-24:])
    return needles


def test_secureboost_over_the_http_relay_matches_in_process_and_hides_everything(live, keys):
    live, wire = live
    xa, xp, y = make_data()
    channels = {
        n: http_relay_channel(live.client(n), JOB, RelayKeyPair.generate(), codec=VERTICAL_CODEC)
        for n in ("shop", *PASSIVES)
    }
    model, parties, margin = over_relay(channels, keys, xa, xp, y)
    ref_model, ref_parties, ref_margin, log = in_process(keys, xa, xp, y)

    assert resolved(model, parties) == resolved(ref_model, ref_parties)
    np.testing.assert_array_equal(margin, ref_margin)

    # the coordinator relayed only sealed envelopes: each posted body is an envelope, and none
    # parses as a SecureBoost message
    posted = [body for kind, path, body in wire.bodies if kind == "in" and "/relay/" in path]
    assert len(posted) >= 2 * len(PASSIVES) * PARAMS.n_trees
    for body in posted:
        assert isinstance(RELAY_CODEC.decode(body), RelayEnvelope)
        with pytest.raises(CodecError):
            VERTICAL_CODEC.decode(body)
    needles = plaintext_needles(xa, xp, y, log)
    frames = [VERTICAL_CODEC.encode(m) for _, _, m in log]
    # control: the row partitions and decisions are in the parties' plaintext frames
    assert all(any(n in f for f in frames) for n in needles[-5:])
    for kind, path, body in wire.bodies:
        for needle in needles:
            assert needle not in body, (kind, path)
