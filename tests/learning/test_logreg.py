"""Local logistic regression: gradients, the federated split of the objective, convergence."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from cdp_federated.learning import logreg
from cdp_federated.learning.aggregate import combine_moments, local_moments, weighted_average


def make_data(seed: int = 0, n: int = 600, d: int = 4, rho: float = 0.5):
    rng = np.random.default_rng(seed)
    cov = rho * np.ones((d, d)) + (1 - rho) * np.eye(d)
    x = rng.multivariate_normal(np.zeros(d), cov, size=n)
    z = x @ rng.normal(0, 1, d) - 0.5
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    return x, y


def central_objective(theta, x, y, c):
    """scikit-learn's objective: sum of log losses + ||w||^2 / (2C)."""
    w = theta[:-1]
    return logreg.log_losses(logreg.logits(x, theta), y).sum() + w @ w / (2 * c)


def test_gradient_matches_finite_differences():
    x, y = make_data(n=80)
    theta = np.random.default_rng(1).normal(0, 1, x.shape[1] + 1)
    grad = logreg.gradient(theta, x, y, c=0.3, total_examples=200)
    h = 1e-6
    numeric = np.array(
        [
            (
                logreg.objective(theta + h * e, x, y, c=0.3, total_examples=200)
                - logreg.objective(theta - h * e, x, y, c=0.3, total_examples=200)
            )
            / (2 * h)
            for e in np.eye(theta.size)
        ]
    )
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def test_intercept_is_not_penalised():
    x, y = make_data(n=50)
    theta = np.zeros(x.shape[1] + 1)
    theta[-1] = 3.0
    small_c = logreg.gradient(theta, x, y, c=1e-3, total_examples=50)
    large_c = logreg.gradient(theta, x, y, c=1e3, total_examples=50)
    assert small_c[-1] == large_c[-1]


def test_party_objectives_weighted_by_rows_sum_to_the_centralised_objective():
    x, y = make_data(n=300)
    parts = [slice(0, 40), slice(40, 250), slice(250, 300)]
    theta = np.random.default_rng(2).normal(0, 1, x.shape[1] + 1)
    c, n = 0.7, len(y)
    federated = sum(
        (p.stop - p.start) * logreg.objective(theta, x[p], y[p], c=c, total_examples=n)
        for p in parts
    )
    assert federated == pytest.approx(central_objective(theta, x, y, c), rel=1e-12)


def test_one_local_step_of_fedavg_is_one_centralised_step():
    x, y = make_data(n=300)
    parts = [slice(0, 40), slice(40, 250), slice(250, 300)]
    theta = np.random.default_rng(3).normal(0, 1, x.shape[1] + 1)
    kw = {"steps": 1, "learning_rate": 0.4, "c": 2.0, "total_examples": len(y)}
    local = [logreg.gradient_descent(theta, x[p], y[p], **kw) for p in parts]
    averaged = weighted_average(local, [p.stop - p.start for p in parts])
    np.testing.assert_allclose(averaged, logreg.gradient_descent(theta, x, y, **kw), rtol=1e-12)


def test_step_one_over_lipschitz_never_increases_the_objective():
    x, y = make_data(n=200, rho=0.9)
    kw = {"c": 1.0, "total_examples": 200}
    rate = 1.0 / logreg.lipschitz_constant(x, **kw)
    theta = np.zeros(x.shape[1] + 1)
    values = []
    for _ in range(30):
        values.append(logreg.objective(theta, x, y, **kw))
        theta = logreg.gradient_descent(theta, x, y, steps=1, learning_rate=rate, **kw)
    assert all(b <= a + 1e-15 for a, b in zip(values, values[1:], strict=False))


def test_preconditioner_bounds_the_hessian():
    x, y = make_data(n=400, rho=0.8)
    n, sums, scatter = local_moments(x)
    m = combine_moments([n], [sums], [scatter])
    z = (x - m.mean) / m.scale
    bound_inv = logreg.preconditioner(m.standardised_covariance(), c=0.5, total_examples=n)
    theta = np.random.default_rng(4).normal(0, 1, x.shape[1] + 1)
    p = logreg.sigmoid(logreg.logits(z, theta))
    zt = np.c_[z, np.ones(n)]
    hessian = (zt * (p * (1 - p))[:, None]).T @ zt / n
    hessian[:-1, :-1] += np.eye(x.shape[1]) / (0.5 * n)
    gap = np.linalg.inv(bound_inv) - hessian
    assert np.linalg.eigvalsh(gap).min() > -1e-10


def test_preconditioned_descent_converges_to_sklearn_coefficients():
    x, y = make_data(n=800, d=5, rho=0.8)
    n, sums, scatter = local_moments(x)
    m = combine_moments([n], [sums], [scatter])
    z = (x - m.mean) / m.scale
    precond = logreg.preconditioner(m.standardised_covariance(), c=0.5, total_examples=n)
    theta = logreg.gradient_descent(
        np.zeros(6),
        z,
        y,
        steps=150,
        learning_rate=1.0,
        c=0.5,
        total_examples=n,
        preconditioner=precond,
    )
    ref = LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000).fit(z, y)
    np.testing.assert_allclose(theta, np.r_[ref.coef_[0], ref.intercept_], atol=1e-5)


def test_newton_reference_solver_matches_sklearn():
    x, y = make_data(seed=5, n=500)
    theta = logreg.fit_newton(x, y, c=2.0)
    ref = LogisticRegression(C=2.0, tol=1e-12, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(theta, np.r_[ref.coef_[0], ref.intercept_], atol=1e-6)


def test_sigmoid_and_log_loss_are_stable_for_extreme_logits():
    z = np.array([-1000.0, -40.0, 0.0, 40.0, 1000.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = logreg.sigmoid(z)
        losses = logreg.log_losses(z, np.array([0.0, 0.0, 1.0, 1.0, 0.0]))
    assert p[0] == 0.0 and p[2] == 0.5 and p[-1] == 1.0
    np.testing.assert_allclose(
        losses, [0.0, np.log1p(np.exp(-40.0)), np.log(2), np.log1p(np.exp(-40.0)), 1000.0]
    )


def test_float32_input_stays_float32():
    x, y = make_data(n=50)
    theta = logreg.gradient_descent(
        np.zeros(5), x.astype(np.float32), y, steps=2, learning_rate=0.1, c=1.0, total_examples=50
    )
    assert theta.dtype == np.float32
