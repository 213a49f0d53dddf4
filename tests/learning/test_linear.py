"""Linear objectives: implicit standardisation, penalties, FedProx and L1 behave as the maths says."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from sklearn.linear_model import ElasticNet, LogisticRegression, Ridge

from cdp_federated.errors import ConfigError
from cdp_federated.learning import linear
from cdp_federated.learning.aggregate import combine_moments, local_moments
from cdp_federated.learning.strategy import FedAvg

OBJECTIVES = ("binary", "regression")


def make_data(n=400, d=4, seed=0, objective="binary"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.array([1.0, 20.0, 0.1, 5.0])[:d] + np.arange(d) * 50.0
    z = (x - x.mean(0)) / x.std(0)
    signal = z @ np.array([1.5, -1.0, 0.5, 0.0])[:d] + 0.3
    if objective == "binary":
        y = (rng.random(n) < 1 / (1 + np.exp(-signal))).astype(float)
    else:
        y = signal + 0.5 * rng.normal(size=n)
    return x, y, x.mean(0), x.std(0)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gradient_matches_finite_differences_with_penalty_and_prox_term(objective):
    x, y, mean, scale = make_data(objective=objective)
    pen = linear.penalty(0.3, 1000)
    theta = np.array([0.3, -0.2, 0.1, 0.4, -0.5])
    anchor = np.array([0.1, 0.1, 0.0, 0.2, 0.0])
    kw = {"objective": objective, "penalty": pen, "anchor": anchor, "mu": 0.7}
    grad = linear.gradient(theta, x, y, mean, scale, **kw)
    eps = 1e-6
    numeric = [
        (
            linear.objective_value(theta + eps * e, x, y, mean, scale, **kw)
            - linear.objective_value(theta - eps * e, x, y, mean, scale, **kw)
        )
        / (2 * eps)
        for e in np.eye(theta.size)
    ]
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


def test_implicit_standardisation_equals_the_explicit_one():
    x, y, mean, scale = make_data()
    theta = np.array([0.3, -0.2, 0.1, 0.4, -0.5])
    z = (x - mean) / scale
    np.testing.assert_allclose(linear.scores(x, theta, mean, scale), z @ theta[:-1] + theta[-1])
    pen = linear.penalty(1.0, 400)
    explicit = linear.gradient(
        theta, z, y, np.zeros(4), np.ones(4), objective="binary", penalty=pen
    )
    np.testing.assert_allclose(
        linear.gradient(theta, x, y, mean, scale, objective="binary", penalty=pen),
        explicit,
        rtol=1e-10,
        atol=1e-12,
    )


def test_regression_one_preconditioned_step_is_the_ridge_solution():
    x, y, mean, scale = make_data(objective="regression")
    n = x.shape[0]
    moments = combine_moments(*[[v] for v in local_moments(x)])
    pen = linear.penalty(0.05, n)
    precond = linear.preconditioner(
        moments.standardised_covariance(), objective="regression", penalty=pen
    )
    theta, start = linear.local_fit(
        np.zeros(5), x, y, mean, scale, objective="regression", penalty=pen,
        steps=1, learning_rate=1.0, precond=precond,
    )  # fmt: skip
    ridge = Ridge(alpha=1 / 0.05).fit((x - mean) / scale, y)
    np.testing.assert_allclose(theta, np.r_[ridge.coef_, ridge.intercept_], rtol=1e-9)
    assert start == pytest.approx(0.5 * np.mean(y**2))  # the loss of the incoming zeros


def test_curvature_bound_dominates_the_hessian():
    x, y, mean, scale = make_data()
    z = (x - mean) / scale
    pen = linear.penalty(0.5, 400)
    moments = combine_moments(*[[v] for v in local_moments(x)])
    bound = linear.curvature_bound(
        moments.standardised_covariance(), objective="binary", penalty=pen, mu=0.2
    )
    theta = np.array([0.5, -1.0, 0.2, 0.0, 0.1])
    p = linear.predictions(linear.scores(x, theta, mean, scale), "binary")
    za = np.c_[z, np.ones(len(z))]
    hessian = (za * (p * (1 - p))[:, None]).T @ za / len(z)
    hessian[np.arange(4), np.arange(4)] += pen.l2
    hessian += 0.2 * np.eye(5)
    assert np.linalg.eigvalsh(bound - hessian).min() > -1e-12
    diagonal = linear.preconditioner(
        moments.standardised_covariance(),
        objective="binary",
        penalty=linear.penalty(0.5, 400, l1_ratio=0.5),
    )
    assert np.count_nonzero(diagonal - np.diag(np.diagonal(diagonal))) == 0
    majoriser = np.diag(1 / np.diagonal(diagonal))
    l1_bound = linear.curvature_bound(
        moments.standardised_covariance(),
        objective="binary",
        penalty=linear.penalty(0.5, 400, l1_ratio=0.5),
    )
    assert np.linalg.eigvalsh(majoriser - l1_bound).min() > -1e-12


def test_fedprox_local_optimum_is_pulled_towards_the_global_model():
    x, y, mean, scale = make_data()
    pen = linear.penalty(1.0, 400)
    anchor = np.zeros(5)
    drifts = []
    for mu in (0.0, 0.1, 1.0):
        theta, _ = linear.local_fit(
            anchor, x, y, mean, scale, objective="binary", penalty=pen, steps=400,
            learning_rate=1.0 / linear.local_curvature(
                x, mean, scale, objective="binary", penalty=pen, mu=mu
            ),
            mu=mu,
        )  # fmt: skip
        # Stationary for the local objective plus mu/2 ||theta - anchor||^2.
        grad = linear.gradient(
            theta, x, y, mean, scale, objective="binary", penalty=pen, anchor=anchor, mu=mu
        )
        assert np.abs(grad).max() < 1e-6
        drifts.append(np.linalg.norm(theta - anchor))
    assert drifts[0] > drifts[1] > drifts[2]


def test_soft_threshold_by_hand_and_intercept_untouched():
    out = linear.soft_threshold(np.array([1.0, -0.3, 0.05, 2.0]), np.array([0.5, 0.5, 0.1, 9]))
    np.testing.assert_allclose(out, [0.5, 0.0, 0.0, 2.0])


def test_fedavg_with_server_prox_is_exactly_one_centralised_ista_step():
    x, y, mean, scale = make_data()
    n = x.shape[0]
    pen = linear.penalty(0.2, n, l1_ratio=0.8)
    moments = combine_moments(*[[v] for v in local_moments(x)])
    precond = linear.preconditioner(
        moments.standardised_covariance(), objective="binary", penalty=pen
    )
    theta0 = np.array([0.4, -0.3, 0.0, 0.2, 0.1])
    thresholds = linear.prox_thresholds(precond, 1.0, pen.l1, 5)
    central = linear.soft_threshold(
        theta0
        - precond @ linear.gradient(theta0, x, y, mean, scale, objective="binary", penalty=pen),
        thresholds,
    )
    strategy = FedAvg()
    strategy.configure_fit(1, theta0, ["a", "b"])
    results = {}
    for name, rows in (("a", slice(0, 150)), ("b", slice(150, n))):
        local, _ = linear.local_fit(
            theta0, x[rows], y[rows], mean, scale, objective="binary", penalty=pen,
            steps=1, learning_rate=1.0, precond=precond, prox_last=False,
        )  # fmt: skip
        results[name] = type("R", (), {"parameters": local, "num_examples": x[rows].shape[0]})
    federated = linear.soft_threshold(strategy.aggregate_fit(1, results, {}), thresholds)
    np.testing.assert_allclose(federated, central, rtol=1e-12, atol=1e-14)


def test_l1_reference_solver_matches_sklearn():
    x, y, mean, scale = make_data(n=600, objective="regression")
    z = (x - mean) / scale
    ours = linear.fit_centralised(z, y, objective="regression", c=0.01, l1_ratio=0.7)
    net = ElasticNet(alpha=1 / (0.01 * 600), l1_ratio=0.7, tol=1e-12, max_iter=100_000).fit(z, y)
    np.testing.assert_allclose(ours, np.r_[net.coef_, net.intercept_], atol=1e-7)
    assert (ours[:-1] == 0).sum() == (net.coef_ == 0).sum() >= 1  # exact zeros, as the maths says

    xb, yb, mb, sb = make_data(n=600, objective="binary")
    zb = (xb - mb) / sb
    ours = linear.fit_centralised(zb, yb, objective="binary", c=0.05, l1_ratio=1.0)
    ref = LogisticRegression(C=0.05, l1_ratio=1.0, solver="saga", tol=1e-10, max_iter=50_000).fit(
        zb, yb
    )
    np.testing.assert_allclose(ours, np.r_[ref.coef_[0], ref.intercept_], atol=2e-4)


def test_float32_matrix_stays_float32_and_is_never_copied():
    rng = np.random.default_rng(3)
    x = np.asfortranarray(rng.normal(size=(20_000, 50)).astype(np.float32) + 5)
    y = (rng.random(20_000) < 0.3).astype(np.float32)
    mean, scale = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64)
    pen = linear.penalty(1.0, 20_000)
    tracemalloc.start()
    theta, loss = linear.local_fit(
        np.zeros(51), x, y, mean, scale, objective="binary", penalty=pen, steps=5,
        learning_rate=0.5,
    )  # fmt: skip
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 0.1 * x.nbytes  # n-vectors only: no standardised or float64 copy of x
    assert theta.dtype == np.float64 and np.isfinite(theta).all()
    x64 = x.astype(np.float64)
    theta64, loss64 = linear.local_fit(
        np.zeros(51), x64, y.astype(np.float64), mean, scale, objective="binary", penalty=pen,
        steps=5, learning_rate=0.5,
    )  # fmt: skip
    np.testing.assert_allclose(theta, theta64, atol=1e-5)
    assert loss == pytest.approx(loss64, abs=1e-6)


def test_column_moments_match_local_moments_without_a_full_copy():
    x = np.random.default_rng(1).normal(size=(1000, 3)) * [1, 100, 1e-3] + [0, 1e6, 5]
    n, sums, scatter = linear.column_moments(x, block_rows=97)
    n2, sums2, scatter2 = local_moments(x)
    assert n == n2
    np.testing.assert_allclose(sums, sums2)
    np.testing.assert_allclose(scatter, scatter2, rtol=1e-9)


def test_objective_follows_the_model():
    assert linear.objective_of("logreg") == "binary"
    assert linear.objective_of("linear") == "regression"
    assert linear.objective_of("linear", "binary") == "binary"
    for model, objective in (("logreg", "regression"), ("gbm", None), ("linear", "poisson")):
        with pytest.raises(ConfigError):
            linear.objective_of(model, objective)
