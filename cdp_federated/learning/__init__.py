"""Learning: pure computation over numpy. Never imports a transport, HTTP, SQL, the CLI or privacy/."""

from .aggregate import Moments, combine_moments, local_moments, weighted_average, weighted_metrics
from .estimators import FederatedLogisticRegression
from .metrics import (
    accuracy_from_histograms,
    mean_log_loss,
    roc_auc_from_histograms,
    score_histograms,
)
from .strategy import FedAvg, FitInstructions, FitResult, Strategy

__all__ = [
    "Moments",
    "combine_moments",
    "local_moments",
    "weighted_average",
    "weighted_metrics",
    "FederatedLogisticRegression",
    "accuracy_from_histograms",
    "mean_log_loss",
    "roc_auc_from_histograms",
    "score_histograms",
    "FedAvg",
    "FitInstructions",
    "FitResult",
    "Strategy",
]
