"""Group operations for ECDH private set intersection: X25519 over hashed u-coordinates.

.. warning::
   Hazardous material. This module holds primitives; misusing them (hashing an id into the
   *scalar* instead of the point, reusing a blinding scalar across sessions, sending an unshuffled
   set) breaks the protocol's privacy. Call :func:`cdp_federated.identity.psi.run_psi` or
   :func:`~cdp_federated.identity.psi.align_many` instead.

The construction (see ``docs/identity.md``, "Private set intersection"):

* ``hash_to_group(id) = SHA-256(b"cdp-fl psi v1\\x00" || utf8(id))`` with the top bit cleared: a
  u-coordinate on Curve25519 or on its quadratic twist. The id's hash is the *point*; the secret
  is the scalar. Never the other way round: with ``X25519(H(id), basepoint)`` a party that knows
  one shared id could rebuild every other id's blinded value from the transcript.
* ``blind(scalar, u) = X25519(scalar, u)``: OpenSSL's constant-time Montgomery ladder through
  ``cryptography``. Clamped scalars commute, so ``blind(b, blind(a, u)) == blind(a, blind(b, u))``.
  An all-zero result (a small-order input) makes ``cryptography`` raise; a peer's point that does
  so is reported as :class:`SmallOrderPoint` and the protocol turns it into a ``ProtocolError``.

Scalar multiplications run in a :class:`~concurrent.futures.ProcessPoolExecutor` (``fork`` start:
about 15 ms for two workers here, against about 110 ms for ``spawn`` or ``forkserver``). Points
travel between processes as one ``bytes`` blob per chunk and come back as numpy ``uint8`` arrays
of shape ``(n, 32)``.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

__all__ = [
    "DOMAIN",
    "POINT_BYTES",
    "SmallOrderPoint",
    "X25519Group",
    "canonical_rows",
    "hash_to_group",
    "new_scalar",
    "secure_permutation",
]

DOMAIN = b"cdp-fl psi v1\x00"
POINT_BYTES = 32
# Below this many points a call runs in-process: the round trip to the pool costs more than it saves.
MIN_PARALLEL = 2048

Rng = Callable[[int], bytes]


class SmallOrderPoint(Exception):
    """A point whose product with the scalar is the identity (all-zero output): ``index`` in the
    input. Raised inside a worker process, so it must stay a plain picklable exception."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


def _hash_point(identifier: str) -> bytes:
    digest = bytearray(hashlib.sha256(DOMAIN + identifier.encode("utf-8")).digest())
    digest[31] &= 0x7F
    return bytes(digest)


def hash_to_group(ids: Sequence[str]) -> np.ndarray:
    """The hashed u-coordinates of ``ids`` as a ``(n, 32)`` uint8 array (never sent; for tests)."""
    out = np.empty((len(ids), POINT_BYTES), dtype=np.uint8)
    for i, identifier in enumerate(ids):
        out[i] = np.frombuffer(_hash_point(identifier), dtype=np.uint8)
    return out


def new_scalar(rng: Rng = os.urandom) -> bytes:
    """A fresh secret scalar (32 random bytes; X25519 clamps it)."""
    scalar = rng(POINT_BYTES)
    if len(scalar) != POINT_BYTES:
        raise ValueError(f"rng returned {len(scalar)} bytes, expected {POINT_BYTES}")
    return scalar


def secure_permutation(n: int, rng: Rng = os.urandom) -> np.ndarray:
    """A uniformly random permutation of ``range(n)`` (int64), by sorting 64-bit random keys.

    Two equal keys (probability below ``n**2 / 2**65``) keep their index order, a bias no party can
    observe. ``rng`` must be cryptographic in production (the default is ``os.urandom``).
    """
    if n <= 1:
        return np.arange(n, dtype=np.int64)
    keys = np.frombuffer(rng(8 * n), dtype="<u8")
    return np.argsort(keys, kind="stable").astype(np.int64, copy=False)


def canonical_rows(points: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows of a ``(n, 32)`` uint8 array that encode a u-coordinate below
    ``p = 2**255 - 19`` (what every X25519 output is). Anything else did not come from X25519."""
    top = points[:, 31]
    below = top < 0x7F
    at_top = top == 0x7F
    if at_top.any():
        middle_full = (points[:, 1:31] == 0xFF).all(axis=1)
        below |= at_top & ~(middle_full & (points[:, 0] >= 0xED))
    return below


# --- worker functions (run in the pool; module level so they pickle by reference) ---------------


def _blind_ids(scalar: bytes, ids: list[str]) -> bytes:
    exchange = X25519PrivateKey.from_private_bytes(scalar).exchange
    point = X25519PublicKey.from_public_bytes
    sha256 = hashlib.sha256
    out = []
    for i, identifier in enumerate(ids):
        digest = bytearray(sha256(DOMAIN + identifier.encode("utf-8")).digest())
        digest[31] &= 0x7F
        try:
            out.append(exchange(point(bytes(digest))))
        except ValueError:
            raise SmallOrderPoint(i) from None
    return b"".join(out)


def _blind_points(scalar: bytes, points: bytes) -> bytes:
    exchange = X25519PrivateKey.from_private_bytes(scalar).exchange
    point = X25519PublicKey.from_public_bytes
    out = []
    for i in range(0, len(points), POINT_BYTES):
        try:
            out.append(exchange(point(points[i : i + POINT_BYTES])))
        except ValueError:
            raise SmallOrderPoint(i // POINT_BYTES) from None
    return b"".join(out)


def _ping(_: int) -> int:
    return os.getpid()


class X25519Group:
    """Blinds ids and points with a secret scalar, on ``workers`` processes.

    ``executor`` injects a pool (tests, or two parties sharing one machine); otherwise the group
    starts its own on first use and :meth:`close` (or ``with``) stops it. ``workers=1`` computes
    in-process.
    """

    def __init__(
        self,
        *,
        workers: int = 2,
        executor: Executor | None = None,
        min_parallel: int = MIN_PARALLEL,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self.min_parallel = min_parallel
        self._executor = executor
        self._owned = False

    def __enter__(self) -> X25519Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker processes now (otherwise on the first large call)."""
        if self._executor is None and self.workers > 1:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self._executor = ProcessPoolExecutor(self.workers, mp_context=context)
            self._owned = True
            list(self._executor.map(_ping, range(self.workers)))

    def close(self) -> None:
        if self._owned and self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._executor = None if self._owned else self._executor
        self._owned = False

    def blind_ids(self, scalar: bytes, ids: Sequence[str]) -> np.ndarray:
        """``X25519(scalar, hash_to_group(id))`` for each id, as ``(n, 32)`` uint8.

        Raises :class:`SmallOrderPoint` (never in practice: it needs a SHA-256 preimage)."""
        ids = list(ids)
        return self._run(_blind_ids, scalar, ids, len(ids), lambda a, b: ids[a:b])

    def blind_points(self, scalar: bytes, points: np.ndarray) -> np.ndarray:
        """``X25519(scalar, u)`` for each row of a ``(n, 32)`` uint8 array.

        Raises :class:`SmallOrderPoint` with the index of the first small-order row."""
        raw = np.ascontiguousarray(points, dtype=np.uint8).tobytes()
        n = len(raw) // POINT_BYTES
        return self._run(
            _blind_points, scalar, raw, n, lambda a, b: raw[a * POINT_BYTES : b * POINT_BYTES]
        )

    def _run(
        self,
        fn: Callable[[bytes, Any], bytes],
        scalar: bytes,
        whole: Any,
        n: int,
        part: Callable[[int, int], Any],
    ) -> np.ndarray:
        if n < self.min_parallel or self.workers == 1:
            return _as_points(fn(scalar, whole))
        self.start()
        assert self._executor is not None
        # Two chunks per worker: a worker slowed by other load on the machine does not hold the
        # whole batch back.
        chunks = min(2 * self.workers, n)
        size = math.ceil(n / chunks)
        bounds = [(a, min(a + size, n)) for a in range(0, n, size)]
        futures = [self._executor.submit(fn, scalar, part(a, b)) for a, b in bounds]
        results = []
        for (a, _), future in zip(bounds, futures, strict=True):
            try:
                results.append(future.result())
            except SmallOrderPoint as exc:
                for other in futures:
                    other.cancel()
                raise SmallOrderPoint(a + exc.index) from None
        return _as_points(b"".join(results))


def _as_points(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, POINT_BYTES).copy()
