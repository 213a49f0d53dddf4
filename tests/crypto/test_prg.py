"""The mask PRG: deterministic per seed, distinct across seeds, uniform over the ring."""

from __future__ import annotations

import numpy as np
import pytest

from cdp_federated.crypto import kex
from cdp_federated.crypto.prg import expand
from cdp_federated.errors import ConfigError, ProtocolError


def test_expand_is_deterministic_prefix_stable_and_seed_dependent():
    seed = bytes(range(32))
    a = expand(seed, 1000, 32)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    assert np.array_equal(a, expand(seed, 1000, 32))
    assert np.array_equal(a[:10], expand(seed, 10, 32))
    assert not np.array_equal(a, expand(bytes(31) + b"\x01", 1000, 32))
    wide = expand(seed, 500, 64)
    assert wide.dtype == np.uint64
    assert np.array_equal(wide.view(np.uint32), a)  # the same little-endian keystream


def test_expand_looks_uniform():
    words = expand(b"\x07" * 32, 200_000, 32)
    buckets = np.bincount(words >> 28, minlength=16)  # top nibble
    expected = words.size / 16
    assert float(((buckets - expected) ** 2 / expected).sum()) < 50  # 15 dof
    assert abs(float(words.mean()) / 2**32 - 0.5) < 0.005


def test_bad_seed_or_ring_is_refused():
    with pytest.raises(ConfigError):
        expand(b"short", 4)
    with pytest.raises(ConfigError):
        expand(bytes(32), 4, bits=16)


def test_pairwise_seeds_agree_and_bind_the_context():
    a, b, c = (kex.private_from_bytes(bytes([i]) * 32) for i in (1, 2, 3))
    ab = kex.pairwise_seed(a, kex.public_bytes(b), b"s1")
    assert ab == kex.pairwise_seed(b, kex.public_bytes(a), b"s1")
    assert ab != kex.pairwise_seed(a, kex.public_bytes(b), b"s2")
    assert ab != kex.pairwise_seed(a, kex.public_bytes(c), b"s1")
    with pytest.raises(ProtocolError, match="small-order"):
        kex.pairwise_seed(a, bytes(32), b"s1")


def test_keystream_into_a_reused_buffer_matches_expand_and_checks_its_size():
    from cdp_federated.crypto.prg import keystream

    seed, other = bytes(range(32)), bytes(32)
    buffer = np.empty(4000 + 63, dtype=np.uint8)
    first = keystream(seed, 4000, out=buffer).copy()
    assert np.array_equal(first.view("<u4"), expand(seed, 1000, 32))
    assert not np.array_equal(keystream(other, 4000, out=buffer), first)  # overwritten in place
    assert np.array_equal(keystream(seed, 4000, out=buffer), first)
    with pytest.raises(ConfigError, match="too small"):
        keystream(seed, 4000, out=np.empty(4000, dtype=np.uint8))
