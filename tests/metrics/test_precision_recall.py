"""Improved precision/recall against a brute-force computation with explicit loops over the pairs."""

import numpy as np
import pytest
import torch

from metrics import precision_recall as pr_lib

#----------------------------------------------------------------------------



def brute_force_radii(x, k):
    """k-th nearest-neighbour distance of each row of x, itself excluded, by sorting all distances."""
    n = len(x)
    radii = np.empty(n)
    for i in range(n):
        d = np.sqrt(((x - x[i]) ** 2).sum(axis=1))
        d = np.delete(d, i)
        radii[i] = np.sort(d)[k - 1]
    return radii


def brute_force_membership(queries, manifold, radii):
    out = np.zeros(len(queries), dtype=bool)
    for i, q in enumerate(queries):
        for j, m in enumerate(manifold):
            if np.sqrt(((q - m) ** 2).sum()) <= radii[j]:
                out[i] = True
                break
    return out


def brute_force_precision_recall(real, gen, k):
    precision = brute_force_membership(gen, real, brute_force_radii(real, k)).mean()
    recall = brute_force_membership(real, gen, brute_force_radii(gen, k)).mean()
    return precision, recall


def make_sets(seed, n_real, n_gen, d, shift):
    rng = np.random.default_rng(seed)
    real = rng.standard_normal([n_real, d])
    gen = rng.standard_normal([n_gen, d]) * 1.3 + shift # Partly overlapping: precision, recall in (0, 1).
    return real, gen

#----------------------------------------------------------------------------

@pytest.mark.parametrize('k', [1, 3, 5])
def test_knn_radii_match_brute_force_with_small_chunks(k):
    real, _ = make_sets(0, 53, 1, 6, 0)
    want = brute_force_radii(real, k)
    for row_chunk, col_chunk in [(4096, 4096), (7, 5), (1, 53), (53, 1), (10, 4)]:
        got = pr_lib.compute_knn_radii(real, k=k, row_chunk=row_chunk, col_chunk=col_chunk, dtype=torch.float64)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    got32 = pr_lib.compute_knn_radii(torch.from_numpy(real).float(), k=k, row_chunk=8, col_chunk=16)
    np.testing.assert_allclose(got32.numpy(), want, rtol=1e-4)


@pytest.mark.parametrize('seed,shift', [(1, 0.5), (2, 1.5), (3, 0.0)])
def test_precision_recall_match_brute_force(seed, shift):
    real, gen = make_sets(seed, 120, 90, 8, shift)
    want = brute_force_precision_recall(real, gen, k=3)
    assert 0 < want[0] < 1 or 0 < want[1] < 1 # The sets are not trivially separated or identical.
    for chunk in [(4096, 4096), (16, 7), (5, 33)]:
        got = pr_lib.compute_precision_recall(real, gen, k=3, row_chunk=chunk[0], col_chunk=chunk[1], dtype=torch.float64)
        assert got == pytest.approx(want, abs=1e-12)
    got32 = pr_lib.compute_precision_recall(torch.from_numpy(real).float(), torch.from_numpy(gen).float(),
                                            k=3, row_chunk=32, col_chunk=17)
    assert got32 == pytest.approx(want, abs=1 / 90 + 1e-9) # At most one point flips in float32.


def test_membership_counts_ball_boundary_as_inside():
    manifold = np.array([[0.0, 0.0], [10.0, 0.0]])
    radii = np.array([1.0, 2.0])
    queries = np.array([[1.0, 0.0], [1.5, 0.0], [8.0, 0.0], [7.9, 0.0], [5.0, 5.0]])
    got = pr_lib.manifold_membership(queries, manifold, radii, row_chunk=2, col_chunk=1, dtype=torch.float64)
    assert got.tolist() == [True, False, True, False, False]


def test_identical_sets_have_full_precision_and_recall():
    real, _ = make_sets(4, 40, 1, 5, 0)
    assert pr_lib.compute_precision_recall(real, real.copy(), k=3, row_chunk=9, col_chunk=11) == (1.0, 1.0)


def test_precision_recall_errors():
    with pytest.raises(ValueError, match='k=3 need more than 3 features, got 3'):
        pr_lib.compute_knn_radii(np.zeros([3, 2]))
    with pytest.raises(ValueError, match=r'\[N, D\].*\[5\]'):
        pr_lib.compute_knn_radii(np.zeros([5]))
    with pytest.raises(ValueError, match='4 dimensions but the manifold has 3'):
        pr_lib.manifold_membership(np.zeros([2, 4]), np.zeros([5, 3]), np.ones(5))
    with pytest.raises(ValueError, match=r'one entry per manifold point \(5\)'):
        pr_lib.manifold_membership(np.zeros([2, 3]), np.zeros([5, 3]), np.ones(4))

#----------------------------------------------------------------------------
