"""transport.laplace against computations that use none of its formulas: quadrature of the unnormalised
conditional density exp(-(y - x)^2 / (2 eps) - |y - c| / b) on a fine grid, and sample moments."""

import numpy as np
import pytest

from transport import laplace as lp
from transport import mixture as mx


def _quadrature_moments(x, c, b, eps):
    y = np.linspace(min(x, c) - 12 * np.sqrt(eps) - 30 * b, max(x, c) + 12 * np.sqrt(eps) + 30 * b, 400_001)
    log_p = -(y - x) ** 2 / (2 * eps) - np.abs(y - c) / b
    p = np.exp(log_p - log_p.max())
    p /= np.trapezoid(p, y)
    mean = np.trapezoid(y * p, y)
    return mean, np.trapezoid((y - mean) ** 2 * p, y)


@pytest.mark.parametrize('eps', [0.1, 1.0, 10.0])
def test_conditional_moments_match_quadrature(eps):
    source = mx.GaussianMixtureLaw(np.ones(1), np.zeros((1, 3)), np.eye(3)[None])
    pair = lp.LaplacePair(source, np.array([0.5, -1.0, 2.0]), np.array([0.7, 1.3, 0.5]), eps)
    x = np.array([[0.4, -3.0, 9.0], [-6.0, 1.2, 2.0]])
    mean, cov = pair.conditional_moments(x)
    assert np.all(cov == np.diagonal(cov, axis1=1, axis2=2)[:, :, None] * np.eye(3)[None])
    for n in range(2):
        for d in range(3):
            m, v = _quadrature_moments(x[n, d], pair.centers[d], pair.scales[d], eps)
            assert mean[n, d] == pytest.approx(m, abs=1e-6 * max(1, abs(m)))
            assert cov[n, d, d] == pytest.approx(v, rel=1e-5)


def test_samples_follow_the_moments_and_the_floor_is_small():
    pair = lp.laplace_pair(4, 1.0, seed=0)
    rng = np.random.default_rng(0)
    x = pair.source.sample(3, rng)
    y = pair.sample_conditional(x, 100_000, rng)
    mean, cov = pair.conditional_moments(x)
    se = np.sqrt(np.diagonal(cov, axis1=1, axis2=2) / 100_000)
    assert np.all(np.abs(y.mean(1) - mean) < 5 * se)
    assert np.allclose(y.var(1), np.diagonal(cov, axis1=1, axis2=2), rtol=0.03)
    # The coordinates are independent given x (the cost and the potential are sums over coordinates).
    emp = np.cov(y[0].T)
    assert np.all(np.abs(emp - np.diag(np.diag(emp))) < 0.02 * emp.max())
    # An exact sampler scores near 0; the independent coupling far above.
    xs = pair.source.sample(50, rng)
    assert pair.floor(xs, 400, rng) < 1
    assert mx.cbw2_uvp(xs, pair.sample_target(50 * 400, rng).reshape(50, 400, 4), pair) > 20


def test_bad_parameters_are_refused():
    source = mx.GaussianMixtureLaw(np.ones(1), np.zeros((1, 2)), np.eye(2)[None])
    with pytest.raises(ValueError, match='scales > 0'):
        lp.LaplacePair(source, np.zeros(2), np.array([1.0, 0.0]), 1.0)
    with pytest.raises(ValueError, match='eps'):
        lp.LaplacePair(source, np.zeros(2), np.ones(2), 0.0)
