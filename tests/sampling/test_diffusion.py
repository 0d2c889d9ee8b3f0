"""training.diffusion: the EDM schedule, samplers and losses against closed forms and brute-force recursions."""

import math

import numpy as np
import pytest
import torch
from sampling import diffusion
from models import diffusion_loss
from sampling.diffusion import edm_sigma_schedule, expected_nfe, run_sampler
from models.networks import Denoiser


class IdealGaussianDenoiser(torch.nn.Module):
    """The exact denoiser of x ~ N(mu, s^2 I): D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def __init__(self, mu, s, sigma_min=0.002, sigma_max=80.0):
        super().__init__()
        self.register_buffer('mu', torch.as_tensor(mu, dtype=torch.float64))
        self.s, self.sigma_min, self.sigma_max = float(s), sigma_min, sigma_max
        self.data_shape = tuple(self.mu.shape)

    def forward(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return self.mu + self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x - self.mu)


class Rng:
    """The `randn`/`rand` interface of the Trainer, from one generator."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)

    def randn(self, shape):
        return torch.randn(shape, generator=self.gen, dtype=torch.float64)

    def rand(self, shape):
        return torch.rand(shape, generator=self.gen, dtype=torch.float64)

#----------------------------------------------------------------------------
# Schedule.

def test_edm_schedule_matches_eq5():
    K, smin, smax, rho = 18, 0.002, 80.0, 7.0
    expect = [(smax ** (1 / rho) + i / (K - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(K)] + [0]
    s = edm_sigma_schedule(K)
    assert s.dtype == torch.float64 and s.shape == (K + 1,)
    np.testing.assert_allclose(s.numpy(), expect, rtol=1e-12)
    assert s[0] == pytest.approx(80) and s[K - 1] == pytest.approx(0.002) and s[K] == 0
    assert edm_sigma_schedule(1, 0.1, 5.0).tolist() == [5.0, 0.0]


@pytest.mark.parametrize('args, expect', [((0,), 'num_steps'), ((5, 0.0), 'sigma_min'), ((5, 2.0, 1.0), 'sigma_min'),
                                          ((5, 0.002, 80, 0), 'rho'), ((2.5,), 'num_steps')])
def test_edm_schedule_rejects_bad_arguments(args, expect):
    with pytest.raises(ValueError, match=expect):
        edm_sigma_schedule(*args)


def test_net_schedule_clamps_and_rounds():
    class EDMLike:
        sigma_min, sigma_max = 0.01, 10.0
        def round_sigma(self, sigma):
            return torch.as_tensor(sigma).mul(100).round().div(100)
    s = diffusion.net_sigma_schedule(EDMLike(), 6, sigma_min=0.001, sigma_max=50)
    raw = edm_sigma_schedule(6, 0.01, 10.0)
    np.testing.assert_allclose(s[:-1].numpy(), np.round(raw[:-1].numpy() * 100) / 100)
    assert s[0] == 10 and s[-1] == 0


@pytest.mark.parametrize('sigmas, expect', [([1.0], 'at least 2'), ([1.0, 2.0, 0.0], 'non-increasing'),
                                            ([1.0, 0.0, 0.0], 'only the last'), ([1.0, -1.0], '>= 0'),
                                            ([float('nan'), 0.0], 'finite')])
def test_samplers_reject_bad_schedules(sigmas, expect):
    net = IdealGaussianDenoiser([0.0], 1.0)
    with pytest.raises(ValueError, match=expect):
        diffusion.sample_heun(net, torch.zeros(2, 1, dtype=torch.float64), sigmas)

#----------------------------------------------------------------------------
# Samplers on Gaussian data, where the probability-flow ODE is linear and known in closed form.

def _ode_factor(sigmas, s, heun):
    """Brute force: the discrete map of e = x - mu under dx/dsigma = (x - D) / sigma = e sigma / (s^2 + sigma^2),
    step by step in Python floats (Euler, or Heun without a correction on a step to 0)."""
    f = lambda q: q / (s * s + q * q)
    e = 1.0
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        pred = e * (1 + (b - a) * f(a))
        e = e + (b - a) / 2 * (e * f(a) + pred * f(b)) if heun and b > 0 else pred
    return e


def _affine_map(name, net, sigmas, dim):
    """(a, b) of x_final = a x_0 + b for a deterministic sampler with a linear denoiser (runs on 0 and e_1)."""
    x0 = torch.zeros(2, dim, dtype=torch.float64)
    x0[1, 0] = 1
    out, _ = run_sampler(name, net, x0, sigmas)
    return float(out[1, 0] - out[0, 0]), out[0]


@pytest.mark.parametrize('name', ['euler', 'heun'])
def test_deterministic_samplers_match_the_brute_force_recursion(name):
    mu, s = [1.5, -0.5, 0.25], 0.3
    net = IdealGaussianDenoiser(mu, s)
    sigmas = edm_sigma_schedule(12)
    a, b = _affine_map(name, net, sigmas, 3)
    a_ref = _ode_factor(sigmas.tolist(), s, heun=(name == 'heun'))
    assert a == pytest.approx(a_ref, rel=1e-10)
    np.testing.assert_allclose(b.numpy(), (1 - a_ref) * np.array(mu), rtol=1e-9)


def test_heun_is_second_order_and_far_more_accurate_than_euler():
    s = 0.5
    net = IdealGaussianDenoiser([0.0], s)
    exact = lambda sigmas: s / math.sqrt(s ** 2 + float(sigmas[0]) ** 2)  # the ODE's x(0) - mu per unit x(sigma_0) - mu
    err = {}
    for name in ('euler', 'heun'):
        for K in (35, 70):
            sigmas = edm_sigma_schedule(K)
            err[name, K] = abs(_affine_map(name, net, sigmas, 1)[0] / exact(sigmas) - 1)
    assert err['heun', 35] < err['euler', 35] / 5
    assert 3.3 < err['heun', 35] / err['heun', 70] < 4.7     # second order: halving the step quarters the error
    assert 1.7 < err['euler', 35] / err['euler', 70] < 2.3   # first order


@pytest.mark.parametrize('name, K, sigma_max, s, opts', [
    ('heun', 35, 80.0, 0.3, {}), ('heun', 70, 80.0, 0.3, dict(S_churn=20, S_min=0.05, S_max=10)),
    ('euler', 200, 80.0, 0.3, dict(S_churn=5))])
def test_samplers_land_on_the_gaussian(name, K, sigma_max, s, opts):
    mu = torch.tensor([1.5, -1.0])
    net = IdealGaussianDenoiser(mu, s)
    sigmas = edm_sigma_schedule(K, sigma_max=sigma_max)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(8000, 2, generator=gen, dtype=torch.float64) * sigmas[0]
    randn_like = lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype)
    x, _ = run_sampler(name, net, x0, sigmas, randn_like=randn_like, **opts)
    # x0 has mean 0, not mu: the exact flow leaves mean mu (1 - s / sqrt(s^2 + sigma_0^2)).
    mean_exact = mu * (1 - s / math.sqrt(s ** 2 + float(sigmas[0]) ** 2))
    np.testing.assert_allclose(x.mean(0).numpy(), mean_exact.numpy(), atol=0.015)
    np.testing.assert_allclose(x.std(0).numpy(), [s, s], rtol=0.035)


def test_langevin_lands_on_the_gaussian_as_its_variance_recursion_predicts():
    # With the ideal denoiser a step is e <- (1 - alpha / (s^2 + sigma^2)) e + sqrt(2 alpha) z for e = x - mu, so
    # Var e follows a scalar recursion; the final denoise multiplies e by s^2 / (s^2 + sigma_L^2).
    mu, s, n, r = torch.tensor([1.5, -1.0]), 1.0, 5, 0.5
    sigmas = edm_sigma_schedule(40, sigma_max=5.0)
    var = float(sigmas[0]) ** 2 + s * s                       # start from p_sigma0 = N(mu, s^2 + sigma0^2)
    for q in sigmas[:-1].tolist():
        alpha = r * q * q
        for _ in range(n):
            var = (1 - alpha / (s * s + q * q)) ** 2 * var + 2 * alpha
    var *= (s * s / (s * s + float(sigmas[-2]) ** 2)) ** 2
    assert var == pytest.approx(s * s, rel=0.12)              # close to the data's (annealing is not exact)
    gen = torch.Generator().manual_seed(0)
    x0 = mu + torch.randn(4000, 2, generator=gen, dtype=torch.float64) * math.sqrt(float(sigmas[0]) ** 2 + s * s)
    x, nfe = run_sampler('langevin', IdealGaussianDenoiser(mu, s), x0, sigmas, n_steps_each=n, step_scale=r,
                         randn_like=lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype))
    assert nfe == 40 * n + 1
    np.testing.assert_allclose(x.mean(0).numpy(), mu.numpy(), atol=0.06)
    np.testing.assert_allclose(x.var(0).numpy(), [var, var], rtol=0.07)


def test_churn_matches_a_brute_force_edm_loop():
    # EDM Algorithm 2 written out for scalars, with the same noise sequence: as NVlabs/edm's sampler, one draw per
    # step, multiplied by 0 where the level lies outside [S_min, S_max].
    mu, s = 0.7, 0.4
    net = IdealGaussianDenoiser([mu], s)
    sigmas = edm_sigma_schedule(8, sigma_max=20.0)
    S_churn, S_min, S_max, S_noise = 30.0, 0.01, 5.0, 1.007
    noise = torch.randn(8, 5, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    it = iter(noise)
    x0 = torch.linspace(-20, 20, 5, dtype=torch.float64)[:, None]
    out = diffusion.sample_heun(net, x0.clone(), sigmas, randn_like=lambda x: next(it), S_churn=S_churn, S_min=S_min,
                                S_max=S_max, S_noise=S_noise)
    D = lambda x, q: mu + s * s / (s * s + q * q) * (x - mu)
    sig, K = sigmas.tolist(), 8
    for j in range(5):
        x, k = float(x0[j, 0]), 0
        for i in range(K):
            t, t_next = sig[i], sig[i + 1]
            gamma = min(S_churn / K, math.sqrt(2) - 1) if S_min <= t <= S_max else 0
            t_hat = t * (1 + gamma)
            x = x + math.sqrt(t_hat ** 2 - t ** 2) * S_noise * float(noise[k, j, 0])
            k += 1
            d = (x - D(x, t_hat)) / t_hat
            x_next = x + (t_next - t_hat) * d
            if t_next > 0:
                x_next = x + (t_next - t_hat) * (d + (x_next - D(x_next, t_next)) / t_next) / 2
            x = x_next
        assert float(out[j, 0]) == pytest.approx(x, rel=1e-10, abs=1e-12)
    assert 0 < sum(S_min <= t <= S_max for t in sigmas.tolist()[:-1]) < 8  # draws both used and zero-multiplied


def test_langevin_step_and_final_denoise():
    # With zero noise, one level is x <- x + step_scale (D(x) - x); then D at the last level.
    mu, s = 0.5, 1.0
    net = IdealGaussianDenoiser([mu], s)
    x0 = torch.tensor([[3.0]], dtype=torch.float64)
    out = diffusion.sample_langevin(net, x0, [2.0, 0.0], randn_like=torch.zeros_like, step_scale=0.3)
    x1 = 3.0 + 0.3 * (mu + s * s / (s * s + 4) * (3.0 - mu) - 3.0)
    assert float(out) == pytest.approx(mu + s * s / (s * s + 4) * (x1 - mu), rel=1e-12)
    with pytest.raises(ValueError, match='step_scale'):
        diffusion.sample_langevin(net, x0, [2.0, 0.0], step_scale=2.5)

#----------------------------------------------------------------------------
# Network evaluations.

@pytest.mark.parametrize('name, ends_at_zero, opts, expect', [
    ('euler', True, {}, 7), ('heun', True, {}, 13), ('heun', False, {}, 12),
    ('euler', True, dict(S_churn=10), 7), ('heun', True, dict(S_churn=10), 13),
    ('langevin', True, {}, 8), ('langevin', True, dict(n_steps_each=3), 22),
    ('langevin', True, dict(denoise=False), 7), ('langevin', False, {}, 7)])
def test_nfe_is_counted_and_matches_the_formula(name, ends_at_zero, opts, expect):
    net = IdealGaussianDenoiser([0.0, 0.0], 0.5)
    sigmas = edm_sigma_schedule(7)
    if not ends_at_zero:
        sigmas = sigmas[:-1]                         # 6 steps between 7 positive levels
    x, nfe = run_sampler(name, net, torch.randn(3, 2, dtype=torch.float64) * sigmas[0], sigmas, **opts)
    assert nfe == expect == expected_nfe(name, sigmas, **opts)
    assert x.shape == (3, 2)


def test_run_sampler_rejects_unknown_names():
    with pytest.raises(ValueError, match='euler, heun, langevin'):
        run_sampler('dpm', IdealGaussianDenoiser([0.0], 1), torch.zeros(1, 1), edm_sigma_schedule(2))


def test_callback_sees_every_step():
    seen = []
    net = IdealGaussianDenoiser([0.0], 1.0)
    diffusion.sample_heun(net, torch.ones(2, 1, dtype=torch.float64), edm_sigma_schedule(5),
                          callback=lambda d: seen.append((d['i'], d['sigma_next'])))
    assert [i for i, _ in seen] == list(range(5)) and seen[-1][1] == 0


def test_samplers_drive_a_real_denoiser_on_images():
    torch.manual_seed(0)
    net = Denoiser([3, 8, 8], model_channels=8, num_blocks=1, attn_resolutions=[], channel_mult=[1, 2])
    net.eval()
    sigmas = diffusion.net_sigma_schedule(net, 3)
    x, nfe = run_sampler('heun', net, torch.randn(2, 3, 8, 8, dtype=torch.float64) * sigmas[0], sigmas)
    assert x.dtype == torch.float64 and x.shape == (2, 3, 8, 8) and nfe == 5 and torch.isfinite(x).all()

#----------------------------------------------------------------------------
# Losses: with the ideal denoiser of Gaussian data the expected loss is known.

def test_edm_loss_of_the_ideal_denoiser_is_one_at_every_sigma():
    # For y ~ N(0, sigma_data^2): E|D - y|^2 = sigma_data^2 sigma^2 / (sigma^2 + sigma_data^2) = 1 / weight.
    sd = 0.5
    seen = []

    class Recording(IdealGaussianDenoiser):
        def forward(self, x, sigma):
            seen.append(sigma.clone())
            return super().forward(x, sigma)

    rng = Rng(0)
    y = rng.randn([40000, 4]) * sd
    loss = diffusion_loss.EDMLoss(sigma_data=sd)(Recording([0.0] * 4, sd), y, rng)
    assert loss.shape == (40000,)
    assert float(loss.mean()) == pytest.approx(1.0, abs=0.02)
    logs = torch.cat(seen).log()
    assert float(logs.mean()) == pytest.approx(-1.2, abs=0.03) and float(logs.std()) == pytest.approx(1.2, abs=0.03)


@pytest.mark.parametrize('kind', ['vp', 've'])
def test_vp_and_ve_losses_of_the_ideal_denoiser_match_quadrature(kind):
    # Weight 1 / sigma^2: E loss = E_sigma[s^2 / (s^2 + sigma^2)] over the loss's law of sigma.
    s = 0.5
    rng = Rng(1)
    y = rng.randn([40000, 2]) * s
    net = IdealGaussianDenoiser([0.0, 0.0], s)
    if kind == 'vp':
        loss_fn = diffusion_loss.VPLoss()
        t = np.linspace(1e-5, 1, 200001)
        sig2 = np.exp(0.5 * 19.9 * t ** 2 + 0.1 * t) - 1
    else:
        loss_fn = diffusion_loss.VELoss()
        sig2 = np.exp(np.linspace(np.log(0.02), np.log(100), 200001)) ** 2
    expect = np.mean(s * s / (s * s + sig2))
    assert float(loss_fn(net, y, rng).mean()) == pytest.approx(expect, rel=0.03)


def test_losses_pickle_with_their_source():
    import pickle
    loss = pickle.loads(pickle.dumps(diffusion_loss.EDMLoss(P_mean=-1.0, sigma_data=0.3)))
    assert (loss.P_mean, loss.P_std, loss.sigma_data) == (-1.0, 1.2, 0.3)


def test_the_schedule_range_is_edms_clamped_to_the_network():
    class Net:
        def __init__(self, lo, hi):
            self.sigma_min, self.sigma_max = lo, hi
    # edm's EDMPrecond says 0 .. inf: the sampler's defaults 0.002 .. 80 apply (as in edm's edm_sampler).
    assert diffusion.sigma_range(Net(0, math.inf)) == (0.002, 80.0)
    assert diffusion.sigma_range(Net(0.0045, 152.0)) == (0.0045, 80.0)           # a VP network: sigma_max capped
    assert diffusion.sigma_range(Net(0, math.inf), 0.01, 500) == (0.01, 500.0)
    assert diffusion.sigma_range(Net(0.02, 100), 0.001, 500) == (0.02, 100.0)
    assert diffusion.sigma_range(object()) == (0.002, 80.0)                      # no range given: edm's
    s = diffusion.net_sigma_schedule(Net(0, math.inf), 5)
    torch.testing.assert_close(s, edm_sigma_schedule(5, 0.002, 80.0))
    with pytest.raises(ValueError, match='no noise levels left'):
        diffusion.sigma_range(Net(0.5, 1.0), 2.0)
