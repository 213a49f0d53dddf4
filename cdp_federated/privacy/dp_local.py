"""Local, example-level DP for linear models: DP-SGD steps (Abadi et al. 2016) inside each
participant, for federations whose participants do not trust the coordinator.

With ``params.dp_local = true`` every participant replaces its local training steps by DP-SGD:
each step draws a Poisson batch of its rows (rate ``dp_batch_fraction``), clips every row's
gradient to L2 norm ``dp_clip``, sums, adds discrete Gaussian noise ``z * dp_clip``
(:mod:`.noise`), divides by the expected batch size and applies the job's preconditioner and L2
penalty (both data-independent at this point, so free post-processing). The model leaving the
participant is then already DP for each of its rows, whatever the coordinator does with it; the
participant's training loss is not sent.

Accounting (:class:`~cdp_federated.privacy.dp_fedavg.DPConfig` with ``local=True``): each row
takes part in ``rounds * local_steps`` Poisson-subsampled Gaussian steps at rate
``dp_batch_fraction``. That counts every round for every participant, ignoring the amplification
client sampling would add: an upper bound. Each participant computes the same figure from the job
spec its own governance approved, so the coordinator cannot lower the noise behind its back.

Per-row gradients are never materialised: the clipped sum is ``[Z' (f r), sum(f r)]`` with
``f_i = min(1, C / (|r_i| sqrt(|z_i|^2 + 1)))``, two passes over the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..learning import linear
from .noise import DEFAULT_GRID, RandomSource, gaussian_noise, noise_std_for, uniform

__all__ = ["LOCAL_KEY", "dp_sgd_fit", "local_fit_for"]

LOCAL_KEY = "dp_local"

LocalFit = Callable[..., tuple[np.ndarray, float]]


def dp_sgd_fit(
    theta: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    *,
    objective: str,
    penalty: linear.Penalty,
    steps: int,
    learning_rate: float,
    clip: float,
    noise_multiplier: float,
    sampling_rate: float,
    precond: np.ndarray | None = None,
    mu: float = 0.0,
    prox_last: bool = True,
    source: RandomSource | None = None,
    grid: float = DEFAULT_GRID,
) -> tuple[np.ndarray, float]:
    """``steps`` DP-SGD steps from ``theta``; same contract as :func:`linear.local_fit` except
    that the returned loss is NaN (the exact local loss would not be private)."""
    if penalty.l1 > 0:
        raise ConfigError(
            "local DP supports L2 only",
            field="params.l1_ratio",
            value=penalty.l1,
            fix="set params.l1_ratio to 0 with params.dp_local",
        )
    anchor = np.array(theta, dtype=np.float64)
    theta = anchor.copy()
    n, d = x.shape
    expected = sampling_rate * n
    std = noise_std_for(noise_multiplier, clip, d + 1, grid)
    for _ in range(steps):
        batch = uniform(n, source) < sampling_rate
        xb, yb = x[batch].astype(np.float64), y[batch].astype(np.float64)
        z = (xb - mean) / scale
        r = _residuals(z @ theta[:-1] + theta[-1], yb, objective)
        norms = np.abs(r) * np.sqrt(np.einsum("ij,ij->i", z, z) + 1.0)
        factor = np.minimum(1.0, clip / np.maximum(norms, 1e-300))
        weighted = factor * r
        clipped_sum = np.append(z.T @ weighted, weighted.sum())
        grad = gaussian_noise(clipped_sum, std, grid=grid, source=source) / expected
        grad[:-1] += penalty.l2 * theta[:-1]
        if mu:
            grad += mu * (theta - anchor)
        if precond is not None:
            grad = precond @ grad if precond.ndim == 2 else precond * grad
        theta -= learning_rate * grad
    return theta, float("nan")


def _residuals(s: np.ndarray, y: np.ndarray, objective: str) -> np.ndarray:
    if objective == "binary":
        return 0.5 * (1.0 + np.tanh(0.5 * s)) - y
    return s - y


def local_fit_for(params: Mapping[str, Any], rounds: int) -> LocalFit:
    """The local training step a job asks of a participant: :func:`linear.local_fit`, or DP-SGD
    with the job's calibrated noise when ``params.dp_local`` is true."""
    if not params.get(LOCAL_KEY):
        return linear.local_fit
    from .dp_fedavg import DPConfig

    config = DPConfig.from_params(params, rounds)
    if config is None:
        raise ConfigError(
            "local DP needs a noise level",
            field="params.dp_local",
            value=True,
            fix="set params.dp_epsilon or params.dp_noise_multiplier",
        )

    def fit(*args: Any, **kwargs: Any) -> tuple[np.ndarray, float]:
        return dp_sgd_fit(
            *args,
            clip=config.clip,
            noise_multiplier=config.noise_multiplier,
            sampling_rate=config.sampling_rate,
            **kwargs,
        )

    return fit
