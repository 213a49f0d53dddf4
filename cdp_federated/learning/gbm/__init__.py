"""Histogram gradient-boosted trees for horizontal federation: pure numpy, no transport.

``binning`` (federated quantile sketches -> shared bin edges), ``histograms`` (a party's rows,
margins and gradient/hessian histograms), ``splits`` and ``grower`` (the coordinator's split
finding with histogram subtraction), ``boosting`` (the loop both sides share), ``model`` (trees
as flat arrays) and ``estimators`` (scikit-learn compatible exports).
"""

from .binning import FeatureSketch, bin_codes, bin_edges, merge_sketches, sketch_columns
from .boosting import Step, TreeRecord, apply_step, boost, fit_local
from .estimators import FederatedGBMClassifier, FederatedGBMRegressor
from .grower import TreeGrower
from .histograms import LocalBooster
from .model import TreeEnsemble
from .params import GBMParams

__all__ = [
    "FeatureSketch",
    "bin_codes",
    "bin_edges",
    "merge_sketches",
    "sketch_columns",
    "Step",
    "TreeRecord",
    "apply_step",
    "boost",
    "fit_local",
    "FederatedGBMClassifier",
    "FederatedGBMRegressor",
    "TreeGrower",
    "LocalBooster",
    "TreeEnsemble",
    "GBMParams",
]
