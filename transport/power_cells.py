"""Exact cells of semi-discrete OT in dimension d = 1, 2, 3: their masses and the masses' derivatives.

In the centred coordinates of SemidiscreteProblem (x - E[x] and y_i - ybar), the cell of target i is
    W_i = {x : <x, y_i> + g_i >= <x, y_j> + g_j for all j},
a convex polytope: the cell of site s_i = t y_i with weight w_i = |s_i|^2 + 2 t g_i in the power diagram
(|x - s_i|^2 - w_i = |x|^2 - 2 t (<x, y_i> + g_i), so the least power distance is the best score), for any
t > 0. Power cells come from the regular triangulation: the lower convex hull of the lifted points
(s_i, |s_i|^2 - w_i) = (s_i, -2 t g_i), computed by qhull (scipy.spatial.ConvexHull). The points of a lower
facet with plane z = <a, s> + b share the power vertex x = a / 2; the face between cells i and j is dual to
the hull edge (i, j) (d = 2, 3: the polygon or segment through the power vertices of the facets around that
edge) or is the facet (i, j) itself (d = 1: a point).

Clipping by mirrors. The source's support is the box B = [-1/2, 1/2]^d ('uniform', centred) or, for
'normal', B = [-R, R]^d with R = NORMAL_BOX = 8 (outside lies mass < 2 d Phi(-8) < 4e-15, ignored). t puts
every site inside B, and every site is mirrored across each of B's 2 d faces with its weight. For x in B a
mirror never beats its original (x is on the original's side of the mirror plane), and an x beyond face k
of B loses to i's own mirror across k. So in the diagram of sites and mirrors the cell of an original site
is exactly W_i ∩ B: every cell is a bounded polytope, and its faces towards mirrors lie on B's boundary.

Masses, from the faces F of a cell (outward unit normal n, <x, n> = p on F):
    'uniform':  |W_i ∩ B| = (1/d) sum_F p |F|                     (divergence theorem about the origin)
    'normal':   mu(W_i) = sum_F sign(p) C(F)                        (signed cones from the origin)
with C(F) the Gaussian mass of the cone {r x : x in F, 0 <= r <= 1}:
    d = 1:  Phi(|p|) - 1/2.
    d = 2:  F the segment u in [u0, u1] of its line, u measured from the foot of the perpendicular from 0:
            (atan(u1/q) - atan(u0/q)) / 2 pi - T(q, u1/q) + T(q, u0/q), q = |p|, T Owen's T function.
    d = 3:  in polar coordinates about the foot point of the face's plane (distance delta = |p|), the
            radial integral is closed-form: the cone over the disc of radius r holds k(r) =
            delta / (4 pi) int_delta^S G(s) / s^2 ds with S^2 = delta^2 + r^2, G the chi_3 CDF, and
            int G(s)/s^2 ds = -G(s)/s - sqrt(2/pi) exp(-s^2/2). C(F) is then a sum over the polygon's
            edges e (distance q_e from the foot point, along-edge coordinate u) of
            sign(q_e) int_{u0}^{u1} |q_e| k(r) / r^2 du, r^2 = q_e^2 + u^2, integrated by Gauss-Legendre
            (6 nodes on pieces of length <= 1; the integrand is analytic in u, and the rule agrees with 16 nodes on
            pieces of 1/2 to 3e-12).
Derivatives: d mu_i / d g_j = -rho(F_ij) / |y_i - y_j| for j != i (the face moves at speed 1 / |y_i - y_j|)
and d mu_i / d g_i = sum_{j != i} rho(F_ij) / |y_i - y_j|, where rho(F) is the source's mass on F (its
(d-1)-volume for 'uniform'; phi(p) times the 2-D Gaussian mass of F about the foot point, by the same
formula as C above, for 'normal' in d = 3; phi(p) (Phi(u1) - Phi(u0)) in d = 2; phi(x) in d = 1).
"""

import dataclasses
import math
from typing import Optional

import numpy as np
import scipy.sparse
import scipy.spatial
import scipy.special

NORMAL_BOX = 8.0
MAX_DIM = 3
_GL_X, _GL_W = np.polynomial.legendre.leggauss(6)
_PIECE = 1.0                    # longest edge piece per Gauss-Legendre rule (d = 3, 'normal')


class CellGeometryError(ValueError):
    """The exact cells cannot be computed (qhull failed, or the diagram is degenerate)."""


def box_half_width(source):
    """Half-width of the box that carries the source's mass (centred coordinates)."""
    return 0.5 if source == 'uniform' else NORMAL_BOX


def duplicate_rows(y):
    """Indices (i, j), i < j, of the first pair of identical rows of y [N, d], or None."""
    y = np.asarray(y)
    order = np.lexsort(y.T[::-1])
    same = np.all(y[order[1:]] == y[order[:-1]], axis=1)
    if not same.any():
        return None
    k = int(np.argmax(same))
    i, j = sorted((int(order[k]), int(order[k + 1])))
    return i, j


@dataclasses.dataclass(frozen=True, eq=False)
class Cells:
    """Result of cell_masses: masses [N], hessian (csr [N, N] or None) and the mirrors used ([2 d, N] bool)."""
    masses: np.ndarray
    hessian: Optional[scipy.sparse.csr_matrix]
    mirrors: np.ndarray


def cell_masses(yc, g, source, hessian=True, mirrors=None):
    """Exact source masses of the cells of centred targets yc with centred heights g.

    Args:
        yc: [N, d] float64 array, d in 1..3, distinct rows (centred targets y_i - ybar).
        g: [N] float64 array of centred heights.
        source: 'uniform' (on the centred unit cube) or 'normal' (standard Gaussian).
        hessian: also compute the face weights.
        mirrors: optional [2 d, N] bool array of sites to mirror across face 2 k + (0: lower, 1: upper) of
            the box to start with (a previous call's Cells.mirrors: cells change little between calls).
    Returns:
        Cells: masses [N] float64; hessian, a symmetric scipy.sparse.csr_matrix [N, N] with
        H_ij = rho(F_ij) / |y_i - y_j| for adjacent cells (else 0), so that the Jacobian of the masses with
        respect to g is diag(H 1) - H (None when hessian=False); mirrors, the mirrors used.
    Raises:
        CellGeometryError when qhull fails on the lifted points.

    Only the mirrors of cells that reach the box's boundary matter (the others' cells lie inside the box,
    where mirrors never win), so they are added as needed: a pass computes the hull with the current
    mirrors, and every cell that is unbounded or has a power vertex beyond face k gets its mirror across k
    (all 2 d for an unbounded one) before the next pass. When no cell leaves the box, each cell is exactly
    W_i ∩ B (mirrors can only cut cells outside B).
    """
    yc, g = np.asarray(yc, dtype=np.float64), np.asarray(g, dtype=np.float64)
    N, d = yc.shape
    if not 1 <= d <= MAX_DIM:
        raise ValueError(f'exact cells are implemented for d = 1, 2, 3; got d = {d}')
    half = box_half_width(source)
    mask = np.zeros((2 * d, N), dtype=bool) if mirrors is None else np.array(mirrors, dtype=bool)
    for attempt in range(4 * d + 5):
        if attempt == 4 * d + 4:
            mask[:] = True           # a long cascade of additions: take every mirror (always enough)
        s, z, t = _lift(yc, g, half, mask)
        try:
            facets, verts = _lower_facets(s, z)
        except CellGeometryError:
            if mask.all():
                raise
            mask[:] = True           # too few points, or all in a hyperplane, without the mirrors
            continue
        need = _escaping(facets, verts, N, half) & ~mask
        if not need.any():
            break
        mask |= need
    faces = (_faces_1d, _faces_2d, _faces_3d)[d - 1](facets, verts, s, z, N, source)
    a, b, p = faces['a'], faces['b'], faces['p']
    contrib = p * faces['measure'] / d if source == 'uniform' else np.sign(p) * faces['cone']
    inner = b < N
    masses = np.bincount(a, weights=contrib, minlength=N) - np.bincount(b[inner], weights=contrib[inner],
                                                                       minlength=N)  # cell b: -n, -p
    if not hessian:
        return Cells(masses, None, mask)
    ia, ib = a[inner], b[inner]
    w = faces['weight'][inner] * t / np.linalg.norm(s[ia] - s[ib], axis=1)      # |y_i - y_j| = |s_i - s_j| / t
    H = scipy.sparse.coo_matrix((np.concatenate([w, w]), (np.concatenate([ia, ib]), np.concatenate([ib, ia]))),
                                shape=(N, N)).tocsr()
    return Cells(masses, H, mask)


def _lift(yc, g, half, mask):
    """Sites inside the box, the mirrors of `mask`, and the lifted heights z = |s|^2 - w (originals first)."""
    N, d = yc.shape
    reach = float(np.abs(yc).max())
    t = 0.5 * half / reach if reach > 0 else 1.0          # every site at most halfway to the box's faces
    s0 = t * yc
    z0 = -2.0 * t * g
    sites, heights = [s0], [z0]
    for k in range(d):
        for side, wall in enumerate((-half, half)):
            rows = np.flatnonzero(mask[2 * k + side])
            m = s0[rows].copy()
            m[:, k] = 2.0 * wall - m[:, k]
            sites.append(m)
            heights.append(z0[rows] + 4.0 * wall * (wall - s0[rows, k]))      # the same weight w
    return np.concatenate(sites), np.concatenate(heights), t


def _escaping(facets, verts, N, half):
    """[2 d, N] bool: original cells with a power vertex beyond each face of the box (all faces for cells
    with an unbounded face)."""
    lower, all_facets = facets
    d = verts.shape[1]
    tol = 1e-9 * half
    beyond = np.concatenate([np.stack([verts[:, k] < -half - tol, verts[:, k] > half + tol]) for k in range(d)])
    need = np.zeros((2 * d, N), dtype=bool)
    for c in range(lower.shape[1]):
        idx = lower[:, c]
        orig = idx < N
        for f in range(2 * d):
            hit = orig & beyond[f]
            need[f, idx[hit]] = True
    need[:, _unbounded(lower, all_facets, N)] = True
    return need


def _unbounded(lower, all_facets, N):
    """Original points on the silhouette of the lower hull (their cells are unbounded)."""
    if lower.shape[1] == 2:                                # d = 1: a bounded cell has two faces
        idx = lower.reshape(-1)
        deg = np.bincount(idx[idx < N], minlength=N)
        return np.flatnonzero(deg == 1)
    _, _, _, _, _, _, bad = _edge_groups(lower, all_facets, _PAIRS[lower.shape[1]], N, check=False)
    return bad


def _lower_facets(s, z):
    """(lower facets [F, d + 1] of point indices, their power vertices [F, d], all facets [F_all, d + 1])."""
    d = s.shape[1]
    try:
        hull = scipy.spatial.ConvexHull(np.concatenate([s, z[:, None]], axis=1))
    except scipy.spatial.QhullError as err:
        raise CellGeometryError(f'qhull failed on the lifted targets ({str(err).splitlines()[0]})') from None
    eq = hull.equations
    lower = eq[:, d] < -1e-12
    verts = -eq[lower, :d] / (2.0 * eq[lower, d:d + 1])        # x = a / 2 for the plane z = <a, s> + b
    return (hull.simplices[lower], hull.simplices), verts


def _face_frame(s, z, a, b):
    """Unit normals n (from site a towards b, outward for cell a) and offsets p = <x, n> of the faces."""
    diff = s[b] - s[a]
    length = np.linalg.norm(diff, axis=1)
    return diff / length[:, None], (z[b] - z[a]) / (2.0 * length)


def _cone2(q, u0, u1):
    """2-D standard Gaussian mass of the triangle (0, (q, u0), (q, u1)) in a frame where the segment lies on
    the line at distance q >= 0 from the origin; u0 <= u1. Owen's T gives it in closed form."""
    out = np.zeros_like(q)
    ok = q > 1e-300
    qq, a0, a1 = q[ok], u0[ok] / q[ok], u1[ok] / q[ok]
    out[ok] = ((np.arctan(a1) - np.arctan(a0)) / (2 * math.pi)
               - scipy.special.owens_t(qq, a1) + scipy.special.owens_t(qq, a0))
    return out


def _phi(x):
    return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _Phi(x):
    return 0.5 * scipy.special.erfc(-x / math.sqrt(2.0))


def _faces_1d(facets, verts, s, z, N, source):
    lower, _ = facets
    a, b = lower.min(axis=1), lower.max(axis=1)
    keep = a < N
    a, b, x = a[keep], b[keep], verts[keep, 0]
    n, p = _face_frame(s, z, a, b)
    measure = np.ones_like(p)
    if source == 'uniform':
        return dict(a=a, b=b, p=p, measure=measure, weight=measure, cone=None)
    return dict(a=a, b=b, p=p, measure=measure, weight=_phi(x), cone=_Phi(np.abs(p)) - 0.5)


_PAIRS = {3: np.array([[0, 1], [1, 2], [2, 0]]), 4: np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])}


def _edge_groups(lower, all_facets, pairs, N, check=True):
    """Edges (a < b, a original) of the lower facets, each with the lower facets around it.

    Returns (a [E], b [E], facet ids [K] sorted by edge, edge of each [K], first [E], counts [E], originals
    with an edge that also borders an upper facet (an unbounded face)); with check=True such an edge raises.
    """
    M = int(max(lower.max(), all_facets.max())) + 1

    def keys(simplices):
        e = simplices[:, pairs].astype(np.int64)                 # [F, P, 2]
        lo, hi = e.min(axis=2), e.max(axis=2)
        return lo * M + hi, lo

    k_low, lo_low = keys(lower)
    fid = np.repeat(np.arange(lower.shape[0]), len(pairs))
    k_low, lo_low = k_low.reshape(-1), lo_low.reshape(-1)
    keep = lo_low < N
    k_low, fid = k_low[keep], fid[keep]
    order = np.argsort(k_low, kind='stable')
    k_low, fid = k_low[order], fid[order]
    uniq, first, counts = np.unique(k_low, return_index=True, return_counts=True)
    k_all, lo_all = keys(all_facets)
    u_all, c_all = np.unique(k_all.reshape(-1)[lo_all.reshape(-1) < N], return_counts=True)
    open_edge = c_all[np.searchsorted(u_all, uniq)] != counts
    a, b = uniq // M, uniq % M
    bad = np.unique(np.concatenate([a[open_edge], b[open_edge][b[open_edge] < N]]))
    if check and bad.size:
        raise CellGeometryError('an original cell has an unbounded face (degenerate lifted hull)')
    return a, b, fid, np.repeat(np.arange(uniq.size), counts), first, counts, bad


def _faces_2d(facets, verts, s, z, N, source):
    lower, all_facets = facets
    a, b, fid, _, first, counts, _ = _edge_groups(lower, all_facets, _PAIRS[3], N)
    if not np.all(counts == 2):
        raise CellGeometryError('a hull edge borders more than two lower facets')
    v0, v1 = verts[fid[first]], verts[fid[first + 1]]
    n, p = _face_frame(s, z, a, b)
    length = np.linalg.norm(v1 - v0, axis=1)
    if source == 'uniform':
        return dict(a=a, b=b, p=p, measure=length, weight=length, cone=None)
    e = np.stack([-n[:, 1], n[:, 0]], axis=1)                    # along the face's line
    u0, u1 = (v0 * e).sum(axis=1), (v1 * e).sum(axis=1)
    lo, hi = np.minimum(u0, u1), np.maximum(u0, u1)
    cone = _cone2(np.abs(p), lo, hi)
    weight = _phi(p) * (_Phi(hi) - _Phi(lo))
    return dict(a=a, b=b, p=p, measure=length, weight=weight, cone=cone)


def _faces_3d(facets, verts, s, z, N, source):
    lower, all_facets = facets
    a, b, fid, group, first, counts, _ = _edge_groups(lower, all_facets, _PAIRS[4], N)
    n, p = _face_frame(s, z, a, b)
    # Order each face's vertices counter-clockwise about n: angles in a frame (e1, e2) with e1 x e2 = n.
    helper = np.where(np.abs(n[:, :1]) < 0.9, np.array([[1.0, 0, 0]]), np.array([[0, 1.0, 0]]))
    e1 = np.cross(n, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(n, e1)
    v = verts[fid]
    centre = np.add.reduceat(v, first, axis=0) / counts[:, None]
    rel = v - centre[group]
    angle = np.arctan2((rel * e2[group]).sum(axis=1), (rel * e1[group]).sum(axis=1))
    order = np.lexsort((angle, group))
    v, rel = v[order], rel[order]
    nxt = np.arange(v.shape[0]) + 1
    last = first + counts - 1
    nxt[last] = first
    area = 0.5 * np.bincount(group, weights=(np.cross(rel, rel[nxt]) * n[group]).sum(axis=1),
                             minlength=a.size)
    if source == 'uniform':
        return dict(a=a, b=b, p=p, measure=area, weight=area, cone=None)
    cone, weight = _normal_face_integrals(v, v[nxt], group, n, p)
    return dict(a=a, b=b, p=p, measure=area, weight=weight, cone=cone)


def _normal_face_integrals(v0, v1, group, n, p):
    """Per face: the Gaussian cone mass C(F) and the face's Gaussian mass rho(F) (see the module docstring),
    from its counter-clockwise polygon edges v0 -> v1 (rows grouped by face)."""
    F = n.shape[0]
    foot = p[group, None] * n[group]
    edge = v1 - v0
    length = np.linalg.norm(edge, axis=1)
    ok = length > 0
    v0, edge, length, grp, foot = v0[ok], edge[ok], length[ok], group[ok], foot[ok]
    e = edge / length[:, None]
    m = np.cross(e, n[grp])                                      # outward in-plane normal of the edge
    q = ((v0 - foot) * m).sum(axis=1)
    u0 = ((v0 - foot) * e).sum(axis=1)
    u1 = u0 + length
    weight = np.bincount(grp, weights=np.sign(q) * _cone2(np.abs(q), u0, u1), minlength=F) * _phi(p)
    cone = np.bincount(grp, weights=np.sign(q) * _cone3_edge(np.abs(p[grp]), np.abs(q), u0, u1), minlength=F)
    return cone, weight


def _cone3_edge(delta, q, u0, u1):
    """int_{u0}^{u1} q k(r) / r^2 du with r^2 = q^2 + u^2 (Gauss-Legendre on pieces of length <= _PIECE)."""
    pieces = np.maximum(1, np.ceil((u1 - u0) / _PIECE)).astype(np.int64)
    row = np.repeat(np.arange(q.size), pieces)
    start = np.cumsum(pieces) - pieces
    j = np.arange(row.size) - start[row]
    h = (u1 - u0)[row] / pieces[row]
    lo = u0[row] + j * h
    u = lo[:, None] + 0.5 * h[:, None] * (_GL_X[None, :] + 1.0)            # [P, 16]
    r2 = q[row, None] ** 2 + u * u
    vals = _k_over_r2(delta[row, None], r2) * q[row, None]
    return np.bincount(row, weights=0.5 * h * (vals * _GL_W).sum(axis=1), minlength=q.size)


def _chi3_cdf_over_s2(s):
    """G(s) / s^2 with G the chi_3 CDF, G(s) = erf(s / sqrt 2) - sqrt(2 / pi) s exp(-s^2 / 2) (0 at s = 0)."""
    s = np.asarray(s, dtype=np.float64)
    out = np.empty_like(s)
    small = s < 0.1
    x = s[small]                   # the series sqrt(2/pi) (s/3 - s^3/10 + s^5/56 - s^7/432), no cancellation
    x2 = x * x
    out[small] = math.sqrt(2.0 / math.pi) * x * (1.0 / 3 - x2 * (1.0 / 10 - x2 * (1.0 / 56 - x2 / 432)))
    x = s[~small]
    out[~small] = (scipy.special.erf(x / math.sqrt(2.0)) - math.sqrt(2.0 / math.pi) * x * np.exp(-0.5 * x * x)) / (x * x)
    return out


def _k_over_r2(delta, r2):
    """k(r) / r^2 with k(r) = delta / (4 pi) int_delta^S G(s) / s^2 ds, S = sqrt(delta^2 + r^2)."""
    delta, r2 = np.broadcast_arrays(np.asarray(delta, dtype=np.float64), np.asarray(r2, dtype=np.float64))
    S = np.sqrt(delta * delta + r2)
    width = r2 / np.maximum(S + delta, 1e-300)                          # S - delta without cancellation
    ratio = np.empty_like(S)                                          # int_delta^S G(s)/s^2 ds / r^2
    # Narrow ranges: Simpson's rule (error ~ width^5); wide ones: the antiderivative
    # -G(s)/s - sqrt(2/pi) exp(-s^2/2).
    narrow = width <= 0.05
    d, Sn = delta[narrow], S[narrow]
    ratio[narrow] = (_chi3_cdf_over_s2(d) + 4.0 * _chi3_cdf_over_s2(0.5 * (d + Sn)) + _chi3_cdf_over_s2(Sn)) \
        / (6.0 * (Sn + d))
    d, Sw = delta[~narrow], S[~narrow]
    c = math.sqrt(2.0 / math.pi)
    anti = lambda x: -_chi3_cdf_over_s2(x) * x - c * np.exp(-0.5 * x * x)
    ratio[~narrow] = (anti(Sw) - anti(d)) / r2[~narrow]
    return delta / (4.0 * math.pi) * ratio
