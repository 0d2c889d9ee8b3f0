"""metrics.distances against independent NumPy / SciPy computations on small samples."""

import numpy as np
import pytest
import scipy.optimize
import scipy.spatial.distance
import torch

from metrics import distances


def np_mmd2(a, b, widths):
    """Unbiased MMD^2 by a double loop over the pairs."""
    def k(x, y):
        return sum(np.exp(-np.sum((x - y) ** 2) / (2 * w * w)) for w in widths)
    m, n = len(a), len(b)
    kaa = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kbb = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kab = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return kaa + kbb - 2 * kab


def np_sliced_w2(a, b, v):
    """Sliced W2 along the unit columns of v, each 1-D transport plan from an assignment solver."""
    total = 0.0
    for j in range(v.shape[1]):
        pa, pb = a @ v[:, j], b @ v[:, j]
        cost = (pa[:, None] - pb[None, :]) ** 2
        rows, cols = scipy.optimize.linear_sum_assignment(cost)
        total += cost[rows, cols].mean()
    return np.sqrt(total / v.shape[1])


def lower_median(values):
    # torch.median's convention (the lower of the two middle values for an even count).
    return sorted(values)[(len(values) - 1) // 2]


def np_median_nn(x, ref):
    return lower_median([min(np.linalg.norm(xi - r) for r in ref) for xi in x])


def np_median_pairwise(x):
    return lower_median([np.linalg.norm(x[i] - x[j]) for i in range(len(x)) for j in range(i + 1, len(x))])


def test_sliced_w2_matches_assignment_plans_along_the_same_directions():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(15, 5)), rng.normal(0.3, 1.5, size=(15, 5))
    # The default directions: 256 N(0, I) draws of a seeded torch.Generator, normalised.
    v = torch.randn(5, 256, generator=torch.Generator().manual_seed(3), dtype=torch.float64).numpy()
    v /= np.linalg.norm(v, axis=0, keepdims=True)
    assert distances.sliced_w2(a, b, seed=3) == pytest.approx(np_sliced_w2(a, b, v), rel=1e-10)
    # Explicit directions (not normalised by the caller); float32 torch input gives the same as float64 NumPy.
    w = rng.normal(size=(5, 7))
    expect = np_sliced_w2(a.astype(np.float32).astype(np.float64), b, w / np.linalg.norm(w, axis=0))
    assert distances.sliced_w2(torch.as_tensor(a, dtype=torch.float32), b, directions=w) == pytest.approx(expect, rel=1e-10)


def test_sliced_w2_of_a_shift_along_one_axis():
    # b = a + s e_0: every 1-D plan is the shift itself, so SW2^2 = mean over directions of (s v_0)^2 = s^2 / d
    # in expectation over uniform directions; with the directions given, exactly s^2 mean(v_0^2).
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 3))
    b = a + np.array([2.0, 0, 0])
    v = rng.normal(size=(3, 50))
    v /= np.linalg.norm(v, axis=0)
    assert distances.sliced_w2(a, b, directions=v) == pytest.approx(np.sqrt(4 * np.mean(v[0] ** 2)), rel=1e-12)
    assert distances.sliced_w2(a, a) == 0


def test_mmd2_matches_a_double_loop_and_does_not_depend_on_the_chunk():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(11, 4)), rng.normal(0.5, 1.0, size=(9, 4))
    expect = np_mmd2(a, b, (0.5, 2.0))
    for chunk in (1, 4, 2048):
        assert distances.mmd2(a, b, widths=(0.5, 2.0), chunk=chunk) == pytest.approx(expect, rel=1e-10)
    # Unbiased: two samples of one law give values on both sides of 0 across seeds, and the default widths work.
    values = [distances.mmd2(rng.normal(size=(20, 2)), rng.normal(size=(20, 2))) for _ in range(20)]
    assert min(values) < 0 < max(values)


def test_median_distances_match_brute_force():
    rng = np.random.default_rng(3)
    x, ref = rng.normal(size=(10, 6)), rng.normal(size=(7, 6))       # an even count: the lower median
    assert distances.median_nn_distance(x, ref) == pytest.approx(np_median_nn(x, ref), rel=1e-12)
    assert distances.median_nn_distance(x[:9], ref) == pytest.approx(
        np.median(scipy.spatial.distance.cdist(x[:9], ref).min(axis=1)), rel=1e-12)
    assert distances.median_pairwise_distance(x) == pytest.approx(np_median_pairwise(x), rel=1e-12)
    assert distances.median_pairwise_distance(x, max_items=4) == pytest.approx(np_median_pairwise(x[:4]), rel=1e-12)


@pytest.mark.parametrize('call, match', [
    (lambda: distances.sliced_w2(np.zeros((3, 2)), np.zeros((4, 2))), 'same size; got 3 and 4'),
    (lambda: distances.sliced_w2(np.zeros((3, 2)), np.zeros((3, 5))), 'same dimension d, got 2 and 5'),
    (lambda: distances.sliced_w2(np.zeros((3, 2)), np.zeros((3, 2)), directions=np.ones((3, 4))), r'\[d=2, P\]'),
    (lambda: distances.sliced_w2(np.zeros((3, 2)), np.zeros((3, 2)), directions=0), 'directions must be >= 1'),
    (lambda: distances.mmd2(np.zeros((1, 2)), np.zeros((3, 2))), 'at least 2 samples'),
    (lambda: distances.median_nn_distance(np.zeros(3), np.zeros((3, 1))), r'\[M, d\] matrix.*\[3\]'),
    (lambda: distances.median_pairwise_distance(np.zeros((1, 2))), 'at least 2 rows'),
])
def test_bad_input_is_refused_with_the_values(call, match):
    with pytest.raises(ValueError, match=match):
        call()
