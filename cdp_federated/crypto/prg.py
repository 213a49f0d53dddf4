"""Expand a 32-byte seed into a vector of ring elements (the masks of secure aggregation).

.. warning::
   Hazardous material: a seed must mask one vector only. Expanding the same seed for two inputs
   (two rounds, two sessions) lets anyone who sees both masked inputs subtract the masks away.
   Derive per-session seeds (:func:`cdp_federated.crypto.kex.pairwise_seed` does).

The stream is AES-128 in counter mode (from ``cryptography``; OpenSSL uses the CPU's AES
instructions) from an all-zero counter block, keyed by ``SHA-256(label | seed)`` cut to 16
bytes: one seed, one stream, 128-bit security as in Bonawitz et al.'s AES-CTR PRG. It replaced
ChaCha20, which measured 1.5-2x slower per byte here (mask expansion is most of secure
aggregation's compute). ``length`` words of ``bits`` (32 or 64) are read from the stream as
little-endian unsigned integers, uniform over the ring Z_(2**bits).
"""

from __future__ import annotations

import hashlib

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..errors import ConfigError

__all__ = ["SEED_BYTES", "RING_DTYPES", "expand", "keystream"]

SEED_BYTES = 32
RING_DTYPES = {32: np.dtype("<u4"), 64: np.dtype("<u8")}
_COUNTER = bytes(16)
_LABEL = b"cdp-federated/secagg-prg/v2\x00"


def _check_seed(seed: bytes) -> None:
    if not isinstance(seed, bytes | bytearray) or len(seed) != SEED_BYTES:
        raise ConfigError(
            f"a PRG seed is {SEED_BYTES} bytes",
            field="seed",
            value=len(seed) if isinstance(seed, bytes | bytearray) else type(seed).__name__,
            fix="derive seeds with cdp_federated.crypto.kex",
        )


def keystream(seed: bytes, nbytes: int, out: np.ndarray | None = None) -> np.ndarray:
    """The first ``nbytes`` bytes of ``seed``'s stream as a uint8 array, written into ``out``
    (a writable uint8 array of at least ``nbytes + 63`` bytes, reused across calls so masking
    a long vector with many seeds allocates nothing) or into a fresh array."""
    _check_seed(seed)
    if nbytes < 0:
        raise ConfigError("length must be non-negative", field="length", value=nbytes)
    if out is None:
        out = np.empty(nbytes + _SLACK, dtype=np.uint8)
    elif out.dtype != np.uint8 or out.ndim != 1 or out.size < nbytes + _SLACK:
        raise ConfigError(
            "the keystream buffer is too small",
            field="out",
            value=out.size,
            fix=f"pass a uint8 buffer of at least {nbytes + _SLACK} bytes",
        )
    key = hashlib.sha256(_LABEL + bytes(seed)).digest()[:16]
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_COUNTER)).encryptor()
    written = encryptor.update_into(_zeros(nbytes), out)  # keystream = encryption of zeros
    return out[:written]


def expand(seed: bytes, length: int, bits: int = 32) -> np.ndarray:
    """``length`` pseudo-random elements of Z_(2**bits) from ``seed`` (uint32 or uint64): the
    stream of :func:`keystream` read as little-endian words."""
    dtype = RING_DTYPES.get(bits)
    if dtype is None:
        _check_seed(seed)
        raise ConfigError("the ring is 32 or 64 bits", field="bits", value=bits, fix="use 32 or 64")
    if length < 0:
        raise ConfigError("length must be non-negative", field="length", value=length)
    stream = keystream(seed, length * dtype.itemsize)
    return stream.view(dtype).astype(dtype.newbyteorder("="), copy=False)


_SLACK = 63  # update_into wants room for a block beyond the data (15 bytes for AES)
_ZEROS = memoryview(bytes(0))


def _zeros(nbytes: int) -> memoryview:
    """A read-only all-zero input of ``nbytes``, kept between calls (every mask has the same
    length, so this allocates once per vector size)."""
    global _ZEROS
    if len(_ZEROS) < nbytes:
        _ZEROS = memoryview(bytes(nbytes))
    return _ZEROS[:nbytes]
