"""Distances between two samples, used by the benchmarks to score generated samples against fresh data.

- `sliced_w2`: sliced 2-Wasserstein distance (random unit directions, exact 1-D transport by sorting).
- `mmd2`: unbiased squared maximum mean discrepancy with a sum of RBF kernels.
- `median_nn_distance`: median distance from each sample to its nearest neighbour in a reference set; the
  benchmarks' copying measure is this distance to the training items behind the samples, divided by the same
  for fresh data (below 1: the samples sit closer to those training items than new data would).
- `median_pairwise_distance`: the median distance between distinct rows (the usual RBF width heuristic).

Inputs are [M, d] torch tensors or NumPy arrays (any float dtype; computed in float64 on the CPU or on the
tensor's device). Medians follow torch.median: the lower of the two middle values for an even count.
"""

import numbers

import torch

#----------------------------------------------------------------------------

def _as_rows(x, name):
    x = torch.as_tensor(x)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f'{name} must be a non-empty [M, d] matrix of samples, got shape {list(x.shape)}')
    return x.to(torch.float64)


def _check_dims(a, b, names):
    if a.shape[1] != b.shape[1]:
        raise ValueError(f'{names[0]} and {names[1]} must have the same dimension d, got {a.shape[1]} and '
                         f'{b.shape[1]}')


def random_directions(dim, num, seed=0):
    """[dim, num] float64 unit vectors, uniform on the sphere, from a torch.Generator seeded with `seed`."""
    v = torch.randn(dim, num, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return v / v.norm(dim=0, keepdim=True)


def sliced_w2(a, b, directions=256, seed=0):
    """Sliced W2: sqrt(mean over unit directions v of W2^2(<a, v>, <b, v>)), the 1-D W2 between the projected
    samples (equal weights: sort both and pair in order).

    Args:
        a, b: [M, d] samples of the same size M.
        directions: the number of random directions (random_directions(d, directions, seed)), or a [d, P]
            matrix whose columns are the directions (normalised here).
        seed: seed of the random directions.
    Returns:
        float.
    """
    a, b = _as_rows(a, 'a'), _as_rows(b, 'b')
    _check_dims(a, b, ('a', 'b'))
    if len(a) != len(b):
        raise ValueError(f'sliced_w2 compares samples of the same size; got {len(a)} and {len(b)} rows '
                         f'(subsample the larger one)')
    if isinstance(directions, numbers.Integral):
        if directions < 1:
            raise ValueError(f'directions must be >= 1, got {directions}')
        v = random_directions(a.shape[1], int(directions), seed)
    else:
        v = torch.as_tensor(directions).to(torch.float64)
        if v.ndim != 2 or v.shape[0] != a.shape[1]:
            raise ValueError(f'directions must be an int or a [d={a.shape[1]}, P] matrix, got shape '
                             f'{list(v.shape)}')
        v = v / v.norm(dim=0, keepdim=True)
    v = v.to(a.device)
    pa, pb = (a @ v).sort(dim=0)[0], (b @ v).sort(dim=0)[0]
    return float((pa - pb).square().mean().sqrt())


def mmd2(a, b, widths=(0.2, 1.0, 5.0), chunk=2048):
    """Unbiased MMD^2 between samples a [M, d] and b [N, d] (M, N >= 2) with the kernel
    k(x, y) = sum over w in `widths` of exp(-|x - y|^2 / (2 w^2)):
    mean_{i != j} k(a_i, a_j) + mean_{i != j} k(b_i, b_j) - 2 mean_{i, j} k(a_i, b_j).
    Rows are processed `chunk` at a time (memory chunk x max(M, N))."""
    a, b = _as_rows(a, 'a'), _as_rows(b, 'b')
    _check_dims(a, b, ('a', 'b'))
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f'mmd2 needs at least 2 samples on each side, got {len(a)} and {len(b)}')

    def kernel_sum(x, y, same):
        total = 0.0
        for i in range(0, len(x), chunk):
            d2 = torch.cdist(x[i:i + chunk], y).square()
            k = sum(torch.exp(-d2 / (2 * w * w)) for w in widths)
            if same:  # leave out the diagonal
                idx = torch.arange(i, min(i + chunk, len(x)))
                k[idx - i, idx] = 0
            total += float(k.sum())
        return total

    m, n = len(a), len(b)
    return (kernel_sum(a, a, True) / (m * (m - 1)) + kernel_sum(b, b, True) / (n * (n - 1))
            - 2 * kernel_sum(a, b, False) / (m * n))


def median_nn_distance(x, ref):
    """Median over the rows of x [M, d] of the Euclidean distance to the nearest row of ref [N, d]."""
    x, ref = _as_rows(x, 'x'), _as_rows(ref, 'ref')
    _check_dims(x, ref, ('x', 'ref'))
    return float(torch.cdist(x, ref).min(dim=1).values.median())


def median_pairwise_distance(x, max_items=1000):
    """Median Euclidean distance between distinct rows of x [M, d] (its first `max_items` rows, M >= 2)."""
    x = _as_rows(x, 'x')[:max_items]
    if len(x) < 2:
        raise ValueError(f'median_pairwise_distance needs at least 2 rows, got {len(x)}')
    d = torch.cdist(x, x)
    i, j = torch.triu_indices(len(x), len(x), offset=1)
    return float(d[i, j].median())
