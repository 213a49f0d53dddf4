"""Central, client-level DP-FedAvg (McMahan et al. 2018) as a wrapper around a FedAvg strategy.

Participant side (:func:`clip_update`, called by the agent after local training): the model
delta ``theta - theta_global`` is clipped to L2 norm ``C`` and only the clipped model goes back,
without the per-participant training loss (a statistic the noise does not cover).

Coordinator side (:class:`DPFedAvg`):

- **Sampling.** With ``sampling_rate q < 1`` each participant is asked independently with
  probability ``q`` (Poisson sampling, keyed BLAKE2b like the job's other draws), which is what
  the accountant assumes; ``q = 1`` asks everyone.
- **Noise.** The clipped deltas are summed (re-clipped first, so a participant that skipped
  clipping cannot widen the sensitivity), rounded to a fixed-point grid and given discrete
  Gaussian noise of standard deviation ``z * C`` (:mod:`.noise`). The sum is divided by the
  *expected* number of participants ``q * N``, not by how many replied, as DP-FedAvg's
  fixed-denominator estimator requires: weighting is uniform, sample counts are ignored.
- **Server step.** The noisy average goes through the wrapped strategy's ``server_update``
  (FedAvg, FedAvgM, FedAdam...): post-processing, free of privacy cost.
- **Adaptive clipping** (Andrew et al. 2021), optional: participants also report whether their
  delta was within ``C``; the coordinator estimates that fraction with Gaussian noise
  ``sigma_b`` and moves ``C`` geometrically towards the ``target_quantile``. The update noise is
  raised so that the two releases together cost exactly the job's noise multiplier ``z``:
  ``z_update = (z^-2 - (2 sigma_b)^-2)^-1/2``.

**Fewer replies than sampled.** The noise is calibrated per round to the sum's sensitivity ``C``
and stays at that absolute level whoever replies, so the guarantee the accountant reports holds;
what shrinks is the signal. A round where some sampled participants failed is therefore kept,
with a :class:`DPShortfallWarning` naming the effective noise multiplier on the mean of those who
replied (``z * expected / replied``), unless fewer than ``min_fit_participants`` (capped at the
number sampled) replied: then the round is refused with :class:`TrainingError`, the same rule as
without DP.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, TrainingError
from ..learning.strategy import FedAvg, FitInstructions, FitResult, Strategy
from .accountant import ACCOUNTANTS, PrivacySpend, calibrate, epsilon
from .noise import DEFAULT_GRID, RandomSource, gaussian_noise, noise_std_for

__all__ = [
    "DP_PARAM_NAMES",
    "DPConfig",
    "DPFedAvg",
    "DPShortfallWarning",
    "RoundPrivacy",
    "clip_update",
    "clip_to_norm",
    "job_privacy_spend",
]

# Job parameters this module reads.
DP_PARAM_NAMES = frozenset(
    {
        "dp_epsilon",
        "dp_noise_multiplier",
        "dp_delta",
        "dp_clip",
        "dp_adaptive_clip",
        "dp_target_quantile",
        "dp_clip_learning_rate",
        "dp_clip_count_stddev",
        "dp_accountant",
        "dp_local",
        "dp_batch_fraction",
    }
)
DEFAULT_DELTA = 1e-5
DEFAULT_CLIP = 1.0
# FitIns config keys the participant's clip_update reads.
CLIP_KEY, ADAPTIVE_KEY, UNCLIPPED_METRIC = "dp_clip", "dp_adaptive_clip", "dp_unclipped"


_CONFIG_CACHE: dict[str, DPConfig | None] = {}


class DPShortfallWarning(UserWarning):
    """Fewer participants replied than the round's noise was calibrated for."""


@dataclass(frozen=True)
class DPConfig:
    """The DP settings of a job, from ``job.params``: either ``dp_noise_multiplier`` or a target
    ``dp_epsilon`` (calibrated here, deterministically, so the coordinator and every participant
    arrive at the same noise), ``dp_delta`` (default 1e-5), ``dp_clip`` (default 1.0, the initial
    clip with ``dp_adaptive_clip``), the sampling rate (``fraction_fit``, default 1) and rounds."""

    noise_multiplier: float
    delta: float
    clip: float
    sampling_rate: float
    rounds: int
    accountant: str = "rdp"
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clip_count_stddev: float | None = None
    target_epsilon: float | None = None
    local: bool = False  # example-level DP-SGD at each participant (dp_local.py)

    @classmethod
    def from_params(cls, params: Mapping[str, Any], rounds: int) -> DPConfig | None:
        """None when the job asks for no DP (neither ``dp_epsilon`` nor
        ``dp_noise_multiplier``); a :class:`ConfigError` for inconsistent settings. Cached:
        participants ask every round and calibration takes ~0.1 s."""
        key = json.dumps(
            [rounds, {k: v for k, v in params.items() if k in _SPEND_KEYS}],
            sort_keys=True,
            default=str,
        )
        if key not in _CONFIG_CACHE:
            if len(_CONFIG_CACHE) > 256:
                _CONFIG_CACHE.clear()
            _CONFIG_CACHE[key] = cls._parse(params, rounds)
        return _CONFIG_CACHE[key]

    @classmethod
    def _parse(cls, params: Mapping[str, Any], rounds: int) -> DPConfig | None:
        stray = sorted(k for k in DP_PARAM_NAMES if k in params)
        if "dp_epsilon" not in params and "dp_noise_multiplier" not in params:
            if stray:
                raise ConfigError(
                    f"DP settings {stray} given without a noise level",
                    field=f"params.{stray[0]}",
                    value=params[stray[0]],
                    fix="set params.dp_epsilon (target) or params.dp_noise_multiplier",
                )
            return None
        if "dp_epsilon" in params and "dp_noise_multiplier" in params:
            raise ConfigError(
                "give a target epsilon or a noise multiplier, not both",
                field="params.dp_noise_multiplier",
                value=params["dp_noise_multiplier"],
                fix="keep params.dp_epsilon or params.dp_noise_multiplier",
            )
        local = params.get("dp_local", False)
        if not isinstance(local, bool):
            raise ConfigError(
                "dp_local is true or false",
                field="params.dp_local",
                value=local,
                fix="set it to true for example-level DP-SGD at each participant",
            )
        if local:
            return cls._local(params, rounds)
        if "dp_batch_fraction" in params:
            raise ConfigError(
                "dp_batch_fraction applies to local DP only",
                field="params.dp_batch_fraction",
                value=params["dp_batch_fraction"],
                fix="set params.dp_local to true, or leave dp_batch_fraction out",
            )
        if params.get("clients_per_round") is not None:
            raise ConfigError(
                "DP accounting needs Poisson client sampling at a known rate",
                field="params.clients_per_round",
                value=params["clients_per_round"],
                fix="use params.fraction_fit with DP",
            )
        if params.get("patience") is not None:
            raise ConfigError(
                "early stopping reads per-participant validation losses the DP noise does not "
                "cover",
                field="params.patience",
                value=params["patience"],
                fix="leave params.patience out of DP jobs",
            )
        q = _num(params, "fraction_fit", 1.0, low=0.0, high=1.0, low_open=True)
        delta = _num(
            params, "dp_delta", DEFAULT_DELTA, low=0.0, high=1.0, low_open=True, high_open=True
        )
        accountant = str(params.get("dp_accountant", "rdp"))
        if accountant not in ACCOUNTANTS:
            raise ConfigError(
                "unknown privacy accountant",
                field="params.dp_accountant",
                value=accountant,
                fix=f"use one of {', '.join(ACCOUNTANTS)}",
            )
        target = None
        if "dp_epsilon" in params:
            target = _num(params, "dp_epsilon", 1.0, low=0.0, low_open=True)
            z = calibrate(target, delta, rounds, q, accountant="rdp")
        else:
            z = _num(params, "dp_noise_multiplier", 1.0, low=0.0, low_open=True)
        adaptive = params.get("dp_adaptive_clip", False)
        if not isinstance(adaptive, bool):
            raise ConfigError(
                "dp_adaptive_clip is true or false",
                field="params.dp_adaptive_clip",
                value=adaptive,
                fix="set it to true for adaptive clipping",
            )
        count_std = params.get("dp_clip_count_stddev")
        out = cls(
            noise_multiplier=z,
            delta=delta,
            clip=_num(params, "dp_clip", DEFAULT_CLIP, low=0.0, low_open=True),
            sampling_rate=q,
            rounds=rounds,
            accountant=accountant,
            adaptive=adaptive,
            target_quantile=_num(params, "dp_target_quantile", 0.5, low=0.0, high=1.0),
            clip_learning_rate=_num(params, "dp_clip_learning_rate", 0.2, low=0.0, low_open=True),
            clip_count_stddev=None
            if count_std is None
            else _num(params, "dp_clip_count_stddev", 1.0, low=0.0, low_open=True),
            target_epsilon=target,
        )
        return out

    @classmethod
    def _local(cls, params: Mapping[str, Any], rounds: int) -> DPConfig:
        """Example-level DP-SGD: ``rounds * local_steps`` steps at rate ``dp_batch_fraction``."""
        if params.get("dp_adaptive_clip"):
            raise ConfigError(
                "adaptive clipping is for central DP-FedAvg",
                field="params.dp_adaptive_clip",
                value=True,
                fix="leave dp_adaptive_clip out with params.dp_local",
            )
        if params.get("patience") is not None:
            raise ConfigError(
                "early stopping reads validation losses the DP noise does not cover",
                field="params.patience",
                value=params["patience"],
                fix="leave params.patience out of DP jobs",
            )
        if "dp_epsilon" in params and "dp_noise_multiplier" in params:
            raise ConfigError(
                "give a target epsilon or a noise multiplier, not both",
                field="params.dp_noise_multiplier",
                value=params["dp_noise_multiplier"],
                fix="keep params.dp_epsilon or params.dp_noise_multiplier",
            )
        q = _num(params, "dp_batch_fraction", 0.1, low=0.0, high=1.0, low_open=True)
        steps = rounds * int(_num(params, "local_steps", 1, low=1.0))
        delta = _num(
            params, "dp_delta", DEFAULT_DELTA, low=0.0, high=1.0, low_open=True, high_open=True
        )
        accountant = str(params.get("dp_accountant", "rdp"))
        target = None
        if "dp_epsilon" in params:
            target = _num(params, "dp_epsilon", 1.0, low=0.0, low_open=True)
            z = calibrate(target, delta, steps, q, accountant="rdp")
        else:
            z = _num(params, "dp_noise_multiplier", 1.0, low=0.0, low_open=True)
        return cls(
            noise_multiplier=z,
            delta=delta,
            clip=_num(params, "dp_clip", DEFAULT_CLIP, low=0.0, low_open=True),
            sampling_rate=q,
            rounds=steps,
            accountant=accountant,
            target_epsilon=target,
            local=True,
        )

    def spend(self) -> PrivacySpend:
        """(epsilon, delta) of the whole job, by this config's accountant."""
        eps = epsilon(
            self.noise_multiplier,
            self.rounds,
            self.sampling_rate,
            self.delta,
            accountant=self.accountant,
        )
        return PrivacySpend(
            eps, self.delta, self.noise_multiplier, self.sampling_rate, self.rounds, self.accountant
        )

    def count_stddev(self, expected: float) -> float:
        """Noise on the adaptive clip's count: the setting, else ``max(expected / 20, z)``
        (Andrew et al. suggest expected/20; at least z keeps the update noise within ~15% of
        z for small federations)."""
        if self.clip_count_stddev is not None:
            return self.clip_count_stddev
        return max(expected / 20.0, self.noise_multiplier)

    def update_noise_multiplier(self, expected: float) -> float:
        """The noise multiplier of the update sum: ``z`` with fixed clipping; with adaptive
        clipping the share of ``z`` the count query leaves."""
        z = self.noise_multiplier
        if not self.adaptive:
            return z
        twice = 2.0 * self.count_stddev(expected)
        if twice <= z:
            raise ConfigError(
                f"the clip-count noise {twice / 2:g} is too small for noise multiplier {z:g}: "
                "the two releases together would exceed the accounted noise",
                field="params.dp_clip_count_stddev",
                value=twice / 2,
                fix=f"set params.dp_clip_count_stddev above {z / 2:g}",
            )
        return (z**-2 - twice**-2) ** -0.5


@dataclass(frozen=True)
class RoundPrivacy:
    """What DP did in one round: who was sampled, how many replied, the clip norm used, the
    noise standard deviation added to the sum and the divisor (expected participants)."""

    round: int
    sampled: int
    replied: int
    expected: float
    clip: float
    noise_std: float
    effective_noise_multiplier: float


def clip_to_norm(vector: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """``vector`` scaled down to L2 norm ``clip`` if longer; returns it and the original norm."""
    norm = float(np.linalg.norm(vector))
    if norm > clip:
        return vector * (clip / norm), norm
    return vector, norm


def clip_update(
    config: Mapping[str, Any],
    incoming: np.ndarray,
    theta: np.ndarray,
    metrics: Mapping[str, Any],
    *,
    job_params: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The participant's side of DP-FedAvg: with ``dp_clip`` in the fit config, the returned
    model is ``incoming`` plus the local delta clipped to that norm, and the metrics keep only
    the clip indicator (adaptive clipping); without it, both pass through unchanged. A local-DP
    job (``job_params.dp_local``) sends its DP-SGD model as it is, without metrics."""
    if job_params is not None and job_params.get("dp_local"):
        return theta, {}
    if CLIP_KEY not in config:
        return theta, dict(metrics)
    clip = float(config[CLIP_KEY])
    if not (math.isfinite(clip) and clip > 0):
        raise ConfigError(
            "the DP clip norm must be a positive number",
            field="config.dp_clip",
            value=config[CLIP_KEY],
            fix="the coordinator must send a positive params.dp_clip",
        )
    incoming = np.asarray(incoming, dtype=np.float64)
    delta, norm = clip_to_norm(np.asarray(theta, dtype=np.float64) - incoming, clip)
    out: dict[str, Any] = {}
    if config.get(ADAPTIVE_KEY):
        out[UNCLIPPED_METRIC] = 1.0 if norm <= clip else 0.0
    return incoming + delta, out


class DPFedAvg(Strategy):
    """Client-level DP around a FedAvg-family ``inner`` strategy (which must not sample: this
    wrapper does, by Poisson). See the module docstring. ``seed`` keys the sampling draw
    (fresh :mod:`secrets` key without one); ``source`` is the noise's random source (tests only).
    """

    def __init__(
        self,
        inner: FedAvg,
        config: DPConfig,
        *,
        min_fit_participants: int = 1,
        seed: int | str | None = None,
        source: RandomSource | None = None,
        grid: float = DEFAULT_GRID,
    ) -> None:
        if inner.sampler is not None:
            raise ConfigError(
                "the DP wrapper samples participants itself",
                field="strategy.sampler",
                value=type(inner.sampler).__name__,
                fix="build the wrapped strategy without a sampler",
            )
        self.inner = inner
        self.config = config
        self.min_fit_participants = max(1, int(min_fit_participants))
        self.clip = config.clip
        self.source = source
        self.grid = grid
        self.key = (
            hashlib.blake2b(f"{seed}".encode(), person=b"cdpfl-dp-sample", digest_size=32).digest()
            if seed is not None
            else secrets.token_bytes(32)
        )
        self.rounds: list[RoundPrivacy] = []
        self._global: np.ndarray | None = None
        self._sampled: tuple[str, ...] = ()
        self._expected = 0.0
        self.last_sample: tuple[str, ...] = ()

    # --- Strategy --------------------------------------------------------------------------------

    def initialize(self, num_features: int) -> np.ndarray:
        return self.inner.initialize(num_features)

    def sample(self, round_number: int, participants: Sequence[str]) -> list[str]:
        """Poisson sampling: each participant independently with probability ``q``."""
        q = self.config.sampling_rate
        if q >= 1.0:
            return sorted(participants)
        threshold = int(q * 2**64)
        chosen = []
        for name in participants:
            digest = hashlib.blake2b(
                f"{round_number}\x00{name}".encode(), key=self.key, digest_size=8
            ).digest()
            if int.from_bytes(digest, "big") < threshold:
                chosen.append(name)
        return sorted(chosen)

    def configure_fit(
        self, round_number: int, parameters: np.ndarray, participants: Sequence[str]
    ) -> dict[str, FitInstructions]:
        chosen = self.sample(round_number, participants)
        self._expected = self.config.sampling_rate * len(participants)
        self._sampled = self.last_sample = tuple(chosen)
        self._global = np.array(parameters, dtype=np.float64)
        instructions = self.inner.configure_fit(round_number, parameters, chosen)
        extra = {CLIP_KEY: self.clip, ADAPTIVE_KEY: self.config.adaptive}
        return {
            p: FitInstructions(i.parameters, {**i.config, **extra}) for p, i in instructions.items()
        }

    def aggregate_fit(
        self,
        round_number: int,
        results: Mapping[str, FitResult],
        failures: Mapping[str, Any],
    ) -> np.ndarray:
        if self._global is None:
            raise TrainingError(
                "DP aggregation needs the parameters handed out by configure_fit",
                field="round",
                value=round_number,
                fix="call configure_fit before aggregate_fit",
            )
        replied, sampled = len(results), len(self._sampled)
        needed = min(self.min_fit_participants, sampled)
        if replied < needed:
            raise TrainingError(
                f"round {round_number}: {replied} of {sampled} sampled participants replied, "
                f"needs {needed}; failed: {', '.join(sorted(failures)) or 'none'}",
                field="min_fit_participants",
                value=self.min_fit_participants,
                fix="fix the failing participants or lower params.min_fit_participants",
            )
        expected = self._expected
        z_update = self.config.update_noise_multiplier(expected)
        dim = self._global.size
        total = np.zeros(dim)
        unclipped = 0.0
        for name in sorted(results):  # a fixed order keeps the float sum reproducible
            delta, norm = clip_to_norm(results[name].parameters - self._global, self.clip)
            total += delta
            unclipped += 1.0 if norm <= self.clip else 0.0
        std = noise_std_for(z_update, self.clip, dim, self.grid)
        noisy = gaussian_noise(total, std, grid=self.grid, source=self.source)
        effective = z_update * expected / max(replied, 1)
        if replied < sampled:  # a Poisson draw below the expectation is no shortfall
            warnings.warn(
                f"round {round_number}: {replied} of {sampled} sampled participants replied, "
                f"the noise was calibrated for {expected:g} expected; the guarantee holds "
                f"(noise std {std:.4g} on the sum) but the noise multiplier on the repliers' "
                f"mean is {effective:.3g}",
                DPShortfallWarning,
                stacklevel=2,
            )
        self.rounds.append(
            RoundPrivacy(round_number, sampled, replied, expected, self.clip, std, effective)
        )
        average = self._global + noisy / expected
        if self.config.adaptive:
            self._adapt_clip(unclipped, replied, expected)
        return self.inner.server_update(self._global, average)

    def aggregate_fit_metrics(self, results: Mapping[str, FitResult]) -> dict[str, float]:
        """None: under DP participants send no loss (it is not covered by the noise)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {**self.inner.state_dict(), "dp_sampler_key": self.key.hex(), "dp_clip": self.clip}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        rest = {k: v for k, v in state.items() if k not in ("dp_sampler_key", "dp_clip")}
        if "dp_sampler_key" in state:
            self.key = bytes.fromhex(str(state["dp_sampler_key"]))
        if "dp_clip" in state:
            self.clip = float(state["dp_clip"])
        self.inner.load_state_dict(rest)

    # --- adaptive clipping -----------------------------------------------------------------------

    def _adapt_clip(self, unclipped: float, replied: int, expected: float) -> None:
        """Andrew et al. 2021, Alg. 1: the noisy fraction ``b`` of participants within the clip,
        from ``sum(b_i - 1/2)`` (sensitivity 1/2) plus noise ``sigma_b``; then
        ``C <- C exp(-eta (b - gamma))``."""
        sigma_b = self.config.count_stddev(expected)
        centred = np.array([unclipped - replied / 2.0])
        noisy = float(gaussian_noise(centred, sigma_b, grid=self.grid, source=self.source)[0])
        fraction = noisy / expected + 0.5
        step = self.config.clip_learning_rate * (fraction - self.config.target_quantile)
        self.clip = float(self.clip * math.exp(-step))


def _num(
    params: Mapping[str, Any],
    key: str,
    default: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    value = params.get(key, default)
    if value is None:
        value = default
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}, "
        hi = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ConfigError(
            f"{key} must be a number in {lo}{hi}",
            field=f"params.{key}",
            value=value,
            fix=f"set params.{key} within {lo}{hi} or leave it out",
        )
    return float(value)


# Models whose training rounds DPFedAvg wraps; other jobs must not declare DP (no noise would be
# added while the budget is charged).
DP_MODELS = ("logreg", "linear")


def job_privacy_spend(job: Any) -> PrivacySpend | None:
    """The (epsilon, delta) a job spends, computed from its spec alone (so each participant can
    check it without trusting the coordinator's claim); None for a job without DP."""
    if job.kind == "horizontal" and job.model == "gbm":  # noise on histograms (dp_gbm.py)
        from .dp_gbm import gbm_histogram_dp

        gbm = gbm_histogram_dp(job)
        return None if gbm is None else gbm.spend()
    config = DPConfig.from_params(job.params, job.rounds)
    if config is not None and (job.kind != "horizontal" or job.model not in DP_MODELS):
        raise ConfigError(
            "differential privacy is implemented for horizontal linear models and GBM only",
            field="params.dp_epsilon"
            if "dp_epsilon" in job.params
            else "params.dp_noise_multiplier",
            value={"kind": job.kind, "model": job.model},
            fix="train a horizontal logreg, linear or gbm model, or leave the dp_* parameters out",
        )
    return None if config is None else config.spend()


_SPEND_KEYS = DP_PARAM_NAMES | {"fraction_fit", "clients_per_round", "patience", "local_steps"}
