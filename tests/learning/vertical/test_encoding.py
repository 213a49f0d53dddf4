"""Fixed-point packing of (g, h) and its bounds, candidate filtering, binning semantics."""

from __future__ import annotations

import numpy as np
import pytest

from cdp_federated.crypto import generate_keypair, slot_capacity, unpack_slots
from cdp_federated.errors import TrainingError
from cdp_federated.learning.vertical.binning import bin_codes, quantile_edges
from cdp_federated.learning.vertical.encoding import GHLayout, encode_fixed, pack_gh, unpack_gh
from cdp_federated.learning.vertical.splits import valid_candidates


@pytest.mark.parametrize("sign", [1, -1])
def test_packing_edge_every_row_at_the_maximum_hessian(sign):
    n, f = 1000, 24
    g = encode_fixed(np.full(n, sign * 1.0), f)  # |g| at its bound on every row
    h = encode_fixed(np.full(n, 0.25), f)  # h at its bound on every row: H = n * max(h)
    layout = GHLayout.for_tree(g, h)
    assert n * int(h.max()) < 2**layout.shift <= 2 * n * int(h.max())
    packed = pack_gh(g, h, layout.shift)
    total = int(sum(packed))  # the largest possible sum
    G, H = unpack_gh([total, int(packed[0])], layout.shift)
    assert G.tolist() == [int(g.sum()), int(g[0])] and H.tolist() == [int(h.sum()), int(h[0])]
    # ... and the same sums survive slot packing at the computed width, through real encryption
    keys = generate_keypair("paillier", 1024, insecure=True)
    slots = slot_capacity(keys.public.plaintext_bits, layout.slot_bits)
    values = [total, -total if sign < 0 else total, int(packed[1]), 0] * slots
    enc = keys.public.pack(keys.public.encrypt(values), layout.slot_bits, slots)
    assert unpack_slots(keys.decrypt(enc), layout.slot_bits, slots, len(values)) == values
    assert abs(total) < 2 ** (layout.slot_bits - 1)


def test_one_bit_less_would_break_the_hessian_slot():
    g = np.array([0, 0], dtype=np.int64)
    h = np.array([3, 3], dtype=np.int64)
    layout = GHLayout.for_tree(g, h)
    assert layout.shift == 3  # H up to 6 needs 3 bits
    assert unpack_gh([6], layout.shift)[1].tolist() == [6]
    assert unpack_gh([6], layout.shift - 1)[1].tolist() != [6]  # the bound is tight


def test_layout_refuses_gradients_that_overflow_exact_sums():
    with pytest.raises(TrainingError, match="standardise"):
        GHLayout.for_tree(np.array([2**61, 0], dtype=np.int64), np.array([1, 1], dtype=np.int64))
    with pytest.raises(TrainingError, match="non-negative"):
        GHLayout.for_tree(np.array([1], dtype=np.int64), np.array([-1], dtype=np.int64))


def test_encode_fixed_is_round_half_even_at_one_scale():
    assert encode_fixed(np.array([0.5, -0.25, 1.0]), 2).tolist() == [2, -1, 4]
    assert encode_fixed(np.array([0.125, 0.375]), 2).tolist() == [0, 2]  # 0.5 -> 0, 1.5 -> 2


def test_valid_candidates_keep_the_first_of_every_tie():
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 6, size=(50, 3)).astype(np.uint8)
    codes[:, 2] = 1  # a constant column offers nothing
    rows = np.flatnonzero(rng.random(50) < 0.5)
    offered = set(valid_candidates(codes, rows, 8).tolist())
    for f in range(3):
        counts = np.bincount(codes[rows, f], minlength=8)
        for b in range(8):
            left, right = counts[: b + 1].sum(), counts[b + 1 :].sum()
            first_of_its_left_sum = counts[b] > 0
            assert ((f * 8 + b) in offered) == bool(first_of_its_left_sum and left and right)


def test_bins_match_thresholds():
    rng = np.random.default_rng(2)
    x = np.column_stack([rng.normal(size=300), rng.integers(0, 3, 300)])
    edges = quantile_edges(x, 8)
    codes = bin_codes(x, edges)
    assert len(edges[0]) == 7 and len(edges[1]) <= 3  # quantiles of {0, 1, 2}
    for j, e in enumerate(edges):
        for b, threshold in enumerate(e):
            assert np.array_equal(x[:, j] <= threshold, codes[:, j] <= b)
    with pytest.raises(TrainingError):
        quantile_edges(np.array([[np.nan]]), 4)
