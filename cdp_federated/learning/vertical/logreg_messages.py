"""Vertical logistic/linear regression wire messages, in the vertical registry (``VERTICAL_CODEC``).

What travels, by direction (``docs/vertical_logreg.md`` says what each party learns from it):

* active -> passive: the public key and training settings, which rows form a batch, the batch's
  residuals **encrypted** under the active party's key (in chunks), the passive party's own
  masked gradient after decryption, the end of training, scoring requests;
* passive -> active: its feature count, its partial logits ``X_k w_k`` for a batch's rows (or the
  scoring rows), and its encrypted gradient ``[[X_k^T d + r_k]]`` with a fresh mask ``r_k``.

Ciphertexts travel as ``uint8`` arrays holding the HE backend's own serialisation; decrypted
masked gradients are larger than int64, so they travel as fixed-width big-endian signed bytes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ...federation.messages import FLOAT, Message, register
from .messages import VERTICAL_CODEC, VERTICAL_MESSAGE_TYPES

__all__ = [
    "LRSetup",
    "LRReady",
    "LRLogitsRequest",
    "LRLogits",
    "LRResiduals",
    "LRMaskedGradient",
    "LRUnmasked",
    "LRFinish",
    "LRPredictRequest",
    "LRPredictResponse",
]

_BYTES = "u"


def _reg(name: str, arrays: dict[str, str] | None = None):
    return register(name, version=1, arrays=arrays, registry=VERTICAL_MESSAGE_TYPES)


@_reg("lr_setup", {"public_key": _BYTES})
@dataclasses.dataclass(frozen=True, eq=False)
class LRSetup(Message):
    """Start a session: HE scheme/backend and public key, the aligned row count, the optimiser
    settings the passive party applies to its own weights, the residuals' fixed-point scale
    ``2**frac_bits``, ``digits`` (its features are quantised to ``127**digits`` levels for the
    encrypted gradient) and the statistical mask margin ``mask_bits``."""

    session: str
    scheme: str
    backend: str
    public_key: np.ndarray
    n_rows: int
    learning_rate: float
    l2: float
    frac_bits: int
    digits: int
    mask_bits: int


@_reg("lr_ready")
@dataclasses.dataclass(frozen=True, eq=False)
class LRReady(Message):
    session: str
    n_features: int


@_reg("lr_logits_request")
@dataclasses.dataclass(frozen=True, eq=False)
class LRLogitsRequest(Message):
    """Batch ``batch`` of epoch ``epoch`` is rows ``start .. stop``: send their partial logits."""

    session: str
    epoch: int
    batch: int
    start: int
    stop: int


@_reg("lr_logits", {"logits": FLOAT})
@dataclasses.dataclass(frozen=True, eq=False)
class LRLogits(Message):
    session: str
    epoch: int
    batch: int
    logits: np.ndarray


@_reg("lr_residuals", {"ciphertexts": _BYTES})
@dataclasses.dataclass(frozen=True, eq=False)
class LRResiduals(Message):
    """Batch rows ``offset .. offset+count`` (relative to the batch start) of the encrypted
    fixed-point residuals; ``d_bits`` bounds ``|d_int| < 2**d_bits`` (it sizes the mask)."""

    session: str
    epoch: int
    batch: int
    offset: int
    count: int
    total: int
    d_bits: int
    ciphertexts: np.ndarray


@_reg("lr_masked_gradient", {"ciphertexts": _BYTES})
@dataclasses.dataclass(frozen=True, eq=False)
class LRMaskedGradient(Message):
    """``[[G_j + r_j]]`` for each of the passive party's features (``count`` ciphertexts)."""

    session: str
    epoch: int
    batch: int
    count: int
    ciphertexts: np.ndarray


@_reg("lr_unmasked", {"values": _BYTES})
@dataclasses.dataclass(frozen=True, eq=False)
class LRUnmasked(Message):
    """The decryptions of :class:`LRMaskedGradient`, ``width`` signed big-endian bytes each."""

    session: str
    epoch: int
    batch: int
    width: int
    values: np.ndarray


@_reg("lr_finish")
@dataclasses.dataclass(frozen=True, eq=False)
class LRFinish(Message):
    session: str
    epochs: int


@_reg("lr_predict_request")
@dataclasses.dataclass(frozen=True, eq=False)
class LRPredictRequest(Message):
    """Score ``n_rows`` aligned rows (the passive party's scoring data, in the agreed order)."""

    session: str
    n_rows: int


@_reg("lr_predict_response", {"logits": FLOAT})
@dataclasses.dataclass(frozen=True, eq=False)
class LRPredictResponse(Message):
    session: str
    logits: np.ndarray


# VERTICAL_CODEC copied the registry when it was built: teach it these types too, so the
# in-process and relay channels carry them with the same checks as SecureBoost's.
for _cls in (
    LRSetup,
    LRReady,
    LRLogitsRequest,
    LRLogits,
    LRResiduals,
    LRMaskedGradient,
    LRUnmasked,
    LRFinish,
    LRPredictRequest,
    LRPredictResponse,
):
    VERTICAL_CODEC.types[_cls.TYPE] = _cls
