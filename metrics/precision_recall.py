"""Improved precision and recall (Kynkaanniemi et al. 2019), as used by the DPM-OT paper.

Each feature set spans a manifold: the union of balls centred at its points, the radius of each ball
being the distance to the point's k-th nearest neighbour in the same set (the point itself excluded).
Precision = fraction of generated features inside the real manifold; recall = fraction of real features
inside the generated manifold.

Distances are computed in [row_chunk x col_chunk] blocks (squared, via |a|^2 + |b|^2 - 2 a.b after
centring on the manifold's mean), and k-NN radii are kept as a running top-(k+1) across column blocks,
so memory stays O(chunk^2) and 50k x 50k sets fit. Under torch.distributed, row blocks are split across
ranks (every rank must hold all features) and the results are gathered, so every rank returns the same.
"""

import torch

from torch_utils import distributed as dist_utils

#----------------------------------------------------------------------------

def _prepare(features, name, device, dtype):
    features = torch.as_tensor(features)
    if features.ndim != 2:
        raise ValueError(f'{name} must be a [N, D] feature matrix, got shape {list(features.shape)}')
    device = features.device if device is None else torch.device(device)
    return features.to(device, dtype)


def _sq_dist(a, b):
    """Squared Euclidean distances [len(a), len(b)], clamped at 0."""
    d2 = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2 * (a @ b.T)
    return d2.clamp_min_(0)


def _chunks(n, chunk_size):
    return [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def _distributed_over_row_chunks(num_rows, row_chunk, fn):
    """Call fn(start, stop) on this rank's share of row chunks; return all results concatenated in order."""
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    chunks = _chunks(num_rows, row_chunk)
    mine = {i: fn(*chunks[i]).cpu() for i in range(rank, len(chunks), world)}
    results = {}
    for part in dist_utils.all_gather_object(mine):
        results.update(part)
    return torch.cat([results[i] for i in range(len(chunks))]) if chunks else torch.zeros([0])


def compute_knn_radii(features, k=3, row_chunk=4096, col_chunk=4096, device=None, dtype=torch.float32):
    """Distance from each feature vector to its k-th nearest neighbour in the same set (itself excluded).

    Args:
        features: [N, D] tensor or array, N > k.
        k: neighbourhood size (3 in Kynkaanniemi et al.).
        row_chunk, col_chunk: block size of the distance matrix.
        device, dtype: where and in which precision to compute (default: the features' device, float32).
    Returns:
        float tensor [N] on the CPU (`dtype`).
    """
    x = _prepare(features, 'features', device, dtype)
    n = x.shape[0]
    if n <= k:
        raise ValueError(f'k-NN radii with k={k} need more than {k} features, got {n}')
    x = x - x.mean(dim=0) # Centring reduces cancellation in |a|^2 + |b|^2 - 2 a.b.
    col_blocks = _chunks(n, col_chunk)

    def radii_of_rows(start, stop):
        # Running k+1 smallest squared distances; the (k+1)-th skips the point itself (distance 0).
        best = torch.full([stop - start, k + 1], float('inf'), device=x.device, dtype=x.dtype)
        for c0, c1 in col_blocks:
            both = torch.cat([best, _sq_dist(x[start:stop], x[c0:c1])], dim=1)
            best = torch.topk(both, k + 1, dim=1, largest=False, sorted=True).values
        return best[:, k].sqrt()
    return _distributed_over_row_chunks(n, row_chunk, radii_of_rows)


def manifold_membership(queries, manifold, radii, row_chunk=4096, col_chunk=4096, device=None, dtype=torch.float32):
    """For each query, whether it lies in some ball |q - m_j| <= radii_j of the manifold points m_j.

    Args:
        queries: [M, D]; manifold: [N, D]; radii: [N] (from compute_knn_radii(manifold)).
        row_chunk, col_chunk, device, dtype: as in compute_knn_radii.
    Returns:
        bool tensor [M] on the CPU.
    """
    q = _prepare(queries, 'queries', device, dtype)
    m = _prepare(manifold, 'manifold', q.device, dtype)
    r2 = torch.as_tensor(radii).to(q.device, dtype).square()
    if q.shape[1] != m.shape[1]:
        raise ValueError(f'queries have {q.shape[1]} dimensions but the manifold has {m.shape[1]}')
    if r2.shape != (m.shape[0],):
        raise ValueError(f'radii must have one entry per manifold point ({m.shape[0]}), got shape {list(r2.shape)}')
    shift = m.mean(dim=0)
    q, m = q - shift, m - shift
    col_blocks = _chunks(m.shape[0], col_chunk)

    def members_of_rows(start, stop):
        inside = torch.zeros([stop - start], dtype=torch.bool, device=q.device)
        for c0, c1 in col_blocks:
            inside |= (_sq_dist(q[start:stop], m[c0:c1]) <= r2[c0:c1]).any(dim=1)
            if bool(inside.all()):
                break
        return inside
    return _distributed_over_row_chunks(q.shape[0], row_chunk, members_of_rows).to(torch.bool)


def compute_precision_recall(real_features, gen_features, k=3, row_chunk=4096, col_chunk=4096, device=None,
                             dtype=torch.float32):
    """Improved precision and recall of generated features against real ones.

    Args:
        real_features: [N, D] detector features of reference images.
        gen_features: [M, D] detector features of generated images.
        k: neighbourhood size (3).
        row_chunk, col_chunk, device, dtype: as in compute_knn_radii.
    Returns:
        (precision, recall) as Python floats in [0, 1].
    """
    opts = dict(row_chunk=row_chunk, col_chunk=col_chunk, device=device, dtype=dtype)
    real_radii = compute_knn_radii(real_features, k=k, **opts)
    gen_radii = compute_knn_radii(gen_features, k=k, **opts)
    precision = manifold_membership(gen_features, real_features, real_radii, **opts).to(torch.float64).mean()
    recall = manifold_membership(real_features, gen_features, gen_radii, **opts).to(torch.float64).mean()
    return float(precision), float(recall)

#----------------------------------------------------------------------------
