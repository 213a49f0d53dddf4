"""Shamir secret sharing of 32-byte secrets, with dealer commitments that authenticate each share.

.. warning::
   Hazardous material: a primitive for :mod:`cdp_federated.privacy.secagg`. It protects against
   holders that alter a share (the reconstruction refuses it), not against a dealer that hands
   out shares of an inconsistent polynomial, nor against anyone who collects ``threshold`` shares.

Field: the integers modulo the Mersenne prime ``P = 2**521 - 1``, so any 32-byte secret is one
field element. :func:`deal` picks a random polynomial of degree ``threshold - 1`` whose constant
term is the secret (coefficients from :mod:`secrets`) and evaluates it at the holders' nonzero
``x``. Any ``threshold`` shares give the secret by Lagrange interpolation at 0; fewer are
uniformly distributed whatever the secret is, so they say nothing about it.

Authentication (the dealer commits): each share gets a fresh 16-byte salt, and the dealer
publishes ``commitment = SHA-256(label | context | x | y | salt)`` to whoever will reconstruct
(the secure-aggregation server) while the share itself (``y`` and ``salt``) travels, encrypted,
to its holder only. :func:`combine` checks every share against its commitment before it
interpolates, so a holder that alters ``y`` is caught (:class:`~cdp_federated.errors.ProtocolError`);
the salt keeps the commitment from being a test for guessed share values.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError, ProtocolError

__all__ = [
    "PRIME",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "SALT_BYTES",
    "Share",
    "deal",
    "combine",
    "commitment",
    "interpolate_at_zero",
]

PRIME = 2**521 - 1  # a Mersenne prime: larger than any 32-byte secret
SECRET_BYTES = 32
SHARE_BYTES = 66  # ceil(521 / 8): one field element, big-endian
SALT_BYTES = 16
_LABEL = b"cdp-federated/shamir-commitment/v1"


@dataclass(frozen=True)
class Share:
    """One holder's share: the point ``(x, y)`` of the dealer's polynomial and the ``salt`` of
    its commitment."""

    x: int
    y: int
    salt: bytes

    def y_bytes(self) -> bytes:
        return self.y.to_bytes(SHARE_BYTES, "big")


def commitment(share: Share, context: bytes) -> bytes:
    """The dealer's binding commitment to ``share`` within ``context`` (who dealt it, to whom,
    for what): SHA-256 over length-prefixed fields."""
    parts = [_LABEL, context, struct.pack(">I", share.x), share.y_bytes(), share.salt]
    return hashlib.sha256(b"".join(struct.pack(">I", len(p)) + p for p in parts)).digest()


def deal(
    secret: bytes,
    threshold: int,
    xs: Sequence[int],
    *,
    context: bytes = b"",
    randbelow: Callable[[int], int] = secrets.randbelow,
    token_bytes: Callable[[int], bytes] = secrets.token_bytes,
) -> tuple[list[Share], list[bytes]]:
    """Split ``secret`` (32 bytes) into one share per holder ``x`` in ``xs`` (distinct, 1 <= x <
    P); any ``threshold`` of them reconstruct it. Returns the shares (in ``xs`` order) and their
    commitments (same order). ``randbelow``/``token_bytes`` are injectable for tests only."""
    if not isinstance(secret, bytes | bytearray) or len(secret) != SECRET_BYTES:
        raise ConfigError(
            f"a Shamir secret is {SECRET_BYTES} bytes",
            field="secret",
            value=len(secret) if isinstance(secret, bytes | bytearray) else type(secret).__name__,
            fix="share a 32-byte seed or key",
        )
    xs = list(xs)
    _check_xs(xs)
    if not 1 <= threshold <= len(xs):
        raise ConfigError(
            "the threshold must be between 1 and the number of holders",
            field="threshold",
            value=threshold,
            fix=f"choose 1..{len(xs)}",
        )
    coefficients = [int.from_bytes(secret, "big")] + [
        randbelow(PRIME) for _ in range(threshold - 1)
    ]
    shares: list[Share] = []
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append(Share(x, y, bytes(token_bytes(SALT_BYTES))))
    return shares, [commitment(s, context) for s in shares]


def combine(
    shares: Iterable[Share],
    threshold: int,
    commitments: Mapping[int, bytes],
    *,
    context: bytes = b"",
) -> bytes:
    """The secret from at least ``threshold`` shares, each checked against the dealer's
    commitment for its ``x`` first. A share without a commitment, or that does not match it, or
    a secret that does not fit 32 bytes, is a :class:`ProtocolError`; too few distinct shares a
    :class:`ConfigError`."""
    unique: dict[int, Share] = {}
    for share in shares:
        expected = commitments.get(share.x)
        if expected is None or not hmac.compare_digest(commitment(share, context), expected):
            raise ProtocolError(
                "a Shamir share does not match its dealer's commitment",
                field="share",
                value=share.x,
                fix="the holder altered or replaced it: exclude that holder",
            )
        unique[share.x] = share
    if len(unique) < threshold:
        raise ConfigError(
            f"{len(unique)} distinct shares cannot reconstruct a threshold-{threshold} secret",
            field="shares",
            value=len(unique),
            fix=f"collect at least {threshold} shares",
        )
    points = sorted(unique.values(), key=lambda s: s.x)[:threshold]
    value = interpolate_at_zero([(s.x, s.y) for s in points])
    if value >> (8 * SECRET_BYTES):
        raise ProtocolError(
            "the reconstructed Shamir secret is out of range",
            field="shares",
            fix="the dealer's shares are inconsistent",
        )
    return value.to_bytes(SECRET_BYTES, "big")


def interpolate_at_zero(points: Sequence[tuple[int, int]], prime: int = PRIME) -> int:
    """Lagrange interpolation at 0 of the polynomial through ``points`` (distinct x), mod
    ``prime``. Exposed so tests can show what fewer than ``threshold`` points give."""
    weights = _lagrange_at_zero(tuple(x for x, _ in points), prime)
    return sum(w * y for w, (_, y) in zip(weights, points, strict=True)) % prime


@functools.lru_cache(maxsize=64)
def _lagrange_at_zero(xs: tuple[int, ...], prime: int) -> tuple[int, ...]:
    """The Lagrange weights at 0 for the points ``xs``: the same for every secret a set of
    holders reconstructs, so the unmasking server inverts once per holder set, not per owner."""
    weights = []
    for j, xj in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * xm % prime
                den = den * (xm - xj) % prime
        weights.append(num * pow(den, -1, prime) % prime)
    return tuple(weights)


def _check_xs(xs: list[int]) -> None:
    if len(set(xs)) != len(xs) or not all(isinstance(x, int) and 0 < x < PRIME for x in xs):
        raise ConfigError(
            "holder points must be distinct integers in [1, P)",
            field="xs",
            value=xs[:8],
            fix="number the holders 1, 2, 3...",
        )
