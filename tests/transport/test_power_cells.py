"""Exact cell masses (transport/power_cells.py) against brute force: polygons clipped half-plane by half-plane,
polyhedra from scipy's halfspace intersection, a 1-D quantile grid, large Monte Carlo samples and finite
differences."""

import math

import numpy as np
import pytest
import scipy.optimize
import scipy.spatial
import scipy.special

from transport import power_cells as pc

#----------------------------------------------------------------------------
# Independent references.

def clip_polygon(poly, a, b):
    """Sutherland-Hodgman: the part of the polygon (rows of vertices) where <x, a> <= b."""
    out = []
    n = len(poly)
    for k in range(n):
        p, q = poly[k], poly[(k + 1) % n]
        fp, fq = p @ a - b, q @ a - b
        if fp <= 0:
            out.append(p)
        if fp * fq < 0:
            out.append(p + fp / (fp - fq) * (q - p))
    return np.array(out) if out else np.zeros((0, 2))


def polygon_cells(y, g, half):
    """Every cell {x : <x, y_i> + g_i >= <x, y_j> + g_j for all j} clipped to [-half, half]^2, as polygons."""
    box = np.array([[-half, -half], [half, -half], [half, half], [-half, half]], dtype=np.float64)
    cells = []
    for i in range(len(y)):
        poly = box
        for j in range(len(y)):
            if j != i and len(poly):
                poly = clip_polygon(poly, y[j] - y[i], g[i] - g[j])
        cells.append(poly)
    return cells


def shoelace(poly):
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(x @ np.roll(y, -1) - y @ np.roll(x, -1)))


def polyhedron_volume(y, g, i, half=0.5):
    """Volume of cell i clipped to the cube, from scipy's halfspace intersection (an interior point by LP)."""
    A = [y[j] - y[i] for j in range(len(y)) if j != i]
    b = [g[i] - g[j] for j in range(len(y)) if j != i]
    for k in range(3):
        e = np.zeros(3)
        e[k] = 1
        A += [e, -e]
        b += [half, half]
    A, b = np.array(A), np.array(b)
    norms = np.linalg.norm(A, axis=1)
    # Chebyshev centre: max r subject to A x + r |A_k| <= b.
    res = scipy.optimize.linprog(c=[0, 0, 0, -1], A_ub=np.c_[A, norms], b_ub=b, bounds=[(None, None)] * 3 + [(0, None)])
    if res.status != 0 or res.x[3] < 1e-9:
        return 0.0
    hs = scipy.spatial.HalfspaceIntersection(np.c_[A, -b], res.x[:3])
    return scipy.spatial.ConvexHull(hs.intersections).volume


def random_problem(N, d, seed, spread=1.0, heights=0.3):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((N, d)) * spread
    return y - y.mean(axis=0), heights * rng.standard_normal(N)


def monte_carlo_masses(y, g, source, M, seed):
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(y))
    for _ in range(M // 500_000):
        x = rng.random((500_000, y.shape[1])) - 0.5 if source == 'uniform' else rng.standard_normal((500_000, y.shape[1]))
        counts += np.bincount(np.argmax(x @ y.T + g, axis=1), minlength=len(y))
    return counts / (M // 500_000 * 500_000)

#----------------------------------------------------------------------------

def test_polygon_areas_match_clipped_polygons():
    for seed in range(3):
        y, g = random_problem(40, 2, seed, heights=0.02)
        g += -0.05 * (y * y).sum(axis=1)            # near-Voronoi cells, most inside the box ...
        g[:4] -= 1.0                                # ... and some empty ones
        cells = pc.cell_masses(y, g, 'uniform')
        want = np.array([shoelace(p) for p in polygon_cells(y, g, 0.5)])
        np.testing.assert_allclose(cells.masses, want, rtol=0, atol=1e-12)
        assert (want == 0).sum() >= 4 and (want > 0).sum() >= 20          # both kinds of cells occur


def test_polyhedron_volumes_match_halfspace_intersections():
    y, g = random_problem(25, 3, 4)
    cells = pc.cell_masses(y, g, 'uniform')
    want = np.array([polyhedron_volume(y, g, i) for i in range(len(y))])
    np.testing.assert_allclose(cells.masses, want, rtol=0, atol=1e-10)
    assert (want > 0).sum() > 5 and abs(cells.masses.sum() - 1) < 1e-12


@pytest.mark.parametrize('source', ['uniform', 'normal'])
def test_one_dimensional_masses_match_a_quantile_grid(source):
    y, g = random_problem(12, 1, 5, heights=0.2)
    K = 1_000_000
    q = (np.arange(K) + 0.5) / K
    x = q - 0.5 if source == 'uniform' else math.sqrt(2) * scipy.special.erfinv(2 * q - 1)
    want = np.bincount(np.argmax(x[:, None] * y[:, 0] + g, axis=1), minlength=12) / K
    np.testing.assert_allclose(pc.cell_masses(y, g, source).masses, want, rtol=0, atol=3 * 12 / K)


@pytest.mark.parametrize('d,source', [(2, 'normal'), (3, 'normal'), (3, 'uniform')])
def test_masses_match_a_large_monte_carlo_sample(d, source):
    y, g = random_problem(30, d, 6 + d)
    cells = pc.cell_masses(y, g, source)
    M = 4_000_000
    mc = monte_carlo_masses(y, g, source, M, seed=d)
    se = np.sqrt(np.maximum(cells.masses, 1 / M) * (1 - cells.masses) / M)
    assert np.all(np.abs(cells.masses - mc) <= 4.5 * se), np.abs(cells.masses - mc) / se
    assert abs(cells.masses.sum() - 1) < 1e-12


@pytest.mark.parametrize('d,source', [(1, 'uniform'), (1, 'normal'), (2, 'uniform'), (2, 'normal'),
                                      (3, 'uniform'), (3, 'normal')])
def test_jacobian_matches_finite_differences(d, source):
    y, g = random_problem(20, d, 10 + d)
    cells = pc.cell_masses(y, g, source)
    H = cells.hessian.toarray()
    assert np.allclose(H, H.T) and (H >= 0).all()
    J = np.diag(H.sum(axis=1)) - H
    eps = 1e-6
    for j in np.flatnonzero(cells.masses > 0)[:6]:
        e = np.zeros(len(g))
        e[j] = eps
        fd = (pc.cell_masses(y, g + e, source, hessian=False).masses
              - pc.cell_masses(y, g - e, source, hessian=False).masses) / (2 * eps)
        np.testing.assert_allclose(fd, J[:, j], rtol=0, atol=1e-6 * np.abs(J).max())


def test_mirrors_of_an_earlier_call_give_the_same_masses():
    y, g = random_problem(300, 2, 20)
    first = pc.cell_masses(y, g, 'uniform')
    assert 0 < first.mirrors.sum() < first.mirrors.size      # only cells at the boundary were mirrored
    again = pc.cell_masses(y, g * 1.01, 'uniform', mirrors=first.mirrors)
    fresh = pc.cell_masses(y, g * 1.01, 'uniform')
    np.testing.assert_allclose(again.masses, fresh.masses, rtol=0, atol=1e-14)
    every = pc.cell_masses(y, g * 1.01, 'uniform', mirrors=np.ones_like(first.mirrors))
    np.testing.assert_allclose(every.masses, fresh.masses, rtol=0, atol=1e-14)


def test_collinear_targets_and_a_single_target():
    y = np.c_[np.linspace(-1, 1, 7), np.zeros(7)]                 # all on a line in the plane
    cells = pc.cell_masses(y, np.zeros(7), 'uniform')
    want = np.array([shoelace(p) for p in polygon_cells(y, np.zeros(7), 0.5)])
    np.testing.assert_allclose(cells.masses, want, atol=1e-12)
    one = pc.cell_masses(np.zeros((1, 3)), np.zeros(1), 'normal')
    assert abs(one.masses[0] - 1) < 1e-12


def test_duplicate_rows_are_found():
    y = np.array([[0.0, 1.0], [2.0, 3.0], [0.5, 1.0], [2.0, 3.0]])
    assert pc.duplicate_rows(y) == (1, 3)
    assert pc.duplicate_rows(y[:3]) is None
