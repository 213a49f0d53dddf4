"""SecureBoost settings, validated once at the boundary."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError

__all__ = ["SecureBoostParams", "OBJECTIVES"]

OBJECTIVES = ("binary", "regression")


@dataclass(frozen=True)
class SecureBoostParams:
    """XGBoost-style settings (same gain and leaf formulas as XGBoost's ``hist`` method).

    ``frac_bits`` is the fixed-point scale: gradients and hessians become
    ``round(v * 2**frac_bits)`` integers, one scale for all of them, so encrypted additions need
    no exponent alignment. ``first_tree_active_only`` grows tree 0 on the active party's features
    only (passive parties see no gradients for it). ``chunk_rows`` bounds the ciphertexts per
    gradient message (lowered further, per key, so a message stays within half the codec's
    limits: :func:`.messages.rows_per_message`). HEU takes bin codes as int8, hence ``max_bins <= 127``."""

    objective: str = "binary"
    n_trees: int = 10
    max_depth: int = 5
    learning_rate: float = 0.3
    max_bins: int = 32
    reg_lambda: float = 1.0
    gamma: float = 0.0
    min_child_weight: float = 1.0
    frac_bits: int = 24
    first_tree_active_only: bool = False
    chunk_rows: int = 16384

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                "unknown SecureBoost objective",
                field="objective",
                value=self.objective,
                fix="use 'binary' (logistic loss) or 'regression' (squared loss)",
            )
        _integer("n_trees", self.n_trees, 1, 10_000)
        _integer("max_depth", self.max_depth, 1, 12)
        _integer("max_bins", self.max_bins, 2, 127)
        _integer("frac_bits", self.frac_bits, 8, 40)
        _integer("chunk_rows", self.chunk_rows, 1, 10_000_000)
        for name, low in (
            ("learning_rate", 0.0),
            ("reg_lambda", 0.0),
            ("gamma", 0.0),
            ("min_child_weight", 0.0),
        ):
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool) and value == value
            if not ok or value < low or (name == "learning_rate" and value == 0):
                raise ConfigError(
                    f"SecureBoost parameter {name!r} must be a number >= {low}",
                    field=name,
                    value=value,
                    fix=f"set {name} to a finite non-negative number",
                )
        if self.reg_lambda == 0 and self.min_child_weight == 0:
            raise ConfigError(
                "reg_lambda and min_child_weight cannot both be 0",
                field="reg_lambda",
                value=0,
                fix="set reg_lambda > 0 or min_child_weight > 0 (an empty child divides by zero)",
            )
        if not isinstance(self.first_tree_active_only, bool):
            raise ConfigError(
                "first_tree_active_only must be a bool",
                field="first_tree_active_only",
                value=self.first_tree_active_only,
            )


def _integer(name: str, value: object, low: int, high: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        raise ConfigError(
            f"SecureBoost parameter {name!r} must be an integer in [{low}, {high}]",
            field=name,
            value=value,
            fix=f"set {name} within [{low}, {high}]",
        )
