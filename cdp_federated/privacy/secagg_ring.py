"""Fixed-point encoding into the ring Z_(2**bits) that secure aggregation sums in.

The interface other layers use (DP noise, compression) to put numbers through secure aggregation:

>>> ring = RingEncoder(bits=32, frac_bits=16, bound=100.0, parties=20)
>>> words = ring.encode(update)          # float array -> uint32 ring elements, refuses |x| > 100
>>> total = ring.decode(ring_sum)        # ring sum of up to 20 encodings -> float64 sum

``frac_bits=0`` makes it an integer encoder (quantised codes, counts): ``encode`` then takes
integers and is exact. The constructor refuses a configuration whose sum could wrap around:
``parties * round(bound * 2**frac_bits)`` must stay below ``2**(bits - 1)`` (signed values are
two's complement), and ``encode`` refuses any value above ``bound``, naming it. Rounding costs at
most ``2**-(frac_bits + 1)`` per value and party.
"""

from __future__ import annotations

import numpy as np

from ..crypto.prg import RING_DTYPES
from ..errors import ConfigError

__all__ = ["RingEncoder", "ring_sum"]


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


def ring_sum(vectors: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """The sum of ``vectors`` in Z_(2**bits): unsigned numpy arithmetic wraps by itself."""
    total = np.zeros(vectors[0].shape, dtype=dtype) if vectors else np.zeros(0, dtype=dtype)
    for vector in vectors:
        np.add(total, vector, out=total, casting="unsafe")
    return total
