"""Privacy accounting of DP-FedAvg with Google's ``dp-accounting``: (epsilon, delta) of a job, and
the noise multiplier that reaches a target epsilon.

One round of client-level DP-FedAvg is a Gaussian mechanism with noise multiplier ``z`` (noise
standard deviation over the per-participant L2 sensitivity) applied to the participants sampled
that round; with Poisson sampling at rate ``q`` (each participant independently, which is what
:class:`~cdp_federated.privacy.dp_fedavg.DPFedAvg` does) the job is ``rounds`` self-compositions
of a Poisson-subsampled Gaussian, under add/remove-one-participant neighbouring. With ``q == 1``
(everyone every round) it is the plain Gaussian composed ``rounds`` times.

Two accountants: ``"rdp"`` (Renyi DP, Mironov 2017; milliseconds, a slightly loose upper bound) and
``"pld"`` (privacy loss distributions, Koskela et al. / Google; tight, ~0.5 s per evaluation).
:func:`calibrate` searches with RDP, so the noise it returns gives at most the target epsilon
under RDP and a little less under PLD.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError

__all__ = ["ACCOUNTANTS", "RDP_ORDERS", "PrivacySpend", "dp_event_of", "epsilon", "calibrate"]

ACCOUNTANTS = ("rdp", "pld")
# Orders from 2 up: fractional orders below 2 make dp-accounting's subsampled series fail to
# converge (it then drops them with a log warning). They matter only for epsilons above ~20.
RDP_ORDERS = tuple(
    [2.0 + 0.25 * i for i in range(40)]
    + [float(a) for a in range(12, 65)]
    + [80.0, 96.0, 128.0, 256.0, 512.0, 1024.0]
)
_MAX_NOISE = 1e4  # upper end of calibration's search


@dataclass(frozen=True)
class PrivacySpend:
    """What a DP job spends: ``(epsilon, delta)`` for ``rounds`` rounds at ``noise_multiplier``
    and ``sampling_rate``, by ``accountant``."""

    epsilon: float
    delta: float
    noise_multiplier: float
    sampling_rate: float
    rounds: int
    accountant: str = "rdp"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dp_event_of(noise_multiplier: float, rounds: int, sampling_rate: float) -> Any:
    """The ``dp-accounting`` event of a DP-FedAvg job."""
    from dp_accounting import dp_event  # imported on use: ~0.25 s of scipy/absl at start-up

    _check(noise_multiplier=noise_multiplier, rounds=rounds, sampling_rate=sampling_rate)
    event = dp_event.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dp_event.PoissonSampledDpEvent(sampling_rate, event)
    return dp_event.SelfComposedDpEvent(event, rounds)


def _accountant(name: str) -> Any:
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    if name == "rdp":
        return rdp_privacy_accountant.RdpAccountant(orders=list(RDP_ORDERS))
    if name == "pld":
        return pld_privacy_accountant.PLDAccountant()
    raise ConfigError(
        "unknown privacy accountant",
        field="params.dp_accountant",
        value=name,
        fix=f"use one of {', '.join(ACCOUNTANTS)}",
    )


def epsilon(
    noise_multiplier: float,
    rounds: int,
    sampling_rate: float,
    delta: float,
    *,
    accountant: str = "rdp",
) -> float:
    """Epsilon at ``delta`` of ``rounds`` rounds of DP-FedAvg."""
    _check(delta=delta)
    acc = _accountant(accountant)
    acc.compose(dp_event_of(noise_multiplier, rounds, sampling_rate))
    return float(acc.get_epsilon(delta))


def calibrate(
    target_epsilon: float,
    delta: float,
    rounds: int,
    sampling_rate: float,
    *,
    accountant: str = "rdp",
) -> float:
    """The smallest noise multiplier (to ~1e-3 relative) whose epsilon at ``delta`` over
    ``rounds`` rounds at ``sampling_rate`` is at most ``target_epsilon``."""
    _check(target_epsilon=target_epsilon, delta=delta, rounds=rounds, sampling_rate=sampling_rate)
    from dp_accounting import mechanism_calibration

    found = mechanism_calibration.calibrate_dp_mechanism(
        lambda: _accountant(accountant),
        lambda z: dp_event_of(z, rounds, sampling_rate),
        target_epsilon,
        delta,
        mechanism_calibration.LowerEndpointAndGuess(1e-2, 1.0),
        tol=1e-4,
    )
    if not found < _MAX_NOISE:
        raise ConfigError(
            f"no noise below {_MAX_NOISE:g} reaches epsilon {target_epsilon} in {rounds} rounds",
            field="params.dp_epsilon",
            value=target_epsilon,
            fix="raise the target epsilon or train fewer rounds",
        )
    return float(found)


# Where each checked value comes from in a job.
_FIELDS = {
    "target_epsilon": "params.dp_epsilon",
    "rounds": "rounds",
    "sampling_rate": "params.fraction_fit",
}


def _check(**values: float) -> None:
    fixes = {
        "noise_multiplier": ("a positive number", lambda v: v > 0),
        "target_epsilon": ("a positive number", lambda v: v > 0),
        "rounds": ("a positive integer", lambda v: v >= 1 and v == int(v)),
        "sampling_rate": ("in (0, 1]", lambda v: 0 < v <= 1),
        "delta": ("in (0, 1)", lambda v: 0 < v < 1),
    }
    for name, value in values.items():
        what, ok = fixes[name]
        valid = isinstance(value, int | float) and not isinstance(value, bool)
        if not (valid and math.isfinite(value) and ok(value)):
            raise ConfigError(
                f"{name} must be {what}",
                field=_FIELDS.get(name, f"params.dp_{name}"),
                value=value,
                fix=f"set {name} {what}",
            )
