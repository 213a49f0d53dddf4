"""SecretFlow HEU backend (``sf-heu``): ZPaillier and OU with batched, multi-threaded numpy ops.

.. warning:: Hazardous material; see :mod:`cdp_federated.crypto.he`.

HEU is imported lazily so the rest of the package works without the ``vertical`` extra.

Parallelism, measured with sf-heu 0.5.2b0 on a 2-core machine (process CPU time over wall
time, 100k rows): one multi-feature bucket-sum call uses both cores (about 1.8x), and so do
large Paillier encryptions and decryptions; OU *encryption* runs on one thread (1.0x). Every
call holds the GIL, so Python threads cannot overlap HEU calls. A ``fork``-started process pool
deadlocked once HEU was loaded, so the parties' optional workers are ``spawn``-ed processes
that load the public key themselves (:mod:`.he_workers`): they pay off for OU encryption.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, ProtocolError
from .he import CipherVector, HEKeyPair, HEPublicKey

__all__ = ["HeuPublicKey", "HeuKeyPair"]

_SCHEMA_NAMES = {"paillier": "ZPaillier", "ou": "OU"}
_N_BITS = re.compile(r"n=[0-9A-Fa-f]+\[(\d+)bits\]")


def _heu() -> tuple[Any, Any]:
    try:
        import heu.numpy as hnp
        import heu.phe as phe
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError(
            "the HEU backend needs the sf-heu package",
            field="backend",
            value="heu",
            fix="pip install 'cdp-federated[vertical]' (or use backend='phe' in tests)",
        ) from exc
    return hnp, phe


class HeuPublicKey(HEPublicKey):
    backend = "heu"

    def __init__(self, kit: Any, scheme: str, key_bits: int) -> None:
        hnp, phe = _heu()
        self._kit = kit
        self._hnp = hnp
        self.scheme = scheme
        self.key_bits = key_bits
        self._encoder = phe.BigintEncoder(kit.get_schema())
        self._encryptor = kit.encryptor()
        self._evaluator = kit.evaluator()
        # plaintext_bound is the largest magnitude HEU accepts; 2**t <= bound keeps us inside it.
        self._plaintext_bits = int(kit.public_key().plaintext_bound()).bit_length() - 1
        self._shift_cache: dict[int, Any] = {}

    @classmethod
    def from_bytes(cls, data: bytes, scheme: str) -> HeuPublicKey:
        hnp, phe = _heu()
        if scheme not in _SCHEMA_NAMES:
            raise ConfigError(
                "HEU backend schemes are paillier and ou", field="scheme", value=scheme
            )
        try:
            key = phe.PublicKey.load_from(bytes(data))
            kit = hnp.setup(key)
        except Exception as exc:  # noqa: BLE001 - HEU raises several types on bad bytes
            raise ProtocolError(
                "malformed public key", field="public_key", fix="send HEU's serialize() bytes"
            ) from exc
        if kit.get_schema().name != _SCHEMA_NAMES[scheme]:
            raise ProtocolError(
                "public key is for another scheme",
                field="public_key",
                value=kit.get_schema().name,
                fix=f"expected {_SCHEMA_NAMES[scheme]}",
            )
        match = _N_BITS.search(str(key))
        bits = int(match.group(1)) if match else 0
        return cls(kit, scheme, bits)

    @property
    def plaintext_bits(self) -> int:
        return self._plaintext_bits

    def to_bytes(self) -> bytes:
        return bytes(self._kit.public_key().serialize())

    def _wrap(self, data: Any, length: int) -> CipherVector:
        return CipherVector("heu", data, length)

    def encrypt(self, values: Sequence[int] | np.ndarray) -> CipherVector:
        array = np.asarray(values, dtype=object).reshape(-1)
        if array.size == 0:
            raise ConfigError("nothing to encrypt", field="values", value=0)
        # Vectors are (n, 1) columns throughout: the shape HEU's bucket sums take.
        plain = self._hnp.array(array.reshape(-1, 1), self._encoder)
        return self._wrap(self._encryptor.encrypt(plain), array.size)

    def add(self, a: CipherVector, b: CipherVector) -> CipherVector:
        self._check(a)
        self._check(b)
        return self._wrap(self._evaluator.add(a.data, b.data), a.length)

    def sub(self, a: CipherVector, b: CipherVector) -> CipherVector:
        self._check(a)
        self._check(b)
        return self._wrap(self._evaluator.sub(a.data, b.data), a.length)

    def take(self, x: CipherVector, index: np.ndarray) -> CipherVector:
        self._check(x)
        idx = [int(i) for i in np.asarray(index).reshape(-1)]
        return self._wrap(x.data[idx], len(idx))

    def shift(self, x: CipherVector, bits: int) -> CipherVector:
        self._check(x)
        factor = self._shift_cache.get(bits)
        if factor is None:  # a one-element plaintext broadcasts over the vector
            factor = self._hnp.array(np.array([[1 << bits]], dtype=object), self._encoder)
            self._shift_cache[bits] = factor
        return self._wrap(self._evaluator.mul(x.data, factor), x.length)

    def bucket_sums(
        self,
        x: CipherVector,
        masks: Sequence[np.ndarray],
        codes: np.ndarray,
        n_bins: int,
        *,
        cumulative: bool,
    ) -> list[CipherVector]:
        self._check(x)
        if not 1 <= n_bins <= 127:  # HEU takes bin codes as int8
            raise ConfigError(
                "the HEU backend supports at most 127 bins", field="max_bins", value=n_bins
            )
        order = np.ascontiguousarray(codes, dtype=np.int8)
        groups = [np.ascontiguousarray(np.asarray(m, dtype=np.int8).reshape(1, -1)) for m in masks]
        sums = self._evaluator.batch_feature_wise_bucket_sum(
            x.data, groups, order, n_bins, cumulative
        )
        width = order.shape[1] * n_bins
        return [self._wrap(s, width) for s in sums]

    def weighted_sums(self, x: CipherVector, weights: np.ndarray) -> CipherVector:
        self._check(x)
        w = _weight_matrix(weights, x.length)
        plain = self._hnp.array(np.ascontiguousarray(w.T), self._encoder)
        return self._wrap(self._evaluator.matmul(plain, x.data), w.shape[1])

    def dumps(self, x: CipherVector) -> bytes:
        self._check(x)
        return bytes(x.data.serialize())

    def loads(self, data: bytes, length: int) -> CipherVector:
        try:
            array = self._hnp.CiphertextArray.load_from(bytes(data))
        except Exception as exc:  # noqa: BLE001 - HEU raises PheRuntimeError or RuntimeError
            raise ProtocolError(
                "malformed ciphertexts", field="ciphertexts", fix="send HEU serialize() bytes"
            ) from exc
        if array.ndim != 2 or array.shape[0] != length or array.shape[1] != 1:
            raise ProtocolError(
                "ciphertext vector has the wrong length",
                field="ciphertexts",
                value=str(array.shape),
                fix=f"expected {length} ciphertexts",
            )
        return self._wrap(array, length)


def _weight_matrix(weights: np.ndarray, rows: int) -> np.ndarray:
    w = np.asarray(weights, dtype=object)
    if w.ndim != 2 or w.shape[0] != rows or w.shape[1] == 0:
        raise ConfigError("weights must be a (len(x), k) matrix", field="weights", value=w.shape)
    return w


class HeuKeyPair(HEKeyPair):
    def __init__(self, kit: Any, scheme: str, key_bits: int) -> None:
        self._kit = kit
        self.public = HeuPublicKey(kit, scheme, key_bits)
        self._decryptor = kit.decryptor()

    @classmethod
    def generate(cls, scheme: str, key_bits: int) -> HeuKeyPair:
        hnp, phe = _heu()
        if scheme not in _SCHEMA_NAMES:
            raise ConfigError(
                "HEU backend schemes are paillier and ou", field="scheme", value=scheme
            )
        kit = hnp.setup(getattr(phe.SchemaType, _SCHEMA_NAMES[scheme]), key_bits)
        return cls(kit, scheme, key_bits)

    def decrypt(self, x: CipherVector) -> list[int]:
        self.public._check(x)
        plain = self._decryptor.decrypt(x.data)
        return [int(v) for v in plain.to_numpy(self.public._encoder).reshape(-1)]
