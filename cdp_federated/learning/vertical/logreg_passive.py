"""The passive party of vertical logistic/linear regression: features and its slice of the weights.

Stages: ``setup`` -> ``idle`` -> ``logits`` (sent its partial logits, waiting for the batch's
encrypted residuals) -> ``masked`` (sent its masked encrypted gradient) -> ``idle`` after the
unmasked values come back and it updates its weights -> ``trained`` on ``lr_finish``. Every
message is checked against the stage, the session, the epoch and batch, and the expected sizes;
anything else raises :class:`~cdp_federated.errors.ProtocolError` and leaves the state untouched.

The encrypted gradient ``[[X^T d]]`` is computed with additions, not ciphertext-plaintext
products (each of which is a modular exponentiation, about 100x slower in HEU): every feature is
quantised to ``q = round(x * s_j) + half`` in ``[0, 127**digits)`` and split into base-127
digits ``v``. One cumulative bucket-sum pass over all digit columns, with each digit stored
reversed (code ``126 - v``), gives per column ``P_b = sum of d_i over rows with v_i >= 126 - b``;
then ``sum_{b<126} P_b = sum_i v_i d_i`` (row ``i`` is counted in exactly ``v_i`` of those
prefixes), so the digit-weighted sums cost 125 ciphertext additions per column, no products.
Only the place values ``127**p`` (per feature) and the offset ``half`` (``sum_i (q_i - half)
d_i``, with ``sum_i d_i`` the last prefix of any column) are small plaintext products.

Keeps to itself: features, means, scales, quantisation scales, its weights, the masks. Learns:
its own gradient per batch, the batch boundaries, ``d_bits``; residuals only as ciphertexts.
"""

from __future__ import annotations

import secrets

import numpy as np

from ...crypto.he import CipherVector, HEPublicKey, load_public_key
from ...errors import ProtocolError, TrainingError
from .channel import dispatch, scoring_rows
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

__all__ = ["VerticalLogRegPassive", "DIGIT_BASE", "gradient_bits", "standardise"]

DIGIT_BASE = 127  # HEU bucket sums take int8 codes: at most 127 buckets per pass


def gradient_bits(rows: int, digits: int, d_bits: int) -> int:
    """Bit bound of ``|sum_i (q_i - half) d_i|`` over ``rows`` rows: both sides size the mask with it."""
    half = (DIGIT_BASE**digits - 1) // 2
    return (rows * half).bit_length() + d_bits


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and scale (population std; 1 for a constant column)."""
    mean = x.mean(axis=0) if x.shape[0] else np.zeros(x.shape[1])
    scale = x.std(axis=0) if x.shape[0] else np.ones(x.shape[1])
    return mean, np.where(scale > 0, scale, 1.0)


def _refuse(message: str, field: str, value: object = None) -> ProtocolError:
    return ProtocolError(message, field=field, value=value, fix="restart the session from lr_setup")


class VerticalLogRegPassive:
    """``features``: this party's aligned training rows (rows x features, finite).
    ``allow_insecure_keys`` accepts keys under 2048 bits (tests only). After training,
    ``coef_`` holds its weights on standardised features (``mean_``, ``scale_``)."""

    def __init__(
        self, name: str, features: np.ndarray, *, allow_insecure_keys: bool = False
    ) -> None:
        self.name = name
        self._x = np.asarray(features, dtype=np.float64)
        if self._x.ndim != 2 or self._x.shape[1] == 0 or not np.isfinite(self._x).all():
            raise TrainingError(
                "a passive party needs a finite 2-D feature array",
                field="features",
                value=self._x.shape,
                fix="impute missing values and pass rows x features",
            )
        self._insecure = allow_insecure_keys
        self.stage = "setup"
        self.session = ""
        self.mean_, self.scale_ = standardise(self._x)
        self._z = (self._x - self.mean_) / self.scale_
        self.coef_ = np.zeros(self._x.shape[1])
        self._scoring: np.ndarray | None = None

    # --- dispatch ---------------------------------------------------------------------------------

    def handle(self, message: object) -> list[object]:
        """Process one message from the active party; returns the replies to send back."""
        handlers = {
            LRSetup: ("setup", self._on_setup),
            LRLogitsRequest: ("idle", self._on_logits),
            LRResiduals: ("logits", self._on_residuals),
            LRUnmasked: ("masked", self._on_unmasked),
            LRFinish: ("idle", self._on_finish),
            LRPredictRequest: ("trained", self._on_predict),
        }
        return dispatch(self, message, handlers, LRSetup, _refuse)

    def set_scoring_features(self, features: np.ndarray) -> None:
        """Rows to score next, aligned with the active party's (same order)."""
        self._scoring = scoring_rows(features, self._x.shape[1])

    def partial_logits(self, features: np.ndarray) -> np.ndarray:
        """``X_k w_k`` on standardised rows: this party's share of the logit."""
        return ((np.asarray(features, dtype=np.float64) - self.mean_) / self.scale_) @ self.coef_

    # --- training ---------------------------------------------------------------------------------

    def _on_setup(self, m: LRSetup) -> list[object]:
        if m.n_rows != self._x.shape[0]:
            raise _refuse("row count differs from this party's aligned rows", "n_rows", m.n_rows)
        if not 1 <= m.digits <= 4 or not 16 <= m.mask_bits <= 256:
            raise _refuse("quantisation digits or mask size out of range", "digits", m.digits)
        if not 8 <= m.frac_bits <= 40:
            raise _refuse("residual fixed-point scale out of range", "frac_bits", m.frac_bits)
        if not (m.learning_rate > 0 and m.l2 >= 0):
            raise _refuse("learning rate must be > 0 and l2 >= 0", "learning_rate", m.learning_rate)
        key: HEPublicKey = load_public_key(
            bytes(m.public_key), scheme=m.scheme, backend=m.backend, insecure=self._insecure
        )
        # Quantise once: q in [0, 127**digits), split into base-127 digit columns (digit-major).
        half = (DIGIT_BASE**m.digits - 1) // 2
        peak = np.abs(self._z).max(axis=0)
        qscale = half / np.where(peak > 0, peak, 1.0)
        q = np.rint(self._z * qscale).astype(np.int64) + half
        columns = [DIGIT_BASE - 1 - (q // DIGIT_BASE**p) % DIGIT_BASE for p in range(m.digits)]
        self._codes = np.ascontiguousarray(np.hstack(columns), dtype=np.int8)  # reversed digits
        self._qscale, self._half = qscale, half
        self._weights = self._place_values(m.digits)
        self._key, self._digits, self._mask_bits = key, m.digits, m.mask_bits
        self._lr, self._l2 = float(m.learning_rate), float(m.l2)
        self._d_scale = float(1 << m.frac_bits)
        self.coef_ = np.zeros(self._x.shape[1])
        self._last = (-1, -1)
        self.session = m.session
        self.stage = "idle"
        return [LRReady(session=self.session, n_features=self._x.shape[1])]

    def _place_values(self, digits: int) -> np.ndarray:
        """Digit-major ``sum_i v_i d_i`` per column -> ``sum_i q_ij d_i`` per feature."""
        m = self._x.shape[1]
        w = np.zeros((digits * m, m), dtype=object)
        for p in range(digits):
            w[p * m + np.arange(m), np.arange(m)] = DIGIT_BASE**p
        return w

    def _on_logits(self, m: LRLogitsRequest) -> list[object]:
        n = self._x.shape[0]
        if (m.epoch, m.batch) <= self._last or not 0 <= m.start < m.stop <= n:
            raise _refuse("batch out of order or out of range", "batch", (m.epoch, m.batch))
        self._last = (m.epoch, m.batch)
        self._rows = (m.start, m.stop)
        self._sums: CipherVector | None = None
        self._received, self._d_bits = 0, -1
        self.stage = "logits"
        logits = self._z[m.start : m.stop] @ self.coef_
        return [LRLogits(session=self.session, epoch=m.epoch, batch=m.batch, logits=logits)]

    def _on_residuals(self, m: LRResiduals) -> list[object]:
        start, stop = self._rows
        rows = stop - start
        if (m.epoch, m.batch) != self._last or m.total != rows or m.offset != self._received:
            raise _refuse("residual chunk out of order", "offset", m.offset)
        if m.count < 1 or m.offset + m.count > rows:
            raise _refuse("residual chunk size out of range", "count", m.count)
        if self._d_bits not in (-1, m.d_bits) or not 1 <= m.d_bits <= 64:
            raise _refuse("residual bound changed within a batch", "d_bits", m.d_bits)
        bits = gradient_bits(rows, self._digits, m.d_bits) + self._mask_bits + 2
        if bits > self._key.plaintext_bits:
            raise _refuse("masked gradients would not fit the plaintext space", "d_bits", m.d_bits)
        part = self._key.loads(bytes(m.ciphertexts), m.count)
        lo = start + m.offset
        # Gradients are linear in d: bucket-sum each chunk and add, never holding all of them.
        (sums,) = self._key.bucket_sums(
            part,
            [np.ones(m.count, dtype=bool)],
            self._codes[lo : lo + m.count],
            DIGIT_BASE,
            cumulative=True,
        )
        self._sums = sums if self._sums is None else self._key.add(self._sums, sums)
        self._received += m.count
        self._d_bits = m.d_bits
        if self._received < rows:
            return []
        return [self._masked_gradient(rows)]

    def _masked_gradient(self, rows: int) -> LRMaskedGradient:
        key, n_features = self._key, self._x.shape[1]
        columns = self._codes.shape[1]
        starts = np.arange(columns) * DIGIT_BASE
        digit_sums = key.take(self._sums, starts)  # prefix b = 0 of every column
        for b in range(1, DIGIT_BASE - 1):
            digit_sums = key.add(digit_sums, key.take(self._sums, starts + b))
        total = key.take(self._sums, [DIGIT_BASE - 1])  # every row: sum_i d_i
        offset = key.weighted_sums(total, np.array([[self._half]], dtype=object))
        exact = key.sub(
            key.weighted_sums(digit_sums, self._weights),
            key.take(offset, np.zeros(n_features, dtype=np.int64)),
        )
        # A fresh uniform mask per feature, mask_bits wider than any gradient: the decryption the
        # active party sees is statistically independent of the gradient (distance <= 2**-mask_bits).
        width = gradient_bits(rows, self._digits, self._d_bits) + self._mask_bits
        self._masks = [secrets.randbits(width) for _ in range(n_features)]
        masked = key.add(exact, key.encrypt(self._masks))
        self._sums = None
        self.stage = "masked"
        epoch, batch = self._last
        blob = key.dumps(masked)
        return LRMaskedGradient(
            session=self.session,
            epoch=epoch,
            batch=batch,
            count=n_features,
            ciphertexts=np.frombuffer(blob, dtype=np.uint8),
        )

    def _on_unmasked(self, m: LRUnmasked) -> list[object]:
        n_features = self._x.shape[1]
        start, stop = self._rows
        rows = stop - start
        bits = gradient_bits(rows, self._digits, self._d_bits) + self._mask_bits + 2
        if (m.epoch, m.batch) != self._last or m.width != (bits + 7) // 8:
            raise _refuse("unmasked gradient for another batch or width", "batch", m.batch)
        raw = bytes(m.values)
        if len(raw) != m.width * n_features:
            raise _refuse("unmasked gradient has the wrong length", "values", len(raw))
        values = [
            int.from_bytes(raw[i * m.width : (i + 1) * m.width], "big", signed=True)
            for i in range(n_features)
        ]
        g_int = [v - r for v, r in zip(values, self._masks, strict=True)]
        limit = 1 << gradient_bits(rows, self._digits, self._d_bits)
        if any(not -limit < g < limit for g in g_int):
            raise _refuse("unmasked gradient out of range", "values", m.batch)
        # Undo the fixed-point scales: residuals by 2**frac_bits (folded into d_scale), features by
        # their quantisation scale.
        grad = np.array(g_int, dtype=np.float64) / self._qscale / self._d_scale / rows
        self.coef_ = self.coef_ - self._lr * (grad + self._l2 * self.coef_)
        self._masks = []
        self.stage = "idle"
        return []

    def _on_finish(self, m: LRFinish) -> list[object]:
        self._sums, self._masks = None, []
        self.stage = "trained"
        return []

    # --- scoring ----------------------------------------------------------------------------------

    def _on_predict(self, m: LRPredictRequest) -> list[object]:
        if self._scoring is None or self._scoring.shape[0] != m.n_rows:
            raise _refuse("no scoring rows of that count were set", "n_rows", m.n_rows)
        return [LRPredictResponse(session=self.session, logits=self.partial_logits(self._scoring))]
