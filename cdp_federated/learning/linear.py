"""Linear models of horizontal jobs: logistic loss (``binary``) or squared loss (``regression``),
L2 and optional L1 penalties, on features standardised *implicitly*.

Parameters are one flat vector ``theta = [w_1, ..., w_d, b]`` (intercept last, never penalised)
that applies to standardised features ``z = (x - mean) / scale``. Party ``k`` holding ``n_k`` of
the ``N`` training rows minimises, per row::

    F_k(theta) = mean_{i in k} loss(z_i . w + b, y_i) + l2/2 ||w||^2 + l1 ||w||_1
                 [+ mu/2 ||theta - theta_global||^2 with FedProx]

with ``l2 = (1 - l1_ratio) / (C N)`` and ``l1 = l1_ratio / (C N)``, so ``sum_k (n_k/N) F_k`` is
scikit-learn's centralised objective divided by ``C N``: ``LogisticRegression(C=C)`` (elastic net
with ``l1_ratio``) for ``binary``; ``Ridge(alpha=1/C)``, or ``ElasticNet(alpha=1/(C N),
l1_ratio=l1_ratio)`` with L1, for ``regression``. Regression trains on the label standardised with
federated moments, ``(y - mu_y) / sigma_y``, with ``loss = (s - y)^2 / 2``; L2 is invariant to that
scaling and the L1 weight is divided by ``sigma_y``, so the optimum is the one in label units.

Implicit standardisation: ``z @ w = x @ (w / scale) - mean . (w / scale)`` and
``z' r = (x' r - mean sum(r)) / scale``. The raw matrix ``x`` is never copied or standardised, so
a float32 matrix stays float32 (and is read once per product); only d-sized vectors are float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

__all__ = [
    "OBJECTIVES",
    "MODELS",
    "objective_of",
    "column_moments",
    "Penalty",
    "penalty",
    "scores",
    "predictions",
    "row_losses",
    "objective_value",
    "gradient",
    "curvature_bound",
    "preconditioner",
    "local_curvature",
    "soft_threshold",
    "prox_thresholds",
    "local_fit",
    "fit_centralised",
    "to_label_units",
]

OBJECTIVES = ("binary", "regression")
# A job's ``model`` and the objective it trains unless ``params.objective`` says otherwise.
MODELS = {"logreg": "binary", "linear": "regression"}
# Bound on the second derivative of the per-row loss in the score: 1/4 for log loss, 1 for squares.
_CURVATURE = {"binary": 0.25, "regression": 1.0}


@dataclass(frozen=True)
class Penalty:
    """Per-row penalty weights: ``l2/2 ||w||^2 + l1 ||w||_1`` (see the module docstring)."""

    l2: float
    l1: float = 0.0


def penalty(
    c: float, total_examples: int, *, l1_ratio: float = 0.0, label_scale: float = 1.0
) -> Penalty:
    """scikit-learn's ``C`` and ``l1_ratio`` as per-row weights for ``total_examples`` rows.

    ``label_scale`` (regression's ``sigma_y``) keeps the L1 optimum the one in label units."""
    if c <= 0 or total_examples <= 0 or not 0.0 <= l1_ratio <= 1.0 or label_scale <= 0:
        raise ValueError(
            f"need C > 0, total_examples > 0, 0 <= l1_ratio <= 1 and label_scale > 0; got "
            f"C={c}, N={total_examples}, l1_ratio={l1_ratio}, label_scale={label_scale}"
        )
    per_row = 1.0 / (c * total_examples)
    return Penalty(l2=(1.0 - l1_ratio) * per_row, l1=l1_ratio * per_row / label_scale)


def objective_of(model: str, objective: str | None = None) -> str:
    """The objective a job trains: ``logreg`` is ``binary``; ``linear`` is ``regression`` unless
    ``params.objective`` asks for ``binary`` (a linear model with logistic loss, the same thing)."""
    if model not in MODELS:
        raise ConfigError(
            "not a linear model",
            field="model",
            value=model,
            fix=f"use one of {', '.join(MODELS)}",
        )
    chosen = MODELS[model] if objective is None else objective
    if chosen not in OBJECTIVES or (model == "logreg" and chosen != "binary"):
        raise ConfigError(
            f"objective {chosen!r} does not fit model {model!r}",
            field="params.objective",
            value=objective,
            fix="use model 'logreg' (objective binary) or model 'linear' (objective regression)",
        )
    return chosen


def column_moments(
    x: np.ndarray, *, block_rows: int = 65_536
) -> tuple[int, np.ndarray, np.ndarray]:
    """``(count, sums, scatter)`` of the rows of ``x`` like :func:`.aggregate.local_moments`, in
    float64 but one block of rows at a time, so a large (float32) matrix is never copied whole."""
    n, d = x.shape
    sums = x.sum(axis=0, dtype=np.float64)
    scatter = np.zeros((d, d))
    if n == 0:
        return 0, sums, scatter
    mean = sums / n
    for start in range(0, n, block_rows):
        block = np.asarray(x[start : start + block_rows], dtype=np.float64) - mean
        scatter += block.T @ block
    return n, sums, scatter


def _check_objective(objective: str) -> None:
    if objective not in _CURVATURE:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def scores(x: np.ndarray, theta: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``z @ w + b`` for every row, in ``x``'s float type, without forming ``z``."""
    w = theta[:-1] / scale
    offset = float(theta[-1] - mean @ w)
    out = x @ w.astype(x.dtype, copy=False)
    out += x.dtype.type(offset)
    return out


def predictions(s: np.ndarray, objective: str) -> np.ndarray:
    """Probabilities (``binary``: a stable sigmoid) or the scores themselves (``regression``)."""
    _check_objective(objective)
    if objective == "regression":
        return s
    return 0.5 * (1.0 + np.tanh(0.5 * s))


def row_losses(s: np.ndarray, y: np.ndarray, objective: str) -> np.ndarray:
    """Per-row loss: ``log(1 + exp(-(2y-1) s))`` (exact, no clipping) or ``(s - y)^2 / 2``."""
    _check_objective(objective)
    if objective == "regression":
        return 0.5 * np.square(s - y)
    # softplus(u) = max(u, 0) + log1p(exp(-|u|)): exact for any u, and in place about ten times
    # faster than np.logaddexp, which matters because every round reports the incoming loss.
    u = 1.0 - 2.0 * y
    u *= s
    positive = np.maximum(u, 0.0)
    np.abs(u, out=u)
    np.negative(u, out=u)
    np.exp(u, out=u)
    np.log1p(u, out=u)
    u += positive
    return u


def _residuals_in_place(s: np.ndarray, y: np.ndarray, objective: str) -> np.ndarray:
    """``d loss / d s`` per row, overwriting ``s`` (no n-sized temporaries)."""
    if objective == "binary":
        s *= 0.5
        np.tanh(s, out=s)
        s += 1.0
        s *= 0.5
    s -= y
    return s


def _data_gradient(x: np.ndarray, r: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Gradient of ``mean(loss)`` from the residuals ``r``: ``[z' r / n, sum(r) / n]``."""
    n = x.shape[0]
    total = float(r.sum(dtype=np.float64))
    grad = np.empty(x.shape[1] + 1)
    grad[:-1] = ((x.T @ r).astype(np.float64) - mean * total) / (scale * n)
    grad[-1] = total / n
    return grad


def objective_value(
    theta: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    *,
    objective: str,
    penalty: Penalty,
    anchor: np.ndarray | None = None,
    mu: float = 0.0,
) -> float:
    """``F_k(theta)`` of the module docstring (with the FedProx term when ``mu`` > 0)."""
    w = theta[:-1]
    loss = float(row_losses(scores(x, theta, mean, scale), y, objective).mean(dtype=np.float64))
    value = loss + 0.5 * penalty.l2 * float(w @ w) + penalty.l1 * float(np.abs(w).sum())
    if mu:
        value += 0.5 * mu * float(np.sum((theta - anchor) ** 2))
    return value


def gradient(
    theta: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    *,
    objective: str,
    penalty: Penalty,
    anchor: np.ndarray | None = None,
    mu: float = 0.0,
) -> np.ndarray:
    """Gradient of the smooth part of :func:`objective_value` (everything but the L1 term)."""
    _check_objective(objective)
    r = _residuals_in_place(scores(x, theta, mean, scale), y, objective)
    grad = _data_gradient(x, r, mean, scale)
    grad[:-1] += penalty.l2 * theta[:-1]
    if mu:
        grad += mu * (theta - anchor)
    return grad


def curvature_bound(
    standardised_covariance: np.ndarray, *, objective: str, penalty: Penalty, mu: float = 0.0
) -> np.ndarray:
    """``B = c [z 1]'[z 1] / N + diag(l2, ..., l2, 0) + mu I`` from global moments alone, with
    ``c`` = 1/4 (log loss: Boehning's bound) or 1 (squares: ``B`` *is* the Hessian).

    For globally standardised features ``[z 1]'[z 1] / N = [[cov(z), 0], [0, 1]]``. ``B`` bounds
    the Hessian of the global smooth objective, so the step ``theta - B^-1 grad`` never increases
    it; for regression without L1 one such step lands on the optimum."""
    _check_objective(objective)
    c = _CURVATURE[objective]
    d = standardised_covariance.shape[0]
    bound = np.zeros((d + 1, d + 1))
    bound[:d, :d] = c * standardised_covariance
    bound[np.arange(d), np.arange(d)] += penalty.l2
    bound[d, d] = c
    bound[np.diag_indices(d + 1)] += mu
    return bound


def preconditioner(
    standardised_covariance: np.ndarray, *, objective: str, penalty: Penalty, mu: float = 0.0
) -> np.ndarray:
    """``B^-1`` of :func:`curvature_bound`, or with L1 the inverse of a *diagonal* majoriser of
    ``B`` (row sums of ``|B|``, which dominate ``B`` by Gershgorin), since the L1 proximal step is a
    per-coordinate soft-threshold only in a diagonal metric. Constant features (zero rows) get 1."""
    bound = curvature_bound(standardised_covariance, objective=objective, penalty=penalty, mu=mu)
    if penalty.l1 > 0:
        diagonal = np.abs(bound).sum(axis=1)
        return np.diag(1.0 / np.where(diagonal > 0, diagonal, 1.0))
    empty = ~bound.any(axis=1)
    bound[empty, empty] = 1.0  # a constant feature without L2: any step is as good
    return np.linalg.inv(bound)


def local_curvature(
    x: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    *,
    objective: str,
    penalty: Penalty,
    mu: float = 0.0,
) -> float:
    """Scalar bound ``L`` on this party's curvature (largest eigenvalue of its own ``B``), for
    plain gradient steps of size ``1/L`` when no preconditioner is sent."""
    _check_objective(objective)
    n, sums, scatter = column_moments(x)  # blockwise: no float64 copy of x
    shift = (sums / n - mean) / scale
    gram = np.empty((x.shape[1] + 1, x.shape[1] + 1))
    gram[:-1, :-1] = scatter / np.outer(scale, scale) / n + np.outer(shift, shift)
    gram[:-1, -1] = gram[-1, :-1] = shift
    gram[-1, -1] = 1.0
    top = float(np.linalg.eigvalsh(gram)[-1])
    return _CURVATURE[objective] * top + penalty.l2 + mu


def soft_threshold(theta: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """Proximal step of ``sum_j t_j |w_j|``: shrink each weight towards 0 by ``t_j``, zeroing
    those within ``t_j`` of it. The intercept (last) is never shrunk. Returns a new array."""
    out = np.array(theta, dtype=np.float64)
    t = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), out.shape)[:-1]
    w = out[:-1]
    out[:-1] = np.sign(w) * np.maximum(np.abs(w) - t, 0.0)
    return out


def prox_thresholds(
    precond: np.ndarray | None, learning_rate: float, l1: float, size: int
) -> np.ndarray:
    """Per-coordinate thresholds ``rate * l1 * P_jj`` of the step ``theta - rate P grad``."""
    diagonal = np.ones(size) if precond is None else np.diagonal(precond)
    return learning_rate * l1 * diagonal


def _is_diagonal(matrix: np.ndarray) -> bool:
    # Every nonzero entry on the diagonal; two counts, no matrix-sized temporary.
    return int(np.count_nonzero(matrix)) == int(np.count_nonzero(np.diagonal(matrix)))


def local_fit(
    theta: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    *,
    objective: str,
    penalty: Penalty,
    steps: int,
    learning_rate: float,
    precond: np.ndarray | None = None,
    mu: float = 0.0,
    prox_last: bool = True,
) -> tuple[np.ndarray, float]:
    """``steps`` full-batch (proximal) gradient steps on ``F_k`` from ``theta``, which is also the
    FedProx anchor. Returns the new parameters and the mean data loss of the *incoming* ``theta``
    (read off the first step's scores, so it costs no extra pass over ``x``).

    Each step is ``theta <- prox(theta - rate P grad)`` (``P`` = ``precond`` or the identity).
    With ``prox_last=False`` the last step skips the L1 prox, so a server that averages the
    parties' results and applies the prox itself makes one local step an exact centralised
    proximal-gradient step."""
    _check_objective(objective)
    if penalty.l1 > 0 and precond is not None and not _is_diagonal(precond):
        raise ValueError("an L1 penalty needs a diagonal preconditioner")
    anchor = np.array(theta, dtype=np.float64)
    theta = anchor.copy()
    diagonal = None if precond is None or not _is_diagonal(precond) else np.diagonal(precond)
    thresholds = prox_thresholds(precond, learning_rate, penalty.l1, theta.size)
    start_loss = float("nan")
    for step in range(steps):
        s = scores(x, theta, mean, scale)
        if step == 0:
            start_loss = float(row_losses(s, y, objective).mean(dtype=np.float64))
        r = _residuals_in_place(s, y, objective)
        grad = _data_gradient(x, r, mean, scale)
        grad[:-1] += penalty.l2 * theta[:-1]
        if mu:
            grad += mu * (theta - anchor)
        if diagonal is not None:
            grad *= diagonal
        elif precond is not None:
            grad = precond @ grad
        theta -= learning_rate * grad
        if penalty.l1 > 0 and (prox_last or step < steps - 1):
            theta = soft_threshold(theta, thresholds)
    return theta, start_loss


def fit_centralised(
    z: np.ndarray,
    y: np.ndarray,
    *,
    objective: str,
    c: float,
    l1_ratio: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-10,
    label_scale: float = 1.0,
) -> np.ndarray:
    """Reference solver on one party's standardised rows ``z`` (N = n): Newton's method (binary),
    a linear solve (regression), or with L1 accelerated proximal gradient (FISTA) in the diagonal
    metric of :func:`preconditioner`. ``label_scale`` as in :func:`penalty` (for ``y`` standardised
    by it). Estimators' ``fit`` and tests use it; federated training never does."""
    _check_objective(objective)
    n, d = z.shape
    zero, one = np.zeros(d), np.ones(d)
    pen = penalty(c, n, l1_ratio=l1_ratio, label_scale=label_scale)
    cov = z.T @ z / n - np.outer(z.mean(0), z.mean(0))
    if l1_ratio > 0:
        precond = preconditioner(cov, objective=objective, penalty=pen)
        thresholds = prox_thresholds(precond, 1.0, pen.l1, d + 1)
        extrapolated = previous = np.zeros(d + 1)
        momentum = 1.0
        for _ in range(max(max_iter, 20_000)):
            grad = gradient(extrapolated, z, y, zero, one, objective=objective, penalty=pen)
            current = soft_threshold(extrapolated - precond @ grad, thresholds)
            following = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * momentum**2))
            extrapolated = current + (momentum - 1.0) / following * (current - previous)
            done = float(np.max(np.abs(current - previous))) < tol
            previous, momentum = current, following
            if done:
                break
        return previous
    ridge = np.full(d + 1, pen.l2)
    ridge[-1] = 0.0
    theta = np.zeros(d + 1)
    for _ in range(max_iter if objective == "binary" else 1):
        grad = gradient(theta, z, y, zero, one, objective=objective, penalty=pen)
        s = scores(z, theta, zero, one)
        weights = (
            np.full(n, 1.0 / n)
            if objective == "regression"
            else predictions(s, "binary") * (1.0 - predictions(s, "binary")) / n
        )
        hess = np.empty((d + 1, d + 1))
        hess[:-1, :-1] = (z * weights[:, None]).T @ z
        hess[:-1, -1] = hess[-1, :-1] = weights @ z
        hess[-1, -1] = weights.sum()
        hess[np.diag_indices(d + 1)] += ridge + 1e-12  # keeps a pure-intercept model solvable
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        if float(np.max(np.abs(step))) < tol:
            break
    return theta


def to_label_units(theta: np.ndarray, label_mean: float, label_scale: float) -> np.ndarray:
    """Regression parameters trained on ``(y - label_mean) / label_scale`` mapped back so that
    ``z @ w + b`` predicts ``y`` itself."""
    out = np.asarray(theta, dtype=np.float64) * label_scale
    out[-1] += label_mean
    return out
