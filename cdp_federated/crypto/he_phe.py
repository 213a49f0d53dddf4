"""Reference backends: python-paillier (``phe``, pure Python, slow) and ``plain`` (no encryption).

.. warning:: Hazardous material; see :mod:`cdp_federated.crypto.he`. ``plain`` encrypts
   nothing: it exists so tests can run the vertical protocols fast and check that encryption
   changes no result.

Both keep ciphertexts as Python integers and compute with the textbook operations (Paillier:
``Enc(a) * Enc(b) = Enc(a + b) mod n^2``, ``Enc(a)^k = Enc(k a)``), one value at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, ProtocolError
from .he import CipherVector, HEKeyPair, HEPublicKey

__all__ = ["PhePublicKey", "PheKeyPair", "PlainPublicKey", "PlainKeyPair"]

_PHE_MAGIC = b"PHE1"
_PLAIN_MAGIC = b"PLN1"


def _phe():
    try:
        from phe import paillier
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError(
            "the phe backend needs python-paillier",
            field="backend",
            value="phe",
            fix="pip install phe (it is in the dev extra)",
        ) from exc
    return paillier


class _IntVectorKey(HEPublicKey):
    """Shared code for backends whose ciphertexts are Python ints (a list per vector)."""

    width: int  # bytes per serialised ciphertext

    def _wrap(self, data: list[int]) -> CipherVector:
        return CipherVector(self.backend, data, len(data))

    def take(self, x: CipherVector, index: np.ndarray) -> CipherVector:
        self._check(x)
        return self._wrap([x.data[int(i)] for i in np.asarray(index).reshape(-1)])

    def bucket_sums(self, x, masks, codes, n_bins, *, cumulative):
        self._check(x)
        codes = np.asarray(codes)
        n_features = codes.shape[1]
        out = []
        for mask in masks:
            rows = np.flatnonzero(np.asarray(mask, dtype=bool))
            sums = [self._zero() for _ in range(n_features * n_bins)]
            for f in range(n_features):
                for r in rows:
                    k = f * n_bins + int(codes[r, f])
                    sums[k] = self._add1(sums[k], x.data[r])
                if cumulative:
                    for b in range(1, n_bins):
                        k = f * n_bins + b
                        sums[k] = self._add1(sums[k], sums[k - 1])
            out.append(self._wrap(sums))
        return out

    def add(self, a, b):
        self._check(a)
        self._check(b)
        return self._wrap([self._add1(u, v) for u, v in zip(a.data, b.data, strict=True)])

    def weighted_sums(self, x: CipherVector, weights: np.ndarray) -> CipherVector:
        self._check(x)
        w = np.asarray(weights, dtype=object)
        if w.ndim != 2 or w.shape[0] != x.length or w.shape[1] == 0:
            raise ConfigError(
                "weights must be a (len(x), k) matrix", field="weights", value=w.shape
            )
        out = []
        for j in range(w.shape[1]):
            acc = self._zero()
            for c, k in zip(x.data, w[:, j], strict=True):
                acc = self._add1(acc, self._mul1(c, int(k)))
            out.append(acc)
        return self._wrap(out)

    def dumps(self, x: CipherVector) -> bytes:
        self._check(x)
        return b"".join(self._to_bytes1(c) for c in x.data)

    def loads(self, data: bytes, length: int) -> CipherVector:
        data = bytes(data)
        if len(data) != length * self.width:
            raise ProtocolError(
                "ciphertext vector has the wrong length",
                field="ciphertexts",
                value=len(data),
                fix=f"expected {length} ciphertexts of {self.width} bytes",
            )
        w = self.width
        return self._wrap([self._from_bytes1(data[i * w : (i + 1) * w]) for i in range(length)])

    # per-value primitives
    def _zero(self) -> int:
        raise NotImplementedError

    def _add1(self, a: int, b: int) -> int:
        raise NotImplementedError

    def _mul1(self, c: int, k: int) -> int:
        raise NotImplementedError

    def _to_bytes1(self, c: int) -> bytes:
        raise NotImplementedError

    def _from_bytes1(self, raw: bytes) -> int:
        raise NotImplementedError


class PhePublicKey(_IntVectorKey):
    backend = "phe"
    scheme = "paillier"

    def __init__(self, key) -> None:
        self._key = key
        self.n = key.n
        self.nsquare = key.nsquare
        self.key_bits = key.n.bit_length()
        self.width = (self.nsquare.bit_length() + 7) // 8
        self._zero_ct = key.raw_encrypt(
            0, r_value=1
        )  # deterministic Enc(0) = 1, only as a sum seed

    @classmethod
    def from_bytes(cls, data: bytes) -> PhePublicKey:
        data = bytes(data)
        if not data.startswith(_PHE_MAGIC) or len(data) < 68:
            raise ProtocolError(
                "malformed public key", field="public_key", fix="send PhePublicKey.to_bytes()"
            )
        n = int.from_bytes(data[4:], "big")
        if n % 2 == 0:
            raise ProtocolError("malformed public key", field="public_key", value="even modulus")
        return cls(_phe().PaillierPublicKey(n))

    @property
    def plaintext_bits(self) -> int:
        return (self.n // 2).bit_length() - 1

    def to_bytes(self) -> bytes:
        return _PHE_MAGIC + self.n.to_bytes((self.n.bit_length() + 7) // 8, "big")

    def encrypt(self, values: Sequence[int] | np.ndarray) -> CipherVector:
        values = [int(v) for v in np.asarray(values, dtype=object).reshape(-1)]
        limit = 1 << self.plaintext_bits
        if any(not -limit < v < limit for v in values):
            raise ConfigError(
                "plaintext out of range", field="values", fix=f"keep |v| < 2**{self.plaintext_bits}"
            )
        return self._wrap([self._key.raw_encrypt(v % self.n) for v in values])

    def sub(self, a, b):
        self._check(a)
        self._check(b)
        return self._wrap(
            [
                u * pow(v, -1, self.nsquare) % self.nsquare
                for u, v in zip(a.data, b.data, strict=True)
            ]
        )

    def shift(self, x, bits):
        self._check(x)
        k = 1 << bits
        return self._wrap([pow(c, k, self.nsquare) for c in x.data])

    def _zero(self) -> int:
        return self._zero_ct

    def _add1(self, a: int, b: int) -> int:
        return a * b % self.nsquare

    def _mul1(self, c: int, k: int) -> int:
        return pow(c, k % self.n, self.nsquare)

    def _to_bytes1(self, c: int) -> bytes:
        return c.to_bytes(self.width, "big")

    def _from_bytes1(self, raw: bytes) -> int:
        c = int.from_bytes(raw, "big")
        if not 0 < c < self.nsquare:
            raise ProtocolError("ciphertext out of range", field="ciphertexts")
        return c


class PheKeyPair(HEKeyPair):
    def __init__(self, public_key, private_key) -> None:
        self.public = PhePublicKey(public_key)
        self._private = private_key

    @classmethod
    def generate(cls, key_bits: int) -> PheKeyPair:
        pub, priv = _phe().generate_paillier_keypair(n_length=key_bits)
        return cls(pub, priv)

    def decrypt(self, x: CipherVector) -> list[int]:
        self.public._check(x)
        n, half = self.public.n, self.public.n // 2
        out = []
        for c in x.data:
            m = self._private.raw_decrypt(c)
            out.append(m - n if m > half else m)
        return out


class PlainPublicKey(_IntVectorKey):
    """No encryption: 'ciphertexts' are the integers themselves (tests only)."""

    backend = "plain"
    scheme = "plain"

    def __init__(self, key_bits: int) -> None:
        self.key_bits = key_bits
        self.width = key_bits // 8 + 1

    @classmethod
    def from_bytes(cls, data: bytes) -> PlainPublicKey:
        data = bytes(data)
        if not data.startswith(_PLAIN_MAGIC) or len(data) != 8:
            raise ProtocolError("malformed public key", field="public_key")
        return cls(int.from_bytes(data[4:], "big"))

    @property
    def plaintext_bits(self) -> int:
        return self.key_bits - 2

    def to_bytes(self) -> bytes:
        return _PLAIN_MAGIC + self.key_bits.to_bytes(4, "big")

    def encrypt(self, values):
        return self._wrap([int(v) for v in np.asarray(values, dtype=object).reshape(-1)])

    def sub(self, a, b):
        self._check(a)
        self._check(b)
        return self._wrap([u - v for u, v in zip(a.data, b.data, strict=True)])

    def shift(self, x, bits):
        self._check(x)
        return self._wrap([c << bits for c in x.data])

    def _zero(self) -> int:
        return 0

    def _add1(self, a: int, b: int) -> int:
        return a + b

    def _mul1(self, c: int, k: int) -> int:
        return c * k

    def _to_bytes1(self, c: int) -> bytes:
        return c.to_bytes(self.width, "big", signed=True)

    def _from_bytes1(self, raw: bytes) -> int:
        return int.from_bytes(raw, "big", signed=True)


class PlainKeyPair(HEKeyPair):
    def __init__(self, key_bits: int) -> None:
        self.public = PlainPublicKey(key_bits)

    def decrypt(self, x: CipherVector) -> list[int]:
        self.public._check(x)
        return list(x.data)
