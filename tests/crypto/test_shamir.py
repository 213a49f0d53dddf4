"""Shamir secret sharing: every t-subset reconstructs, fewer shares say nothing, tampering fails."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from cdp_federated.crypto import shamir
from cdp_federated.errors import ConfigError, ProtocolError

SECRET = bytes(range(32))
CONTEXT = b"session-1\x00alice\x00self"


def test_every_threshold_subset_reconstructs_and_fewer_do_not():
    shares, commitments = shamir.deal(SECRET, 3, range(1, 7), context=CONTEXT)
    table = {s.x: c for s, c in zip(shares, commitments, strict=True)}
    for subset in itertools.combinations(shares, 3):  # all 20 of them
        assert shamir.combine(subset, 3, table, context=CONTEXT) == SECRET
    for subset in itertools.combinations(shares, 2):
        with pytest.raises(ConfigError, match="cannot reconstruct"):
            shamir.combine(subset, 3, table, context=CONTEXT)
        # interpolating only t-1 points gives a wrong value, not the secret
        guess = shamir.interpolate_at_zero([(s.x, s.y) for s in subset])
        assert guess != int.from_bytes(SECRET, "big")


def test_t_minus_one_shares_fit_every_possible_secret():
    """Perfect secrecy, shown directly: for any candidate secret there is exactly one degree
    t-1 polynomial through the t-1 observed shares and (0, candidate)."""
    shares, _ = shamir.deal(SECRET, 4, range(1, 8))
    seen = [(s.x, s.y) for s in shares[:3]]
    for candidate in (0, 1, int.from_bytes(SECRET, "big"), shamir.PRIME - 1):
        points = [(0, candidate), *seen]
        # the polynomial through these 4 points reproduces the observed shares and the candidate
        assert shamir.interpolate_at_zero(points) == candidate
        for x, y in seen:
            shifted = [(px - x, py) for px, py in points if px != x] + [(0, y)]
            assert shamir.interpolate_at_zero(shifted) == y


def test_t_minus_one_shares_are_uniform_whatever_the_secret():
    """Two shares of a threshold-3 secret, dealt by the real code many times: their joint
    distribution (reduced mod 7) is uniform for two different secrets (chi-square, 48 dof)."""
    draws, cells = 4900, 49
    for secret in (bytes(32), b"\xff" * 32):
        counts = np.zeros(cells)
        for _ in range(draws):
            shares, _ = shamir.deal(secret, 3, [1, 2, 3])
            counts[(shares[0].y % 7) * 7 + shares[1].y % 7] += 1
        expected = draws / cells
        assert float(((counts - expected) ** 2 / expected).sum()) < 95  # p < 1e-4 above 95


def test_a_tampered_share_fails():
    shares, commitments = shamir.deal(SECRET, 3, range(1, 6), context=CONTEXT)
    table = {s.x: c for s, c in zip(shares, commitments, strict=True)}
    tampered = [replace(shares[0], y=(shares[0].y + 1) % shamir.PRIME), *shares[1:3]]
    with pytest.raises(ProtocolError, match="commitment"):
        shamir.combine(tampered, 3, table, context=CONTEXT)
    moved = [replace(shares[0], x=5), *shares[1:3]]  # claimed for another holder's point
    with pytest.raises(ProtocolError):
        shamir.combine(moved, 3, table, context=CONTEXT)
    with pytest.raises(ProtocolError):  # the same share under another dealer or session
        shamir.combine(shares[:3], 3, table, context=b"other")


def test_bad_parameters_are_refused():
    with pytest.raises(ConfigError, match="32 bytes"):
        shamir.deal(b"short", 2, [1, 2])
    with pytest.raises(ConfigError, match="threshold"):
        shamir.deal(SECRET, 4, [1, 2, 3])
    with pytest.raises(ConfigError, match="distinct"):
        shamir.deal(SECRET, 2, [1, 1, 2])
    with pytest.raises(ConfigError, match="distinct"):
        shamir.deal(SECRET, 2, [0, 1])
