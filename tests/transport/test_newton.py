"""The damped Newton solver (transport/newton.py) on clustered low-dimensional targets, checked against brute-force
cell masses (polygons clipped half-plane by half-plane, large Monte Carlo samples) and 1-D closed forms."""

import io
import math

import numpy as np
import pytest
import torch

from benchmarks.semidiscrete_lowdim import clustered_targets
from tests.transport.test_power_cells import polygon_cells, shoelace
from tests.transport.test_semidiscrete import closed_form_h_1d
from transport import semidiscrete as sd
from transport.newton import NewtonSolver, NewtonState


def mixture(N, d, std, seed, noise=0.14):
    """Targets of the issue's kind: tight clusters on a grid plus forward-diffusion noise (the benchmark's)."""
    return clustered_targets(N, d, std, noise, seed)


@pytest.mark.parametrize('std', [0.05, 0.005])
def test_2d_clusters_reach_equal_polygon_areas(std):
    y = mixture(300, 2, std, seed=0, noise=0.0 if std < 0.01 else 0.14).double()
    prob = sd.SemidiscreteProblem(y, 'uniform')
    out = NewtonSolver(tol=0.05)(prob, generator=torch.Generator().manual_seed(0))
    assert out.converged and out.num_iters <= 30, [r['max_rel_err'] for r in out.history]
    # Independent: every cell as a polygon, clipped by the 299 other half-planes and the unit square.
    g = prob.to_centred(out.h).numpy()
    areas = np.array([shoelace(p) for p in polygon_cells(prob._yc.numpy(), g, 0.5)])
    assert np.abs(300 * areas - 1).max() <= 1e-4 + 1e-9
    ev = sd.evaluate(prob, out.h, 300 * 1000, torch.Generator().manual_seed(3))
    assert ev['rms'] < 0.02 and ev['empty'] == 0 and ev['max_abs'] < 2 * ev['noise_floor']


@pytest.mark.parametrize('d,source', [(2, 'normal'), (3, 'uniform'), (3, 'normal')])
def test_clusters_reach_equal_masses_on_a_large_monte_carlo_sample(d, source):
    N = 120
    prob = sd.SemidiscreteProblem(mixture(N, d, 0.05, seed=d), source)
    out = NewtonSolver(tol=0.05)(prob, generator=torch.Generator().manual_seed(1))
    assert out.converged and out.history[-1]['check_rms'] is not None
    M = 2000 * N
    ev = sd.evaluate(prob, out.h, M, torch.Generator().manual_seed(4))
    # Every cell's count is within 4.5 binomial standard deviations of M / N.
    assert ev['max_abs'] <= 4.5 * math.sqrt(N / M) and ev['empty'] == 0, ev


@pytest.mark.parametrize('source', ['uniform', 'normal'])
def test_1d_matches_the_closed_form(source):
    y = (torch.rand(30, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 4 - 2).sort(dim=0).values
    out = NewtonSolver(tol=0.05, mass_tol=1e-9)(sd.SemidiscreteProblem(y, source))
    want = closed_form_h_1d(y, source)
    torch.testing.assert_close(out.h - out.h.mean(), want - want.mean(), rtol=0, atol=1e-8)


def test_resume_continues_exactly_and_the_state_round_trips():
    prob = sd.SemidiscreteProblem(mixture(200, 2, 0.05, seed=7), 'uniform')
    full = NewtonSolver()(prob, generator=torch.Generator().manual_seed(0))
    part = NewtonSolver(max_iters=2)(prob, generator=torch.Generator().manual_seed(0))
    assert not part.converged and part.num_iters == 2
    buf = io.BytesIO()
    torch.save(part.state, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    rest = NewtonSolver()(prob, resume=state)
    assert rest.converged and rest.num_iters == full.num_iters
    assert torch.equal(rest.h, full.h)
    assert NewtonState.from_dict(state).iter == 2
    with pytest.raises(ValueError, match="kind 'newton'"):
        NewtonSolver()(prob, resume=sd.SemidiscreteSolver(max_iters=1, tol=0)(prob).state)


def test_bad_input_is_refused_clearly():
    y = torch.randn(10, 2, generator=torch.Generator().manual_seed(8))
    y[7] = y[2]
    with pytest.raises(ValueError, match='targets 2 and 7 are identical'):
        NewtonSolver()(sd.SemidiscreteProblem(y))
    with pytest.raises(ValueError, match='d <= 3'):
        NewtonSolver()(sd.SemidiscreteProblem(torch.randn(10, 4)))
    prob = sd.SemidiscreteProblem(torch.randn(10, 2, generator=torch.Generator().manual_seed(9)))
    h0 = torch.zeros(10)
    h0[0] = -50.0                                                   # cell 0 empty
    with pytest.raises(ValueError, match='cells empty'):
        NewtonSolver()(prob, h0=h0)
    with pytest.raises(ValueError, match='mass_tol'):
        NewtonSolver(mass_tol=0)
