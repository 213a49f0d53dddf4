"""Calibration from aggregated score histograms: a reliability table and the expected calibration
error (ECE), with no per-row score leaving a party.

The input is what federated evaluation already sums across parties (see :mod:`.metrics`): per
class, the count of rows whose predicted probability falls in each of ``B`` equal-width bins over
[0, 1]. The reliability table regroups those ``B`` fine bins into ``n_bins`` coarse ones and
reports, per coarse bin, the mean predicted probability and the observed positive rate.

The mean predicted probability of a bin needs the sum of scores in it, which the histograms do not
carry; each row's score is approximated by the centre of its fine bin, so the mean is off by at
most ``1 / (2 B)`` (0.0005 with the default 1000 bins) and so is each term of the ECE.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "ReliabilityBin",
    "reliability_table",
    "expected_calibration_error",
    "max_calibration_error",
]


@dataclass(frozen=True)
class ReliabilityBin:
    """One row of a reliability table: predicted probabilities in ``[lower, upper)`` (the last
    bin includes 1.0). ``mean_predicted`` and ``observed_rate`` are NaN for an empty bin."""

    lower: float
    upper: float
    count: int
    positives: int
    mean_predicted: float
    observed_rate: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("mean_predicted", "observed_rate"):  # JSON has no NaN
            if np.isnan(out[key]):
                out[key] = None
        return out


def _as_counts(positives: Any, negatives: Any) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(positives)
    neg = np.asarray(negatives)
    if pos.ndim != 1 or pos.shape != neg.shape or pos.size == 0:
        raise ValueError("positives and negatives must be non-empty 1-d arrays of the same length")
    if (pos < 0).any() or (neg < 0).any():
        raise ValueError("histogram counts must be non-negative")
    return pos.astype(np.int64), neg.astype(np.int64)


def reliability_table(positives: Any, negatives: Any, n_bins: int = 10) -> list[ReliabilityBin]:
    """Regroup per-class score histograms (``B`` equal-width bins over [0, 1]) into ``n_bins``
    equal-width reliability bins. Fine bin ``i`` (centre ``(i + 0.5) / B``) joins the coarse bin
    holding its centre; choose ``B`` a multiple of ``n_bins`` so no fine bin straddles an edge."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    pos, neg = _as_counts(positives, negatives)
    fine = pos.size
    centres = (np.arange(fine) + 0.5) / fine
    coarse = np.minimum((centres * n_bins).astype(np.int64), n_bins - 1)
    totals = pos + neg
    count = np.bincount(coarse, weights=totals, minlength=n_bins)
    hits = np.bincount(coarse, weights=pos, minlength=n_bins)
    score_sum = np.bincount(coarse, weights=totals * centres, minlength=n_bins)
    table = []
    for b in range(n_bins):
        n = int(count[b])
        table.append(
            ReliabilityBin(
                lower=b / n_bins,
                upper=(b + 1) / n_bins,
                count=n,
                positives=int(hits[b]),
                mean_predicted=float(score_sum[b] / n) if n else float("nan"),
                observed_rate=float(hits[b] / n) if n else float("nan"),
            )
        )
    return table


def expected_calibration_error(table: list[ReliabilityBin]) -> float:
    """``sum_b (n_b / N) |observed_rate_b - mean_predicted_b|`` over non-empty bins; NaN when
    the table holds no rows."""
    total = sum(row.count for row in table)
    if total == 0:
        return float("nan")
    return float(
        sum(row.count * abs(row.observed_rate - row.mean_predicted) for row in table if row.count)
        / total
    )


def max_calibration_error(table: list[ReliabilityBin]) -> float:
    """The largest ``|observed_rate - mean_predicted|`` over non-empty bins (NaN if none)."""
    gaps = [abs(row.observed_rate - row.mean_predicted) for row in table if row.count]
    return float(max(gaps)) if gaps else float("nan")
