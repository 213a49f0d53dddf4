"""Aggregation maths against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from cdp_federated.errors import TrainingError
from cdp_federated.learning.aggregate import (
    combine_moments,
    local_moments,
    weighted_average,
    weighted_metrics,
)


def test_weighted_average_by_sample_count():
    # (1 * [1, 2] + 3 * [3, 6]) / 4 = [10/4, 20/4]
    out = weighted_average([np.array([1.0, 2.0]), np.array([3.0, 6.0])], [1, 3])
    np.testing.assert_allclose(out, [2.5, 5.0])


def test_uniform_average_when_no_weights():
    out = weighted_average([np.array([1.0, 2.0]), np.array([3.0, 6.0])])
    np.testing.assert_allclose(out, [2.0, 4.0])


def test_zero_weight_party_is_ignored():
    out = weighted_average([np.array([1.0]), np.array([100.0])], [2, 0])
    np.testing.assert_allclose(out, [1.0])


@pytest.mark.parametrize(
    ("vectors", "weights", "field"),
    [
        ([], None, "vectors"),
        ([np.zeros(2), np.zeros(3)], None, "parameters"),
        ([np.zeros(2), np.zeros(2)], [0, 0], "weights"),
        ([np.zeros(2), np.zeros(2)], [1, -1], "weights"),
        ([np.zeros(2), np.zeros(2)], [1], "weights"),
    ],
)
def test_weighted_average_refuses_bad_input(vectors, weights, field):
    with pytest.raises(TrainingError) as info:
        weighted_average(vectors, weights)
    assert info.value.field == field


def test_local_moments_of_one_party():
    # rows [1, 0] and [3, 2]: mean [2, 1], deviations [-1, -1] and [1, 1]
    n, sums, scatter = local_moments(np.array([[1.0, 0.0], [3.0, 2.0]]))
    assert n == 2
    np.testing.assert_allclose(sums, [4.0, 2.0])
    np.testing.assert_allclose(scatter, [[2.0, 2.0], [2.0, 2.0]])


def test_combine_moments_by_hand():
    # Party A rows [1, 0], [3, 2]; party B row [5, 4]. Pooled feature 1: 1, 3, 5 -> mean 3,
    # population variance (4 + 0 + 4) / 3 = 8/3; feature 2 is feature 1 minus 1.
    a = local_moments(np.array([[1.0, 0.0], [3.0, 2.0]]))
    b = local_moments(np.array([[5.0, 4.0]]))
    m = combine_moments(*zip(a, b, strict=True))
    assert m.count == 3
    np.testing.assert_allclose(m.mean, [3.0, 2.0])
    np.testing.assert_allclose(m.scale, [np.sqrt(8 / 3)] * 2)
    np.testing.assert_allclose(m.covariance, np.full((2, 2), 8 / 3))
    np.testing.assert_allclose(m.standardised_covariance(), np.ones((2, 2)))
    assert not m.constant.any()


def test_combine_moments_survive_large_offsets():
    # E[x^2] - E[x]^2 would lose every digit here (x ~ 1e9, std ~ 2); the scatter form keeps ~7.
    rng = np.random.default_rng(0)
    parts = [1e9 + rng.normal(k, 1 + k, size=(50 + 10 * k, 3)) for k in range(3)]
    exact = np.vstack(parts) - 1e9  # exact subtraction (Sterbenz), so a faithful reference
    m = combine_moments(*zip(*(local_moments(p) for p in parts), strict=True))
    np.testing.assert_allclose(m.mean - 1e9, exact.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(m.scale, exact.std(axis=0), rtol=1e-6)
    np.testing.assert_allclose(m.covariance, np.cov(exact.T, bias=True), rtol=1e-6, atol=1e-6)


def test_zero_variance_feature_gets_scale_one_and_no_covariance():
    a = local_moments(np.array([[7.1, 1.0], [7.1, 2.0]]))
    b = local_moments(np.array([[7.1, 3.0]]))
    m = combine_moments(*zip(a, b, strict=True))
    assert m.constant.tolist() == [True, False]
    assert m.scale[0] == 1.0
    np.testing.assert_allclose(m.standardised_covariance(), [[0.0, 0.0], [0.0, 1.0]])


def test_empty_parties_count_for_nothing_but_all_empty_is_an_error():
    a = local_moments(np.array([[1.0], [3.0]]))
    empty = local_moments(np.zeros((0, 1)))
    m = combine_moments(*zip(a, empty, strict=True))
    np.testing.assert_allclose([m.mean[0], m.scale[0]], [2.0, 1.0])
    with pytest.raises(TrainingError, match="no rows"):
        combine_moments(*zip(empty, empty, strict=True))


def test_weighted_metrics_by_hand():
    out = weighted_metrics([(1, {"loss": 1.0, "acc": 0.5, "note": "x"}), (3, {"loss": 2.0})])
    assert out == {"loss": pytest.approx(1.75), "acc": pytest.approx(0.5)}
