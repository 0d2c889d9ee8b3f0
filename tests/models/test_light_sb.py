"""models.light_sb.LightPotential (the light G-step's Schrodinger potential) against computations that use none
of its formulas: quadrature of c_v, the closed-form plan of transport.mixture, and its own fit on samples."""

import math

import numpy as np
import pytest
import torch

from models.light_sb import LightPotential
from transport import mixture as mx
from transport.gaussian import bw2_squared


def _potential(dim, eps, seed=0, components=3):
    """A LightPotential with random weights, means and (axis-aligned) variances."""
    gen = torch.Generator().manual_seed(seed)
    V = LightPotential(dim, components=components, eps=eps).double()
    with torch.no_grad():
        V.logits.copy_(torch.randn(components, generator=gen, dtype=torch.float64))
        V.means.copy_(2 * torch.randn(components, dim, generator=gen, dtype=torch.float64))
        V.log_vars.copy_(torch.randn(components, dim, generator=gen, dtype=torch.float64) * 0.5 - 1)
    return V


def _as_pair(V, source):
    """The same potential as a transport.mixture.MixturePair (full covariance matrices, its own formulas)."""
    weights = V.logits.softmax(0).detach().double().numpy()
    covs = np.stack([np.diag(v) for v in V.log_vars.exp().detach().double().numpy()])
    return mx.MixturePair(source, mx.GaussianMixtureLaw(weights, V.means.detach().double().numpy(), covs), V.eps)


def test_log_c_and_log_v_match_quadrature_in_one_dimension():
    """c_v(x) = int N(y; x, eps) v(y) dy and v itself, by the trapezoidal rule on a fine grid."""
    V = _potential(1, eps=0.3)
    y = torch.linspace(-15, 15, 200_001, dtype=torch.float64)
    weights, means, variances = (p.detach() for p in (V.logits.softmax(0), V.means[:, 0], V.log_vars.exp()[:, 0]))

    def v(y):
        return sum(w * torch.exp(-(y - m) ** 2 / (2 * s)) / math.sqrt(2 * math.pi * s)
                   for w, m, s in zip(weights, means, variances))

    x = torch.tensor([-2.0, 0.1, 1.7], dtype=torch.float64)
    for xi, log_c, log_v in zip(x, V.log_c(x[:, None]).detach(), V.log_v(x[:, None]).detach()):
        kernel = torch.exp(-(y - xi) ** 2 / (2 * V.eps)) / math.sqrt(2 * math.pi * V.eps)
        assert float(log_c) == pytest.approx(math.log(float(torch.trapezoid(kernel * v(y), y))), abs=1e-6)
        assert float(log_v) == pytest.approx(math.log(float(v(xi))), abs=1e-7)


def test_samples_follow_the_closed_form_plan():
    """sample(x, u, z): the mean and covariance of 40 000 draws per input match pi(y | x) of transport.mixture."""
    dim, eps = 3, 0.7
    V = _potential(dim, eps).float()
    pair = _as_pair(V, mx.GaussianMixtureLaw(np.ones(1), np.zeros((1, dim)), np.eye(dim)[None]))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, dim, generator=gen)
    reps = 40_000
    xr = x.repeat_interleave(reps, 0)
    y = V.sample(xr, torch.rand(len(xr), generator=gen), torch.randn(xr.shape, generator=gen)).double()
    y = y.reshape(4, reps, dim).numpy()
    mean, cov = pair.conditional_moments(x.double().numpy())
    se = np.sqrt(np.diagonal(cov, axis1=1, axis2=2) / reps)
    assert np.all(np.abs(y.mean(1) - mean) < 5 * se)
    emp = np.stack([np.cov(yi.T) for yi in y])
    assert np.allclose(emp, cov, atol=0.05 * np.abs(cov).max())


def test_fitted_on_marginal_samples_it_recovers_the_plan():
    """The LightSB loss on unpaired samples of a mixture pair (D = 2) recovers the pair's plan: cBW2-UVP of its
    conditional moments (closed form, transport.mixture) far below the independent coupling's."""
    torch.manual_seed(0)
    pair = mx.benchmark_pair(2, 1.0, seed=0)
    rng = np.random.default_rng(0)
    x0 = torch.tensor(pair.source.sample(20_000, rng), dtype=torch.float32)
    x1 = torch.tensor(pair.sample_target(20_000, rng), dtype=torch.float32)
    V = LightPotential(2, components=8, eps=1.0)
    V.init_from(x1[:8])
    opt = torch.optim.Adam(V.parameters(), lr=1e-2)
    for _ in range(1500):
        i, j = torch.randint(0, 20_000, [2, 512])
        loss = V(x0[i], x1[j]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = pair.source.sample(200, np.random.default_rng(1))
    fitted = _as_pair(V, pair.source)
    m1, c1 = fitted.conditional_moments(x)
    m0, c0 = pair.conditional_moments(x)
    uvp = 100 * float(bw2_squared(m1, c1, m0, c0).mean()) / pair.target_variance()
    assert uvp < 0.5, uvp
    # Before fitting (the initial potential): far off.
    V0 = LightPotential(2, components=8, eps=1.0)
    V0.init_from(x1[:8])
    m1, c1 = _as_pair(V0, pair.source).conditional_moments(x)
    assert 100 * float(bw2_squared(m1, c1, m0, c0).mean()) / pair.target_variance() > 10


def test_init_spreads_the_means_over_the_modes():
    """k-means++ seeding: with 3 tight clusters far apart, listed cluster by cluster (so the first K rows all lie
    in one), the K = 3 means land one in each cluster, each at a row of y, the same for the same generator."""
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    y = (centres[:, None] + 0.01 * torch.randn(3, 50, 2, generator=torch.Generator().manual_seed(1))).reshape(-1, 2)
    V = LightPotential(2, components=3)
    V.init_from(y, generator=torch.Generator().manual_seed(0))
    assert all(any(torch.equal(mean, row) for row in y) for mean in V.means)
    nearest = torch.cdist(V.means, centres).argmin(1)
    assert sorted(nearest.tolist()) == [0, 1, 2]
    twin = LightPotential(2, components=3)
    twin.init_from(y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(V.means, twin.means)
    assert torch.allclose(V.log_vars.exp(), torch.full([3, 2], float(y.var(0).mean()) * 0.1 + 1e-2))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match='components'):
        LightPotential(2, components=0)
    with pytest.raises(ValueError, match='eps'):
        LightPotential(2, eps=0)
    with pytest.raises(ValueError, match='at least 20 samples'):
        LightPotential(2).init_from(torch.zeros(5, 2))
