"""Strategies: what the coordinator does each round, as configure/aggregate pairs (Flower's shape).

A strategy never touches a transport or a wire message. It hands out :class:`FitInstructions`
(parameters + scalar config per participant) and aggregates anything shaped like a
:class:`FitResult`, receiving the round's failures explicitly so it can decide whether the round
holds. The coordinator translates to and from the wire. The maths lives in :mod:`.aggregate`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError, TrainingError
from .aggregate import weighted_average, weighted_metrics

__all__ = ["FitInstructions", "FitResult", "Strategy", "FedAvg"]


@dataclass(frozen=True, eq=False)
class FitInstructions:
    """What one participant should do in a round: start from ``parameters``, apply ``config``."""

    parameters: np.ndarray
    config: Mapping[str, Any] = field(default_factory=dict)


class FitResult(Protocol):
    """One participant's answer to :class:`FitInstructions` (the wire's ``FitRes`` fits)."""

    @property
    def parameters(self) -> np.ndarray: ...

    @property
    def num_examples(self) -> int: ...

    @property
    def metrics(self) -> Mapping[str, Any]: ...


class Strategy(ABC):
    """Base class of coordinator-side training strategies."""

    @abstractmethod
    def initialize(self, num_features: int) -> np.ndarray:
        """Initial global parameters for a model over ``num_features`` features."""

    @abstractmethod
    def configure_fit(
        self, round_number: int, parameters: np.ndarray, participants: Sequence[str]
    ) -> dict[str, FitInstructions]:
        """Instructions for round ``round_number`` (1-based), per participant to ask."""

    @abstractmethod
    def aggregate_fit(
        self,
        round_number: int,
        results: Mapping[str, FitResult],
        failures: Mapping[str, Any],
    ) -> np.ndarray:
        """New global parameters from the round's ``results``; ``failures`` maps each participant
        that did not deliver to what went wrong. Raise :class:`TrainingError` to reject the round."""

    def aggregate_fit_metrics(self, results: Mapping[str, FitResult]) -> dict[str, float]:
        """Round metrics: each numeric metric averaged over parties, weighted by examples."""
        return weighted_metrics((r.num_examples, r.metrics) for r in results.values())

    def state_dict(self) -> dict[str, Any]:
        """The strategy's state between rounds (server momentum, adaptive moments...), as numpy
        arrays and JSON scalars only, so a coordinator can checkpoint it after each committed
        round without pickling. Stateless strategies return ``{}``."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (crash-resume). Stateless: nothing to do."""
        if state:
            raise ConfigError(
                f"{type(self).__name__} keeps no state between rounds",
                field="strategy_state",
                value=sorted(state),
                fix="resume with the strategy that wrote the checkpoint",
            )


class FedAvg(Strategy):
    """Federated averaging: the new model is the average of the parties' locally trained models,
    weighted by their sample counts (``weighting="samples"``) or uniformly (``"uniform"``).

    A round needs at least ``min_fit_participants`` results, otherwise it raises
    :class:`TrainingError`. ``fit_config`` is sent to every participant every round.
    """

    def __init__(
        self,
        *,
        min_fit_participants: int = 1,
        weighting: str = "samples",
        fit_config: Mapping[str, Any] | None = None,
    ) -> None:
        if min_fit_participants < 1:
            raise ConfigError(
                "min_fit_participants must be at least 1",
                field="min_fit_participants",
                value=min_fit_participants,
                fix="use a positive number of participants",
            )
        if weighting not in ("samples", "uniform"):
            raise ConfigError(
                "unknown weighting",
                field="weighting",
                value=weighting,
                fix="use 'samples' or 'uniform'",
            )
        self.min_fit_participants = min_fit_participants
        self.weighting = weighting
        self.fit_config = dict(fit_config or {})

    def initialize(self, num_features: int) -> np.ndarray:
        return np.zeros(num_features + 1)  # weights then intercept; zeros need no randomness

    def configure_fit(
        self, round_number: int, parameters: np.ndarray, participants: Sequence[str]
    ) -> dict[str, FitInstructions]:
        config = {**self.fit_config, "round": round_number}
        return {p: FitInstructions(parameters.copy(), dict(config)) for p in participants}

    def aggregate_fit(
        self,
        round_number: int,
        results: Mapping[str, FitResult],
        failures: Mapping[str, Any],
    ) -> np.ndarray:
        if len(results) < self.min_fit_participants:
            failed = "; ".join(f"{p}: {_describe(f)}" for p, f in sorted(failures.items()))
            raise TrainingError(
                f"round {round_number} got {len(results)} results, needs "
                f"{self.min_fit_participants}; failed: {failed or 'none'}",
                field="min_fit_participants",
                value=self.min_fit_participants,
                fix="fix the failing participants or lower params.min_fit_participants",
            )
        ordered = sorted(results)  # a fixed order keeps the float sum reproducible
        vectors = [results[p].parameters for p in ordered]
        weights = (
            [results[p].num_examples for p in ordered] if self.weighting == "samples" else None
        )
        return weighted_average(vectors, weights)


def _describe(failure: Any) -> str:
    """A one-line account of a failure: a wire failure, an exception or anything printable."""
    if hasattr(failure, "error_type") and hasattr(failure, "message"):
        return f"{failure.error_type}: {failure.message}"
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"
    return str(failure)
