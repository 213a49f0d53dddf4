"""Vertical logistic (and linear) regression: gradient descent with encrypted residuals and masks.

The active party holds the labels, maybe features, the intercept and the HE secret key; each
passive party holds features and its own slice of the weights. Per batch of rows:

1. every passive party sends its partial logits ``z_k = X_k w_k`` for the batch's rows;
2. the active party forms ``z = X_A w_A + b + sum_k z_k`` and the residual ``d = sigmoid(z) - y``
   (exact sigmoid; ``z - y`` for regression), encodes it as fixed-point integers, encrypts it
   under its own key and sends the same ciphertexts to every passive party;
3. each passive party computes its encrypted gradient ``[[X_k^T d]]`` (additions only, see
   :mod:`.logreg_passive`), adds a fresh uniform mask ``r_k`` drawn from ``secrets`` and sends
   ``[[X_k^T d + r_k]]`` back;
4. the active party decrypts, range-checks (this also blocks OU's chosen-ciphertext key
   recovery) and returns the masked values; the passive party removes its mask and updates
   ``w_k``. The active party updates ``w_A`` and ``b`` from ``d`` in plaintext.

Every party uses the same ``d`` and the same step, so the run is full-batch (or mini-batch)
gradient descent on the joined, per-party standardised data, up to the fixed-point encoding.
What each party learns is in ``docs/vertical_logreg.md``; in short, the active party sees each
passive party's partial logits (so, with one passive party, their sum), never features or
gradients; a passive party sees its own gradient, never residuals, labels or other parties' data.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ...crypto.he import HEKeyPair, generate_keypair
from ...crypto.he_workers import HEWorkers
from ...errors import ConfigError, ProtocolError, TrainingError
from .channel import InProcessChannel, PartyChannel, receive_reply
from .encoding import encode_fixed
from .logreg_messages import (
    LRFinish,
    LRLogits,
    LRLogitsRequest,
    LRMaskedGradient,
    LRPredictRequest,
    LRPredictResponse,
    LRReady,
    LRResiduals,
    LRSetup,
    LRUnmasked,
)
from .logreg_passive import VerticalLogRegPassive, gradient_bits, standardise
from .messages import rows_per_message

__all__ = ["LogRegParams", "VerticalLogRegActive", "VerticalLogRegPassive", "fit_vertical_logreg"]

_OBJECTIVES = ("binary", "regression")
_INT64_BITS = 62


@dataclass(frozen=True)
class LogRegParams:
    """Gradient-descent settings. ``batch_size=0`` is full batch; batches are consecutive row
    ranges in the aligned order (no shuffling: the order is shared, so shuffle before aligning if
    it matters). ``l2`` penalises the weights, not the intercept. ``frac_bits`` is the residuals'
    fixed-point scale; ``digits`` quantises each passive feature to ``127**digits`` levels for the
    encrypted gradient (3: about 2 million levels over the feature's range); ``mask_bits`` is the
    statistical margin of the masks; ``chunk_rows`` bounds the ciphertexts per message."""

    objective: str = "binary"
    epochs: int = 10
    learning_rate: float = 0.5
    l2: float = 0.0
    batch_size: int = 0
    frac_bits: int = 24
    digits: int = 3
    mask_bits: int = 40
    chunk_rows: int = 16384

    def __post_init__(self) -> None:
        if self.objective not in _OBJECTIVES:
            raise ConfigError(
                "unknown objective",
                field="objective",
                value=self.objective,
                fix="use 'binary' (logistic regression) or 'regression' (linear regression)",
            )
        for name, low, high in (
            ("epochs", 1, 100_000),
            ("batch_size", 0, 1_000_000_000),
            ("frac_bits", 8, 40),
            ("digits", 1, 4),
            ("mask_bits", 16, 256),
            ("chunk_rows", 1, 10_000_000),
        ):
            value = getattr(self, name)
            if not (
                isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
            ):
                raise ConfigError(
                    f"{name} must be an integer in [{low}, {high}]",
                    field=name,
                    value=value,
                    fix=f"set {name} within [{low}, {high}]",
                )
        for name, strict in (("learning_rate", True), ("l2", False)):
            value = getattr(self, name)
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or not np.isfinite(value) or value < 0 or (strict and value == 0):
                raise ConfigError(
                    f"{name} must be a finite number {'> 0' if strict else '>= 0'}",
                    field=name,
                    value=value,
                )


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow warnings for large |z|


class VerticalLogRegActive:
    """The label holder. ``features`` may have zero columns (a label-only party); ``labels`` are
    0/1 for ``binary``. After :meth:`fit`: ``coef_`` (weights on its standardised features),
    ``intercept_``, ``mean_``, ``scale_``, ``passive_features_`` (name -> feature count).
    ``workers > 1`` encrypts each batch's residual chunks in that many spawned processes
    (:class:`~cdp_federated.crypto.he_workers.HEWorkers`, ended when :meth:`fit` returns):
    sf-heu 0.5.2b0 encrypts OU on one thread."""

    def __init__(
        self,
        name: str,
        features: np.ndarray,
        labels: np.ndarray,
        params: LogRegParams,
        keys: HEKeyPair,
        *,
        workers: int = 1,
    ) -> None:
        self.name, self.params, self.keys = name, params, keys
        self._workers, self._pool = max(1, int(workers)), None
        self._y = np.asarray(labels, dtype=np.float64).reshape(-1)
        self._x = np.asarray(features, dtype=np.float64).reshape(self._y.size, -1)
        if self._y.size == 0 or not (np.isfinite(self._x).all() and np.isfinite(self._y).all()):
            raise TrainingError(
                "the active party needs finite features and labels for at least one row",
                field="labels",
                value=self._y.size,
                fix="impute missing values and drop unlabelled rows before aligning",
            )
        if params.objective == "binary" and not np.isin(self._y, (0.0, 1.0)).all():
            raise TrainingError(
                "binary labels must be 0 or 1", field="label", fix="encode the label as 0/1"
            )
        self.mean_, self.scale_ = standardise(self._x)
        self._z = (self._x - self.mean_) / self.scale_
        self.coef_ = np.zeros(self._x.shape[1])
        self.intercept_ = 0.0
        self.passive_features_: dict[str, int] = {}
        self.stage = "new"
        self.session = ""
        self.history_: list[float] = []  # mean training loss per epoch, before each step

    # --- protocol plumbing ------------------------------------------------------------------------

    def _receive(self, channel: PartyChannel, sender: str, kind: type) -> object:
        return receive_reply(channel, sender, kind, self.session)

    # --- training ---------------------------------------------------------------------------------

    def fit(self, channel: PartyChannel, passives: Sequence[str]) -> VerticalLogRegActive:
        if self.stage != "new":
            raise ProtocolError("fit() runs once per party object", field="stage", value=self.stage)
        self.stage = "training"
        try:
            self._fit(channel, list(passives))
        except BaseException:
            self.stage = "failed"
            raise
        finally:
            if self._pool is not None:
                self._pool.close()
                self._pool = None
        self.stage = "trained"
        return self

    def _batches(self) -> list[tuple[int, int]]:
        n, size = self._y.size, self.params.batch_size or self._y.size
        return [(start, min(start + size, n)) for start in range(0, n, size)]

    def _fit(self, channel: PartyChannel, passives: list[str]) -> None:
        p, n = self.params, self._y.size
        self.session = secrets.token_hex(8)
        pk = self.keys.public
        key = np.frombuffer(pk.to_bytes(), dtype=np.uint8)
        for name in passives:
            channel.send(
                name,
                LRSetup(
                    session=self.session,
                    scheme=pk.scheme,
                    backend=pk.backend,
                    public_key=key,
                    n_rows=n,
                    learning_rate=float(p.learning_rate),
                    l2=float(p.l2),
                    frac_bits=p.frac_bits,
                    digits=p.digits,
                    mask_bits=p.mask_bits,
                ),
            )
        for name in passives:
            ready = self._receive(channel, name, LRReady)
            if ready.n_features < 1:
                raise ProtocolError(
                    "passive party has no features", field="n_features", value=ready.n_features
                )
            self.passive_features_[name] = ready.n_features
        widest = max(self.passive_features_.values(), default=0)
        smallest = min(stop - start for start, stop in self._batches())
        # X_k^T d over a batch no larger than k's feature count lets party k solve for d (labels).
        if passives and smallest <= 2 * widest:
            raise ConfigError(
                "batches are too small: a passive party could solve its gradient for the residuals",
                field="batch_size",
                value=smallest,
                fix=f"use batches of more than {2 * widest} rows (or full batch)",
            )
        self._chunk = rows_per_message(pk, p.chunk_rows) if passives else p.chunk_rows
        for epoch in range(p.epochs):
            total = 0.0
            for b, (start, stop) in enumerate(self._batches()):
                total += self._step(channel, passives, epoch, b, start, stop)
            self.history_.append(total / n)
        for name in passives:
            channel.send(name, LRFinish(session=self.session, epochs=p.epochs))

    def _step(
        self, channel: PartyChannel, passives: list[str], epoch: int, b: int, start: int, stop: int
    ) -> float:
        """One gradient step on rows ``start .. stop``; returns the batch's summed loss before it."""
        p, rows = self.params, stop - start
        for name in passives:
            channel.send(
                name,
                LRLogitsRequest(session=self.session, epoch=epoch, batch=b, start=start, stop=stop),
            )
        z = self._z[start:stop] @ self.coef_ + self.intercept_
        for name in passives:
            reply = self._receive(channel, name, LRLogits)
            logits = np.asarray(reply.logits, dtype=np.float64)
            if (reply.epoch, reply.batch) != (epoch, b) or logits.shape != (rows,):
                raise ProtocolError("partial logits for another batch", field="logits", value=b)
            z = z + logits
        y = self._y[start:stop]
        if p.objective == "binary":
            d, loss = _sigmoid(z) - y, float(np.sum(np.logaddexp(0.0, z) - y * z))
        else:
            d, loss = z - y, float(np.sum((z - y) ** 2) / 2)
        if passives:
            self._passive_gradients(channel, passives, epoch, b, d)
        grad = self._z[start:stop].T @ d / rows
        self.coef_ = self.coef_ - p.learning_rate * (grad + p.l2 * self.coef_)
        self.intercept_ -= p.learning_rate * float(d.mean())
        return loss

    def _passive_gradients(
        self, channel: PartyChannel, passives: list[str], epoch: int, b: int, d: np.ndarray
    ) -> None:
        p, pk, rows = self.params, self.keys.public, d.size
        peak = float(np.abs(d).max())
        if peak * 2.0**p.frac_bits >= 2.0**_INT64_BITS:
            raise TrainingError(
                "residuals too large for the fixed-point encoding",
                field="label",
                value=peak,
                fix="standardise the regression label or lower frac_bits",
            )
        d_int = encode_fixed(d, p.frac_bits)
        d_bits = max(1, int(np.abs(d_int).max()).bit_length())
        bound = gradient_bits(rows, p.digits, d_bits)
        width = (bound + p.mask_bits + 2 + 7) // 8
        if bound + p.mask_bits + 2 > pk.plaintext_bits:
            raise TrainingError(
                "masked gradients do not fit the plaintext space",
                field="batch_size",
                value=rows,
                fix="use a larger key, smaller batches, fewer digits or a smaller frac_bits",
            )
        # Encrypt once, send the same ciphertexts to every passive party.
        step = self._chunk
        if self._workers > 1 and rows > step:
            if self._pool is None:
                self._pool = HEWorkers(pk, self._workers)
            blobs = self._pool.encrypt_chunks(d_int, step)
        else:
            blobs = [pk.dumps(pk.encrypt(d_int[o : o + step])) for o in range(0, rows, step)]
        for offset, blob in zip(range(0, rows, step), blobs, strict=True):
            count = min(step, rows - offset)
            message = LRResiduals(
                session=self.session,
                epoch=epoch,
                batch=b,
                offset=offset,
                count=count,
                total=rows,
                d_bits=d_bits,
                ciphertexts=np.frombuffer(blob, dtype=np.uint8),
            )
            for name in passives:
                channel.send(name, message)
        limit = 1 << (bound + p.mask_bits + 1)
        for name in passives:
            reply = self._receive(channel, name, LRMaskedGradient)
            count = self.passive_features_[name]
            if (reply.epoch, reply.batch) != (epoch, b) or reply.count != count:
                raise ProtocolError("masked gradient for another batch", field="count", value=b)
            values = self.keys.decrypt(pk.loads(bytes(reply.ciphertexts), count))
            # A masked gradient is below 2**(bound + mask_bits) + 2**bound; anything else is not
            # one, and returning it could leak key material (OU): refuse without answering.
            if any(not -limit < v < limit for v in values):
                raise ProtocolError(
                    "a masked gradient is out of range; refusing it",
                    field="ciphertexts",
                    value=name,
                    fix="the passive party must send masked gradients of the agreed size",
                )
            raw = b"".join(v.to_bytes(width, "big", signed=True) for v in values)
            channel.send(
                name,
                LRUnmasked(
                    session=self.session,
                    epoch=epoch,
                    batch=b,
                    width=width,
                    values=np.frombuffer(raw, dtype=np.uint8),
                ),
            )

    # --- cooperative scoring ----------------------------------------------------------------------

    def decision_function(
        self, features: np.ndarray, channel: PartyChannel, passives: Sequence[str]
    ) -> np.ndarray:
        """Logits of aligned scoring rows: own part plus each passive party's partial logits
        (each passive party must have ``set_scoring_features`` with the same rows)."""
        if self.stage != "trained":
            raise TrainingError(
                "no trained model", field="stage", value=self.stage, fix="call fit() first"
            )
        x = np.asarray(features, dtype=np.float64).reshape(-1, self._x.shape[1])
        z = (x - self.mean_) / self.scale_ @ self.coef_ + self.intercept_
        for name in passives:
            channel.send(name, LRPredictRequest(session=self.session, n_rows=x.shape[0]))
        for name in passives:
            reply = self._receive(channel, name, LRPredictResponse)
            logits = np.asarray(reply.logits, dtype=np.float64)
            if logits.shape != z.shape:
                raise ProtocolError("partial logits of the wrong length", field="logits")
            z = z + logits
        return z

    def predict_proba(
        self, features: np.ndarray, channel: PartyChannel, passives: Sequence[str]
    ) -> np.ndarray:
        """``(rows, 2)`` class probabilities (binary objective)."""
        if self.params.objective != "binary":
            raise ConfigError(
                "predict_proba needs the binary objective",
                field="objective",
                value=self.params.objective,
                fix="use predict() for regression",
            )
        p1 = _sigmoid(self.decision_function(features, channel, passives))
        return np.column_stack([1.0 - p1, p1])

    def predict(
        self, features: np.ndarray, channel: PartyChannel, passives: Sequence[str]
    ) -> np.ndarray:
        """Class labels (binary) or predicted values (regression)."""
        z = self.decision_function(features, channel, passives)
        return (z > 0).astype(np.int64) if self.params.objective == "binary" else z


def fit_vertical_logreg(
    active_features: np.ndarray,
    labels: np.ndarray,
    passive_features: Mapping[str, np.ndarray],
    params: LogRegParams | None = None,
    *,
    keys: HEKeyPair | None = None,
    scheme: str = "paillier",
    key_bits: int = 2048,
    insecure: bool = False,
    active_name: str = "active",
    workers: int = 1,
) -> tuple[VerticalLogRegActive, dict[str, VerticalLogRegPassive], InProcessChannel]:
    """Train in one process (simulations, benchmarks): returns the trained active party, the
    passive parties and the channel to score through. ``insecure`` allows keys under 2048 bits
    (tests only); ``workers`` is the active party's encryption processes."""
    keys = keys or generate_keypair(scheme, key_bits, insecure=insecure)
    parties = {
        name: VerticalLogRegPassive(name, x, allow_insecure_keys=insecure)
        for name, x in passive_features.items()
    }
    channel = InProcessChannel(parties, active=active_name)
    active = VerticalLogRegActive(
        active_name, active_features, labels, params or LogRegParams(), keys, workers=workers
    )
    active.fit(channel, list(parties))
    return active, parties, channel
