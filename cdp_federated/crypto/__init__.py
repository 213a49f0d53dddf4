"""Cryptographic primitives for the protocols (vertical learning first).

.. warning::
   Hazardous material. These are building blocks: homomorphic encryption of fixed-point
   integers, packed slots, bucket sums. Misused (a plaintext that overflows the packing bound,
   OU where a peer can observe decryptions of ciphertexts it crafted, 1024-bit keys outside
   tests) they leak data or keys. Call the protocol recipes instead
   (:mod:`cdp_federated.learning.vertical`).
"""

# Secure aggregation's primitives (Shamir with commitments, AES-CTR PRG, X25519 seeds) are
# modules of their own: cdp_federated.crypto.shamir / .prg / .kex; the recipe is privacy.secagg.
from . import kex, prg, shamir
from .he import (
    BACKENDS,
    SCHEMES,
    CipherVector,
    HEKeyPair,
    HEPublicKey,
    generate_keypair,
    load_public_key,
    slot_capacity,
    unpack_slots,
)

__all__ = [
    "BACKENDS",
    "SCHEMES",
    "CipherVector",
    "HEKeyPair",
    "HEPublicKey",
    "generate_keypair",
    "load_public_key",
    "slot_capacity",
    "unpack_slots",
    "kex",
    "prg",
    "shamir",
]
