"""Gaussian noise for differential privacy: a discrete Gaussian on a fixed-point grid.

Why discrete. A float Gaussian (Box-Muller, ``numpy``) added to a float value leaks through its
low-order bits: the set of floats the sum can take depends on the value (Mironov 2012 broke
Laplace this way; the same attack applies to any float sampler). Here the noise is an integer
``k`` drawn from the discrete Gaussian ``N_Z(0, s^2)`` (``P(k) ~ exp(-k^2 / 2 s^2)``), and the
value it protects is first rounded onto the same grid of step ``grid``: the released number is
``(round(x / grid) + k) * grid``, a grid point whatever ``x`` was, so no bit beyond the grid
carries information. The discrete Gaussian has the same concentrated-DP guarantee as the
continuous one for integer sensitivities (Canonne, Kamath, Steinke 2020, Thm 4); the grid
rounding can move a sum by at most half a step per coordinate, which :func:`noise_std_for`
adds to the sensitivity.

The sampler is CKS's Algorithm 3 (discrete Laplace proposal, accepted with probability
``exp(-(|y| - s^2/t)^2 / 2 s^2)``), vectorised: whole batches are proposed and accepted at once,
so 10^6 draws take well under a second. It evaluates the geometric draws and the acceptance
test in float64 rather than CKS's exact rational arithmetic (which runs ~10^4 draws per second in
Python): that perturbs each acceptance probability by ~1e-16 relative; the outputs are integers,
so the float attack above does not apply to them.

Randomness comes from :func:`secrets.token_bytes`. Tests pass a :class:`SeededSource` (a
ChaCha20 keystream keyed by the seed) to make draws reproducible; product code never does.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from typing import Protocol

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from ..errors import ConfigError

__all__ = [
    "DEFAULT_GRID",
    "RandomSource",
    "SecureSource",
    "SeededSource",
    "uniform",
    "discrete_gaussian",
    "gaussian_noise",
    "snap",
    "noise_std_for",
]

# Grid step of released values. 2^-24 relative to a clip norm of ~1 keeps the rounding error
# (<= half a step per coordinate) far below the noise, and integers below 2^53 stay exact.
DEFAULT_GRID = 2.0**-24
_MAX_SCALE = 2.0**40  # s (in grid steps) beyond this: grid too fine for exact float integers


class RandomSource(Protocol):
    """Where random bytes come from."""

    def bytes(self, n: int) -> bytes: ...


class SecureSource:
    """The operating system's CSPRNG through :mod:`secrets` (production)."""

    def bytes(self, n: int) -> bytes:
        return secrets.token_bytes(n)


class SeededSource:
    """A deterministic ChaCha20 keystream keyed by ``seed``: tests and benchmarks only."""

    def __init__(self, seed: int | str) -> None:
        key = hashlib.blake2b(f"{seed}".encode(), person=b"cdpfl-dp-noise", digest_size=32)
        self._cipher = Cipher(algorithms.ChaCha20(key.digest(), b"\x00" * 16), mode=None)
        self._stream = self._cipher.encryptor()

    def bytes(self, n: int) -> bytes:
        return self._stream.update(b"\x00" * n)


def uniform(n: int, source: RandomSource | None = None) -> np.ndarray:
    """``n`` uniform floats in the open interval (0, 1), from 53 random bits each."""
    raw = np.frombuffer((source or SecureSource()).bytes(8 * n), dtype=np.uint64)
    return ((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53


def discrete_gaussian(scale: float, n: int, source: RandomSource | None = None) -> np.ndarray:
    """``n`` integers from the discrete Gaussian ``N_Z(0, scale^2)`` (CKS 2020, Algorithm 3)."""
    if not (math.isfinite(scale) and 0 < scale <= _MAX_SCALE):
        raise ConfigError(
            "discrete Gaussian scale must be positive and at most 2^40 grid steps",
            field="scale",
            value=scale,
            fix="use a coarser grid or a smaller noise standard deviation",
        )
    source = source or SecureSource()
    t = math.floor(scale) + 1  # the proposal's discrete Laplace scale
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        # Acceptance is at least ~0.6 for scale >= 1 (CKS Sec. 5): propose with headroom.
        batch = max(64, int((n - filled) * 1.8))
        u = uniform(3 * batch, source).reshape(3, batch)
        # Two geometric(1 - e^{-1/t}) counts; their difference is discrete Laplace(t).
        g1 = np.floor(-t * np.log(u[0]))
        g2 = np.floor(-t * np.log(u[1]))
        y = g1 - g2
        accept = u[2] < np.exp(-((np.abs(y) - scale**2 / t) ** 2) / (2.0 * scale**2))
        kept = y[accept].astype(np.int64)[: n - filled]
        out[filled : filled + kept.size] = kept
        filled += kept.size
    return out


def snap(values: np.ndarray, grid: float = DEFAULT_GRID) -> np.ndarray:
    """``values`` rounded to the nearest grid point, as integers (grid steps)."""
    return np.rint(np.asarray(values, dtype=np.float64) / grid).astype(np.int64)


def gaussian_noise(
    values: np.ndarray,
    std: float,
    *,
    grid: float = DEFAULT_GRID,
    source: RandomSource | None = None,
) -> np.ndarray:
    """``values`` snapped to the grid plus discrete Gaussian noise of standard deviation ``std``
    (in the values' units), returned as float64 grid points."""
    values = np.asarray(values, dtype=np.float64)
    if not (math.isfinite(std) and std > 0):
        raise ConfigError(
            "noise standard deviation must be a positive number",
            field="std",
            value=std,
            fix="calibrate the noise multiplier and clip norm first",
        )
    noise = discrete_gaussian(std / grid, values.size, source).reshape(values.shape)
    return (snap(values, grid) + noise).astype(np.float64) * grid


def noise_std_for(
    noise_multiplier: float, sensitivity: float, dimension: int, grid: float = DEFAULT_GRID
) -> float:
    """The standard deviation that gives ``noise_multiplier`` for an L2 ``sensitivity`` once
    values are rounded to ``grid``: rounding two neighbouring sums can move them apart by up to
    one step per coordinate more, ``grid * sqrt(dimension)`` in L2."""
    return noise_multiplier * (sensitivity + grid * math.sqrt(dimension))
