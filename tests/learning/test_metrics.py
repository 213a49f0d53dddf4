"""Metrics from per-class score histograms agree with scikit-learn on the rows themselves."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from cdp_federated.learning.metrics import (
    accuracy_from_histograms,
    mean_log_loss,
    roc_auc_from_histograms,
    score_histograms,
)


def realistic_scores(seed: int, n: int = 5000):
    """Scores of a moderately good model with a 20% positive rate."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(float)
    logits = rng.normal(-1.5, 1.2, n) + 1.6 * y
    return 1 / (1 + np.exp(-logits)), y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_with_10000_bins_agrees_with_sklearn(seed):
    scores, y = realistic_scores(seed)
    pos, neg = score_histograms(scores, y, 10_000)
    assert abs(roc_auc_from_histograms(pos, neg) - roc_auc_score(y, scores)) < 1e-3


def test_auc_is_exact_when_no_two_classes_share_a_bin():
    rng = np.random.default_rng(3)
    bins = 1000
    scores = (rng.integers(0, bins, 2000) + 0.5) / bins  # bin centres: ties are real ties
    y = (rng.random(2000) < scores).astype(float)
    pos, neg = score_histograms(scores, y, bins)
    assert roc_auc_from_histograms(pos, neg) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_auc_by_hand():
    assert roc_auc_from_histograms([0, 1], [1, 0]) == 1.0  # positive above negative
    assert roc_auc_from_histograms([1, 0], [0, 1]) == 0.0
    assert roc_auc_from_histograms([2, 0], [1, 0]) == 0.5  # all tied
    # positives in bins 1 and 2, negatives in bins 0 and 1: pairs (p1,n0)=1, (p1,n1)=1/2,
    # (p2,n0)=1, (p2,n1)=1 -> 3.5 / 4
    assert roc_auc_from_histograms([0, 1, 1], [1, 1, 0]) == pytest.approx(3.5 / 4)


def test_auc_is_nan_with_one_class():
    assert np.isnan(roc_auc_from_histograms([0, 3], [0, 0]))


def test_histograms_sum_across_parties_like_pooled_rows():
    scores, y = realistic_scores(4, n=900)
    parts = [slice(0, 100), slice(100, 700), slice(700, 900)]
    summed = [
        sum(h) for h in zip(*(score_histograms(scores[p], y[p], 50) for p in parts), strict=True)
    ]
    pooled = score_histograms(scores, y, 50)
    np.testing.assert_array_equal(summed[0], pooled[0])
    np.testing.assert_array_equal(summed[1], pooled[1])


def test_score_histogram_edges():
    pos, neg = score_histograms(np.array([0.0, 0.5, 0.999, 1.0]), np.array([1, 0, 1, 1]), 4)
    assert pos.tolist() == [1, 0, 0, 2] and neg.tolist() == [0, 0, 1, 0]
    assert pos.dtype == np.int64
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        score_histograms(np.array([0.2, np.nan]), np.array([0, 1]), 4)
    with pytest.raises(ValueError):
        score_histograms(np.array([1.5]), np.array([0]), 4)


def test_accuracy_matches_sklearn_at_threshold_half():
    scores, y = realistic_scores(5)
    pos, neg = score_histograms(scores, y, 1000)
    expected = accuracy_score(y, (scores >= 0.5).astype(float))
    assert accuracy_from_histograms(pos, neg) == pytest.approx(expected, abs=1e-12)


def test_accuracy_by_hand_and_threshold_must_be_a_bin_edge():
    # 4 bins; predicted 1 from bin 2 up: negatives in bins 0-1 right, positives in 2-3 right.
    assert accuracy_from_histograms([1, 0, 2, 1], [3, 1, 1, 1]) == pytest.approx(7 / 10)
    with pytest.raises(ValueError, match="bin edge"):
        accuracy_from_histograms([1, 0, 1], [0, 1, 0])
    assert np.isnan(accuracy_from_histograms([0, 0], [0, 0]))


def test_mean_log_loss():
    assert mean_log_loss(3.0, 4) == 0.75
    assert np.isnan(mean_log_loss(0.0, 0))
