"""Per-tree row and feature draws that every party derives from the job's shared seed.

A deterministic stream (SHAKE-256 of the seed and a label) instead of ``numpy.random``: every
party and the coordinator compute the same draws from the seed alone, so nobody sends row ids,
and the draws are reproducible across numpy versions. The seed itself comes from the job spec,
or from :mod:`secrets` on the coordinator.
"""

from __future__ import annotations

import hashlib
import secrets

import numpy as np

__all__ = ["uniforms", "row_sample", "feature_sample", "fresh_seed"]


def fresh_seed() -> int:
    """A seed for jobs that did not fix one: 63 bits from the operating system."""
    return secrets.randbits(63)


def uniforms(seed: int, label: str, n: int) -> np.ndarray:
    """``n`` floats in [0, 1), a pure function of ``(seed, label)`` (53 random bits each)."""
    if n <= 0:
        return np.zeros(0)
    stream = hashlib.shake_256(f"cdpfl-gbm\x00{seed}\x00{label}".encode()).digest(8 * n)
    return (np.frombuffer(stream, dtype="<u8") >> np.uint64(11)) * (1.0 / (1 << 53))


def row_sample(seed: int, tree: int, party: str, n: int, share: float) -> np.ndarray | None:
    """Indices of this party's rows that tree ``tree`` uses (``None``: all of them)."""
    if share >= 1.0:
        return None
    return np.flatnonzero(uniforms(seed, f"rows\x00{tree}\x00{party}", n) < share)


def feature_sample(seed: int, tree: int, n_features: int, share: float) -> np.ndarray:
    """Sorted indices of the features tree ``tree`` may split on (at least one)."""
    if share >= 1.0:
        return np.arange(n_features)
    k = max(1, round(share * n_features))
    order = np.argsort(uniforms(seed, f"features\x00{tree}", n_features), kind="stable")
    return np.sort(order[:k])
