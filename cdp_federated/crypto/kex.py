"""X25519 key agreement with HKDF-SHA256: the pairwise mask seeds of secure aggregation.

.. warning::
   Hazardous material. The seeds are only as private as the published public keys are
   authentic: whoever can substitute a public key (a dishonest coordinator without key pinning)
   learns the seeds made with it. Use a fresh key pair per session: a private key is revealed to
   the server when its owner drops out (that is how its masks are removed).

``pairwise_seed(mine, their_public, context)`` gives both ends the same 32 bytes: X25519 of the
two keys, through HKDF whose ``info`` binds the ``context`` (job, round, session) and both
public keys in a canonical order, so the seed of one session is useless in any other.
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import ProtocolError

__all__ = [
    "KEY_BYTES",
    "generate_private",
    "private_from_bytes",
    "private_bytes",
    "public_bytes",
    "pairwise_seed",
]

KEY_BYTES = 32
_LABEL = b"cdp-federated/secagg-pairwise/v1"
_SALT = hashlib.sha256(_LABEL).digest()


def generate_private() -> X25519PrivateKey:
    """A fresh key pair from the operating system's randomness."""
    return X25519PrivateKey.generate()


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    """The private key whose raw 32 bytes are ``raw`` (tests inject keys this way; the server
    rebuilds a dropped client's key from its reconstructed bytes)."""
    if not isinstance(raw, bytes | bytearray) or len(raw) != KEY_BYTES:
        raise ProtocolError(f"a private key is {KEY_BYTES} bytes", field="private_key")
    return X25519PrivateKey.from_private_bytes(bytes(raw))


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def pairwise_seed(
    mine: X25519PrivateKey, their_public: bytes, context: bytes, *, my_public: bytes | None = None
) -> bytes:
    """The 32-byte seed both ends of a pair derive; :class:`ProtocolError` for a malformed or
    small-order public key. ``my_public`` (``public_bytes(mine)``) saves recomputing it."""
    if not isinstance(their_public, bytes | bytearray) or len(their_public) != KEY_BYTES:
        raise ProtocolError(
            f"a public key is {KEY_BYTES} bytes",
            field="public_key",
            value=len(their_public) if isinstance(their_public, bytes | bytearray) else None,
        )
    try:
        secret = mine.exchange(X25519PublicKey.from_public_bytes(bytes(their_public)))
    except ValueError:  # all-zero shared secret: a small-order point
        raise ProtocolError(
            "public key is a small-order point", field="public_key", fix="publish a real key"
        ) from None
    low, high = sorted([my_public or public_bytes(mine), bytes(their_public)])
    info = b"".join(struct.pack(">I", len(p)) + p for p in (_LABEL, context, low, high))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=info).derive(secret)
