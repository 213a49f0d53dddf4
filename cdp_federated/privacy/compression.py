"""Update compression: stochastic 8/4-bit quantisation and top-k sparsification with error feedback.

A participant sends its *update* (local minus global parameters), compressed as ``params.compression``
selects; the coordinator adds the decoded update back to the global parameters it handed out, so
strategies keep aggregating plain parameter vectors.

* ``int8`` / ``int4``: each block of ``block`` coordinates has a scale ``s`` (its largest
  magnitude, as float32 rounded up); coordinate ``v`` becomes level ``(v + s) / (2 s) * L`` with
  ``L = 2^bits - 1`` and is rounded down or up at random with the probability that makes the code
  unbiased (``E[decoded] = v``). Codes are ``uint8``; 4-bit codes are packed two per byte.
* ``topk:K``: only the ``K`` largest coordinates (``K`` >= 1 a count, 0 < ``K`` < 1 a fraction) of
  update plus residual travel, as int32 indices and float32 values; what was not sent stays in the
  participant's residual and is added to the next round's update (error feedback), so nothing is
  dropped for good. The residual lives in the agent's memory per job: a participant that restarts
  mid-job starts again from a zero residual, losing at most what it had not sent yet (the job goes
  on; the model only misses that mass).

Secure aggregation: quantise *before* masking. With a scale shared by every participant for the
round (``shared_scale``, sent by the coordinator, every coordinate clipped to it), a decoded value
is ``-s + code * 2 s / L``, affine in the code, so the ring sum of the integer codes of ``n``
participants decodes to the sum of their updates with :func:`decode_code_sum`; ``n (2^bits - 1)``
must stay below the ring size, and the codes travel in the narrowest ring that holds that sum
(:class:`~.secagg_ring.QuantisedRing`: 2^16 for 20 parties at 8 bits; the coordinator marks such
rounds ``compression_in_ring`` so :func:`compress_fit` leaves the quantising to the ring). Per-block
scales chosen by each participant are not summable; top-k is not either (every party keeps other
coordinates).

Randomness for rounding comes from ``random_bytes`` (``secrets.token_bytes`` unless a test injects
a seeded source), never ``numpy.random``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import CDPFederatedError, ConfigError, TrainingError
from ..federation.messages import Failure, FitRes, Message, QuantisedFitRes, SparseFitRes

__all__ = [
    "SCHEMES",
    "Compression",
    "parse_compression",
    "RandomBytes",
    "uniforms",
    "stochastic_round",
    "Quantised",
    "quantise",
    "dequantise",
    "pack_codes",
    "unpack_codes",
    "top_k",
    "ErrorFeedback",
    "compress_fit",
    "expand_fit_reply",
    "decode_code_sum",
]

SCHEMES = ("none", "int8", "int4", "topk")
DEFAULT_BLOCK = 256  # coordinates per scale: 4 bytes of scale per 256 codes (1.6% at 8 bits)
RandomBytes = Callable[[int], bytes]
_MAX_JOBS = 8  # residuals kept for this many jobs; the oldest is forgotten first


@dataclass(frozen=True)
class Compression:
    """A parsed ``params.compression``: the scheme, ``k`` for top-k, ``block`` for quantisation."""

    scheme: str = "none"
    k: float = 0.0
    block: int = DEFAULT_BLOCK

    @property
    def bits(self) -> int:
        return {"int8": 8, "int4": 4}.get(self.scheme, 0)

    def kept(self, size: int) -> int:
        """Coordinates top-k sends for a vector of ``size``."""
        count = self.k if self.k >= 1 else np.ceil(self.k * size)
        return int(min(size, max(1, count)))


def parse_compression(value: Any, *, block: Any = None) -> Compression:
    """``none`` (or missing), ``int8``, ``int4`` or ``topk:K``; anything else is a ConfigError."""
    block_size = DEFAULT_BLOCK if block is None else block
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ConfigError(
            "compression block must be a positive integer",
            field="params.compression_block",
            value=block,
            fix=f"leave it out (default {DEFAULT_BLOCK}) or give a positive integer",
        )
    if value is None or value == "none":
        return Compression()
    if value in ("int8", "int4"):
        return Compression(value, block=block_size)
    if isinstance(value, str) and value.startswith("topk:"):
        try:
            k = float(value.partition(":")[2])
        except ValueError:
            k = float("nan")
        if np.isfinite(k) and k > 0 and (k < 1 or k == int(k)):
            return Compression("topk", k=k)
    raise ConfigError(
        "unknown compression",
        field="params.compression",
        value=value,
        fix="use none, int8, int4 or topk:K (K a count such as 100, or a fraction such as 0.1)",
    )


# --- stochastic quantisation ---------------------------------------------------------------------


def uniforms(count: int, random_bytes: RandomBytes = secrets.token_bytes) -> np.ndarray:
    """``count`` uniform draws in [0, 1) on a 2^-32 grid, from ``random_bytes``."""
    raw = np.frombuffer(random_bytes(4 * count), dtype="<u4", count=count)
    return raw.astype(np.float64) * 2.0**-32


def stochastic_round(
    levels: np.ndarray, random_bytes: RandomBytes = secrets.token_bytes
) -> np.ndarray:
    """Round each value down or up, up with probability equal to its fractional part, so the
    expected result is the value itself (up to the 2^-32 grid of the draws)."""
    floor = np.floor(levels)
    up = uniforms(levels.size, random_bytes).reshape(levels.shape) < (levels - floor)
    return floor + up


@dataclass(frozen=True, eq=False)
class Quantised:
    """Unpacked codes (one per coordinate, ``uint8``) and the float32 scale of each block."""

    codes: np.ndarray
    scales: np.ndarray
    bits: int
    block: int

    @property
    def size(self) -> int:
        return int(self.codes.size)


def _check_bits(bits: int) -> int:
    if bits not in (4, 8):
        raise ConfigError("quantisation takes 4 or 8 bits", field="bits", value=bits)
    return (1 << bits) - 1


def _block_scales(vector: np.ndarray, block: int) -> np.ndarray:
    """Largest magnitude per block as float32, rounded up so every coordinate stays within it."""
    blocks = -(-vector.size // block)
    padded = np.zeros(blocks * block)
    padded[: vector.size] = np.abs(vector)
    peak = padded.reshape(blocks, block).max(axis=1)
    scales = peak.astype(np.float32)
    low = scales.astype(np.float64) < peak
    scales[low] = np.nextafter(scales[low], np.float32(np.inf))
    return scales


def quantise(
    vector: np.ndarray,
    bits: int,
    *,
    block: int = DEFAULT_BLOCK,
    shared_scale: float | None = None,
    random_bytes: RandomBytes = secrets.token_bytes,
) -> Quantised:
    """Stochastic ``bits``-bit codes of ``vector`` with per-block scales, or with one
    ``shared_scale`` for every block (coordinates beyond it are clipped to it: summable codes for
    secure aggregation, at the price of a bias on clipped coordinates)."""
    top = _check_bits(bits)
    v = np.asarray(vector, dtype=np.float64).ravel()
    if shared_scale is None:
        scales = _block_scales(v, block)
    else:
        if not (np.isfinite(shared_scale) and shared_scale > 0):
            raise ConfigError(
                "a shared scale must be a positive finite number",
                field="compression_scale",
                value=shared_scale,
                fix="send a positive bound on the update's coordinates",
            )
        scales = np.full(-(-v.size // block), np.float32(shared_scale), dtype=np.float32)
    s = np.repeat(scales.astype(np.float64), block)[: v.size]
    v = np.clip(v, -s, s)
    with np.errstate(divide="ignore", invalid="ignore"):
        levels = np.where(s > 0, (v + s) / (2 * s) * top, 0.0)
    codes = np.clip(stochastic_round(levels, random_bytes), 0, top).astype(np.uint8)
    return Quantised(codes, scales, bits, block)


def dequantise(q: Quantised) -> np.ndarray:
    """The float64 vector the codes stand for: ``-s + code * 2 s / (2^bits - 1)`` per block."""
    top = _check_bits(q.bits)
    s = np.repeat(q.scales.astype(np.float64), q.block)[: q.size]
    return -s + q.codes.astype(np.float64) * (2.0 * s / top)


def decode_code_sum(code_sum: np.ndarray, count: int, scale: float, bits: int) -> np.ndarray:
    """Sum of ``count`` participants' updates from the (ring) sum of their codes, all quantised
    with the same ``shared_scale`` ``scale``: codes are affine in the value, so sums decode."""
    top = _check_bits(bits)
    return -count * float(scale) + np.asarray(code_sum, dtype=np.float64) * (2.0 * scale / top)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """8-bit codes as they are; 4-bit codes two per byte (low nibble first, zero pad)."""
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return codes
    _check_bits(bits)
    if codes.size and codes.max() > 15:
        raise ConfigError("4-bit codes must be below 16", field="codes", value=int(codes.max()))
    padded = np.zeros(codes.size + codes.size % 2, dtype=np.uint8)
    padded[: codes.size] = codes
    return padded[0::2] | (padded[1::2] << 4)


def unpack_codes(packed: np.ndarray, bits: int, size: int) -> np.ndarray:
    """Inverse of :func:`pack_codes` for ``size`` codes."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[:size]
    out = np.empty(packed.size * 2, dtype=np.uint8)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:size]


# --- top-k with error feedback -------------------------------------------------------------------


def top_k(vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (int32, ascending) and float32 values of the ``k`` largest-magnitude coordinates."""
    v = np.asarray(vector, dtype=np.float64)
    k = min(int(k), v.size)
    chosen = np.argpartition(np.abs(v), v.size - k)[v.size - k :] if k else np.zeros(0, int)
    indices = np.sort(chosen).astype(np.int32)
    return indices, v[indices].astype(np.float32)


@dataclass
class ErrorFeedback:
    """Per job, what top-k has not sent yet. Kept in the participant's memory only (never on
    disk, never on the wire): a restart forgets it."""

    residuals: dict[str, np.ndarray] = field(default_factory=dict)

    def sparsify(self, job_id: str, update: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of update + residual; the rest (and float32 rounding) becomes the residual."""
        update = np.asarray(update, dtype=np.float64)
        residual = self.residuals.pop(job_id, None)
        corrected = (
            update if residual is None or residual.shape != update.shape else update + residual
        )
        indices, values = top_k(corrected, k)
        left = corrected.copy()
        left[indices] -= values.astype(np.float64)
        self.residuals[job_id] = left  # re-inserted last: the most recently used job
        while len(self.residuals) > _MAX_JOBS:
            self.residuals.pop(next(iter(self.residuals)))
        return indices, values


# --- the participant's seam and the coordinator's ------------------------------------------------


def compress_fit(
    job_id: str,
    params: Mapping[str, Any],
    config: Mapping[str, Any],
    global_parameters: np.ndarray,
    local_parameters: np.ndarray,
    num_examples: int,
    metrics: dict[str, Any],
    feedback: ErrorFeedback,
    *,
    random_bytes: RandomBytes = secrets.token_bytes,
) -> Message:
    """The participant's fit reply: a plain :class:`FitRes` without compression, else the update
    ``local - global`` compressed as ``params.compression`` says (``config["compression_scale"]``,
    when the coordinator sends one, is the round's shared quantisation scale)."""
    scheme = parse_compression(params.get("compression"), block=params.get("compression_block"))
    if scheme.scheme == "none" or config.get("compression_in_ring"):
        # under secure aggregation the update is quantised once, inside the masked ring
        # (participant/secagg_tasks.py), with the round's shared scale
        return FitRes(local_parameters, num_examples=num_examples, metrics=metrics)
    update = np.asarray(local_parameters, dtype=np.float64) - global_parameters
    if scheme.scheme == "topk":
        indices, values = feedback.sparsify(job_id, update, scheme.kept(update.size))
        return SparseFitRes(indices, values, update.size, num_examples, metrics)
    shared = config.get("compression_scale")
    q = quantise(
        update,
        scheme.bits,
        block=scheme.block,
        shared_scale=None if shared is None else float(shared),
        random_bytes=random_bytes,
    )
    packed = pack_codes(q.codes, q.bits)
    return QuantisedFitRes(packed, q.scales, q.bits, q.block, q.size, num_examples, metrics)


def expand_fit_reply(participant: str, reply: Message, global_parameters: np.ndarray) -> Message:
    """The coordinator's side: a compressed reply becomes the :class:`FitRes` it stands for
    (global parameters plus the decoded update); a malformed one becomes a :class:`Failure`;
    anything else is returned as it is."""
    if not isinstance(reply, QuantisedFitRes | SparseFitRes):
        return reply
    try:
        update = _decoded_update(reply, global_parameters.size)
    except CDPFederatedError as exc:
        return Failure(participant, "fit", "ProtocolError", f"bad compressed update: {exc}")
    theta = np.asarray(global_parameters, dtype=np.float64) + update
    return FitRes(theta, num_examples=reply.num_examples, metrics=reply.metrics)


def _decoded_update(reply: QuantisedFitRes | SparseFitRes, size: int) -> np.ndarray:
    def bad(what: str, value: Any) -> TrainingError:
        return TrainingError(
            what, field=f"{reply.TYPE}", value=value, fix="send updates this release encodes"
        )

    if reply.size != size:
        raise bad(f"update has {reply.size} coordinates, the model {size}", reply.size)
    if isinstance(reply, SparseFitRes):
        idx = reply.indices
        if idx.shape != reply.values.shape or idx.ndim != 1 or reply.values.dtype.kind != "f":
            raise bad("indices and values must be two vectors of one length", list(idx.shape))
        if idx.size and (idx.min() < 0 or idx.max() >= size or np.unique(idx).size != idx.size):
            raise bad("indices must be distinct and within the model", int(idx.size))
        update = np.zeros(size)
        update[idx.astype(np.int64)] = reply.values.astype(np.float64)
        return update
    if reply.bits not in (4, 8) or reply.block < 1:
        raise bad("bits must be 4 or 8 and block positive", [reply.bits, reply.block])
    blocks = -(-size // reply.block)
    expected = -(-size * reply.bits // 8)
    if reply.codes.dtype != np.uint8 or reply.codes.shape != (expected,):
        raise bad(f"expected {expected} uint8 code bytes", list(reply.codes.shape))
    if reply.scales.shape != (blocks,) or (reply.scales < 0).any():
        raise bad(f"expected {blocks} non-negative scales", list(reply.scales.shape))
    codes = unpack_codes(reply.codes, reply.bits, size)
    scales = reply.scales.astype(np.float32)
    return dequantise(Quantised(codes, scales, reply.bits, reply.block))
