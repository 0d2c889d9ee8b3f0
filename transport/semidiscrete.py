"""Semi-discrete optimal transport (quadratic cost) for DPM-OT: the heights of the Brenier potential.

Problem / Solver / Output, in the style of ott-jax:

    prob = SemidiscreteProblem(targets=Y, source='uniform')                 # Y: [N, d]
    out = SemidiscreteSolver(max_iters=500, tol=0.05)(prob, generator=torch.Generator().manual_seed(0))
    out.h, out.converged, out.history                                       # h: [N] float64
    idx = prob.assign(x, out.h)                                             # [M]: argmax_i <x, y_i> + h_i
    idx_k = prob.assign(x, out.h, topk=4)                                   # [M, 4], best first
    stats = evaluate(prob, out.h, num_samples=100 * N, generator=torch.Generator().manual_seed(1))

The problem. The source mu is uniform on [0,1]^d or standard normal; the targets y_1..y_N carry mass 1/N each.
The cell of target i is W_i(h) = {x : <x, y_i> + h_i >= <x, y_j> + h_j for all j}. The dual
E(h) = E_mu[max_i <x, y_i> + h_i] - mean_i h_i is convex with gradient mu(W_i) - 1/N, and the quantity we
report is the relative cell-mass error r_i = N mu(W_i) - 1 (0 for every cell at the solution).

Centred coordinates, where the solver works. With c = E_mu[x] (1/2 per coordinate for 'uniform', 0 for
'normal') and ybar = mean_i y_i,
    <x, y_i> + h_i = <x - c, y_i - ybar> + g_i + <x, ybar>,        g_i = h_i + <c, y_i - ybar>,
and <x, ybar> is the same for every i: the cells of h at x are the cells of g at x - c. Centred scores are
small (for image-like data ~30 instead of ~800), so no height has to walk across offsets of hundreds and
bfloat16 scoring is accurate enough to shortlist candidates. Every public function takes and returns h for
the original, uncentred problem; `to_centred` / `from_centred` convert. h is defined up to a constant.

The solver (see SemidiscreteSolver for the settings):
1. Start ('auto': the best of these and g = 0 on a small pilot batch):
   'norm': g_i = -sqrt(2 ln N) s |y_i - ybar| (s: the source's per-coordinate std). For near-independent
   scores <x - c, y_i - ybar> ~ N(0, s^2 |y_i - ybar|^2) this equalises the levels that the maximum of N
   scores reaches, so all cells start near-equal (at h = 0 most cells are empty). Best in high dimension.
   'voronoi': g_i = -t |y_i - ybar|^2 / 2, the Voronoi cells of the sites c + t (y_i - ybar), with t putting
   every site inside the source's support: no cell starts empty. Best in low dimension.
2. Every iteration draws fresh Monte Carlo (or scrambled Sobol) samples, finds each sample's best and
   second-best cell, and counts n_i. beta_i is the mean top-1/top-2 score gap of the samples where cell i
   is best or second (shrunk towards the global mean gap). Step ('log', the default):
       g_i <- g_i - lr * m_i * beta_i * log((n_i + 1/2) / (M/N + 1/2)),     |change| <= 2 lr mean(beta),
   the Newton step of the logit model mu_i ~ exp(g_i / beta_i), which is what high-dimensional cells obey
   (top-1/top-2 gaps of many near-independent scores are ~ Exp(beta), as for Gumbel maxima). m_i in
   [0.02, 1] halves when cell i's error changes sign while clearly above the noise (low dimension, where
   the model misjudges the response) and otherwise grows back. Step 'adam': Adam on r, learning rate
   lr * beta_i.
3. When the fit-batch error stops improving (no 10% better value for `patience` iterations) or reaches
   the iterate's noise floor, iterate averaging starts, with weights growing linearly in the samples drawn
   since (the transient fades); every later stall multiplies the samples per iteration by `grow_factor`.
   The average reaches the statistical floor ~ sqrt(N / samples averaged) where the plain iterate stalls at
   sqrt(lr / (2 - lr) N / M).
4. Certification: once the averaged samples could support `tol`, the averaged heights are scored on fresh
   check samples that are never used for fitting; `converged` means their debiased rms relative cell-mass
   error is <= tol and no cell is empty. Once the samples per iteration are at their cap, the checks'
   trend (check_trend: rms ~ averaged samples^-a over the last five checks; a = 1/2 for pure noise)
   projects the iterations still needed; a flat error (a < 0.1, rms > 1.5 tol) is a plateau, and the
   solver stops, not converged, with state['plateau'] set (stop_on_plateau=False runs on).

In dimension d <= 3 the cells can be computed exactly, and transport/newton.py's damped Newton method solves
the clustered low-dimensional problems on which this stochastic method plateaus (docs/dpmot.md).

Work is split across ranks when a torch.distributed process group is active (torchrun): Monte Carlo sample
blocks, or with shard_targets=True blocks of targets (each rank scores every sample against its targets; the
per-sample best (score, index) pairs are combined across ranks). Samples are generated per block from a
seed mixed from (seed, stream, iteration, block), so the global sample stream, and the answer, do not depend
on the world size.
"""

import dataclasses
import math
import time
from typing import Callable, Optional

import torch

from torch_utils import distributed as dist_utils

SOURCES = ('uniform', 'normal')
LOW_DIM = 3                     # d <= LOW_DIM: float64 scores (see SemidiscreteProblem)
_FIT, _CHECK, _EVAL, _PILOT = 0, 1, 2, 3      # sample streams: never share samples between fitting and checking

#----------------------------------------------------------------------------
# Problem.

def _source_moments(source):
    """Per-coordinate mean and std of the source law."""
    return (0.5, 1.0 / math.sqrt(12.0)) if source == 'uniform' else (0.0, 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class SemidiscreteProblem:
    """Semi-discrete OT from a continuous source on R^d to N equally weighted targets.

    Args:
        targets: [N, d] floating tensor. Scores are float64 for float64 targets and for d <= 3 (where the
            exact solver makes every cell exact, tight clusters make cells thin in score space, and scoring is
            cheap), float32 otherwise. The problem lives on the targets' device.
        source: 'uniform' (on [0,1]^d) or 'normal' (standard Gaussian).
    """
    targets: torch.Tensor
    source: str = 'uniform'

    def __post_init__(self):
        y = self.targets
        if not isinstance(y, torch.Tensor):
            raise TypeError(f'targets must be a torch.Tensor of shape [N, d], got {type(y).__name__}')
        if y.ndim != 2:
            raise ValueError(f'targets must have shape [N, d], got shape {list(y.shape)}; flatten each target '
                             f'with targets.reshape(N, -1)')
        if y.shape[0] == 0:
            raise ValueError('targets is empty (N = 0): the problem needs at least one target point')
        if y.shape[1] == 0:
            raise ValueError(f'targets have d = 0 features (shape {list(y.shape)}): need d >= 1')
        if not y.is_floating_point():
            raise TypeError(f'targets must be a floating tensor, got dtype {y.dtype}; use targets.float()')
        bad = ~torch.isfinite(y)
        if bad.any():
            rows = bad.any(dim=1).nonzero().flatten()
            raise ValueError(f'targets contain {int(bad.sum())} non-finite values (NaN or Inf) in {len(rows)} '
                             f'rows, first in row {int(rows[0])}; remove or repair those rows')
        if self.source not in SOURCES:
            raise ValueError(f'unknown source {self.source!r}: use "uniform" (on [0,1]^d) or "normal" '
                             f'(standard Gaussian)')
        exact = torch.float64 if y.dtype == torch.float64 or y.shape[1] <= LOW_DIM else torch.float32
        ybar = y.to(torch.float64).mean(dim=0)
        yc64 = y.to(torch.float64) - ybar
        mean, _ = _source_moments(self.source)
        object.__setattr__(self, '_exact', exact)
        object.__setattr__(self, '_yc', yc64.to(exact).contiguous())               # centred targets
        object.__setattr__(self, '_shift', mean * yc64.sum(dim=1))                  # <c, y_i - ybar>, float64
        object.__setattr__(self, '_norms', yc64.norm(dim=1))                        # |y_i - ybar|, float64

    @property
    def num_targets(self):
        return self.targets.shape[0]

    @property
    def dim(self):
        return self.targets.shape[1]

    @property
    def device(self):
        return self.targets.device

    def to_centred(self, h):
        """Heights g of the centred problem (scores <x - c, y_i - ybar> + g_i) from uncentred heights h."""
        h = self._check_h(h)
        return h.to(torch.float64) + self._shift

    def from_centred(self, g):
        """Uncentred heights h (scores <x, y_i> + h_i) from centred heights g: h_i = g_i - <c, y_i - ybar>."""
        g = self._check_h(g, name='g')
        return g.to(torch.float64) - self._shift

    def centre(self, x):
        """x - E_mu[x] in the scoring dtype (float32, or float64 for float64 targets)."""
        x = self._check_x(x)
        mean, _ = _source_moments(self.source)
        return x.to(self._exact) - mean if mean != 0 else x.to(self._exact)

    def assign(self, x, h, topk=None, *, dtype=None, chunk_size=4096, block_size=4096, rescore=4):
        """Best cells of the samples x: argmax_i <x, y_i> + h_i.

        Args:
            x: [M, d] samples.
            h: [N] uncentred heights (e.g. SemidiscreteOutput.h).
            topk: None for the best cell ([M] int64), or k for the k best cells, best first ([M, k] int64).
            dtype: scoring precision: None (float32; float64 for float64 targets) or torch.bfloat16 /
                torch.float16, in which case the best `topk + rescore - 1` candidates are re-scored exactly.
            chunk_size: targets scored at a time; memory is O(block_size * chunk_size), never O(M N).
            block_size: samples scored at a time.
            rescore: candidates re-scored in the exact dtype when dtype is reduced (>= 1).
        """
        k = 1 if topk is None else int(topk)
        if k < 1 or k > self.num_targets:
            raise ValueError(f'topk={topk} is out of range: use None or 1 <= topk <= N = {self.num_targets}')
        g = self.to_centred(h).to(self.device)
        scorer = _Scorer(self, dtype=dtype, chunk_size=chunk_size, rescore=rescore)
        xc = self.centre(x)
        out = torch.empty(xc.shape[0], k, dtype=torch.int64, device=self.device)
        for s in range(0, xc.shape[0], block_size):
            out[s:s + block_size] = scorer.topk(xc[s:s + block_size], g, k)[1]
        return out[:, 0] if topk is None else out

    def _check_x(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f'x must be a torch.Tensor of shape [M, d], got {type(x).__name__}')
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f'x must have shape [M, d] with d = {self.dim} (the targets\' dimension), got '
                             f'shape {list(x.shape)}; reshape samples to x.reshape(M, {self.dim})')
        if x.device != self.device:
            raise ValueError(f'x is on {x.device} but the targets are on {self.device}; move x with '
                             f'x.to({str(self.device)!r})')
        if not torch.isfinite(x).all():
            raise ValueError(f'x contains {int((~torch.isfinite(x)).sum())} non-finite values; cells of NaN or '
                             f'Inf samples are undefined')
        return x

    def _check_h(self, h, name='h'):
        if not isinstance(h, torch.Tensor):
            raise TypeError(f'{name} must be a torch.Tensor of shape [N] = [{self.num_targets}], got '
                            f'{type(h).__name__}')
        if h.shape != (self.num_targets,):
            raise ValueError(f'{name} must have shape [N] = [{self.num_targets}], got {list(h.shape)}')
        if not torch.isfinite(h).all():
            raise ValueError(f'{name} contains {int((~torch.isfinite(h)).sum())} non-finite values')
        return h.to(self.device)

#----------------------------------------------------------------------------
# Scoring kernel: exact top-k of <xc, yc_i> + g_i over (a shard of) the targets, chunked.

class _Scorer:
    """Top-k of centred scores over targets [lo, hi), with a running top-k over target chunks.

    Exact dtype: one matmul per chunk, then max/topk. Reduced dtype (bfloat16 / float16): the heights ride in
    the matmul as two extra columns (a high and a low part, so they lose nothing to rounding) with a shift c0
    that brings the best scores near 0, where the rounding of the output is smallest. These scores shortlist
    `k + rescore - 1` candidates per sample, and candidates are re-scored exactly (gathered rows, row-wise dot
    products) where needed: 'all' re-scores every shortlisted pair; the solver's passes re-score only the
    pairs (best, j) whose reduced-precision lead is within E, the bound on the rounding error of a score
    difference: 6 sqrt(2) standard deviations of the input rounding, u sqrt(2/3) sqrt(sum_k x_k^2 y_ik^2)
    (exceeded with probability ~1e-9; the root is bounded by |x|_inf |y_i|_2 or |x|_2 |y_i|_inf), plus the
    output rounding u (|s_best - c0| + |s_j - c0|), with u the unit roundoff. So the best index is exact
    unless the winner misses the shortlist (never seen with 4 candidates on centred image-like data).
    """

    def __init__(self, prob, dtype=None, chunk_size=4096, rescore=4, lo=0, hi=None):
        exact = prob._exact
        dtype = exact if dtype is None else dtype
        if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise ValueError(f'dtype={dtype} is not supported: use torch.float32 (exact), torch.bfloat16 or '
                             f'torch.float16 (shortlist, then exact re-scoring)')
        if int(chunk_size) < 1 or int(rescore) < 1:
            raise ValueError(f'chunk_size={chunk_size} and rescore={rescore} must both be >= 1')
        hi = prob.num_targets if hi is None else hi
        self.lo, self.hi, self.chunk, self.rescore = lo, hi, int(chunk_size), int(rescore)
        self.exact, self.prob = exact, prob
        self.y = prob._yc[lo:hi]
        self.low = None if dtype in (torch.float32, torch.float64) else dtype
        if self.low is not None:
            d = prob.dim
            self.width = d + 2 + (-(d + 2)) % 8                         # room for the heights, aligned
            self.y_low = torch.zeros(hi - lo, self.width, dtype=self.low, device=prob.device)
            self.y_low[:, :d] = self.y
            self.unit = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
            # For the rounding bound, over all targets (rank-independent): max |y_i|_2 and max |y_i|_inf.
            self.y2max = float(prob._norms.max())
            self.yinf = float(prob._yc.abs().max())

    def topk(self, xc, g, k, exact='all'):
        """Best k (values, global indices) of <xc, y_i> + g_i, i in [lo, hi); xc [m, d] exact, g [N] exact.

        Returns ([m, kk], [m, kk]) with kk = min(k, hi - lo), best first. In a reduced dtype, `exact` says what
        is re-scored: 'all' (the whole shortlist: exact values and order), 'leaders' (the two leading pairs and
        the unsure ones) or 'winner' (the unsure pairs only: the best index is exact, the values of pairs not
        re-scored are reduced-precision estimates).
        """
        n = self.hi - self.lo
        if self.low is None:
            gl = g[self.lo:self.hi].to(self.exact)
            vals, idx = self._running_topk(xc, self.y, gl, min(k, n))
            return vals, idx + self.lo
        # Shift: the best score of a sample is about max_i g_i + (its typical <x, y_i>), the same on all ranks.
        _, s = _source_moments(self.prob.source)
        c0 = float((g.to(torch.float64) + s * self.prob._norms.to(g.device) * math.sqrt(2 * math.log(max(
            self.prob.num_targets, 2)))).max())
        gs = g[self.lo:self.hi].to(torch.float64) - c0
        g_hi = gs.to(self.low)
        d = self.prob.dim
        self.y_low[:, d] = g_hi
        self.y_low[:, d + 1] = (gs - g_hi.to(torch.float64)).to(self.low)
        x_low = torch.empty(xc.shape[0], self.width, dtype=self.low, device=xc.device)
        x_low[:, :d] = xc
        x_low[:, d:d + 2] = 1
        x_low[:, d + 2:] = 0
        cand = min(k + self.rescore - 1, n)
        v_low, idx = self._running_topk(x_low, self.y_low, None, cand)
        vals = v_low.to(self.exact)
        gl = g[self.lo:self.hi].to(self.exact)
        if exact == 'all' or cand < 2:
            redo = torch.ones_like(idx, dtype=torch.bool)
        else:
            # sqrt(sum_k x_k^2 y_ik^2) <= |x|_inf |y_i|_2 <= |y_i|_2 / 2 for the uniform source (no pass over
            # x needed), else <= |x|_2 |y_i|_inf.
            if self.prob.source == 'uniform':
                spread = 0.5 * self.y2max
            else:
                spread = torch.linalg.vector_norm(xc, 2, dim=1)[:, None] * self.yinf
            sigma = math.sqrt(2 / 3) * self.unit * spread
            bound = (6 * math.sqrt(2)) * sigma + self.unit * (vals[:, :1].abs() + vals.abs())
            redo = vals[:, :1] - vals <= bound
            redo[:, 0] = redo[:, 1:].any(dim=1)
            if exact == 'leaders':
                redo[:, :2] = True
        rows, cols = redo.nonzero(as_tuple=True)
        vals += c0
        if rows.numel():
            t = idx[rows, cols]
            vals[rows, cols] = torch.linalg.vecdot(self.y.index_select(0, t), xc.index_select(0, rows)) + gl[t]
        vals, j = vals.topk(min(k, n), dim=1)
        return vals, idx.gather(1, j) + self.lo

    def _running_topk(self, x, y, g, k):
        """Running top-k over target chunks of x @ y.T (+ g when given)."""
        best_v = best_i = None
        for s in range(0, y.shape[0], self.chunk):
            scores = x @ y[s:s + self.chunk].T                                  # [m, chunk]
            if g is not None:
                scores += g[s:s + self.chunk]
            if k == 1:
                v, i = scores.max(dim=1, keepdim=True)
            else:
                v, i = scores.topk(min(k, scores.shape[1]), dim=1)
            i += s
            best_v, best_i = _merge_topk(best_v, best_i, v, i, k)
        return best_v, best_i


def _merge_topk(v1, i1, v2, i2, k):
    """Merge two per-row top lists into the top k (earlier list wins ties for k = 1)."""
    if v1 is None:
        return v2, i2
    if k == 1:
        take = v2 > v1
        return torch.where(take, v2, v1), torch.where(take, i2, i1)
    v = torch.cat([v1, v2], dim=1)
    v, j = v.topk(min(k, v.shape[1]), dim=1)
    return v, torch.cat([i1, i2], dim=1).gather(1, j)


#----------------------------------------------------------------------------
# Sample streams: the global stream is a function of (seed, stream, counter, block) only.

_MASK64 = (1 << 64) - 1


def _mix(*values):
    """SplitMix64-style hash of integers to a 63-bit seed."""
    z = 0x9E3779B97F4A7C15
    for v in values:
        z = (z ^ (int(v) & _MASK64)) & _MASK64
        z = (z + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z >> 1


def _seed_from(generator, distributed):
    """A 63-bit base seed drawn from `generator` (rank 0's, when distributed)."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f'generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)), got '
                        f'{type(generator).__name__}')
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return int(dist_utils.broadcast_object(seed)) if distributed else seed


class _Sampler:
    """Centred source samples, block by block. Pseudo-random blocks come from a generator seeded by
    _mix(seed, stream, counter, block); Sobol points (qmc=True) are taken by global position."""

    def __init__(self, prob, seed, qmc=False):
        self.prob, self.seed, self.qmc = prob, seed, qmc
        self.mean, _ = _source_moments(prob.source)
        self.sobol = None
        if qmc:
            if prob.dim > torch.quasirandom.SobolEngine.MAXDIM:
                raise ValueError(f'qmc=True supports d <= {torch.quasirandom.SobolEngine.MAXDIM} (Sobol), got '
                                 f'd = {prob.dim}; use qmc=False')
            self.sobol = torch.quasirandom.SobolEngine(prob.dim, scramble=True, seed=_mix(seed, 7) % 2**31)

    def block(self, stream, counter, b, size):
        """Pseudo-random block b of size `size` for (stream, counter)."""
        p = self.prob
        gen = torch.Generator(device=p.device).manual_seed(_mix(self.seed, stream, counter, b))
        if p.source == 'uniform':
            return torch.rand(size, p.dim, generator=gen, device=p.device, dtype=p._exact).sub_(0.5)
        return torch.randn(size, p.dim, generator=gen, device=p.device, dtype=p._exact)

    def points(self, start, size):
        """Sobol points [start, start + size) of the scrambled sequence, centred."""
        eng = self.sobol
        if start < eng.num_generated:
            eng.reset()
        eng.fast_forward(start - eng.num_generated)
        u = eng.draw(size, dtype=torch.float64)
        if self.prob.source == 'normal':
            u = math.sqrt(2.0) * torch.erfinv(2.0 * u.clamp(1e-12, 1.0 - 1e-12) - 1.0)
        else:
            u = u - 0.5
        return u.to(device=self.prob.device, dtype=self.prob._exact)

#----------------------------------------------------------------------------
# One pass over a batch of samples: counts per cell and the mean top-1/top-2 gap, split across ranks.

class _Engine:
    def __init__(self, prob, sampler, dtype, chunk_size, block_size, rescore, shard_targets, distributed):
        self.prob, self.sampler, self.block_size = prob, sampler, int(block_size)
        if self.block_size < 1:
            raise ValueError(f'block_size={block_size} must be >= 1')
        self.dist = bool(distributed) and dist_utils.is_distributed()
        self.rank = dist_utils.get_rank() if self.dist else 0
        self.world = dist_utils.get_world_size() if self.dist else 1
        self.shard = bool(shard_targets) and self.world > 1
        N = prob.num_targets
        lo, hi = 0, N
        if self.shard:
            # Shards are whole chunks, so every rank's matmuls have the shapes a single process would use.
            chunks = math.ceil(N / chunk_size)
            lo = min(N, chunk_size * (chunks * self.rank // self.world))
            hi = min(N, chunk_size * (chunks * (self.rank + 1) // self.world))
        self.scorer = _Scorer(prob, dtype=dtype, chunk_size=chunk_size, rescore=rescore, lo=lo, hi=hi)

    def batch(self, g, stream, counter, num_samples, qmc_start=None, pairs=False):
        """Score one global batch of `num_samples` samples against centred heights g.

        Returns (counts, pairs): counts [N] int64 of best cells; with pairs=True also (top1 [M], top2 [M],
        gap [M] float64): every sample's best and second-best cell and their score gap, in global sample
        order and identical on every rank (so every later sum runs in the same order whatever the world
        size); otherwise None.
        """
        N, B, M = self.prob.num_targets, self.block_size, int(num_samples)
        nb = math.ceil(M / B)
        bounds = [nb * r // self.world for r in range(self.world + 1)]
        mine = range(nb) if self.shard else range(bounds[self.rank], bounds[self.rank + 1])
        k = 2 if N >= 2 else 1
        idx_parts, gap_parts = [], []
        for b in mine:
            size = min(B, M - b * B)
            if qmc_start is not None:
                xc = self.sampler.points(qmc_start + b * B, size)
            else:
                xc = self.sampler.block(stream, counter, b, size)
            # Sample split: only the winner must be exact. Target shards: their leaders are compared.
            vals, idx = self.scorer.topk(xc, g, k, exact='leaders' if self.shard else 'winner')
            if self.shard:
                vals, idx = _combine_across_ranks(vals, idx, k)
            idx_parts.append(idx[:, [0, k - 1]])
            gap_parts.append((vals[:, 0] - vals[:, k - 1]).to(torch.float64))
        dev = self.prob.device
        idx = torch.cat(idx_parts) if idx_parts else torch.zeros(0, 2, dtype=torch.int64, device=dev)
        gap = torch.cat(gap_parts) if gap_parts else torch.zeros(0, dtype=torch.float64, device=dev)
        if not pairs:
            counts = torch.bincount(idx[:, 0], minlength=N)
            if self.dist and not self.shard:
                torch.distributed.all_reduce(counts)     # integers: exact in any order
            return counts, None
        if self.dist and not self.shard:
            sizes = [min(M, bounds[r + 1] * B) - min(M, bounds[r] * B) for r in range(self.world)]
            idx = _all_gather_rows(idx, sizes)
            gap = _all_gather_rows(gap, sizes)
        return torch.bincount(idx[:, 0], minlength=N), (idx[:, 0], idx[:, 1], gap)


def _all_gather_rows(t, sizes):
    """Concatenation, in rank order, of every rank's t (rank r holds sizes[r] rows)."""
    pad = max(sizes)
    buf = torch.zeros((pad,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    buf[:t.shape[0]] = t
    out = [torch.empty_like(buf) for _ in sizes]
    torch.distributed.all_gather(out, buf)
    return torch.cat([o[:n] for o, n in zip(out, sizes)])


def _combine_across_ranks(vals, idx, k):
    """Best k (value, index) per sample over all ranks' target shards (lower rank first on ties)."""
    world = torch.distributed.get_world_size()
    vs = [torch.empty_like(vals) for _ in range(world)]
    is_ = [torch.empty_like(idx) for _ in range(world)]
    torch.distributed.all_gather(vs, vals.contiguous())
    torch.distributed.all_gather(is_, idx.contiguous())
    v, i = vs[0], is_[0]
    for r in range(1, world):
        v, i = _merge_topk(v, i, vs[r], is_[r], k)
    return v, i

#----------------------------------------------------------------------------
# Evaluation on independent samples.

def mass_error_stats(counts, num_samples):
    """Relative cell-mass error statistics from cell counts of `num_samples` i.i.d. source samples.

    r_hat_i = N n_i / M - 1. Under a multinomial, E[r_hat_i^2] = r_i^2 + N^2 p_i (1 - p_i) / M and
    sum_i p_i^2 = (1 + R) / N with R = mean_i r_i^2, so R_hat = (mean r_hat^2 - (N - 1) / M) / (1 - 1 / M) is
    unbiased for R.

    Returns dict(rms=sqrt(max(R_hat, 0)), rms_raw=sqrt(mean r_hat^2), r2_debiased=R_hat, max_abs=max |r_hat|,
    noise_floor=sqrt(2 ln N * N / M) (the size of max |r_hat| when every r_i = 0), empty=#cells with n_i = 0).
    """
    N, M = counts.numel(), int(num_samples)
    r = counts.to(torch.float64) * (N / M) - 1.0
    raw = float((r * r).mean())
    r2 = (raw - (N - 1) / M) / (1.0 - 1.0 / M) if M > 1 else float('nan')
    return dict(rms=math.sqrt(max(r2, 0.0)), rms_raw=math.sqrt(raw), r2_debiased=r2,
                max_abs=float(r.abs().max()), noise_floor=math.sqrt(2.0 * math.log(max(N, 2)) * N / M),
                empty=int((counts == 0).sum()))


def evaluate(prob, h, num_samples=None, generator=None, *, x=None, block_size=2048, chunk_size=4096,
             distributed=True):
    """Cell-mass errors of heights h on an independent sample, scored exactly (float32 or float64).

    Args:
        prob: SemidiscreteProblem.
        h: [N] uncentred heights.
        num_samples: i.i.d. source samples to draw (default 100 N); ignored when x is given.
        generator: torch.Generator for the evaluation's seed (default seed 0); use a seed not used to fit.
        x: optional [M, d] samples to score instead of drawing them.
        block_size, chunk_size: samples / targets scored at a time.
        distributed: split the sample blocks across ranks when a process group is active.
    Returns:
        mass_error_stats(...) plus num_samples and counts ([N] int64).
    """
    N = prob.num_targets
    g = prob.to_centred(h).to(prob.device)
    if x is not None:
        idx = prob.assign(x, h, block_size=block_size, chunk_size=chunk_size)
        counts, M = torch.bincount(idx, minlength=N), x.shape[0]
    else:
        M = 100 * N if num_samples is None else int(num_samples)
        if M < 1:
            raise ValueError(f'num_samples={num_samples} must be >= 1 (at least 100 N is recommended)')
        use_dist = bool(distributed) and dist_utils.is_distributed()
        sampler = _Sampler(prob, _seed_from(generator, use_dist))
        engine = _Engine(prob, sampler, None, chunk_size, block_size, 1, False, use_dist)
        counts, _ = engine.batch(g, _EVAL, 0, M)
    return dict(mass_error_stats(counts, M), num_samples=M, counts=counts)

def check_trend(checks, tol, samples_per_iter, window=5):
    """The trend of the last `window` checks of the averaged heights, [avg_samples, rms] each.

    Fits rms ~ c avg_samples^-a by least squares on the logs (a = 1/2 when only noise is left; the averaged
    samples grow 25% between checks, so five checks span ~2.4x). Returns None with fewer checks, else
    dict(slope=a, projected_iters: the iterations of samples_per_iter samples until rms reaches tol at this
    rate (0 when already there, inf when a <= 0), plateau: a < 0.1 while rms > 1.5 tol).
    """
    pts = [(n, r) for n, r in checks[-window:] if n > 0 and r > 0]
    if len(pts) < window:
        return None
    x = [math.log(n) for n, _ in pts]
    y = [math.log(r) for _, r in pts]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    var = sum((v - mx) ** 2 for v in x)
    slope = -sum((u - mx) * (v - my) for u, v in zip(x, y)) / var if var > 0 else 0.0
    n_last, r_last = pts[-1]
    if r_last <= tol:
        projected = 0
    else:
        growth = math.log(r_last / tol) / slope if slope > 0 else math.inf     # log of the samples' growth
        projected = math.ceil(n_last * math.expm1(growth) / samples_per_iter) if growth < 500 else math.inf
    return dict(slope=slope, projected_iters=projected, plateau=slope < 0.1 and r_last > 1.5 * tol)

#----------------------------------------------------------------------------
# Starting heights (centred, float64 on the CPU, mean 0).

def _init_norm(prob):
    """g_i = -sqrt(2 ln N) s |y_i - ybar|: equal upper-tail levels of near-independent Gaussian scores."""
    _, s = _source_moments(prob.source)
    g = -math.sqrt(2.0 * math.log(max(prob.num_targets, 2))) * s * prob._norms.cpu()
    return g - g.mean()


def _init_voronoi(prob):
    """g_i = -t |y_i - ybar|^2 / 2: the cells are the Voronoi cells of the sites c + t (y_i - ybar).

    t puts every site inside the source's support (for 'uniform'), so every cell starts non-empty, and
    matches the spread of the sites to the source's.
    """
    yc = prob._yc.to(torch.float64).cpu()
    _, s = _source_moments(prob.source)
    spread = float(yc.pow(2).mean().sqrt())
    t = s / spread if spread > 0 else 1.0
    if prob.source == 'uniform':
        reach = float(yc.abs().max())
        if reach > 0:
            t = min(t, 0.499 / reach)
    g = -0.5 * t * yc.pow(2).sum(dim=1)
    return g - g.mean()


#----------------------------------------------------------------------------
# Step rules.

def _gap_scales(top1, top2, gaps, N):
    """Mean top-1/top-2 score gap (scalar) and per-cell gap scales beta_i: the mean gap over the samples
    where cell i is best or second best, shrunk towards the global mean by one pseudo-sample."""
    mean_gap = float(gaps.mean()) if gaps.numel() else 0.0
    if N < 2:
        return mean_gap, torch.full((N,), mean_gap, dtype=torch.float64, device=gaps.device)
    sums = torch.zeros(N, dtype=torch.float64, device=gaps.device)
    sums.index_add_(0, top1, gaps).index_add_(0, top2, gaps)
    hits = torch.bincount(top1, minlength=N) + torch.bincount(top2, minlength=N)
    return mean_gap, (sums + mean_gap) / (hits.to(torch.float64) + 1.0)


#----------------------------------------------------------------------------
# Solver.

@dataclasses.dataclass(frozen=True, eq=False)
class SemidiscreteOutput:
    """Result of SemidiscreteSolver.

    h: [N] float64 uncentred heights (the averaged iterate once averaging has started).
    converged: the last check of h on fresh samples had rms <= tol and no empty cell.
    history: one dict per iteration of this call: iter, num_samples, grad_norm (|n/M - 1/N|_2), rms (debiased,
        current iterate, on its fit batch, which it has not seen), max_rel_err, empty, gap (mean top-1/top-2
        score gap), averaging, samples_used, time_s and, on iterations with a check of the averaged h,
        check_rms, check_max_abs, check_noise_floor, check_empty and projected_iters (check_trend's, once
        the samples per iteration are at their cap; else None); plateau (see SemidiscreteSolver.stop_on_plateau).
    num_iters: iterations done in total (including resumed ones).
    num_samples_used: source samples drawn in total (fitting and checks, including resumed ones).
    check: the last check's statistics (mass_error_stats of h), or None.
    state: everything needed to continue, as SolverState.to_dict(): pass it as resume= (tensors on the CPU;
        torch.save-able and loadable with weights_only=True).
    """
    h: torch.Tensor
    converged: bool
    history: list
    num_iters: int
    num_samples_used: int
    check: Optional[dict]
    state: dict


_STATE_TENSORS = ('g', 'g_avg', 'adam_m', 'adam_v', 'mult', 'prev_r', 'loud')


@dataclasses.dataclass(eq=False)
class SolverState:
    """The Monte Carlo solver's state between iterations (centred heights; see the module docstring).

    Serialised by to_dict() as a plain dict with a format version (torch.save-able, loadable with
    weights_only=True); from_dict() reads every version written so far and refuses others clearly.
    """
    num_targets: int
    dim: int
    source: str
    seed: int                   # base seed of every sample stream
    num_samples: int            # Monte Carlo samples of the next iteration
    iter: int = 0
    g: Optional[torch.Tensor] = None        # [N] float64 centred heights (None until the start is chosen)
    g_avg: Optional[torch.Tensor] = None    # [N] averaged heights, once averaging has started
    avg_samples: int = 0                    # samples drawn since averaging started
    avg_samples_at_check: int = 0
    samples_used: int = 0
    qmc_offset: int = 0
    best: float = math.inf                  # best fit-batch r2_debiased so far (stall detection)
    bad: int = 0                            # iterations since it last improved by 10%
    adam_m: Optional[torch.Tensor] = None
    adam_v: Optional[torch.Tensor] = None
    adam_t: int = 0
    mult: Optional[torch.Tensor] = None     # per-cell step multipliers of the 'log' step
    prev_r: Optional[torch.Tensor] = None
    loud: Optional[torch.Tensor] = None
    num_checks: int = 0
    check: Optional[dict] = None
    converged: bool = False
    checks: list = dataclasses.field(default_factory=list)   # [avg_samples, rms] of every check (version 2)
    plateau: bool = False                   # the checks stopped improving (version 2)

    KIND = 'monte-carlo'
    VERSION = 2

    @classmethod
    def fresh(cls, prob, seed, num_samples, g=None):
        N = prob.num_targets
        zeros = lambda: torch.zeros(N, dtype=torch.float64)
        return cls(num_targets=N, dim=prob.dim, source=prob.source, seed=int(seed), num_samples=int(num_samples),
                   g=g, adam_m=zeros(), adam_v=zeros(), mult=torch.ones(N, dtype=torch.float64), prev_r=zeros(),
                   loud=torch.zeros(N, dtype=torch.bool))

    def to_dict(self):
        """A plain dict of the state (tensors on the CPU) with 'version'."""
        out = dict(kind=self.KIND, version=self.VERSION)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.detach().cpu().clone() if torch.is_tensor(v) else (list(v) if isinstance(v, list) else v)
        return out

    @classmethod
    def from_dict(cls, d):
        """Read a dict written by to_dict (versions 1 and 2); tensors are cloned.

        Version 1 (no 'kind', no check history) reads with an empty check history."""
        version = d.get('version') if isinstance(d, dict) else None
        kind = d.get('kind', cls.KIND) if isinstance(d, dict) else None
        if version not in (1, cls.VERSION) or kind != cls.KIND:
            raise ValueError(f'resume must be a Monte Carlo solver state (SemidiscreteOutput.state of '
                             f'SemidiscreteSolver, versions 1-{cls.VERSION}); got {type(d).__name__} of kind '
                             f'{kind!r}, version {version}')
        if version == 1:
            d = dict(d, checks=[], plateau=False)
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(d))
        if missing:
            raise ValueError(f'the solver state (version {version}) lacks {", ".join(missing)}; it is damaged: '
                             f'start over')
        return cls(**{k: (d[k].clone() if torch.is_tensor(d[k]) else d[k]) for k in names})

    def to(self, device):
        """Move the tensors to `device` (in place); returns self."""
        for name in _STATE_TENSORS:
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, v.to(device))
        return self


@dataclasses.dataclass(frozen=True)
class SemidiscreteSolver:
    """Stochastic solver for the heights of semi-discrete OT (see the module docstring for the algorithm).

    Args:
        max_iters: iterations in total (a resumed run counts the earlier ones, so re-running the same
            settings with resume= continues to the same end point).
        tol: converged when the averaged heights' debiased rms relative cell-mass error on check samples is
            <= tol and no check cell is empty; 0 disables checks (run max_iters).
        lr: step relative to the mean top-1/top-2 score gap (1 is the full logit-model Newton step).
        step: 'log' (gap-scaled Newton step on log cell masses) or 'adam' (Adam on r, learning rate lr * gap).
        adam_betas: Adam's (beta1, beta2) for step='adam'.
        samples_per_iter: Monte Carlo samples per iteration at the start (default 10 N).
        max_samples_per_iter: cap for growth (default 32 N, at least samples_per_iter).
        grow_factor: growth of the samples per iteration at each stall after averaging has started.
        patience: iterations without a 10% better fit-batch error that count as a stall.
        qmc: scrambled Sobol points for fitting (checks always use i.i.d. samples, which the debiasing needs).
        check_samples: samples per check (default max(20 N, 4 sqrt(2 N) / tol^2): resolves tol^2 to ~25%).
        block_size: samples per block: the unit of random streams, of work split across ranks, and of memory.
        chunk_size: targets scored at a time (memory ~ block_size * chunk_size scores).
        dtype: scoring dtype: torch.float32 or torch.bfloat16 / torch.float16 (shortlist + exact re-scoring).
        rescore: shortlist length for reduced dtypes.
        shard_targets: under torchrun, split the targets (instead of the samples) across ranks.
        init: 'auto' (the best of the others on a pilot batch of max(2 N, 256) samples), 'norm' (equal
            Gaussian tail levels, g_i = -sqrt(2 ln N) s |y_i - ybar|), 'voronoi' (Voronoi cells of sites
            inside the source's support) or 'zero' (g = 0). h0= in the call overrides it.
        distributed: use the active torch.distributed process group, if any.
        stop_on_plateau: stop (not converged, output.state['plateau'] set) when the checks stop improving
            (check_trend: the samples per iteration at their cap and the last five checks' error flat).
    """
    max_iters: int = 1000
    tol: float = 0.05
    lr: float = 0.5
    step: str = 'log'
    adam_betas: tuple = (0.9, 0.99)
    samples_per_iter: Optional[int] = None
    max_samples_per_iter: Optional[int] = None
    grow_factor: float = 2.0
    patience: int = 3
    qmc: bool = False
    check_samples: Optional[int] = None
    block_size: int = 2048
    chunk_size: int = 4096
    dtype: torch.dtype = torch.float32
    rescore: int = 4
    shard_targets: bool = False
    init: str = 'auto'
    distributed: bool = True
    stop_on_plateau: bool = True

    def __post_init__(self):
        if self.step not in ('log', 'adam'):
            raise ValueError(f'unknown step {self.step!r}: use "log" or "adam"')
        if self.init not in ('auto', 'norm', 'voronoi', 'zero'):
            raise ValueError(f'unknown init {self.init!r}: use "auto", "norm", "voronoi" or "zero" (or pass h0= '
                             f'to the call)')
        if not self.lr > 0:
            raise ValueError(f'lr={self.lr} must be > 0 (0.5 is a good default)')
        if not self.tol >= 0:
            raise ValueError(f'tol={self.tol} must be >= 0 (0 disables convergence checks)')
        if self.max_iters < 0 or self.patience < 1 or not self.grow_factor >= 1:
            raise ValueError(f'need max_iters >= 0, patience >= 1 and grow_factor >= 1; got {self.max_iters}, '
                             f'{self.patience}, {self.grow_factor}')
        for name in ('samples_per_iter', 'max_samples_per_iter', 'check_samples'):
            v = getattr(self, name)
            if v is not None and int(v) < 2:
                raise ValueError(f'{name}={v} must be >= 2 (or None for the default)')

    def __call__(self, prob, generator=None, *, h0=None, resume=None, callback=None):
        """Solve `prob`.

        Args:
            prob: SemidiscreteProblem.
            generator: torch.Generator that seeds every sample stream (ignored with resume=; default seed 0).
            h0: optional [N] uncentred heights to start from (warm start; Adam and averaging start fresh).
            resume: SemidiscreteOutput.state (or a SolverState) of an earlier run with the same problem:
                continues exactly as if the run had not stopped.
            callback: optional callback(iter, info) called after every iteration with that iteration's
                history dict; returning True stops the solver (the output is then resumable).
        Returns:
            SemidiscreteOutput.
        """
        if not isinstance(prob, SemidiscreteProblem):
            raise TypeError(f'prob must be a SemidiscreteProblem, got {type(prob).__name__}')
        run = _MonteCarloRun(self, prob, generator, h0, resume)
        st, history, t0 = run.st, [], time.perf_counter()
        if prob.num_targets == 1:      # a single cell holds all the mass
            st.converged = True
        while st.iter < self.max_iters and not st.converged and not (st.plateau and self.stop_on_plateau):
            row = run.iteration()
            row['time_s'] = time.perf_counter() - t0
            history.append(row)
            if callback is not None and callback(st.iter, row):
                break
        h = prob.from_centred(st.g if st.g_avg is None else st.g_avg)
        state = st.to_dict()
        return SemidiscreteOutput(h=h, converged=bool(st.converged), history=history, num_iters=st.iter,
                                  num_samples_used=st.samples_used, check=st.check, state=state)

    def _step(self, counts, beta, M, st):
        """The change of the centred heights for one fit batch (see the module docstring, item 2)."""
        N = counts.numel()
        n = counts.to(torch.float64)
        r = n * (N / M) - 1.0
        if self.step == 'log':
            # In low dimension the logit model can misjudge how strongly a cell's mass reacts, and the step
            # oscillates. A cell whose error changes sign while clearly above the noise (3 standard
            # deviations, twice in a row) halves its step; otherwise its step grows back towards lr. No cell
            # moves by more than 2 lr mean gaps per iteration.
            loud = r.abs() > 3.0 * torch.sqrt(n + 1.0) * (N / M)      # std of r_i is sqrt(n_i) N / M
            flip = loud & st.loud & (r * st.prev_r < 0)
            st.mult = torch.where(flip, st.mult * 0.5, st.mult * 1.25).clamp(0.02, 1.0)
            st.prev_r, st.loud = r, loud
            step = -self.lr * st.mult * beta * torch.log((n + 0.5) / (M / N + 0.5))
            cap = 2.0 * self.lr * float(beta.mean())
            return step.clamp(-cap, cap)
        b1, b2 = self.adam_betas
        st.adam_t += 1
        st.adam_m.mul_(b1).add_(r, alpha=1 - b1)
        st.adam_v.mul_(b2).addcmul_(r, r, value=1 - b2)
        m_hat = st.adam_m / (1 - b1 ** st.adam_t)
        v_hat = st.adam_v / (1 - b2 ** st.adam_t)
        return -self.lr * beta * m_hat / (v_hat.sqrt() + 1e-12)

    def _initial_heights(self, prob, engine, st):
        """Centred starting heights (float64, CPU, mean 0) for settings.init; see the module docstring."""
        N = prob.num_targets
        cands = dict(norm=_init_norm(prob), voronoi=_init_voronoi(prob), zero=torch.zeros(N, dtype=torch.float64))
        if self.init != 'auto':
            return cands[self.init]
        # Score each candidate on its own small pilot batch; keep the one with the smallest error.
        pilot = max(2 * N, 256)
        best, best_r2 = None, math.inf
        for j, name in enumerate(('norm', 'voronoi', 'zero')):
            counts, _ = engine.batch(cands[name].to(prob.device, prob._exact), _PILOT, j, pilot)
            st.samples_used += pilot
            r2 = mass_error_stats(counts, pilot)['r2_debiased']
            if r2 < best_r2:
                best, best_r2 = name, r2
        return cands[best]

    def _load_state(self, prob, resume):
        st = SolverState.from_dict(resume.to_dict() if isinstance(resume, SolverState) else resume)
        want = dict(num_targets=prob.num_targets, dim=prob.dim, source=prob.source)
        got = {k: getattr(st, k) for k in want}
        if got != want:
            raise ValueError(f'resume state is for a different problem: {got} vs this problem {want}')
        st.converged = st.plateau = False    # a re-run continues (e.g. with a smaller tol) until the next check
        return st


class _MonteCarloRun:
    """One call of SemidiscreteSolver: its state (on the problem's device), engines and settings."""

    def __init__(self, solver, prob, generator, h0, resume):
        self.solver, self.prob = solver, prob
        N = prob.num_targets
        use_dist = solver.distributed and dist_utils.is_distributed()
        if resume is not None:
            st = solver._load_state(prob, resume)
        else:
            g = prob.to_centred(h0).cpu() if h0 is not None else None
            st = SolverState.fresh(prob, _seed_from(generator, use_dist), solver.samples_per_iter or 10 * N, g)
        sampler = _Sampler(prob, st.seed, qmc=solver.qmc)
        self.engine = _Engine(prob, sampler, solver.dtype, solver.chunk_size, solver.block_size, solver.rescore,
                              solver.shard_targets, use_dist)
        self.check_engine = _Engine(prob, sampler, None, solver.chunk_size, solver.block_size, 1,
                                    solver.shard_targets, use_dist)
        if st.g is None:
            st.g = solver._initial_heights(prob, self.engine, st)
        self.st = st.to(prob.device)
        self.max_M = max(int(solver.max_samples_per_iter or 32 * N), st.num_samples)
        tol = max(solver.tol, 1e-6)
        self.check_M = int(solver.check_samples or max(20 * N, math.ceil(4 * math.sqrt(2 * N) / tol**2)))
        self.trend = None

    def iteration(self):
        """One fit batch, step, averaging and (when due) a check; returns the history row (without time_s)."""
        st, s, prob = self.st, self.solver, self.prob
        N = prob.num_targets
        st.iter += 1
        M = st.num_samples
        counts, (top1, top2, gaps) = self.engine.batch(st.g.to(prob._exact), _FIT, st.iter, M,
                                                       qmc_start=st.qmc_offset if s.qmc else None, pairs=True)
        st.qmc_offset += M
        st.samples_used += M
        stats = mass_error_stats(counts, M)
        grad_norm = float((counts.to(torch.float64) / M - 1.0 / N).norm())
        gap, beta = _gap_scales(top1, top2, gaps, N)
        st.g += s._step(counts, beta, M, st)
        st.g -= st.g.mean()
        self._average(stats['r2_debiased'], M)
        check = self._check()
        return dict(iter=st.iter, num_samples=M, grad_norm=grad_norm, rms=stats['rms'],
                    max_rel_err=stats['max_abs'], empty=stats['empty'], gap=gap, averaging=st.g_avg is not None,
                    samples_used=st.samples_used, time_s=None,
                    check_rms=None if check is None else check['rms'],
                    check_max_abs=None if check is None else check['max_abs'],
                    check_noise_floor=None if check is None else check['noise_floor'],
                    check_empty=None if check is None else check['empty'], plateau=st.plateau,
                    projected_iters=None if check is None or self.trend is None else self.trend['projected_iters'])

    def _average(self, r2, M):
        """Stalls start iterate averaging, then grow the samples per iteration; update the average."""
        st, s = self.st, self.solver
        if r2 < 0.9 * st.best:
            st.best, st.bad = r2, 0
        else:
            st.bad += 1
        # The iterate also counts as stalled once at its noise floor: in the logit model the 'log' step
        # leaves var(r_i) = lr / (2 - lr) N / M; within 3x of that, only averaging still helps.
        floor = s.lr / (2 - s.lr) * st.num_targets / M if s.step == 'log' and s.lr < 2 else -math.inf
        at_floor = r2 <= 3 * floor
        if st.bad >= s.patience or (st.g_avg is None and at_floor):
            st.bad = 0
            if st.g_avg is None:
                st.g_avg, st.avg_samples = torch.zeros_like(st.g), 0
            else:
                st.num_samples = min(self.max_M, math.ceil(M * s.grow_factor))
        if st.g_avg is not None:
            # Weights grow linearly with the samples drawn since averaging began, so what is left of the
            # transient fades (uniform weights would keep it for good).
            prev, st.avg_samples = st.avg_samples, st.avg_samples + M
            st.g_avg += (1.0 - (prev / st.avg_samples) ** 2) * (st.g - st.g_avg)

    def _check(self):
        """Certify the averaged heights on fresh samples once their noise floor sqrt(N / samples) is below
        0.9 tol (linear weights keep 3/4 of the samples' worth), then after every 25% more samples."""
        st, s, prob = self.st, self.solver, self.prob
        if not (st.g_avg is not None and s.tol > 0 and st.num_targets / (0.75 * st.avg_samples) <= (0.9 * s.tol)**2
                and st.avg_samples >= 1.25 * st.avg_samples_at_check):
            return None
        st.avg_samples_at_check = st.avg_samples
        c_counts, _ = self.check_engine.batch(st.g_avg.to(prob._exact), _CHECK, st.num_checks, self.check_M)
        st.num_checks += 1
        st.samples_used += self.check_M
        st.check = mass_error_stats(c_counts, self.check_M)
        st.converged = st.check['rms'] <= s.tol and st.check['empty'] == 0
        st.checks.append([st.avg_samples, st.check['rms']])
        self.trend = check_trend(st.checks, s.tol, st.num_samples) if st.num_samples >= self.max_M else None
        st.plateau = bool(not st.converged and self.trend is not None and self.trend['plateau'])
        return st.check
