"""Additively homomorphic encryption of integer vectors, behind one small interface.

.. warning::
   Hazardous material (see :mod:`cdp_federated.crypto`). Plaintexts are *integers*: callers
   encode reals as fixed-point with one scale and must keep every sum inside the plaintext
   bound (:attr:`HEPublicKey.plaintext_bits`); nothing here detects an overflow, it silently
   wraps. Decrypted values are signed (two's-complement-like around the modulus).

Schemes (``scheme=``):

* ``"paillier"`` (default, 2048-bit keys): Paillier, IND-CPA under the decisional composite
  residuosity assumption; 2048-bit moduli give about 112-bit security.
* ``"ou"`` (opt-in): Okamoto-Uchiyama, several times faster with half-size ciphertexts, also
  IND-CPA. **Caveat** (HEU's own documentation): its plaintext space is ``Z_p`` with ``p`` a
  secret factor, so a peer that can get the *decryption of a ciphertext it crafted* (a
  chosen-ciphertext setting) can push a plaintext past ``p`` and recover ``p`` from the wrapped
  result: the private key. Use OU only where decrypted values never go back to the party that
  produced the ciphertexts, or where the key holder range-checks every decryption and refuses
  out-of-range values (the vertical protocols do both: see ``docs/vertical.md``). Some papers
  also argue that OU moduli need 500-600 more bits than Paillier's for equal strength.
* ``"plain"``: no encryption at all, for tests and lossless-equivalence checks; needs
  ``insecure=True``.

Backends (``backend=``): ``"heu"`` (SecretFlow HEU, ``sf-heu``, C++ with a batched numpy API:
the product backend) and ``"phe"`` (python-paillier, a slow pure-Python reference used by tests;
Paillier only). Key sizes below 2048 bits need ``insecure=True`` (unit tests use 1024).

Randomness: keys and encryption nonces come from the library's own CSPRNG: HEU links OpenSSL
(``RAND_bytes``, seeded from the OS) for its bignum randomness; phe uses
``random.SystemRandom`` (``os.urandom``). Nothing here accepts a seed.

Serialisation never pickles: public keys and ciphertext vectors travel as bytes in the library's
own binary format (HEU's ``serialize``/``load_from``; big-endian fixed-width integers for phe),
and :meth:`HEPublicKey.loads` checks the vector length and turns any parse failure into a
:class:`~cdp_federated.errors.ProtocolError`.

Parallelism: see :mod:`.he_heu` (which HEU calls use every core; never fork after loading HEU).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, ProtocolError

__all__ = [
    "SCHEMES",
    "BACKENDS",
    "MIN_SECURE_KEY_BITS",
    "CipherVector",
    "HEPublicKey",
    "HEKeyPair",
    "generate_keypair",
    "load_public_key",
    "slot_capacity",
    "unpack_slots",
]

SCHEMES = ("paillier", "ou", "plain")
BACKENDS = ("heu", "phe")
MIN_SECURE_KEY_BITS = 2048


@dataclass(frozen=True, eq=False)
class CipherVector:
    """An opaque 1-D vector of ciphertexts of one key (``data`` is backend-specific)."""

    backend: str
    data: Any
    length: int

    def __len__(self) -> int:
        return self.length


class HEPublicKey(ABC):
    """Encrypt and compute on ciphertexts; what a party that does not hold the secret key gets."""

    scheme: str
    backend: str
    key_bits: int

    @property
    @abstractmethod
    def plaintext_bits(self) -> int:
        """Largest ``t`` such that every ``|m| < 2**t`` encrypts and decrypts back to ``m``."""

    @abstractmethod
    def to_bytes(self) -> bytes:
        """The public key in the backend's own binary format (load with :func:`load_public_key`)."""

    @abstractmethod
    def encrypt(self, values: Sequence[int] | np.ndarray) -> CipherVector:
        """Encrypt signed integers (Python ints or an int64 array), each ``|v| < 2**plaintext_bits``."""

    @abstractmethod
    def add(self, a: CipherVector, b: CipherVector) -> CipherVector:
        """Element-wise ``a + b``."""

    @abstractmethod
    def sub(self, a: CipherVector, b: CipherVector) -> CipherVector:
        """Element-wise ``a - b`` (histogram subtraction)."""

    @abstractmethod
    def take(self, x: CipherVector, index: np.ndarray) -> CipherVector:
        """``x[index]`` (repeats allowed)."""

    @abstractmethod
    def shift(self, x: CipherVector, bits: int) -> CipherVector:
        """Element-wise ``x * 2**bits`` (a plaintext-ciphertext product)."""

    @abstractmethod
    def bucket_sums(
        self,
        x: CipherVector,
        masks: Sequence[np.ndarray],
        codes: np.ndarray,
        n_bins: int,
        *,
        cumulative: bool,
    ) -> list[CipherVector]:
        """Per mask (a boolean row filter), the sums of ``x`` over the rows of each (feature, bin):
        ``codes`` is ``(rows, features)`` with values in ``[0, n_bins)``; each result has
        ``features * n_bins`` entries, feature-major. ``cumulative`` sums bins ``0..b`` instead."""

    def weighted_sums(self, x: CipherVector, weights: np.ndarray) -> CipherVector:
        """``out[j] = sum_i weights[i, j] * x[i]``: ciphertexts times a plaintext integer matrix of
        shape ``(len(x), k)``. Each product is a modular exponentiation: keep weights small and
        non-negative for speed (a negative weight costs a full-size exponent)."""
        raise ConfigError(
            "this HE backend has no weighted sums", field="backend", value=self.backend
        )

    @abstractmethod
    def dumps(self, x: CipherVector) -> bytes:
        """Serialise a ciphertext vector (the backend's binary format, never pickle)."""

    @abstractmethod
    def loads(self, data: bytes, length: int) -> CipherVector:
        """Parse :meth:`dumps` output of exactly ``length`` ciphertexts; ProtocolError otherwise."""

    def pack(self, x: CipherVector, slot_bits: int, slots: int) -> CipherVector:
        """Pack ``slots`` values per ciphertext: output ``j`` holds ``sum_i x[i*q + j] * 2**(i*slot_bits)``
        with ``q = ceil(len(x) / slots)``, by Horner's rule (``slots - 1`` shifts and additions per
        output). The tail is padded with copies of ``x[0]``, which :func:`unpack_slots` drops.
        The caller guarantees ``|x[i]| < 2**(slot_bits - 1)`` and ``slots * slot_bits <=
        plaintext_bits`` (see :func:`slot_capacity`)."""
        if slots < 1 or slot_bits < 2:
            raise ConfigError("invalid packing", field="slots", value=(slots, slot_bits))
        n = len(x)
        if n == 0 or slots == 1:
            return x
        q = -(-n // slots)
        index = np.arange(q * slots)
        index[index >= n] = 0
        padded = self.take(x, index)
        acc = self.take(padded, np.arange((slots - 1) * q, slots * q))
        for i in range(slots - 2, -1, -1):
            acc = self.add(
                self.shift(acc, slot_bits), self.take(padded, np.arange(i * q, (i + 1) * q))
            )
        return acc

    def _check(self, x: CipherVector) -> None:
        if not isinstance(x, CipherVector) or x.backend != self.backend:
            raise ProtocolError(
                "ciphertext vector from another backend",
                field="ciphertexts",
                value=getattr(x, "backend", type(x).__name__),
                fix=f"use vectors made by the {self.backend} backend",
            )


class HEKeyPair(ABC):
    """The key holder's side: the public key plus decryption."""

    public: HEPublicKey

    @abstractmethod
    def decrypt(self, x: CipherVector) -> list[int]:
        """Signed Python integers, one per ciphertext."""


def slot_capacity(plaintext_bits: int, slot_bits: int) -> int:
    """How many ``slot_bits``-wide signed slots one plaintext holds.

    Packed ``T = sum_i v_i 2**(i w)`` with ``|v_i| < 2**(w-1)`` satisfies
    ``|T| < 2**(w-1) * sum_{i<m} 2**(i w) < 2**(m w)``, so ``m w <= plaintext_bits`` suffices.
    """
    if slot_bits < 2:
        raise ConfigError("slot width must be at least 2 bits", field="slot_bits", value=slot_bits)
    return plaintext_bits // slot_bits


def unpack_slots(values: Sequence[int], slot_bits: int, slots: int, count: int) -> list[int]:
    """Inverse of :meth:`HEPublicKey.pack` on decrypted integers: the first ``count`` slot values.

    Each slot is read as a signed ``slot_bits``-bit number from the low end: ``v = T mod 2**w``,
    minus ``2**w`` when ``v >= 2**(w-1)``; then ``T = (T - v) >> w`` is exact. A packed value
    whose top is not a clean sign extension (``|T| >= 2**(slots * w)``) did not come from
    :meth:`pack` of in-range values and raises :class:`ProtocolError`.
    """
    if slots == 1:
        out = [int(v) for v in values]
        return out[:count]
    w = slot_bits
    full, half = 1 << w, 1 << (w - 1)
    limit = 1 << (slots * w)
    q = len(values)
    if q * slots < count:
        raise ProtocolError("too few packed values", field="ciphertexts", value=q)
    grid = [[0] * q for _ in range(slots)]
    for j, packed in enumerate(values):
        t = int(packed)
        if not -limit < t < limit:
            raise ProtocolError(
                "a packed value is out of range; refusing it",
                field="ciphertexts",
                value=j,
                fix="the sender must pack in-range sums only (this check also blocks OU's "
                "chosen-ciphertext key-recovery attack)",
            )
        for i in range(slots):
            v = t & (full - 1)
            if v >= half:
                v -= full
            grid[i][j] = v
            t = (t - v) >> w
        if t:
            raise ProtocolError("a packed value has stray high bits", field="ciphertexts", value=j)
    flat = [v for row in grid for v in row]
    return flat[:count]


def _check_key_size(scheme: str, key_bits: int, insecure: bool) -> None:
    if scheme not in SCHEMES:
        raise ConfigError(
            "unknown homomorphic encryption scheme",
            field="scheme",
            value=scheme,
            fix="use 'paillier' (default) or 'ou'",
        )
    if scheme == "plain" and not insecure:
        raise ConfigError(
            "the 'plain' scheme does not encrypt",
            field="scheme",
            value=scheme,
            fix="pass insecure=True (tests only) or use 'paillier'",
        )
    if not isinstance(key_bits, int) or key_bits < 512 or key_bits % 2:
        raise ConfigError(
            "key size must be an even number of bits >= 512", field="key_bits", value=key_bits
        )
    if key_bits < MIN_SECURE_KEY_BITS and not insecure:
        raise ConfigError(
            f"{key_bits}-bit keys are not secure",
            field="key_bits",
            value=key_bits,
            fix=f"use {MIN_SECURE_KEY_BITS} bits or more (pass insecure=True only in tests)",
        )


def generate_keypair(
    scheme: str = "paillier",
    key_bits: int = MIN_SECURE_KEY_BITS,
    *,
    backend: str = "heu",
    insecure: bool = False,
) -> HEKeyPair:
    """A fresh key pair. ``backend="phe"`` supports Paillier only; ``"plain"`` ignores the backend."""
    _check_key_size(scheme, key_bits, insecure)
    if scheme == "plain":
        from .he_phe import PlainKeyPair

        return PlainKeyPair(key_bits)
    if backend == "heu":
        from .he_heu import HeuKeyPair

        return HeuKeyPair.generate(scheme, key_bits)
    if backend == "phe":
        if scheme != "paillier":
            raise ConfigError(
                "the phe backend only does Paillier",
                field="scheme",
                value=scheme,
                fix="use backend='heu' for OU",
            )
        from .he_phe import PheKeyPair

        return PheKeyPair.generate(key_bits)
    raise ConfigError(
        "unknown HE backend", field="backend", value=backend, fix="use 'heu' or 'phe'"
    )


def load_public_key(
    data: bytes, *, scheme: str, backend: str, insecure: bool = False
) -> HEPublicKey:
    """Parse a peer's public key; refuses another scheme, a weak key (unless ``insecure``) and
    malformed bytes with :class:`ProtocolError`."""
    if scheme == "plain":
        from .he_phe import PlainPublicKey

        key: HEPublicKey = PlainPublicKey.from_bytes(data)
    elif backend == "heu":
        from .he_heu import HeuPublicKey

        key = HeuPublicKey.from_bytes(data, scheme)
    elif backend == "phe":
        from .he_phe import PhePublicKey

        key = PhePublicKey.from_bytes(data)
    else:
        raise ConfigError(
            "unknown HE backend", field="backend", value=backend, fix="use 'heu' or 'phe'"
        )
    # A loaded key's size is its modulus bit length (odd for some OU moduli): check strength only.
    if key.key_bits < MIN_SECURE_KEY_BITS and not insecure:
        raise ProtocolError(
            f"{key.key_bits}-bit keys are not secure",
            field="public_key",
            value=key.key_bits,
            fix=f"the key holder must use {MIN_SECURE_KEY_BITS} bits or more",
        )
    return key
