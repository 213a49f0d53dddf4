"""Parameters of a histogram gradient-boosted tree ensemble, validated once at the boundary."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError

__all__ = ["GBMParams", "OBJECTIVES", "MAX_DEPTH_LIMIT"]

OBJECTIVES = ("binary", "regression")
MAX_DEPTH_LIMIT = 12  # heap node ids up to 2**13: lookup tables stay tiny
MAX_BINS_LIMIT = 256  # bin codes are uint8


@dataclass(frozen=True)
class GBMParams:
    """XGBoost-style settings. ``reg_lambda`` is the L2 penalty on leaf weights (``lambda`` in
    job params), ``gamma`` the minimum gain a split must bring, ``min_child_weight`` the minimum
    hessian sum of each child. ``subsample``/``colsample`` are per-tree row and feature shares;
    ``seed`` makes those draws reproducible (``None``: the coordinator draws one from
    ``secrets``). ``sketch_size`` bounds the summary points a party sends per feature;
    ``subtraction`` derives each split's larger child as parent minus smaller child."""

    objective: str = "binary"
    n_trees: int = 100
    max_depth: int = 6
    learning_rate: float = 0.1
    max_bins: int = 32
    reg_lambda: float = 1.0
    gamma: float = 0.0
    min_child_weight: float = 1.0
    subsample: float = 1.0
    colsample: float = 1.0
    seed: int | None = None
    sketch_size: int = 1024
    subtraction: bool = True
    histogram_bins: int = 1000

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                "unknown GBM objective",
                field="params.objective",
                value=self.objective,
                fix="use 'binary' (logistic loss) or 'regression' (squared loss)",
            )
        _integer("n_trees", self.n_trees, 1, 100_000)
        _integer("max_depth", self.max_depth, 1, MAX_DEPTH_LIMIT)
        _integer("max_bins", self.max_bins, 2, MAX_BINS_LIMIT)
        _integer("sketch_size", self.sketch_size, 16, 1_000_000)
        _integer("histogram_bins", self.histogram_bins, 2, 1_000_000)
        if self.histogram_bins % 2:
            raise ConfigError(
                "histogram_bins must be even so that 0.5 is a bin edge for accuracy",
                field="params.histogram_bins",
                value=self.histogram_bins,
                fix="use an even number such as 1000",
            )
        _number("learning_rate", self.learning_rate, low=0.0, open_low=True)
        _number("lambda", self.reg_lambda, low=0.0)
        _number("gamma", self.gamma, low=0.0)
        _number("min_child_weight", self.min_child_weight, low=0.0)
        _number("subsample", self.subsample, low=0.0, high=1.0, open_low=True)
        _number("colsample", self.colsample, low=0.0, high=1.0, open_low=True)
        if self.reg_lambda == 0 and self.min_child_weight == 0:
            # An empty child would divide by zero in the gain.
            raise ConfigError(
                "lambda and min_child_weight cannot both be 0",
                field="params.lambda",
                value=0,
                fix="set lambda > 0 or min_child_weight > 0",
            )
        if self.seed is not None:
            _integer("seed", self.seed, 0, 2**63 - 1)
        if not isinstance(self.subtraction, bool):
            raise ConfigError(
                "subtraction must be true or false",
                field="params.subtraction",
                value=self.subtraction,
            )

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any], *, n_trees: int | None = None) -> GBMParams:
        """From job params (``lambda`` for ``reg_lambda``); ``n_trees`` is the default tree count
        (the job's ``rounds``) when ``params.n_trees`` is absent. Unknown keys are ignored, so
        generic job keys (``purpose`` settings, ``impute``...) can sit beside them."""
        kwargs: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            key = "lambda" if name == "reg_lambda" else name
            if key in params:
                kwargs[name] = params[key]
        if "n_trees" not in kwargs and n_trees is not None:
            kwargs["n_trees"] = n_trees
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """Plain JSON job params (inverse of :meth:`from_mapping`)."""
        out = {
            ("lambda" if k == "reg_lambda" else k): getattr(self, k)
            for k in self.__dataclass_fields__
        }
        return out


def _integer(name: str, value: Any, low: int, high: int) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    if not ok:
        raise ConfigError(
            f"GBM parameter {name!r} must be an integer in [{low}, {high}]",
            field=f"params.{name}",
            value=value,
            fix=f"set params.{name} within [{low}, {high}] or leave it out",
        )


def _number(
    name: str, value: Any, *, low: float, high: float = float("inf"), open_low: bool = False
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    ok = ok and value == value  # not NaN
    if not ok:
        bound = f"{'(' if open_low else '['}{low}, {high}]"
        raise ConfigError(
            f"GBM parameter {name!r} must be a number in {bound}",
            field=f"params.{name}",
            value=value,
            fix=f"set params.{name} within {bound} or leave it out",
        )
