"""Horizontal GBM histograms through secure aggregation: the coordinator gets the sum of the
participants' gradient/hessian histograms of each tree level, never one participant's.

Enabled per job by ``params.secure_aggregation``: ``true``, or a mapping with ``threshold``
(the GBM driver raises it to every participant: a level needs all of them anyway, and a level
rerun after a participant restart must not follow an unmasked partial sum, which the coordinator
could subtract) and, for regression, ``gradient_bound`` (the largest ``|gradient|`` of a
row; binary log-loss gradients are within 1 and hessians within 1/4 by construction). Each
level's request (:class:`~cdp_federated.federation.messages.GBMHistogramIns`) is the inner task
of one :func:`~.secagg_rounds.secure_sum`; participants answer with
``grad[k]``, ``hess[k]`` (:func:`~cdp_federated.participant.secagg_tasks.histogram_contribution`).

Fixed point that cannot overflow: a histogram cell of participant ``p`` holds at most
``rows_p * max(gradient_bound, hessian_bound)`` in magnitude, so with ``bound`` the largest row
count times that and ``n`` participants the 64-bit ring gets ``frac_bits = 62 - ceil(log2(n *
bound))`` fractional bits (at most 40): 2^-41 per cell and party of rounding, so the trees are the
plain run's unless two candidate splits tie to within that. A participant whose histograms exceed
the bound is refused by its own encoder (a typed error naming the bound).

Histogram subtraction needs every party's histograms at every level: a participant that drops
out of a level's aggregation stops the job (:class:`~cdp_federated.errors.TrainingError`), as a
failure does without secure aggregation. Not covered: the sketch stage (each participant's
feature quantile summaries, row count and label sum) and the evaluation aggregates still reach
the coordinator per participant.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, TrainingError
from ..federation.messages import GBMHistogramIns
from ..federation.transport import Transport
from .secagg_rounds import SecureSum, secure_sum

__all__ = ["SecureHistograms", "histograms_from_params", "MAX_FRAC_BITS"]

MAX_FRAC_BITS = 40  # 2^-41 rounding per cell is far below any split-gain difference that matters
_MIN_FRAC_BITS = 16
_HESSIAN_BOUND = {"binary": 0.25, "regression": 1.0}  # p(1 - p) and the squared loss's 1


@dataclass
class SecureHistograms:
    """Sums each level's histograms through secure aggregation; ``last`` is the latest
    :class:`~.secagg_rounds.SecureSum` (who took part)."""

    job_id: str
    objective: str
    threshold: int | None = None
    gradient_bound: float = 1.0
    last: SecureSum | None = None

    def ring(self, parties: int, largest_rows: int) -> dict[str, Any]:
        """The 64-bit fixed-point ring for ``parties`` with at most ``largest_rows`` rows each."""
        bound = float(largest_rows) * max(self.gradient_bound, _HESSIAN_BOUND[self.objective])
        frac_bits = min(MAX_FRAC_BITS, 62 - math.ceil(math.log2(parties * bound + 1)))
        if frac_bits < _MIN_FRAC_BITS:
            raise ConfigError(
                f"histogram sums of {parties} participants up to {bound:g} leave {frac_bits} "
                "fractional bits in the 2^64 ring",
                field="params.secure_aggregation.gradient_bound",
                value=self.gradient_bound,
                fix="lower the gradient bound (scale the label) or aggregate fewer rows",
            )
        return {"bits": 64, "frac_bits": frac_bits, "bound": bound, "parties": parties}

    def sum(
        self,
        transport: Transport,
        rows: Mapping[str, int],
        request: GBMHistogramIns,
        bins: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The summed (gradient, hessian) histograms of ``request.build_nodes`` over the
        participants in ``rows`` (name -> training rows, from the sketch stage)."""
        names = sorted(rows)
        shape = (request.build_nodes.size, request.features.size, bins)
        cells = int(np.prod(shape))
        count = len(names)
        result = secure_sum(
            transport,
            dict.fromkeys(names, request),
            job_id=self.job_id,
            # a fresh session per level and attempt: no seed ever masks two inputs
            session=f"{self.job_id}/secagg/tree-{request.tree}/depth-{request.depth}/"
            f"{secrets.token_hex(8)}",
            threshold=self.threshold or count // 2 + 1,
            ring=self.ring(count, max(rows.values())),
            weighting="uniform",
        )
        self.last = result
        if set(result.survivors) != set(names):
            gone = "; ".join(f"{n}: {why}" for n, why in sorted(result.dropped.items())[:3])
            raise TrainingError(
                f"GBM needs every participant's histograms at every level; "
                f"{len(result.dropped)} dropped out of tree {request.tree} depth "
                f"{request.depth} ({gone})",
                field="participants",
                value=sorted(result.dropped),
                fix="check the participants' errors and rerun the job",
            )
        if tuple(result.layout) != (f"grad[{cells}]", f"hess[{cells}]"):
            raise TrainingError(
                "the participants' histograms do not have the level's shape",
                field="layout",
                value=list(result.layout)[:4],
                fix=f"each participant sends histograms of shape {shape}",
            )
        grad = result.total[:cells].reshape(shape)
        hess = result.total[cells:].reshape(shape)
        return grad, np.maximum(hess, 0.0)  # fixed-point rounding can dip an empty cell below 0


def histograms_from_params(
    job_id: str, params: Mapping[str, Any], objective: str
) -> SecureHistograms | None:
    """The GBM job's secure aggregation from ``params.secure_aggregation`` (None when off)."""
    value = params.get("secure_aggregation", False)
    if value is False or value is None:
        return None
    if value is True:
        value = {}
    allowed = {"threshold", "gradient_bound"}
    if not isinstance(value, Mapping) or set(value) - allowed:
        raise ConfigError(
            "for GBM, params.secure_aggregation is true or a mapping of threshold and "
            "gradient_bound",
            field="params.secure_aggregation",
            value=value,
            fix="e.g. secure_aggregation: {threshold: 3, gradient_bound: 10.0}",
        )
    bound = value.get("gradient_bound")
    if objective == "regression" and bound is None:
        raise ConfigError(
            "secure aggregation of regression GBM needs a bound on each row's gradient "
            "(prediction minus label) to size its fixed-point ring",
            field="params.secure_aggregation.gradient_bound",
            value=None,
            fix="set secure_aggregation: {gradient_bound: B}, B about the label's range",
        )
    if bound is not None and not (
        isinstance(bound, int | float) and not isinstance(bound, bool) and 0 < bound < math.inf
    ):
        raise ConfigError(
            "the gradient bound must be a positive number",
            field="params.secure_aggregation.gradient_bound",
            value=bound,
        )
    threshold = value.get("threshold")
    if threshold is not None and (not isinstance(threshold, int) or isinstance(threshold, bool)):
        raise ConfigError(
            "the secure-aggregation threshold is an integer",
            field="params.secure_aggregation.threshold",
            value=threshold,
        )
    gradient_bound = float(bound) if bound is not None else 1.0
    return SecureHistograms(job_id, objective, threshold, gradient_bound)
