"""Calibration from aggregated score histograms: hand-computed tables, the bin-centre bound, and
the federated evaluation carrying it."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from cdp_federated.coordinator import run_horizontal
from cdp_federated.federation import InProcessTransport
from cdp_federated.learning.calibration import (
    expected_calibration_error,
    max_calibration_error,
    reliability_table,
)
from cdp_federated.learning.metrics import score_histograms
from cdp_federated.participant import ParticipantAgent
from tests.test_horizontal_run import FEATURES, LABEL, make_job, make_parties, provider


def test_hand_computed_two_bin_table():
    # Fine bins of width 1/4 (centres .125 .375 .625 .875) regrouped into two halves.
    table = reliability_table([0, 1, 2, 3], [4, 3, 2, 1], n_bins=2)
    assert [(r.lower, r.upper, r.count, r.positives) for r in table] == [
        (0.0, 0.5, 8, 1),
        (0.5, 1.0, 8, 5),
    ]
    assert table[0].mean_predicted == pytest.approx(0.25)  # (4 * .125 + 4 * .375) / 8
    assert table[0].observed_rate == pytest.approx(0.125)
    assert table[1].mean_predicted == pytest.approx(0.75)
    assert table[1].observed_rate == pytest.approx(0.625)
    assert expected_calibration_error(table) == pytest.approx(0.125)  # .5 * .125 + .5 * .125
    assert max_calibration_error(table) == pytest.approx(0.125)


def test_perfectly_calibrated_histograms_have_zero_error():
    table = reliability_table([1, 3], [3, 1], n_bins=2)  # centres .25/.75, rates .25/.75
    assert expected_calibration_error(table) == pytest.approx(0.0)


def test_empty_bins_are_nan_in_the_table_null_in_json_and_ignored_by_ece():
    table = reliability_table([0, 0, 0, 6], [0, 0, 0, 2], n_bins=4)
    assert table[0].count == 0 and math.isnan(table[0].mean_predicted)
    assert table[0].to_dict()["observed_rate"] is None
    assert expected_calibration_error(table) == pytest.approx(abs(0.75 - 0.875))
    assert math.isnan(expected_calibration_error(reliability_table([0, 0], [0, 0])))


def test_bad_histograms_are_refused():
    with pytest.raises(ValueError):
        reliability_table([1, 2], [1], n_bins=2)
    with pytest.raises(ValueError):
        reliability_table([-1, 2], [1, 1])
    with pytest.raises(ValueError):
        reliability_table([1, 2], [1, 1], n_bins=0)


def test_histogram_ece_is_within_half_a_fine_bin_of_the_exact_one():
    rng = np.random.default_rng(5)
    scores = rng.beta(2, 3, size=20_000)
    labels = (rng.random(scores.size) < scores**1.3).astype(int)  # miscalibrated on purpose
    bins, n_bins = 1000, 10
    coarse = np.minimum((scores * n_bins).astype(int), n_bins - 1)
    exact = (
        sum(
            (coarse == b).sum() * abs(labels[coarse == b].mean() - scores[coarse == b].mean())
            for b in range(n_bins)
        )
        / scores.size
    )
    table = reliability_table(*score_histograms(scores, labels, bins), n_bins=n_bins)
    assert exact > 0.02  # the case is not trivially calibrated
    assert abs(expected_calibration_error(table) - exact) <= 1 / (2 * bins) + 1e-12


def test_federated_evaluation_reports_calibration_of_the_pooled_test_rows():
    parties = make_parties()
    agents = {n: ParticipantAgent(n, provider(f)).handle for n, f in parties.items()}
    result = run_horizontal(make_job(rounds=10), InProcessTransport(agents))
    test = result.evaluations["test"]
    pooled = pl.concat([f["test"] for f in parties.values()])
    scores = result.estimator.predict_proba(pooled.select(FEATURES))[:, 1]
    local = reliability_table(*score_histograms(scores, pooled[LABEL].to_numpy(), 1000))
    assert len(test.reliability) == 10
    assert [r.count for r in test.reliability] == [r.count for r in local]
    assert test.ece == pytest.approx(expected_calibration_error(local), abs=1e-9)
    assert 0.0 <= test.ece < 0.2
