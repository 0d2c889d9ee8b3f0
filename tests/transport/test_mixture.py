"""Closed-form mixture EOT pairs (transport/mixture.py) against independent computations: self-normalised
importance sampling of pi(y | x) from its definition N(y; x, eps I) v(y), log-domain Sinkhorn between samples
of p0 and p1, the Schrodinger form of the plan density and Sinkhorn on a fine 1-D grid, the bridge's end-point
predictor by importance sampling, and the cBW2-UVP estimator against a per-input scipy loop."""

import numpy as np
import pytest
import scipy.linalg
from scipy.special import logsumexp

from transport import mixture as mx


def small_pair(dim, eps, seed=0, spread=1.5):
    """A random pair with full (non-isotropic) covariances: 2 input and 3 potential components."""
    rng = np.random.default_rng(seed)

    def covs(k, scale):
        a = rng.normal(size=(k, dim, dim)) * 0.4
        return scale * (a @ a.transpose(0, 2, 1) + 0.3 * np.eye(dim))

    source = mx.GaussianMixtureLaw(rng.random(2) + 0.2, spread * rng.normal(size=(2, dim)), covs(2, 0.5))
    potential = mx.GaussianMixtureLaw(rng.random(3) + 0.2, spread * rng.normal(size=(3, dim)), covs(3, 0.3))
    return mx.MixturePair(source, potential, eps)


def log_potential(pair, y):
    return pair.potential.log_prob(y)


def snis_moments(pair, x, num, rng, log_target, kernel_var):
    """Mean and covariance of the law proportional to exp(log_target(y)) by self-normalised importance sampling;
    also the effective sample size. The proposal is an equal mixture of the target's two factors N(x, kernel_var I)
    and v, and a broad Gaussian around x for the inputs far from v's mass, so that some part of it covers the
    target for every eps (v is sampled as a plain GaussianMixtureLaw: nothing of the pair's conditional formulas
    is used)."""
    broad = (3.0 + 2 * np.sqrt(pair.eps)) ** 2
    third = num // 3
    y = np.concatenate([x + np.sqrt(kernel_var) * rng.normal(size=(third, pair.dim)),
                        x + np.sqrt(broad) * rng.normal(size=(third, pair.dim)),
                        pair.potential.sample(num - 2 * third, rng)])
    def log_normal(var):
        return -0.5 * ((y - x) ** 2).sum(1) / var - 0.5 * pair.dim * np.log(2 * np.pi * var)
    logq = logsumexp(np.stack([log_normal(kernel_var), log_normal(broad), pair.potential.log_prob(y)]), axis=0)
    logw = log_target(y) - logq
    w = np.exp(logw - logsumexp(logw))
    mean = w @ y
    dev = y - mean
    return mean, (w[:, None] * dev).T @ dev, 1 / (w ** 2).sum()

#----------------------------------------------------------------------------
# pi(y | x).

@pytest.mark.parametrize('dim,eps', [(1, 0.1), (1, 1.0), (2, 1.0), (2, 10.0)])
def test_conditional_moments_match_importance_sampling_of_the_definition(dim, eps):
    pair = small_pair(dim, eps, seed=dim)
    rng = np.random.default_rng(1)
    for x in pair.source.sample(3, rng):
        # pi(y | x) proportional to N(y; x, eps I) v(y): nothing of the mixture formulas is used here.
        log_target = lambda y: -0.5 * ((y - x) ** 2).sum(1) / eps + log_potential(pair, y)
        mean, cov, ess = snis_moments(pair, x, 400_000, rng, log_target, eps)
        true_mean, true_cov = pair.conditional_moments(x[None])
        # Standard error of a SNIS mean ~ sqrt(var / ESS); allow 5 of them (ESS >= 4000 here).
        assert ess > 4000
        se = np.sqrt(np.diag(true_cov[0]) / ess)
        assert np.all(np.abs(mean - true_mean[0]) < 5 * se + 1e-12), (mean, true_mean, se)
        scale = np.sqrt(np.outer(np.diag(true_cov[0]), np.diag(true_cov[0])))
        assert np.all(np.abs(cov - true_cov[0]) < 10 * scale / np.sqrt(ess)), (cov, true_cov)


def test_conditional_samples_have_the_conditional_moments_and_log_density_integrates_to_one():
    pair = small_pair(2, 1.0, seed=3)
    rng = np.random.default_rng(0)
    x = pair.source.sample(4, rng)
    y = pair.sample_conditional(x, 100_000, rng)
    mean, cov = pair.conditional_moments(x)
    for i in range(len(x)):
        se = np.sqrt(np.diag(cov[i]) / y.shape[1])
        assert np.all(np.abs(y[i].mean(0) - mean[i]) < 5 * se)
        assert np.allclose(np.cov(y[i].T), cov[i], atol=0.05 * np.abs(cov[i]).max())
    # The conditional density integrates to 1 (quadrature on a grid).
    g = np.linspace(-12, 12, 401)
    grid = np.stack(np.meshgrid(g, g, indexing='ij'), -1).reshape(-1, 2)
    for xi in x[:2]:
        dens = np.exp(pair.conditional_log_prob(np.repeat(xi[None], len(grid), 0), grid))
        assert dens.sum() * (g[1] - g[0]) ** 2 == pytest.approx(1, abs=1e-4)


def test_target_moments_are_those_of_target_samples():
    pair = small_pair(2, 1.0, seed=4)
    mean, cov = pair.target_moments()
    y = pair.sample_target(400_000, np.random.default_rng(1))
    assert np.allclose(y.mean(0), mean, atol=5 * np.sqrt(np.diag(cov) / len(y)))
    assert np.allclose(np.cov(y.T), cov, atol=0.01 * np.abs(cov).max())
    assert pair.target_variance() == pytest.approx(np.trace(cov))

#----------------------------------------------------------------------------
# The plan is the EOT plan.

def test_plan_density_has_the_schrodinger_form():
    """log pi(x, y) + |x - y|^2 / (2 eps) = a(x) + b(y): every cross difference over a grid vanishes."""
    for dim, eps in ((1, 0.5), (2, 3.0)):
        pair = small_pair(dim, eps, seed=5)
        rng = np.random.default_rng(2)
        x, y = rng.normal(size=(6, dim)) * 2, rng.normal(size=(7, dim)) * 2
        xx, yy = np.repeat(x, len(y), 0), np.tile(y, (len(x), 1))
        l = (pair.log_plan_density(xx, yy) + ((xx - yy) ** 2).sum(1) / (2 * eps)).reshape(len(x), len(y))
        # cross[i, i', j, j'] = l[i, j] + l[i', j'] - l[i, j'] - l[i', j]
        cross = (l[:, None, :, None] + l[None, :, None, :] - l[:, None, None, :] - l[None, :, :, None])
        assert np.abs(cross).max() < 1e-9


def sinkhorn(cost, a, b, eps, tol=1e-10, max_iters=50_000):
    la, lb = np.log(a), np.log(b)
    f, g = np.zeros(len(a)), np.zeros(len(b))
    for it in range(max_iters):
        f = -eps * logsumexp((g[None, :] - cost) / eps + lb[None, :], axis=1)
        g = -eps * logsumexp((f[:, None] - cost) / eps + la[:, None], axis=0)
        if it % 10 == 0:
            log_plan = (f[:, None] + g[None, :] - cost) / eps + la[:, None] + lb[None, :]
            if np.abs(np.exp(logsumexp(log_plan, axis=1)) - a).sum() < tol:
                return np.exp(log_plan)
    raise AssertionError('Sinkhorn did not converge')


@pytest.mark.parametrize('eps', [0.3, 1.0, 5.0])
def test_plan_is_what_sinkhorn_finds_on_a_fine_1d_grid(eps):
    """Discretise p0 and p1 (p1 from the plan by quadrature) on a grid, solve EOT by brute force, compare."""
    pair = small_pair(1, eps, seed=6, spread=1.0)
    g = np.arange(-9, 9, 0.06)[:, None]
    log_joint = pair.log_plan_density(np.repeat(g, len(g), 0), np.tile(g, (len(g), 1))).reshape(len(g), len(g))
    joint = np.exp(log_joint - logsumexp(log_joint))
    a, b = joint.sum(1), joint.sum(0)
    keep_a, keep_b = a > 1e-14, b > 1e-14
    plan = sinkhorn(0.5 * (g[keep_a] - g[keep_b].T) ** 2, a[keep_a] / a[keep_a].sum(), b[keep_b] / b[keep_b].sum(), eps)
    closed = joint[np.ix_(keep_a, keep_b)]
    assert np.abs(plan - closed / closed.sum()).sum() < 1e-6
    # and a different entropy gives a clearly different plan
    other = sinkhorn(0.5 * (g[keep_a] - g[keep_b].T) ** 2, a[keep_a] / a[keep_a].sum(), b[keep_b] / b[keep_b].sum(), 1.5 * eps)
    assert np.abs(other - closed / closed.sum()).sum() > 1e-2


def test_plan_matches_sinkhorn_between_samples():
    """Entropic OT between 1500 samples of p0 and 1500 independent samples of p1 (2-D): its plan-weighted
    cross-covariance is the closed form's, to sampling error."""
    eps, n = 1.0, 1500
    pair = small_pair(2, eps, seed=7)
    rng = np.random.default_rng(3)
    x, y = pair.source.sample(n, rng), pair.sample_target(n, rng)
    cost = 0.5 * ((x[:, None] - y[None]) ** 2).sum(-1)
    plan = sinkhorn(cost, np.full(n, 1 / n), np.full(n, 1 / n), eps, tol=1e-9)
    cross = (x - x.mean(0)).T @ plan @ (y - y.mean(0))
    # The population cross-covariance: E[x E[y | x]^T] - E[x] E[y]^T over many inputs.
    xs = pair.source.sample(400_000, np.random.default_rng(4))
    m, _ = pair.conditional_moments(xs)
    population = (xs - xs.mean(0)).T @ (m - m.mean(0)) / len(xs)
    se = np.sqrt(np.outer(np.diag(np.cov(xs.T)), np.diag(pair.target_moments()[1])) / n)
    assert np.all(np.abs(cross - population) < 4 * se), (cross, population, se)
    # The independent coupling (cross-covariance 0) is far outside that band.
    assert np.abs(population).max() > 8 * se.max()

#----------------------------------------------------------------------------
# The bridge.

@pytest.mark.parametrize('t', [0.0, 0.3, 0.8])
def test_end_point_is_the_bridge_posterior_mean(t):
    """E[x_1 | x_t = x] under the Schrodinger bridge: x_1 | x_t = x has density proportional to
    N(x_1; x, eps (1 - t) I) v(x_1) (the same Schrodinger form on [t, 1]); estimated by importance sampling."""
    eps = 2.0
    pair = small_pair(2, eps, seed=8)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 2)) * 2
    pred = pair.end_point(x, t)
    for xi, p in zip(x, pred):
        log_target = lambda y: -0.5 * ((y - xi) ** 2).sum(1) / (eps * (1 - t)) + log_potential(pair, y)
        mean, cov, ess = snis_moments(pair, xi, 400_000, rng, log_target, eps * (1 - t))
        assert np.all(np.abs(p - mean) < 5 * np.sqrt(np.diag(cov) / ess) + 1e-12), (p, mean)
    assert np.allclose(pair.end_point(x, 0.0), pair.conditional_moments(x)[0])


def test_sde_with_the_exact_end_point_samples_the_plan():
    """Euler-Maruyama of dx = (E[x_1 | x_t] - x) / (1 - t) dt + sqrt(eps) dW (200 steps) from inputs x lands
    on pi(. | x): its cBW2-UVP is at the estimator's floor."""
    pair = small_pair(1, 1.0, seed=9)
    rng = np.random.default_rng(6)
    x = pair.source.sample(40, rng)
    xr = np.repeat(x, 2000, 0)
    steps = 200
    for k in range(steps):
        t = k / steps
        xr = xr + (pair.end_point(xr, t) - xr) / (steps - k) + (np.sqrt(pair.eps / steps) * rng.normal(size=xr.shape)
                                                               if k < steps - 1 else 0)
    sde = mx.cbw2_uvp(x, xr.reshape(40, 2000, 1), pair)
    floor = pair.floor(x, 2000, rng)
    assert sde < floor + 0.5, (sde, floor)

#----------------------------------------------------------------------------
# The measure.

def test_cbw2_uvp_against_a_per_input_scipy_loop():
    pair = small_pair(3, 1.0, seed=10)
    rng = np.random.default_rng(7)
    x = pair.source.sample(5, rng)
    y = pair.sample_conditional(x, 50, rng) * 1.1 + 0.2      # a wrong model
    total = 0
    for xi, yi in zip(x, y):
        m, c = pair.conditional_moments(xi[None])
        mu, cov = yi.mean(0), np.cov(yi.T)
        root = scipy.linalg.sqrtm(c[0])
        cross = np.real(scipy.linalg.sqrtm(root @ cov @ root))
        total += ((mu - m[0]) ** 2).sum() + np.trace(cov) + np.trace(c[0]) - 2 * np.trace(cross)
    expected = 100 * total / len(x) / pair.target_variance()
    assert mx.cbw2_uvp(x, y, pair, chunk=2) == pytest.approx(expected, rel=1e-6)


def test_floor_shrinks_with_the_repeats_and_the_independent_coupling_scores_high():
    pair = mx.benchmark_pair(2, 1.0, seed=0)
    rng = np.random.default_rng(8)
    x = pair.source.sample(100, rng)
    floors = [pair.floor(x, r, rng) for r in (100, 1000)]
    assert floors[1] < floors[0] / 4 and floors[1] < 0.3
    indep = mx.cbw2_uvp(x, pair.sample_target(100 * 1000, rng).reshape(100, 1000, 2), pair)
    assert indep > 50


def test_refuses_bad_input():
    law = mx.GaussianMixtureLaw([1.0], np.zeros((1, 2)), np.eye(2)[None])
    with pytest.raises(ValueError, match='eps'):
        mx.MixturePair(law, law, 0.0)
    with pytest.raises(ValueError, match='positive definite'):
        mx.GaussianMixtureLaw([1.0], np.zeros((1, 2)), -np.eye(2)[None])
    with pytest.raises(ValueError, match='cbw2_uvp needs'):
        mx.cbw2_uvp(np.zeros((3, 2)), np.zeros((3, 1, 2)), mx.MixturePair(law, law, 1.0))
    with pytest.raises(ValueError, match='eps must be one of'):
        mx.benchmark_pair(2, 0.5)

#----------------------------------------------------------------------------
# The benchmark's pairs.

@pytest.mark.parametrize('dim,eps', [(2, 0.1), (16, 1), (64, 10)])
def test_benchmark_pair_has_the_published_structure(dim, eps):
    pair = mx.benchmark_pair(dim, eps, seed=0)
    src, pot = pair.source, pair.potential
    assert len(src.weights) == 3 and len(pot.weights) == 5
    assert np.all(np.sort(src.means, axis=0) == np.array([-2.0, 0.0, 2.0])[:, None])
    assert np.all(np.sort(pot.means, axis=0) == np.arange(-2.0, 3.0)[:, None])
    assert np.allclose(src.covs, 0.25 * np.eye(dim))
    std = 0.5 * mx.POTENTIAL_STD_SCALE[eps][dim]
    assert np.allclose(pot.covs, std ** 2 * np.eye(dim))
    # Reproducible, and one input law for every eps of a dimension.
    again = mx.benchmark_pair(dim, eps, seed=0)
    assert np.array_equal(again.potential.means, pot.means) and np.array_equal(again.source.weights, src.weights)
    assert np.array_equal(mx.benchmark_pair(dim, 0.1 if eps != 0.1 else 1, seed=0).source.means, src.means)
    assert not np.array_equal(mx.benchmark_pair(dim, eps, seed=1).potential.means, pot.means)
