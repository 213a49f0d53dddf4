"""L2-regularised logistic regression on standardised features: the local task of horizontal FedAvg.

Parameters are one flat float vector ``theta = [w_1, ..., w_d, b]`` (intercept last, never
penalised). The centralised objective is scikit-learn's ``LogisticRegression(C=C)``::

    sum_i logloss_i(theta) + ||w||^2 / (2 C)

Party ``k`` holding ``n_k`` of the ``N`` training rows takes the share ``n_k / N`` of the penalty
and works with the per-row mean (so step sizes do not depend on its size)::

    F_k(theta) = mean_{i in k} logloss_i(theta) + ||w||^2 / (2 C N)

Then ``sum_k (n_k / N) F_k`` is the centralised objective divided by ``N``: FedAvg weighting by
``n_k`` averages exactly the right gradients, and with one local step a round is exact centralised
gradient descent. All functions are pure numpy; float64 unless the caller passes another float type.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "split_parameters",
    "sigmoid",
    "logits",
    "log_losses",
    "objective",
    "gradient",
    "lipschitz_constant",
    "preconditioner",
    "gradient_descent",
    "fit_newton",
]


def split_parameters(theta: np.ndarray) -> tuple[np.ndarray, float]:
    """``(w, b)`` from the flat parameter vector (intercept last)."""
    return theta[:-1], float(theta[-1])


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function, stable for any finite ``z`` (no overflow warnings)."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def logits(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Decision values ``x @ w + b`` for each row of ``x``."""
    w, b = split_parameters(theta)
    return x @ w + b


def log_losses(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row log loss from logits ``z`` and labels ``y`` in {0, 1}: ``log(1 + exp(-z))`` for a
    positive, ``log(1 + exp(z))`` for a negative. Exact to the last bit, no clipping."""
    return np.logaddexp(0.0, (1.0 - 2.0 * y) * z)


def _penalty_weight(c: float, total_examples: int) -> float:
    if c <= 0 or total_examples <= 0:
        raise ValueError(f"C and total_examples must be positive, got C={c}, N={total_examples}")
    return 1.0 / (c * total_examples)


def objective(
    theta: np.ndarray, x: np.ndarray, y: np.ndarray, *, c: float, total_examples: int
) -> float:
    """``F_k``: mean log loss over ``x`` plus this party's share of the L2 penalty (per row)."""
    w, _ = split_parameters(theta)
    lam = _penalty_weight(c, total_examples)
    return float(log_losses(logits(x, theta), y).mean() + 0.5 * lam * (w @ w))


def gradient(
    theta: np.ndarray, x: np.ndarray, y: np.ndarray, *, c: float, total_examples: int
) -> np.ndarray:
    """Gradient of :func:`objective` with respect to ``theta``."""
    w, _ = split_parameters(theta)
    lam = _penalty_weight(c, total_examples)
    residual = sigmoid(logits(x, theta)) - y
    n = x.shape[0]
    grad = np.empty_like(theta)
    grad[:-1] = x.T @ residual / n + lam * w
    grad[-1] = residual.sum() / n
    return grad


def lipschitz_constant(x: np.ndarray, *, c: float, total_examples: int) -> float:
    """Upper bound ``L`` on the curvature of :func:`objective`: ``lambda_max([x 1]'[x 1]) / (4n)``
    plus the penalty weight. A step of ``1/L`` never increases the objective."""
    n = x.shape[0]
    # Gram matrix of [x, 1] without materialising the augmented copy of x.
    col_sums = x.sum(axis=0)
    gram = np.empty((x.shape[1] + 1, x.shape[1] + 1), dtype=np.float64)
    gram[:-1, :-1] = x.T @ x
    gram[:-1, -1] = gram[-1, :-1] = col_sums
    gram[-1, -1] = n
    top = float(np.linalg.eigvalsh(gram / n)[-1])
    return 0.25 * top + _penalty_weight(c, total_examples)


def preconditioner(
    standardised_covariance: np.ndarray, *, c: float, total_examples: int
) -> np.ndarray:
    """Inverse of the global curvature bound ``B = [z 1]'[z 1] / (4N) + penalty`` (Boehning's bound).

    For globally standardised features ``[z 1]'[z 1] / N`` is ``[[cov(z), 0], [0, 1]]``, so the
    coordinator builds ``B`` from aggregated moments alone. ``B`` bounds the Hessian of the global
    objective in every direction, so the step ``theta - B^-1 grad`` never increases it and, unlike
    a scalar ``1/L`` step, is not slowed down by correlated features.
    """
    d = standardised_covariance.shape[0]
    bound = np.zeros((d + 1, d + 1))
    bound[:d, :d] = 0.25 * standardised_covariance
    bound[np.arange(d), np.arange(d)] += _penalty_weight(c, total_examples)
    bound[d, d] = 0.25
    return np.linalg.inv(bound)


def gradient_descent(
    theta: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int,
    learning_rate: float,
    c: float,
    total_examples: int,
    preconditioner: np.ndarray | None = None,
) -> np.ndarray:
    """``steps`` full-batch steps ``theta -= learning_rate * P @ grad`` on :func:`objective`
    (``P`` is the identity when ``preconditioner`` is ``None``). Returns a new array."""
    theta = np.array(theta, dtype=np.result_type(x.dtype, np.float32))  # a copy; float64 default
    for _ in range(steps):
        grad = gradient(theta, x, y, c=c, total_examples=total_examples)
        if preconditioner is not None:
            grad = preconditioner @ grad
        theta -= learning_rate * grad
    return theta


def fit_newton(
    x: np.ndarray, y: np.ndarray, *, c: float, max_iter: int = 100, tol: float = 1e-10
) -> np.ndarray:
    """Centralised reference solver: Newton's method on the full objective (one party, N = n).

    Used by the estimator's ``fit`` and by tests; federated training never calls it.
    """
    n, d = x.shape
    lam = _penalty_weight(c, n)
    theta = np.zeros(d + 1, dtype=np.float64)
    ridge = np.full(d + 1, lam)
    ridge[-1] = 0.0
    for _ in range(max_iter):
        grad = gradient(theta, x, y, c=c, total_examples=n)
        p = sigmoid(logits(x, theta))
        weights = p * (1.0 - p) / n
        hess = np.empty((d + 1, d + 1))
        hess[:-1, :-1] = (x * weights[:, None]).T @ x
        hess[:-1, -1] = hess[-1, :-1] = weights @ x
        hess[-1, -1] = weights.sum()
        hess[np.diag_indices(d + 1)] += ridge + 1e-12  # keeps a pure-intercept model solvable
        step = np.linalg.solve(hess, grad)
        theta -= step
        if float(np.max(np.abs(step))) < tol:
            break
    return theta
