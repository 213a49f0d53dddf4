"""Expand a 32-byte seed into a vector of ring elements (the masks of secure aggregation).

.. warning::
   Hazardous material: a seed must mask one vector only. Expanding the same seed for two inputs
   (two rounds, two sessions) lets anyone who sees both masked inputs subtract the masks away.
   Derive per-session seeds (:func:`cdp_federated.crypto.kex.pairwise_seed` does).

The stream is ChaCha20 (RFC 7539 block function, from ``cryptography``) keyed by the seed, with
an all-zero 16-byte counter/nonce block: one seed, one stream. ``length`` words of ``bits`` (32
or 64) are read from it as little-endian unsigned integers, uniform over the ring Z_(2**bits).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from ..errors import ConfigError

__all__ = ["SEED_BYTES", "RING_DTYPES", "expand"]

SEED_BYTES = 32
RING_DTYPES = {32: np.dtype("<u4"), 64: np.dtype("<u8")}
_NONCE = bytes(16)


def expand(seed: bytes, length: int, bits: int = 32) -> np.ndarray:
    """``length`` pseudo-random elements of Z_(2**bits) from ``seed`` (uint32 or uint64, a
    read-only array)."""
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        raise ConfigError(
            f"a PRG seed is {SEED_BYTES} bytes",
            field="seed",
            value=len(seed) if isinstance(seed, bytes | bytearray) else type(seed).__name__,
            fix="derive seeds with cdp_federated.crypto.kex",
        )
    dtype = RING_DTYPES.get(bits)
    if dtype is None:
        raise ConfigError("the ring is 32 or 64 bits", field="bits", value=bits, fix="use 32 or 64")
    if length < 0:
        raise ConfigError("length must be non-negative", field="length", value=length)
    encryptor = Cipher(algorithms.ChaCha20(bytes(seed), _NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(length * dtype.itemsize))  # keystream = ChaCha20 of zeros
    # read-only, and no copy on little-endian machines (the masks are only ever added)
    return np.frombuffer(stream, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
