"""Closed-form Gaussian EOT plan and (c)BW2-UVP, against independent computations: log-domain Sinkhorn on
a fine 1-D grid and between large 2-D samples, the Schrodinger-system form of the plan density, the
kinetic-energy variational principle of the bridge, scipy's sqrtm and per-input loops."""

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

from transport import gaussian as ge
from data import toy


def sinkhorn(x, y, a, b, eps, tol=1e-11, max_iters=20000):
    """Log-domain Sinkhorn for the cost |x - y|^2 / 2 between discrete measures (points [N, D], weights);
    returns the plan [N, M]."""
    cost = 0.5 * ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    la, lb = np.log(a), np.log(b)
    f, g = np.zeros(len(x)), np.zeros(len(y))
    for it in range(max_iters):
        f = -eps * logsumexp((g[None, :] - cost) / eps + lb[None, :], axis=1)
        g = -eps * logsumexp((f[:, None] - cost) / eps + la[:, None], axis=0)
        log_plan = (f[:, None] + g[None, :] - cost) / eps + la[:, None] + lb[None, :]
        if it % 10 == 0 and np.abs(np.exp(logsumexp(log_plan, axis=1)) - a).sum() < tol:
            break
    else:
        raise AssertionError(f'Sinkhorn did not converge in {max_iters} iterations')
    return np.exp(log_plan)


def random_pair(dim, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=dim), toy.random_covariance(dim, rng), rng.normal(size=dim), toy.random_covariance(dim, rng)

#----------------------------------------------------------------------------
# The closed form.

@pytest.mark.parametrize('eps,step', [(0.1, 0.08), (1.0, 0.1), (10.0, 0.2)])
def test_closed_form_matches_sinkhorn_on_a_fine_1d_grid(eps, step):
    m0, s0, m1, s1 = 0.3, 0.7, -0.5, 1.8
    x = np.arange(-8, 8 + step / 2, step)[:, None]
    a = np.exp(-(x[:, 0] - m0) ** 2 / (2 * s0))
    b = np.exp(-(x[:, 0] - m1) ** 2 / (2 * s1))
    plan = sinkhorn(x, x, a / a.sum(), b / b.sum(), eps)
    mx, my = plan.sum(1) @ x[:, 0], plan.sum(0) @ x[:, 0]
    var_x, var_y = plan.sum(1) @ (x[:, 0] - mx) ** 2, plan.sum(0) @ (x[:, 0] - my) ** 2
    cross = (x[:, 0] - mx) @ plan @ (x[:, 0] - my)
    closed = ge.gaussian_eot_plan([m0], [[s0]], [m1], [[s1]], eps)
    # The discretised Gaussians keep their moments to ~1e-6 on this grid; so does the plan.
    assert np.allclose([mx, my, var_x, var_y], [m0, m1, s0, s1], atol=1e-5)
    assert cross == pytest.approx(closed.cross[0, 0], abs=1e-5)
    assert closed.joint_cov[1, 1] == s1 and closed.cond_cov[0, 0] == pytest.approx(s1 - cross ** 2 / s0, abs=1e-5)


def test_closed_form_matches_sinkhorn_between_large_2d_samples():
    eps, n = 1.0, 1000
    _, s0, _, s1 = random_pair(2, seed=0)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 2)) @ np.linalg.cholesky(s0).T
    y = rng.normal(size=(n, 2)) @ np.linalg.cholesky(s1).T
    plan = sinkhorn(x, y, np.full(n, 1 / n), np.full(n, 1 / n), eps)
    xc, yc = x - x.mean(0), y - y.mean(0)
    cross = xc.T @ plan @ yc                                   # plan-weighted cross-covariance
    population = ge.gaussian_eot_plan(None, s0, None, s1, eps).cross
    # 1) Against the population plan: the error is sampling noise. Cross-covariance entries estimated from n
    #    pairs have standard error sqrt((S0_ii S1_jj + C_ij^2) / n) (0.02-0.07 here); allow 4 of them.
    se = np.sqrt((np.outer(np.diag(s0), np.diag(s1)) + population ** 2) / n)
    assert np.all(np.abs(cross - population) < 4 * se), (cross, population, se)
    # 2) Against the closed form for the samples' own covariances, most of that noise cancels: what is
    #    left shrinks like 1/n (measured over 6 seeds: rms 2.5e-3 at n=500, 1.2e-3 at 1000, 5e-4 at 2000),
    #    so 10 / n is ~3x the largest residual seen. Wrong formulas miss by far more (checked below).
    matched = ge.gaussian_eot_plan(None, np.cov(x.T, bias=True), None, np.cov(y.T, bias=True), eps).cross
    assert np.abs(cross - matched).max() < 10 / n
    wrong = [matched.T, ge.gaussian_eot_plan(None, np.cov(x.T, bias=True), None, np.cov(y.T, bias=True), 1.2 * eps).cross]
    assert all(np.abs(cross - w).max() > 50 / n for w in wrong)


@settings(max_examples=25, deadline=None)
@given(dim=st.integers(1, 12), seed=st.integers(0, 10 ** 6), log_eps=st.floats(-2.5, 2.5))
def test_plan_solves_the_schrodinger_system(dim, seed, log_eps):
    # An EOT plan has density exp((f(x) + g(y) - |x - y|^2 / 2) / eps): for a Gaussian joint with the
    # right marginals this means the x-y block of the joint precision is exactly -I / eps (and conversely
    # this Gaussian is the unique EOT plan).
    eps = float(np.exp(log_eps))
    m0, s0, m1, s1 = random_pair(dim, seed)
    plan = ge.gaussian_eot_plan(m0, s0, m1, s1, eps)
    joint = plan.joint_cov
    assert np.allclose(joint[:dim, :dim], s0) and np.allclose(joint[dim:, dim:], s1)
    assert np.linalg.eigvalsh(joint).min() > 0
    precision = np.linalg.inv(joint)
    assert np.allclose(precision[:dim, dim:], -np.eye(dim) / eps, atol=1e-7 * max(1.0, 1 / eps))


def test_eps_zero_is_the_monge_map_and_large_eps_the_independent_plan():
    m0, s0, m1, s1 = random_pair(4, seed=3)
    monge = ge.gaussian_eot_plan(m0, s0, m1, s1, 0.0)
    t = monge.cond_matrix                                      # y = m1 + T (x - m0)
    assert np.allclose(t, t.T) and np.linalg.eigvalsh(t).min() > 0   # the gradient of a convex potential
    assert np.allclose(t @ s0 @ t.T, s1) and np.allclose(monge.cond_cov, 0, atol=1e-9)
    indep = ge.gaussian_eot_plan(m0, s0, m1, s1, 1e6)
    assert np.abs(indep.cross).max() < 1e-5 and np.allclose(indep.cond_cov, s1, atol=1e-5)


def test_samples_have_the_plan_moments():
    m0, s0, m1, s1 = random_pair(3, seed=4)
    plan = ge.gaussian_eot_plan(m0, s0, m1, s1, 0.5)
    x, y = plan.sample(200000, np.random.default_rng(0))
    joint = np.cov(np.concatenate([x, y], 1).T)
    assert np.abs(joint - plan.joint_cov).max() < 0.03 and np.abs(y.mean(0) - m1).max() < 0.02
    yc = plan.sample_conditional(x[:3], 100000, np.random.default_rng(1))
    assert np.abs(yc.mean(1) - plan.conditional_mean(x[:3])).max() < 0.02
    assert np.abs(np.cov(yc[0].T) - plan.cond_cov).max() < 0.02


@pytest.mark.parametrize('bad', ['asym', 'indef', 'shape', 'eps'])
def test_bad_input_is_refused_with_the_offending_value(bad):
    s = np.eye(2)
    args = dict(asym=(np.array([[1, 0.5], [0, 1]]), s, 1.0), indef=(np.diag([1.0, -1.0]), s, 1.0),
                shape=(s, np.eye(3), 1.0), eps=(s, s, -1.0))[bad]
    with pytest.raises(ValueError, match=dict(asym='symmetric', indef='-1', shape='shape', eps='-1')[bad]):
        ge.gaussian_eot_plan(None, args[0], None, args[1], args[2])

#----------------------------------------------------------------------------
# The bridge objective: kinetic weights recover the closed form; uniform weights (as stated) do not.

def test_kinetic_bridge_objective_is_minimised_by_the_closed_form():
    _, s0, _, s1 = random_pair(2, seed=0)
    for eps in (0.1, 1.0, 10.0):
        plan = ge.gaussian_eot_plan(None, s0, None, s1, eps)
        found, _ = ge.bridge_objective_optimum(plan, eps, 'kinetic', start=np.zeros((2, 2)))
        assert np.abs(found.cross - plan.cross).max() < 1e-5, eps
        assert ge.plan_cbw2_uvp(found, plan) < 1e-6


def test_uniform_bridge_objective_is_not_minimised_by_the_eot_plan():
    # The measurement behind docs/eot_benchmarks.md: with t ~ U(0, 1) and no 1/(1-t)^2 weight the G-step's
    # transport term has a nonzero gradient at the EOT plan, so the stated method is biased.
    _, s0, _, s1 = random_pair(2, seed=0)
    plan = ge.gaussian_eot_plan(None, s0, None, s1, 1.0)
    cross = torch.tensor(plan.cross, requires_grad=True)
    for weight, small in (('kinetic', True), ('uniform', False)):
        cross.grad = None
        ge.bridge_objective(cross, torch.as_tensor(s0), torch.as_tensor(s1), 1.0, weight).backward()
        assert (cross.grad.abs().max() < 1e-8) == small, (weight, cross.grad)


def test_bridge_objective_matches_monte_carlo():
    # Population value vs a Monte Carlo estimate with the exact E[x1 | x_t] of the Gaussian plan.
    _, s0, _, s1 = random_pair(2, seed=5)
    gamma, t = 0.7, 0.35
    plan = ge.gaussian_eot_plan(None, s0, None, s1, 0.3)   # any plan; not the EOT plan for gamma
    rng = np.random.default_rng(0)
    x0, x1 = plan.sample(400000, rng)
    xt = (1 - t) * x0 + t * x1 + np.sqrt(gamma * t * (1 - t)) * rng.normal(size=x0.shape)
    var_t = np.cov(np.concatenate([x1, xt], 1).T)
    f = xt @ np.linalg.solve(var_t[2:, 2:], var_t[2:, :2])   # linear regression = E[x1 | x_t]
    mc = ((f - xt) ** 2).sum(1).mean()
    exact = ge.bridge_transport(torch.as_tensor(plan.cross), torch.as_tensor(s0), torch.as_tensor(s1), gamma, [t])
    assert float(exact[0]) == pytest.approx(mc, rel=0.01)

#----------------------------------------------------------------------------
# Bures-Wasserstein distances and UVP measures.

def _bw2_scipy(ma, a, mb, b):
    ra = scipy.linalg.sqrtm(a).real
    return float(np.sum((ma - mb) ** 2) + np.trace(a) + np.trace(b) - 2 * np.trace(scipy.linalg.sqrtm(ra @ b @ ra).real))


def test_bw2_squared_against_commuting_formula_and_scipy():
    a, b = np.array([1.0, 2.0, 0.5]), np.array([4.0, 0.5, 0.5])
    q = toy.random_rotation(3, np.random.default_rng(0))
    ma, mb = np.array([1.0, 0, 0]), np.array([0, 2.0, 0])
    exact = 1 + 4 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)   # commuting covariances
    assert ge.bw2_squared(ma, q @ np.diag(a) @ q.T, mb, q @ np.diag(b) @ q.T) == pytest.approx(exact, rel=1e-10)
    _, s0, _, s1 = random_pair(6, seed=7)
    assert ge.bw2_squared(ma[:1].repeat(6), s0, mb[:1].repeat(6), s1) == pytest.approx(
        _bw2_scipy(ma[:1].repeat(6), s0, mb[:1].repeat(6), s1), rel=1e-9)


def test_bw2_uvp_of_exact_samples_is_small_and_of_a_shift_is_known():
    m, s, _, _ = random_pair(4, seed=8)
    x = np.random.default_rng(0).multivariate_normal(m, s, size=200000)
    assert ge.bw2_uvp(x, m, s) < 0.05
    shift = np.array([0.3, 0, 0, 0])
    # Sample moments replace the population ones in the reference value.
    expect = 100 * ge.bw2_squared(x.mean(0) + shift, np.cov(x.T), m, s) / np.trace(s)
    assert ge.bw2_uvp(x + shift, m, s) == pytest.approx(expect, rel=1e-9)
    assert expect == pytest.approx(100 * 0.09 / np.trace(s), abs=0.05)


def test_cbw2_uvp_against_a_per_input_loop_and_the_population_value():
    m0, s0, m1, s1 = random_pair(3, seed=9)
    plan = ge.gaussian_eot_plan(m0, s0, m1, s1, 0.5)
    other = ge.gaussian_eot_plan(m0, s0, m1, s1, 2.0)        # a different plan as the "model"
    rng = np.random.default_rng(0)
    x = other.sample(300, rng)[0]
    y = other.sample_conditional(x, 2000, rng)
    loop = np.mean([_bw2_scipy(y[i].mean(0), np.cov(y[i].T), plan.conditional_mean(x[i:i + 1])[0], plan.cond_cov)
                    for i in range(len(x))]) * 100 / np.trace(s1)
    assert ge.cbw2_uvp(x, y, plan, chunk=64) == pytest.approx(loop, rel=1e-8)
    # With many draws per input the estimate approaches the exact population value of the two plans.
    population = ge.plan_cbw2_uvp(other, plan)
    assert population > 1 and ge.cbw2_uvp(x, y, plan) == pytest.approx(population, rel=0.1)
    assert ge.plan_cbw2_uvp(plan, plan) == pytest.approx(0, abs=1e-9)
    assert ge.plan_bw2_uvp(x, y[:, 0], other) < ge.plan_bw2_uvp(x, y[:, 0], plan)


def test_markovian_projection_keeps_the_eot_plan_and_matches_a_simulated_sde():
    _, s0, _, s1 = random_pair(2, seed=11)
    gamma = 1.0
    eot = ge.gaussian_eot_plan(None, s0, None, s1, gamma)
    assert np.abs(ge.markovian_projection(eot, gamma).cross - eot.cross).max() < 1e-6   # the SB is Markov
    indep = ge.GaussianPlan(eot.mean0, s0, eot.mean1, s1, np.zeros((2, 2)))
    proj = ge.markovian_projection(indep, gamma)
    # Euler-Maruyama of dX = (E[x1 | x_t = X] - X) / (1 - t) dt + sqrt(gamma) dW under the independent plan.
    rng = np.random.default_rng(0)
    n, steps = 40000, 400
    x0 = rng.normal(size=(n, 2)) @ np.linalg.cholesky(s0).T
    x = x0.copy()
    for k in range(steps):
        t = k / steps
        var_t = (1 - t) ** 2 * s0 + t ** 2 * s1 + gamma * t * (1 - t) * np.eye(2)
        a_t = np.linalg.solve(var_t, t * s1).T                 # Cov(x1, x_t) Cov(x_t)^-1 (zero means)
        x = x + (x @ a_t.T - x) / steps / (1 - t)
        if k < steps - 1:
            x = x + np.sqrt(gamma / steps) * rng.normal(size=x.shape)
    assert np.abs(x0.T @ x / n - proj.cross).max() < 0.05    # MC error ~ 1/sqrt(n) * O(1), Euler ~ 1/steps
    assert np.abs(np.cov(x.T) - s1).max() < 0.06             # the projection keeps the target law
    assert ge.plan_cbw2_uvp(proj, eot) < 0.1 * ge.plan_cbw2_uvp(indep, eot)

