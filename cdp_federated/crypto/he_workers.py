"""Both cores for HE: worker processes that hold a public key and encrypt or bucket-sum row chunks.

.. warning:: Hazardous material; see :mod:`cdp_federated.crypto.he`.

HEU 0.5.2b0 encrypts OU on one thread and holds the GIL during every call, and ``fork`` after
loading HEU deadlocks, so workers are ``spawn``-ed and load the public key from its bytes once.
The active parties use :meth:`HEWorkers.encrypt_chunks` (OU encryption: about 1.8x faster with
two workers on two cores); the passive party's bucket sums gain little, since one HEU bucket-sum
call already uses both cores. Chunk ``i``
always goes to worker ``i % workers`` (one single-process executor per worker), so a worker keeps
the ciphertext chunks it was given and later bucket-sums them without receiving them again.
Workers only ever see the public key, ciphertexts and bin codes of the party that runs them; data
crosses the process boundary inside one party, never to a peer.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np

from .he import CipherVector, HEPublicKey, load_public_key

__all__ = ["HEWorkers"]

_KEY: HEPublicKey | None = None
_CHUNKS: dict[int, tuple[CipherVector, np.ndarray]] = {}


def _init(key: bytes, scheme: str, backend: str) -> None:
    global _KEY
    _KEY = load_public_key(
        key, scheme=scheme, backend=backend, insecure=True
    )  # checked by the caller


def _encrypt(values: list[int]) -> bytes:
    assert _KEY is not None
    return _KEY.dumps(_KEY.encrypt(values))


def _store(offset: int, blob: bytes, count: int, codes: np.ndarray | None) -> None:
    assert _KEY is not None
    if offset == 0:
        _CHUNKS.clear()  # a new tree starts at row 0
    _CHUNKS[offset] = (_KEY.loads(blob, count), codes)


def _bucket_sums(offset: int, masks: list[np.ndarray], n_bins: int) -> list[bytes]:
    assert _KEY is not None
    part, codes = _CHUNKS[offset]
    sums = _KEY.bucket_sums(part, masks, codes, n_bins, cumulative=True)
    return [_KEY.dumps(s) for s in sums]


class HEWorkers:
    """``workers`` spawned processes holding ``public_key``; close() (or ``with``) ends them."""

    def __init__(self, public_key: HEPublicKey, workers: int) -> None:
        self.key = public_key
        context = multiprocessing.get_context("spawn")
        args = (public_key.to_bytes(), public_key.scheme, public_key.backend)
        self._pools = [
            ProcessPoolExecutor(1, mp_context=context, initializer=_init, initargs=args)
            for _ in range(workers)
        ]
        self._offsets: list[tuple[int, int]] = []  # (offset, count) in arrival order

    def __enter__(self) -> HEWorkers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for pool in self._pools:
            pool.shutdown(cancel_futures=True)

    def encrypt_chunks(self, values: np.ndarray, chunk_rows: int) -> list[bytes]:
        """Serialised ciphertexts of ``values[i : i + chunk_rows]`` for each chunk, in order."""
        futures: list[Future] = []
        for j, start in enumerate(range(0, len(values), chunk_rows)):
            chunk = [int(v) for v in values[start : start + chunk_rows]]
            futures.append(self._pools[j % len(self._pools)].submit(_encrypt, chunk))
        return [f.result() for f in futures]

    def store(self, offset: int, blob: bytes, count: int, codes: np.ndarray) -> None:
        """Hand chunk ``offset`` (its ciphertext bytes and bin codes) to its worker."""
        if offset == 0:
            self._offsets = []
        j = len(self._offsets)
        self._offsets.append((offset, count))
        self._pools[j % len(self._pools)].submit(_store, offset, blob, count, codes).result()

    def bucket_sums(
        self, masks: Sequence[np.ndarray], n_bins: int, width: int
    ) -> list[CipherVector]:
        """Cumulative bucket sums over every stored chunk, added up in this process."""
        futures = []
        for j, (offset, count) in enumerate(self._offsets):
            rows = slice(offset, offset + count)
            part_masks = [np.asarray(m[rows]) for m in masks]
            futures.append(
                self._pools[j % len(self._pools)].submit(_bucket_sums, offset, part_masks, n_bins)
            )
        total: list[CipherVector] = []
        for f in futures:
            sums = [self.key.loads(blob, width) for blob in f.result()]
            total = (
                sums
                if not total
                else [self.key.add(a, b) for a, b in zip(total, sums, strict=True)]
            )
        return total
