"""Vertical logistic/linear regression: equals centralized gradient descent, wire inspection,
mask checks, stage checks, refusals.

HE runs use HEU with 1024-bit keys (insecure=True) for speed; the 'plain' scheme (no encryption)
runs the same protocol, which shows encryption changes nothing (the integer sums are exact).
"""

from __future__ import annotations

import numpy as np
import pytest

from cdp_federated.crypto import generate_keypair
from cdp_federated.errors import ConfigError, ProtocolError, TrainingError
from cdp_federated.learning.vertical import (
    InProcessChannel,
    LogRegParams,
    VerticalLogRegActive,
    VerticalLogRegPassive,
    fit_vertical_logreg,
)
from cdp_federated.learning.vertical.logreg_messages import (
    LRFinish,
    LRLogits,
    LRLogitsRequest,
    LRMaskedGradient,
    LRResiduals,
    LRSetup,
    LRUnmasked,
)

pytest.importorskip("heu")

# Tolerance against float gradient descent: residuals are rounded to 2**-24 and passive features
# to 1/2 million of their range; the rounding errors average out over the rows of a batch.
WEIGHT_TOL = 1e-5


def make_data(n=300, seed=5, objective="binary"):
    rng = np.random.default_rng(seed)
    xa = rng.normal(size=(n, 2))
    xp1 = rng.normal(size=(n, 3)) * [1.0, 40.0, 0.01] + [0.0, 100.0, -3.0]  # scales differ
    xp2 = rng.integers(0, 4, size=(n, 1)).astype(float)
    signal = xa[:, 0] + xp1[:, 1] / 40 - 50 * (xp1[:, 2] + 3) + 0.7 * xp2[:, 0]
    if objective == "binary":
        y = (signal + rng.normal(scale=0.6, size=n) > 1.0).astype(float)
    else:
        y = signal + rng.normal(scale=0.3, size=n)
    return xa, xp1, xp2, y


def centralized(xs, y, params):
    """Plain gradient descent on the joined, column-standardised data (no code shared)."""
    x = np.hstack(xs)
    sd = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    w, b, n = np.zeros(x.shape[1]), 0.0, len(y)
    size = params.batch_size or n
    for _ in range(params.epochs):
        for start in range(0, n, size):
            zb, yb = z[start : start + size], y[start : start + size]
            margin = zb @ w + b
            d = (1 / (1 + np.exp(-margin)) - yb) if params.objective == "binary" else margin - yb
            w = w - params.learning_rate * (zb.T @ d / len(yb) + params.l2 * w)
            b -= params.learning_rate * d.mean()
    return w, b, z


def run(params, keys, xa, xp1, xp2, y):
    parties = {
        "brand": VerticalLogRegPassive("brand", xp1, allow_insecure_keys=True),
        "media": VerticalLogRegPassive("media", xp2, allow_insecure_keys=True),
    }
    channel = InProcessChannel(parties, active="shop")
    active = VerticalLogRegActive("shop", xa, y, params, keys)
    active.fit(channel, ["brand", "media"])
    return active, parties, channel


@pytest.fixture(scope="module")
def paillier():
    return generate_keypair("paillier", 1024, insecure=True)


@pytest.fixture(scope="module")
def ou():
    return generate_keypair("ou", 1024, insecure=True)


@pytest.fixture(scope="module")
def plain():
    return generate_keypair("plain", 1024, insecure=True)


@pytest.mark.parametrize(
    "objective, params",
    [
        ("binary", LogRegParams(epochs=6, learning_rate=0.5, l2=0.01, batch_size=100)),
        ("binary", LogRegParams(epochs=4, learning_rate=1.0)),
        ("regression", LogRegParams(objective="regression", epochs=5, learning_rate=0.2)),
    ],
)
def test_matches_centralized_gradient_descent(objective, params, plain):
    xa, xp1, xp2, y = make_data(objective=objective)
    w, b, z = centralized([xa, xp1, xp2], y, params)

    active, parties, channel = run(params, plain, xa, xp1, xp2, y)

    federated = np.concatenate([active.coef_, parties["brand"].coef_, parties["media"].coef_])
    assert np.abs(federated - w).max() < WEIGHT_TOL
    assert abs(active.intercept_ - b) < WEIGHT_TOL
    assert np.abs(w).max() > 0.05  # the model did learn something
    for name, x in (("brand", xp1), ("media", xp2)):
        parties[name].set_scoring_features(x)
    margin = active.decision_function(xa, channel, ["brand", "media"])
    assert np.abs(margin - (z @ w + b)).max() < 1e-4
    if objective == "binary":
        proba = active.predict_proba(xa, channel, ["brand", "media"])
        assert np.allclose(proba.sum(axis=1), 1.0)
        assert np.abs(proba[:, 1] - 1 / (1 + np.exp(-(z @ w + b)))).max() < 1e-5
        assert active.history_[-1] < active.history_[0]


@pytest.mark.parametrize("scheme", ["paillier", "ou"])
def test_encryption_changes_nothing(scheme, plain, request):
    xa, xp1, xp2, y = make_data(n=160)
    params = LogRegParams(epochs=1, batch_size=80, l2=0.1, chunk_rows=50)
    keys = request.getfixturevalue(scheme)

    he_active, he_parties, _ = run(params, keys, xa, xp1, xp2, y)
    pl_active, pl_parties, _ = run(params, plain, xa, xp1, xp2, y)

    # The decrypted integer sums are exact in both modes, so the weights agree to the last bit.
    assert np.array_equal(he_active.coef_, pl_active.coef_)
    for name in ("brand", "media"):
        assert np.array_equal(he_parties[name].coef_, pl_parties[name].coef_)


def test_label_only_active_party(plain):
    _, xp1, xp2, y = make_data()
    params = LogRegParams(epochs=3)
    w, b, _ = centralized([xp1, xp2], y, params)

    active, parties, _ = run(params, plain, np.zeros((len(y), 0)), xp1, xp2, y)

    assert active.coef_.size == 0
    assert np.abs(np.concatenate([parties["brand"].coef_, parties["media"].coef_]) - w).max() < (
        WEIGHT_TOL
    )


def test_wire_carries_no_plaintext_gradients_labels_or_features(paillier):
    xa, xp1, xp2, y = make_data(n=120)
    params = LogRegParams(epochs=2)
    active, parties, channel = run(params, paillier, xa, xp1, xp2, y)
    to_passive = [m for s, r, m in channel.log if s == "shop"]
    to_active = [m for s, r, m in channel.log if r == "shop"]

    # Active -> passive: only these types; the residuals only as ciphertexts that are not the
    # plaintext integers' bytes.
    allowed = {LRSetup, LRLogitsRequest, LRResiduals, LRUnmasked, LRFinish}
    assert {type(m) for m in to_passive} == allowed
    residuals = [m for m in to_passive if isinstance(m, LRResiduals)]
    first = residuals[0]
    blob = bytes(first.ciphertexts)
    assert len(blob) > 64 * first.count
    label_bytes = y[: first.count].astype(np.float64).tobytes()
    assert label_bytes not in blob
    decrypted = paillier.decrypt(paillier.public.loads(blob, first.count))
    assert max(abs(v) for v in decrypted) <= 1 << 24  # they were the residuals, |d| <= 1

    # Passive -> active: the feature count, partial logits (a documented leak) and ciphertexts;
    # nothing carries the raw features.
    assert {type(m).__name__ for m in to_active} <= {"LRReady", "LRLogits", "LRMaskedGradient"}
    for m in to_active:
        for value in vars(m).values():
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                assert not np.isin(np.round(xp1, 12), np.round(value, 12)).any()


def test_masks_hide_gradients_from_the_key_holder(paillier):
    xa, xp1, xp2, y = make_data(n=120)
    params = LogRegParams(epochs=1)
    _, _, channel = run(params, paillier, xa, xp1, xp2, y)
    masked = [m for s, r, m in channel.log if isinstance(m, LRMaskedGradient) and s == "brand"]
    unmasked = [m for s, r, m in channel.log if isinstance(m, LRUnmasked) and r == "brand"]
    (residuals,) = [m for s, r, m in channel.log if isinstance(m, LRResiduals) and r == "brand"]

    # The true integer gradient, recomputed here from the residuals and brand's quantised features.
    d_int = np.array(paillier.decrypt(paillier.public.loads(bytes(residuals.ciphertexts), 120)))
    seen = paillier.decrypt(paillier.public.loads(bytes(masked[0].ciphertexts), 3))
    width = unmasked[0].width
    raw = bytes(unmasked[0].values)
    returned = [
        int.from_bytes(raw[i * width : (i + 1) * width], "big", signed=True) for i in range(3)
    ]
    assert seen == returned
    sd = xp1.std(axis=0)
    zs = (xp1 - xp1.mean(axis=0)) / sd
    approx = zs.T @ d_int.astype(float)  # unscaled X^T d: the real gradient, up to known scales
    half = (127**3 - 1) // 2
    quantised = approx * (half / np.abs(zs).max(axis=0))
    for value, true in zip(seen, quantised, strict=True):
        assert abs(value - true) > 2**30  # the key holder sees mask + gradient, far from it
    assert min(abs(v) for v in seen) > 2**40


def test_masks_are_fresh_each_run(paillier):
    xa, xp1, xp2, y = make_data(n=60)
    params = LogRegParams(epochs=1)
    seen = []
    for _ in range(2):
        _, _, channel = run(params, paillier, xa, xp1, xp2, y)
        (m,) = [m for s, r, m in channel.log if isinstance(m, LRUnmasked) and r == "brand"]
        seen.append(bytes(m.values))
    assert seen[0] != seen[1]


class _Cheater(VerticalLogRegPassive):
    """Sends a ciphertext of a huge value instead of its masked gradient (OU's key-recovery probe)."""

    def _masked_gradient(self, rows):
        reply = super()._masked_gradient(rows)
        probe = self._key.encrypt([1 << (self._key.plaintext_bits - 2)] * reply.count)
        blob = self._key.dumps(probe)
        return LRMaskedGradient(
            session=reply.session,
            epoch=reply.epoch,
            batch=reply.batch,
            count=reply.count,
            ciphertexts=np.frombuffer(blob, dtype=np.uint8),
        )


def test_out_of_range_masked_gradient_is_refused_without_an_answer(ou):
    keys = ou
    xa, xp1, _, y = make_data(n=100)
    cheater = _Cheater("brand", xp1, allow_insecure_keys=True)
    channel = InProcessChannel({"brand": cheater}, active="shop")
    active = VerticalLogRegActive("shop", xa, y, LogRegParams(epochs=1), keys)

    with pytest.raises(ProtocolError, match="out of range"):
        active.fit(channel, ["brand"])

    assert active.stage == "failed"
    assert not any(isinstance(m, LRUnmasked) for _, _, m in channel.log)


def _setup_passive(plain, n=50):
    _, xp1, _, _ = make_data(n=n)
    party = VerticalLogRegPassive("brand", xp1, allow_insecure_keys=True)
    party.handle(
        LRSetup(
            session="s1",
            scheme="plain",
            backend="heu",
            public_key=np.frombuffer(plain.public.to_bytes(), dtype=np.uint8),
            n_rows=n,
            learning_rate=0.5,
            l2=0.0,
            frac_bits=24,
            digits=3,
            mask_bits=40,
        )
    )
    return party


def test_out_of_order_messages_are_refused_and_change_nothing(plain):
    party = _setup_passive(plain)
    residuals = LRResiduals(
        session="s1",
        epoch=0,
        batch=0,
        offset=0,
        count=50,
        total=50,
        d_bits=20,
        ciphertexts=np.frombuffer(plain.public.dumps(plain.public.encrypt([1] * 50)), np.uint8),
    )
    with pytest.raises(ProtocolError, match="out of order"):
        party.handle(residuals)  # residuals before the batch was opened
    with pytest.raises(ProtocolError, match="out of order"):
        party.handle(
            LRUnmasked(session="s1", epoch=0, batch=0, width=8, values=np.zeros(24, np.uint8))
        )
    assert party.stage == "idle"

    (logits,) = party.handle(LRLogitsRequest(session="s1", epoch=0, batch=0, start=0, stop=50))
    assert isinstance(logits, LRLogits) and party.stage == "logits"
    with pytest.raises(ProtocolError, match="another session"):
        party.handle(LRResiduals(**{**vars(residuals), "session": "other"}))
    with pytest.raises(ProtocolError, match="out of order"):
        party.handle(LRResiduals(**{**vars(residuals), "offset": 10, "count": 40}))
    with pytest.raises(ProtocolError, match="out of order"):
        party.handle(LRLogitsRequest(session="s1", epoch=0, batch=1, start=0, stop=50))
    assert party.stage == "logits"

    (masked,) = party.handle(residuals)
    assert isinstance(masked, LRMaskedGradient) and party.stage == "masked"
    with pytest.raises(ProtocolError, match="width"):
        party.handle(
            LRUnmasked(session="s1", epoch=0, batch=0, width=3, values=np.zeros(9, np.uint8))
        )
    assert party.stage == "masked"


def test_replayed_batch_is_refused(plain):
    party = _setup_passive(plain)
    party.handle(LRLogitsRequest(session="s1", epoch=0, batch=0, start=0, stop=50))
    party.stage = "idle"  # as if the batch had completed
    with pytest.raises(ProtocolError, match="out of order"):
        party.handle(LRLogitsRequest(session="s1", epoch=0, batch=0, start=0, stop=50))


def test_weak_keys_and_wrong_row_counts_are_refused(paillier):
    keys = paillier
    xa, xp1, _, y = make_data(n=80)
    strict = VerticalLogRegPassive("brand", xp1)  # no allow_insecure_keys
    active = VerticalLogRegActive("shop", xa, y, LogRegParams(epochs=1), keys)
    with pytest.raises(TrainingError, match="not secure"):
        active.fit(InProcessChannel({"brand": strict}, active="shop"), ["brand"])

    short = VerticalLogRegPassive("brand", xp1[:70], allow_insecure_keys=True)
    active = VerticalLogRegActive("shop", xa, y, LogRegParams(epochs=1), keys)
    with pytest.raises(TrainingError, match="row count"):
        active.fit(InProcessChannel({"brand": short}, active="shop"), ["brand"])


def test_small_batches_that_would_reveal_residuals_are_refused(plain):
    xa, xp1, xp2, y = make_data(n=100)
    with pytest.raises(ConfigError, match="too small"):
        run(LogRegParams(epochs=1, batch_size=6), plain, xa, xp1, xp2, y)


def test_dropout_fails_cleanly(plain):
    class Silent(VerticalLogRegPassive):
        def _on_residuals(self, m):
            return []  # never answers with its gradient

    xa, xp1, _, y = make_data(n=60)
    party = Silent("brand", xp1, allow_insecure_keys=True)
    active = VerticalLogRegActive("shop", xa, y, LogRegParams(epochs=1), plain)
    with pytest.raises(TrainingError, match="dropped out"):
        active.fit(InProcessChannel({"brand": party}, active="shop"), ["brand"])
    assert active.stage == "failed"
    with pytest.raises(TrainingError, match="no trained model"):
        active.decision_function(xa, InProcessChannel({"brand": party}), ["brand"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"objective": "poisson"},
        {"epochs": 0},
        {"learning_rate": 0.0},
        {"l2": -1.0},
        {"l2": float("nan")},
        {"digits": 5},
        {"batch_size": -1},
    ],
)
def test_invalid_params_are_refused(kwargs):
    with pytest.raises(ConfigError):
        LogRegParams(**kwargs)


def test_binary_labels_must_be_zero_or_one(plain):
    with pytest.raises(TrainingError, match="0 or 1"):
        VerticalLogRegActive(
            "shop", np.zeros((3, 1)), np.array([0.0, 2.0, 1.0]), LogRegParams(), plain
        )


def test_fit_helper_trains_and_scores(ou):
    xa, xp1, _, y = make_data(n=120)
    active, parties, channel = fit_vertical_logreg(
        xa, y, {"brand": xp1}, LogRegParams(epochs=3), keys=ou, insecure=True
    )
    parties["brand"].set_scoring_features(xp1[:10])
    proba = active.predict_proba(xa[:10], channel, ["brand"])
    assert proba.shape == (10, 2)
    labels = active.predict(xa[:10], channel, ["brand"])
    assert labels.tolist() == (proba[:, 1] > 0.5).astype(int).tolist()


@pytest.mark.parametrize("name", ["paillier", "ou", "phe"])
def test_weighted_sums_match_plaintext(name, request):
    if name == "phe":
        keys = generate_keypair("paillier", 1024, backend="phe", insecure=True)
    else:
        keys = request.getfixturevalue(name)
    values = [5, -7, 11, 0]
    weights = np.array([[1, 0, 3], [2, 5, 0], [0, 1, 126 * 127**2], [9, 9, 9]])
    out = keys.decrypt(keys.public.weighted_sums(keys.public.encrypt(values), weights))
    assert out == (np.array(values, dtype=object) @ weights.astype(object)).tolist()


@pytest.mark.slow
def test_encryption_workers_change_nothing(ou):
    xa, xp1, _, y = make_data(n=200)
    params = LogRegParams(epochs=2, chunk_rows=60)  # 4 residual chunks per batch
    one, *_ = fit_vertical_logreg(xa, y, {"brand": xp1}, params, keys=ou, insecure=True)
    two, parties, _ = fit_vertical_logreg(
        xa, y, {"brand": xp1}, params, keys=ou, insecure=True, workers=2
    )
    assert two._pool is None  # the worker processes ended with fit()
    assert np.array_equal(one.coef_, two.coef_) and one.intercept_ == two.intercept_
    assert np.array_equal(
        parties["brand"].coef_,
        fit_vertical_logreg(xa, y, {"brand": xp1}, params, keys=ou, insecure=True)[1][
            "brand"
        ].coef_,
    )
