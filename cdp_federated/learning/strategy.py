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
from .rounds import ClientSampler

__all__ = [
    "FitInstructions",
    "FitResult",
    "Strategy",
    "FedAvg",
    "FedProx",
    "FedAvgM",
    "FedAdam",
    "FedYogi",
    "STRATEGIES",
    "STRATEGY_PARAM_NAMES",
    "strategy_from_params",
]


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


# Fit-config values computed from the data before round 1, kept in the strategy's state.
PERSISTED_CONFIG = ("label_mean", "label_scale")


class FedAvg(Strategy):
    """Federated averaging: the new model is the average of the parties' locally trained models,
    weighted by their sample counts (``weighting="samples"``) or uniformly (``"uniform"``).

    A round needs at least ``min_fit_participants`` results, otherwise it raises
    :class:`TrainingError`. ``fit_config`` is sent to every participant every round. With a
    ``sampler`` only the participants it draws are asked each round (the draw is kept in
    :attr:`last_sample`). Subclasses change what the server does with the average
    (:meth:`server_update`) and what the participants are told (:meth:`fit_settings`).
    """

    def __init__(
        self,
        *,
        min_fit_participants: int = 1,
        weighting: str = "samples",
        fit_config: Mapping[str, Any] | None = None,
        sampler: ClientSampler | None = None,
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
        self.sampler = sampler
        self.last_sample: tuple[str, ...] = ()
        self._global: np.ndarray | None = None  # the parameters handed out this round

    def initialize(self, num_features: int) -> np.ndarray:
        return np.zeros(num_features + 1)  # weights then intercept; zeros need no randomness

    def fit_settings(self) -> dict[str, Any]:
        """Scalar settings every participant receives on top of ``fit_config``."""
        return {}

    def configure_fit(
        self, round_number: int, parameters: np.ndarray, participants: Sequence[str]
    ) -> dict[str, FitInstructions]:
        chosen = (
            self.sampler.sample(round_number, participants)
            if self.sampler is not None
            else sorted(participants)
        )
        self.last_sample = tuple(chosen)
        self._global = np.array(parameters, dtype=np.float64)
        config = {**self.fit_config, **self.fit_settings(), "round": round_number}
        return {p: FitInstructions(parameters.copy(), dict(config)) for p in chosen}

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
        average = weighted_average(vectors, weights)
        if self._global is None or self._global.shape != average.shape:
            return average  # nothing handed out by configure_fit: plain averaging
        return self.server_update(self._global, average)

    def server_update(self, current: np.ndarray, average: np.ndarray) -> np.ndarray:
        """The new global model from the one handed out and the parties' average: FedAvg takes
        the average itself."""
        return average

    def state_dict(self) -> dict[str, Any]:
        """Server optimiser state, the sampler's key, and the fit-config values a job computed
        from its data before round 1 (the label's standardisation), so a resumed job hands out
        exactly the same config."""
        state = self._server_state()
        if self.sampler is not None:
            state.update(self.sampler.state_dict())
        state.update(
            {k: float(self.fit_config[k]) for k in PERSISTED_CONFIG if k in self.fit_config}
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        sampler_state = {k: v for k, v in state.items() if k in ClientSampler.STATE_KEYS}
        if sampler_state and self.sampler is None:
            _check_state_keys(self, sampler_state, set())
        if self.sampler is not None:
            self.sampler.load_state_dict(sampler_state)
        for key in PERSISTED_CONFIG:
            if key in state:
                self.fit_config[key] = float(state[key])
        skip = {*sampler_state, *PERSISTED_CONFIG}
        self._load_server_state({k: v for k, v in state.items() if k not in skip})

    def _server_state(self) -> dict[str, Any]:
        """Server optimiser state (momentum, moments): arrays only."""
        return {}

    def _load_server_state(self, state: Mapping[str, Any]) -> None:
        _check_state_keys(self, state, set())


class FedProx(FedAvg):
    """FedAvg whose participants add ``mu/2 ||theta - theta_global||^2`` to their local objective
    (Li et al. 2020), which keeps many local steps on non-IID data close to the global model.
    The server side is FedAvg; ``mu`` travels as ``proximal_mu`` in the fit config."""

    def __init__(self, *, mu: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mu = _check_number("mu", mu, low=0.0, low_open=True)

    def fit_settings(self) -> dict[str, Any]:
        return {"proximal_mu": self.mu}


class FedAvgM(FedAvg):
    """Server momentum (Hsu et al. 2019): with the pseudo-gradient ``g = current - average``,
    ``v <- momentum v + g`` and ``new = current - server_learning_rate v``. With a momentum of 0
    and a rate of 1 it is FedAvg."""

    def __init__(
        self, *, server_learning_rate: float = 1.0, server_momentum: float = 0.9, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.server_learning_rate = _check_number(
            "server_learning_rate", server_learning_rate, low=0.0, low_open=True
        )
        self.server_momentum = _check_number("server_momentum", server_momentum, low=0.0, high=1.0)
        self.velocity: np.ndarray | None = None

    def server_update(self, current: np.ndarray, average: np.ndarray) -> np.ndarray:
        pseudo_gradient = current - average
        if self.velocity is None or self.velocity.shape != pseudo_gradient.shape:
            self.velocity = np.zeros_like(pseudo_gradient)
        self.velocity = self.server_momentum * self.velocity + pseudo_gradient
        return current - self.server_learning_rate * self.velocity

    def _server_state(self) -> dict[str, Any]:
        return {} if self.velocity is None else {"velocity": self.velocity.copy()}

    def _load_server_state(self, state: Mapping[str, Any]) -> None:
        _check_state_keys(self, state, {"velocity"})
        self.velocity = _state_array(state, "velocity")


class _AdaptiveServer(FedAvg):
    """Adaptive server optimisers of Reddi et al. 2021 ("Adaptive Federated Optimization",
    Algorithm 2): with ``delta = average - current``,
    ``m <- beta1 m + (1 - beta1) delta``, ``v`` updated by :meth:`_second_moment` (starting from
    ``tau^2``), then ``new = current + eta m / (sqrt(v) + tau)``. No bias correction, as in the
    paper; ``tau`` bounds the per-coordinate step by ``eta / tau``."""

    def __init__(
        self,
        *,
        server_learning_rate: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.eta = _check_number(
            "server_learning_rate", server_learning_rate, low=0.0, low_open=True
        )
        self.beta1 = _check_number("beta1", beta1, low=0.0, high=1.0, high_open=True)
        self.beta2 = _check_number("beta2", beta2, low=0.0, high=1.0, high_open=True)
        self.tau = _check_number("tau", tau, low=0.0, low_open=True)
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def server_update(self, current: np.ndarray, average: np.ndarray) -> np.ndarray:
        delta = average - current
        if self.m is None or self.m.shape != delta.shape:
            self.m = np.zeros_like(delta)
            self.v = np.full_like(delta, self.tau**2)
        self.m = self.beta1 * self.m + (1.0 - self.beta1) * delta
        self.v = self._second_moment(self.v, delta)
        return current + self.eta * self.m / (np.sqrt(self.v) + self.tau)

    def _server_state(self) -> dict[str, Any]:
        if self.m is None:
            return {}
        return {"m": self.m.copy(), "v": self.v.copy()}

    def _load_server_state(self, state: Mapping[str, Any]) -> None:
        _check_state_keys(self, state, {"m", "v"})
        self.m, self.v = _state_array(state, "m"), _state_array(state, "v")
        if (self.m is None) != (self.v is None):
            raise ConfigError(
                "strategy state needs both moments",
                field="strategy_state",
                value=sorted(state),
                fix="resume from a checkpoint written by state_dict()",
            )


class FedAdam(_AdaptiveServer):
    """Server Adam: ``v <- beta2 v + (1 - beta2) delta^2``."""

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * delta**2


class FedYogi(_AdaptiveServer):
    """Server Yogi: ``v <- v - (1 - beta2) delta^2 sign(v - delta^2)``, which grows ``v`` as
    slowly as Adagrad and shrinks it no faster than Adam."""

    def _second_moment(self, v: np.ndarray, delta: np.ndarray) -> np.ndarray:
        square = delta**2
        return v - (1.0 - self.beta2) * square * np.sign(v - square)


STRATEGIES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
}
# Job parameters each strategy reads (beyond FedAvg's), and the keyword they feed.
_STRATEGY_PARAMS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedprox": ("mu",),
    "fedavgm": ("server_learning_rate", "server_momentum"),
    "fedadam": ("server_learning_rate", "beta1", "beta2", "tau"),
    "fedyogi": ("server_learning_rate", "beta1", "beta2", "tau"),
}
_ALL_STRATEGY_PARAMS = {name for names in _STRATEGY_PARAMS.values() for name in names}
# Every job parameter :func:`strategy_from_params` reads.
STRATEGY_PARAM_NAMES = frozenset({"strategy", "weighting", *_ALL_STRATEGY_PARAMS})


def strategy_from_params(
    params: Mapping[str, Any],
    *,
    min_fit_participants: int,
    fit_config: Mapping[str, Any] | None = None,
    sampler: ClientSampler | None = None,
) -> FedAvg:
    """The strategy a job's ``params`` select: ``params.strategy`` (default ``fedavg``) with its
    hyper-parameters (``mu``; ``server_learning_rate``, ``server_momentum``; ``beta1``,
    ``beta2``, ``tau``) and ``params.weighting``. A hyper-parameter of another strategy is a
    :class:`ConfigError`, so a typo cannot silently train something else."""
    name = params.get("strategy", "fedavg")
    if name not in STRATEGIES:
        raise ConfigError(
            "unknown strategy",
            field="params.strategy",
            value=name,
            fix=f"use one of {', '.join(STRATEGIES)}",
        )
    own = _STRATEGY_PARAMS[name]
    stray = sorted(k for k in _ALL_STRATEGY_PARAMS - set(own) if k in params)
    if stray:
        raise ConfigError(
            f"parameters {stray} do not apply to strategy {name!r}",
            field=f"params.{stray[0]}",
            value=params[stray[0]],
            fix=f"remove them or pick the strategy they belong to ({name!r} reads {list(own)})",
        )
    if name == "fedprox" and "mu" not in params:
        raise ConfigError(
            "fedprox needs its proximal weight",
            field="params.mu",
            fix="set params.mu, for example 0.01",
        )
    kwargs = {key: params[key] for key in own if key in params}
    try:
        return STRATEGIES[name](
            min_fit_participants=min_fit_participants,
            weighting=params.get("weighting", "samples"),
            fit_config=fit_config,
            sampler=sampler,
            **kwargs,
        )
    except ConfigError as exc:
        raise ConfigError(
            exc.message,
            field=f"params.{exc.field}",
            value=exc.value,
            fix=exc.fix,
        ) from None


def _check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}, "
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        interval = f"{lo}{hi or 'inf)'}"
        raise ConfigError(
            f"{name} must be a number in {interval}",
            field=name,
            value=value,
            fix=f"set {name} within {interval}",
        )
    return float(value)


def _check_state_keys(strategy: Strategy, state: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = set(state) - allowed
    if unknown:
        raise ConfigError(
            f"{type(strategy).__name__} does not keep {sorted(unknown)}",
            field="strategy_state",
            value=sorted(state),
            fix="resume with the strategy that wrote the checkpoint",
        )


def _state_array(state: Mapping[str, Any], key: str) -> np.ndarray | None:
    if key not in state:
        return None
    array = np.array(state[key], dtype=np.float64)  # a copy: the checkpoint stays untouched
    if array.ndim != 1 or not np.isfinite(array).all():
        raise ConfigError(
            "strategy state must be a finite vector",
            field=f"strategy_state.{key}",
            value=array.shape,
            fix="resume from a checkpoint written by state_dict()",
        )
    return array


def _describe(failure: Any) -> str:
    """A one-line account of a failure: a wire failure, an exception or anything printable."""
    if hasattr(failure, "error_type") and hasattr(failure, "message"):
        return f"{failure.error_type}: {failure.message}"
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"
    return str(failure)
