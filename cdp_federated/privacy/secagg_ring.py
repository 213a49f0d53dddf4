"""Fixed-point encoding into the ring Z_(2**bits) that secure aggregation sums in.

The interface other layers use (DP noise, compression) to put numbers through secure aggregation:

>>> ring = RingEncoder(bits=32, frac_bits=16, bound=100.0, parties=20)
>>> words = ring.encode(update)          # float array -> uint32 ring elements, refuses |x| > 100
>>> total = ring.decode(ring_sum)        # ring sum of up to 20 encodings -> float64 sum

``frac_bits=0`` makes it an integer encoder (quantised codes, counts): ``encode`` then takes
integers and is exact.

:class:`QuantisedRing` is the compressed form: the first ``size`` values become stochastic
``int8``/``int4`` codes with a scale every participant shares for the round, summed in the
smallest ring that ``parties`` times the largest code cannot wrap (2^16 for 20 parties at 8 bits),
and the few values after them (weights, metrics) stay fixed-point in the 64-bit ring: a product of
rings, one masked vector of bytes. The constructor refuses a configuration whose sum could wrap around:
``parties * round(bound * 2**frac_bits)`` must stay below ``2**(bits - 1)`` (signed values are
two's complement), and ``encode`` refuses any value above ``bound``, naming it. Rounding costs at
most ``2**-(frac_bits + 1)`` per value and party.
"""

from __future__ import annotations

import numpy as np

from ..crypto.prg import RING_DTYPES
from ..errors import ConfigError, TrainingError
from .compression import RandomBytes, decode_code_sum, quantise

__all__ = ["RingEncoder", "QuantisedRing", "code_ring_bits", "ring_sum"]


class RingEncoder:
    """Encode values of magnitude at most ``bound`` from up to ``parties`` parties into
    Z_(2**bits) with ``frac_bits`` fractional bits, and decode their ring sum."""

    def __init__(self, *, bits: int = 32, frac_bits: int = 16, bound: float, parties: int) -> None:
        if bits not in RING_DTYPES:
            raise ConfigError("the ring is 32 or 64 bits", field="bits", value=bits, fix="32 or 64")
        if not 0 <= frac_bits < bits or not parties >= 1 or not bound > 0:
            raise ConfigError(
                "need 0 <= frac_bits < bits, parties >= 1 and bound > 0",
                field="ring",
                value={"frac_bits": frac_bits, "parties": parties, "bound": bound},
            )
        self.bits, self.frac_bits, self.bound, self.parties = bits, frac_bits, bound, parties
        self.dtype = RING_DTYPES[bits].newbyteorder("=")
        self.scale = float(2**frac_bits)
        largest = parties * int(np.ceil(bound * self.scale))
        if largest >= 2 ** (bits - 1):
            raise ConfigError(
                f"a sum of {parties} values of magnitude {bound:g} at 2^{frac_bits} scale can "
                f"reach {largest}, which wraps the signed 2^{bits} ring",
                field="bound",
                value=bound,
                fix=f"lower the bound or frac_bits, or use a larger ring (bits=64); the largest "
                f"bound here is {(2 ** (bits - 1) - 1) / parties / self.scale:.6g}",
            )

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Ring elements for ``values`` (floats, or integers with ``frac_bits=0``)."""
        array = np.asarray(values)
        if array.dtype.kind not in "iuf" or array.ndim != 1:
            raise ConfigError(
                "encode takes a one-dimensional numeric array",
                field="values",
                value=f"{array.dtype}{list(array.shape)}",
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ConfigError("values must be finite", field="values", fix="drop NaN/Inf first")
        if array.size and float(np.abs(array.astype(np.float64)).max()) > self.bound:
            raise ConfigError(
                f"a value exceeds the encoder's bound {self.bound:g}: the ring sum could wrap",
                field="values",
                value=float(np.abs(array.astype(np.float64)).max()),
                fix="clip updates to the bound (or choose a larger bound and ring) before "
                "secure aggregation",
            )
        if array.dtype.kind == "f":
            scaled = np.rint(array.astype(np.float64) * self.scale).astype(np.int64)
        else:
            scaled = array.astype(np.int64) << self.frac_bits
        return scaled.astype(self.dtype)  # two's complement: negative values wrap to the top

    def decode(self, total: np.ndarray) -> np.ndarray:
        """The float64 sum that the ring sum ``total`` of at most ``parties`` encodings stands
        for (values at or above 2**(bits-1) are negative)."""
        words = np.ascontiguousarray(total, dtype=self.dtype)
        signed = words.view(np.int64 if self.bits == 64 else np.int32)  # two's complement
        return signed.astype(np.float64) / self.scale

    def zeros(self, length: int) -> np.ndarray:
        return np.zeros(length, dtype=self.dtype)


def code_ring_bits(parties: int, code_bits: int) -> int:
    """The narrowest ring (8, 16, 32 bits) in which ``parties`` codes of ``code_bits`` bits (each
    at most ``2**code_bits - 1``, unsigned) sum without wrapping."""
    top = (1 << code_bits) - 1
    for bits in (8, 16, 32):
        if parties * top < 1 << bits:
            return bits
    raise ConfigError(
        f"{parties} participants' {code_bits}-bit codes can wrap even a 2^32 ring",
        field="parties",
        value=parties,
        fix="aggregate fewer participants per round or turn compression off",
    )


class QuantisedRing:
    """A contribution whose first ``size`` values are quantised to ``code_bits``-bit codes
    with the shared ``scale`` (values beyond it are clipped, :func:`~.compression.quantise`)
    and whose other values go through ``extras`` (a 64-bit :class:`RingEncoder`).

    ``segments`` is what :class:`~.secagg.SecAggConfig` masks: ``(ring bits, size)`` for the
    codes, then ``(64, count)`` for the extras. :meth:`encode` gives the little-endian bytes,
    :meth:`decode` turns the bytes of a ring sum of ``count`` participants back into floats: the
    sum of their (clipped) values, unbiased, then the extras' sums."""

    def __init__(
        self, *, code_bits: int, scale: float, size: int, extras: RingEncoder, count: int
    ) -> None:
        if code_bits not in (4, 8):
            raise ConfigError(
                "in-ring compression takes 4- or 8-bit codes", field="bits", value=code_bits
            )
        if not (np.isfinite(scale) and scale > 0) or size < 0 or count < 0:
            raise ConfigError(
                "the shared scale must be positive and finite",
                field="compression_scale",
                value=scale,
                fix="announce a positive bound on the updates' coordinates",
            )
        if extras.bits != 64:
            raise ConfigError("the extras' ring is 64 bits", field="bits", value=extras.bits)
        self.code_bits, self.size, self.extras, self.count = code_bits, size, extras, count
        self.scale = float(np.float32(scale))  # what quantise() uses
        self.ring_bits = code_ring_bits(extras.parties, code_bits)
        self.segments = ((self.ring_bits, size), (64, count))
        self._codes = np.dtype(f"<u{self.ring_bits // 8}")
        self.nbytes = self._codes.itemsize * size + 8 * count

    def encode(
        self,
        values: np.ndarray,
        random_bytes: RandomBytes | None = None,
        *,
        norm_bound: float | None = None,
    ) -> np.ndarray:
        """The bytes to mask: codes of the first ``size`` values, then the extras.

        ``norm_bound`` (DP's clip norm C) keeps the L2 norm of what the codes decode to within
        C, which the sum's sensitivity (and so the DP noise) relies on: rounding moves each
        value by up to a step, so the values are first shrunk to norm ``sqrt(C^2 - size *
        step^2 / 4)`` (the rounding's expected squared norm is then at most C^2) and the
        rounding is drawn again until the decoded norm is within C (conditional rounding, as
        in Kairouz et al. 2021; a small bias towards shorter updates)."""
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (self.size + self.count,):
            raise ConfigError(
                f"expected {self.size} values to code and {self.count} extras",
                field="values",
                value=list(array.shape),
            )
        if not np.isfinite(array).all():
            raise ConfigError("values must be finite", field="values", fix="drop NaN/Inf first")
        options = {} if random_bytes is None else {"random_bytes": random_bytes}
        head = array[: self.size]
        if norm_bound is not None:
            head = self._shrunk(head, norm_bound)
        for _ in range(_ROUNDING_ATTEMPTS):
            q = quantise(
                head, self.code_bits, block=max(1, self.size), shared_scale=self.scale, **options
            )
            if norm_bound is None or self._decoded_norm(q.codes) <= norm_bound:
                break
        else:
            raise TrainingError(
                f"could not round the update to {self.code_bits}-bit codes within the DP clip "
                f"norm {norm_bound:g}: the rounding alone can add {self._step_norm():.3g}",
                field="params.compression",
                value=f"int{self.code_bits}",
                fix="use int8 rather than int4, a larger dp_clip, or no compression with DP",
            )
        out = np.empty(self.nbytes, dtype=np.uint8)
        split = self._codes.itemsize * self.size
        out[:split] = q.codes.astype(self._codes).view(np.uint8)
        out[split:] = self.extras.encode(array[self.size :]).astype("<u8").view(np.uint8)
        return out

    def _step(self) -> float:
        return 2.0 * self.scale / ((1 << self.code_bits) - 1)

    def _step_norm(self) -> float:
        """The L2 norm rounding can add at most: one step per value."""
        return self._step() * float(np.sqrt(self.size))

    def _shrunk(self, head: np.ndarray, bound: float) -> np.ndarray:
        room = bound * bound - self.size * self._step() ** 2 / 4
        target = float(np.sqrt(room)) if room > 0 else 0.0
        norm = float(np.linalg.norm(head))
        return head * (target / norm) if norm > target else head

    def _decoded_norm(self, codes: np.ndarray) -> float:
        decoded = -self.scale + codes.astype(np.float64) * self._step()
        return float(np.linalg.norm(decoded))

    def decode(self, total: np.ndarray, participants: int) -> np.ndarray:
        """Floats for the ring sum ``total`` (bytes) of ``participants`` encodings."""
        raw = np.ascontiguousarray(total, dtype=np.uint8)
        split = self._codes.itemsize * self.size
        codes = raw[:split].view(self._codes).astype(np.int64)
        head = decode_code_sum(codes, participants, self.scale, self.code_bits)
        tail = self.extras.decode(raw[split:].view("<u8").astype(self.extras.dtype))
        return np.concatenate([head, tail])


_ROUNDING_ATTEMPTS = 64  # each succeeds with probability about 1/2 or better


def ring_sum(vectors: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """The sum of ``vectors`` in Z_(2**bits): unsigned numpy arithmetic wraps by itself."""
    total = np.zeros(vectors[0].shape, dtype=dtype) if vectors else np.zeros(0, dtype=dtype)
    for vector in vectors:
        np.add(total, vector, out=total, casting="unsafe")
    return total
