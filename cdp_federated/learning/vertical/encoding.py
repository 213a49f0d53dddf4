"""Fixed-point encoding of gradients and hessians, and the packing of one (g, h) pair per plaintext.

One scale for everything: ``g_int = round(g * 2**f)``, ``h_int = round(h * 2**f)``, so any sum
of encoded values is the encoding of the sum (up to the per-row rounding) and ciphertexts add
without exponent alignment. Sums of the integers are exact in every mode (plaintext, HE), which
is what makes the HE protocol build exactly the plaintext protocol's trees.

Packing (``pack_gh``): ``p = g_int * 2**k + h_int`` with ``k = bit_length(n * max(h_int))``.

Bound (why one ciphertext carries both): hessians are non-negative, so the hessian sum ``H`` of
any subset of the ``n`` rows satisfies ``0 <= H <= n * max(h_int) < 2**k``. A packed sum is
``S = G * 2**k + H`` with ``G`` the (signed) gradient sum, hence ``H = S mod 2**k`` and
``G = (S - H) >> k`` exactly, for negative ``G`` too. ``|S| <= n * max|g_int| * 2**k + H <
(n * max|g_int| + 1) * 2**k =: B``; a histogram sum (or a cumulative or subtracted one: all
are subset sums) fits a signed slot of ``w = bit_length(B) + 1`` bits since ``B <= 2**(w-1)``.
:class:`GHLayout` checks that one slot fits the plaintext space; tests exercise the edge where
every row carries the maximum hessian.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import TrainingError

__all__ = ["GHLayout", "encode_fixed", "pack_gh", "unpack_gh"]

# numpy int64 holds |v| < 2**63; keep a bit of headroom for exact histogram sums.
_INT64_SUM_BITS = 62


def encode_fixed(values: np.ndarray, frac_bits: int) -> np.ndarray:
    """``round(v * 2**frac_bits)`` as int64 (round half to even)."""
    return np.rint(np.asarray(values, dtype=np.float64) * float(1 << frac_bits)).astype(np.int64)


@dataclass(frozen=True)
class GHLayout:
    """Where g and h sit in a plaintext, and the widths the passive party packs sums with.

    ``shift`` is ``k`` above, ``g_bound``/``h_bound`` the largest ``|g_int|``/``h_int`` of the
    tree's rows and ``n_rows`` the row count; ``slot_bits`` is the signed slot width ``w``."""

    n_rows: int
    g_bound: int
    h_bound: int

    @classmethod
    def for_tree(cls, g_int: np.ndarray, h_int: np.ndarray) -> GHLayout:
        if h_int.size and int(h_int.min()) < 0:
            raise TrainingError(
                "hessians must be non-negative", field="hessian", value=int(h_int.min())
            )
        g_bound = int(np.abs(g_int).max()) if g_int.size else 0
        h_bound = int(h_int.max()) if h_int.size else 0
        layout = cls(n_rows=int(g_int.size), g_bound=g_bound, h_bound=h_bound)
        # Plaintext (own-feature) histograms sum int64s: every subset sum must fit.
        if (layout.n_rows * max(g_bound, h_bound, 1)).bit_length() > _INT64_SUM_BITS:
            raise TrainingError(
                "gradients too large for exact fixed-point sums",
                field="gradient",
                value=g_bound,
                fix="standardise the regression label or lower frac_bits",
            )
        return layout

    @property
    def shift(self) -> int:
        return max(1, (self.n_rows * self.h_bound).bit_length())

    @property
    def slot_bits(self) -> int:
        bound = (self.n_rows * self.g_bound + 1) << self.shift
        return bound.bit_length() + 1

    def check_fits(self, plaintext_bits: int) -> None:
        if self.slot_bits > plaintext_bits:
            raise TrainingError(
                "packed gradient sums do not fit the plaintext space",
                field="key_bits",
                value=plaintext_bits,
                fix="use a larger key or a smaller frac_bits",
            )


def pack_gh(g_int: np.ndarray, h_int: np.ndarray, shift: int) -> np.ndarray:
    """Object array of Python ints ``g << shift + h`` (exact, no int64 overflow)."""
    g = g_int.astype(object)
    h = h_int.astype(object)
    return g * (1 << shift) + h


def unpack_gh(sums: list[int], shift: int) -> tuple[np.ndarray, np.ndarray]:
    """Split packed sums into (G, H) int64 arrays (see the module docstring for why it is exact)."""
    mask = (1 << shift) - 1
    h = [s & mask for s in sums]
    g = [(s - hv) >> shift for s, hv in zip(sums, h, strict=True)]
    return np.array(g, dtype=np.int64).reshape(-1), np.array(h, dtype=np.int64).reshape(-1)
