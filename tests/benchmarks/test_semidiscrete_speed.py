"""The lower bound on the reference algorithm's iterations in benchmarks/semidiscrete_speed.py, checked against
brute-force Adam runs, the reference implementation itself and a solved problem. The benchmark (minutes to
hours) is not run here."""

import math

import numpy as np
import torch

from benchmarks import semidiscrete_speed as bench
from transport import semidiscrete as sd


def _adam_ratios(grads, beta1=0.9, beta2=0.999):
    """|m_t| / sqrt(v_t) of Adam without bias correction, step by step, in float64 NumPy."""
    m = v = 0.0
    out = []
    for g in grads:
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        out.append(abs(m) / math.sqrt(v) if v > 0 else 0.0)
    return np.array(out)


def test_adam_step_bound_holds_for_any_gradients_and_is_reached():
    T = 400
    bound = np.array([bench.adam_step_bound(t) for t in range(1, T + 1)])
    assert math.isclose(bound[0], 0.1 / math.sqrt(0.001))       # t = 1: |m| / sqrt(v) = 0.1 / sqrt(0.001)
    rng = np.random.default_rng(0)
    worst = np.zeros(T)
    sequences = [rng.standard_normal(T), rng.exponential(size=T), np.ones(T), -np.ones(T),
                 1.1 ** np.arange(T), 1.05 ** np.arange(T), 1.2 ** np.arange(T)]
    sequences += [rng.standard_normal(T) * np.exp(rng.uniform(-5, 5, T)) for _ in range(200)]
    sequences += [np.cumprod(rng.uniform(0.8, 1.3, T)) for _ in range(200)]
    for grads in sequences:
        worst = np.maximum(worst, _adam_ratios(grads))
    assert np.all(worst <= bound * (1 + 1e-12))
    # Gradients growing by beta1 / beta2 per step meet the Cauchy-Schwarz bound: it is not loose.
    tight = _adam_ratios((0.9 / 0.999) ** -np.arange(T, dtype=np.float64))
    np.testing.assert_allclose(tight[-1], bound[-1], rtol=1e-6)
    assert abs(bound[-1] - 7.27) < 0.01


def _bright_targets(N=200, d=48, seed=0):
    # Image-like targets with per-target brightness offsets: <1/2, y_i> spreads over ~d / 2, so the bound
    # is far from 0 (a test of a bound of 0 would prove nothing).
    gen = torch.Generator().manual_seed(seed)
    y = torch.rand(N, d, generator=gen) * 0.6 - 0.3 + torch.linspace(-1, 1, N)[:, None]
    return y[torch.randperm(N, generator=gen)]


def test_accurate_heights_respect_the_required_change():
    y = _bright_targets()
    need, theta = bench.required_height_change(y, 0.05)
    assert need > 10 and theta is not None
    prob = sd.SemidiscreteProblem(y, 'uniform')
    out = sd.SemidiscreteSolver(max_iters=400, tol=0.03)(prob, generator=torch.Generator().manual_seed(0))
    ev = sd.evaluate(prob, out.h, 400 * y.shape[0], torch.Generator().manual_seed(7))
    assert ev['rms'] <= 0.05 and ev['empty'] == 0
    assert float(out.h.max() - out.h.min()) >= need
    # The concentration step on its own: every cell of mass >= theta / N is within kappa |y_i - y_j| of the
    # others in centred heights (checked over all pairs of such cells, masses from the evaluation).
    g = out.h.double() + 0.5 * y.double().sum(1)
    kappa = math.sqrt(math.log(y.shape[0] / theta) / 6)
    big = (ev['counts'].double() / ev['num_samples'] * y.shape[0] >= 1.5 * theta).nonzero().squeeze(1)
    diff = (g[big][:, None] - g[big][None, :]).abs()
    assert bool((diff <= kappa * torch.cdist(y[big].double(), y[big].double()) + 1e-9).all())


def test_reference_cannot_be_accurate_before_the_bound():
    y = _bright_targets()
    T, need, _ = bench.reference_min_iterations(y, 0.05)
    moved = sum(2 * 0.1 * bench.adam_step_bound(t) for t in range(1, T))
    assert moved < need <= moved + 2 * 0.1 * bench.adam_step_bound(T)
    ref = bench.ReferenceSolver(y, bat_size_sr=500, seed=0)
    prob = sd.SemidiscreteProblem(y, 'uniform')
    for t in range(1, T):
        ref.step()
        spread = float(ref.h.max() - ref.h.min())
        assert spread <= sum(2 * 0.1 * bench.adam_step_bound(s) for s in range(1, t + 1)) + 1e-3
    assert float(ref.h.max() - ref.h.min()) < need
    ev = sd.evaluate(prob, ref.h, 100 * y.shape[0], torch.Generator().manual_seed(7))
    assert ev['rms'] > 0.05
