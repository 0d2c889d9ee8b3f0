"""Semi-discrete OT in dimension d <= 3 by a damped Newton method on exact cell masses.

    prob = SemidiscreteProblem(targets=Y, source='uniform')                 # Y: [N, d], d <= 3
    out = NewtonSolver(tol=0.05)(prob, generator=torch.Generator().manual_seed(0))
    out.h, out.converged, out.history                                       # as SemidiscreteSolver's output

In low dimension the cells are polygons (d = 2) or polyhedra (d = 3), and transport/power_cells.py gives
their masses mu_i(g) and the derivatives d mu / d g = L(g) (a weighted graph Laplacian over adjacent cells)
exactly, up to rounding. The method is Algorithm 1 of Kitagawa, Merigot and Thibert, "Convergence of a Newton
algorithm for semi-discrete optimal transport" (JEMS 2019):

    eps0 = min(min_i mu_i(g0), 1 / N) / 2                      (g0: every cell non-empty, the Voronoi start)
    repeat: solve L(g) d = 1/N - mu(g) (d with mean 0);
            alpha = the largest of a0, a0/2, a0/4, ... with min_i mu_i(g + alpha d) >= eps0 and
                    |mu(g + alpha d) - 1/N| <= (1 - alpha / 2) |mu(g) - 1/N|;
            g <- g + alpha d
    until max_i |N mu_i - 1| <= mass_tol.

It converges from any start with no empty cell, and quadratically near the solution; the damping keeps
every cell at least eps0 large, so no cell ever empties. KMT take a0 = 1; here a0 = min(1, 4 alpha_prev), the
backtracking starting from four times the last accepted step: on tight clusters the first steps are damped to
alpha ~ 1e-4 and each halving costs a cell computation, and the steps grow back by at most 4x per iteration
(full steps are taken again once they are accepted). Once the exact error is below mass_tol, the heights
are checked as SemidiscreteSolver checks its own: on fresh i.i.d. source samples (the same streams and rule,
never used to fit), `converged` meaning a debiased rms relative cell-mass error <= tol and no empty cell. The
check guards against a bug or a rounding problem in the geometry; it costs one pass over
max(20 N, 4 sqrt(2 N) / tol^2) samples.

Under torchrun every rank computes the same geometry (qhull is deterministic) and rank 0's iterate is
broadcast after every iteration; the check's samples are split across ranks as the Monte Carlo solver's are.
"""

import dataclasses
import math
import time
from typing import Optional

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

from torch_utils import distributed as dist_utils
from transport import power_cells
from transport.semidiscrete import (_CHECK, SemidiscreteOutput, SemidiscreteProblem, _Engine, _init_voronoi,
                                    _Sampler, _seed_from, mass_error_stats)

MIN_STEP = 2.0 ** -30


def check_exact_problem(prob):
    """Raise ValueError when the exact solver cannot take `prob` (d > 3, or two identical targets)."""
    if prob.dim > power_cells.MAX_DIM:
        raise ValueError(f'the exact (Newton) solver works in d <= {power_cells.MAX_DIM}; these targets have '
                         f'd = {prob.dim}: use the Monte Carlo solver (SemidiscreteSolver)')
    dup = power_cells.duplicate_rows(prob._yc.double().cpu().numpy())
    if dup is not None:
        raise ValueError(f'targets {dup[0]} and {dup[1]} are identical: two equal targets share one cell, so no '
                         'heights give each mass 1/N; remove duplicates (or add noise)')


@dataclasses.dataclass(eq=False)
class NewtonState:
    """The Newton solver's state between iterations (centred heights), serialised by to_dict / from_dict."""
    num_targets: int
    dim: int
    source: str
    seed: int                               # seed of the check's sample stream
    iter: int = 0
    g: Optional[torch.Tensor] = None        # [N] float64 centred heights (None until the start is set)
    eps0: Optional[float] = None            # the damping's lower bound on every cell's mass
    mirrors: Optional[torch.Tensor] = None  # [2 d, N] bool: the sites mirrored in the last cell computation
    last_step: float = 1.0                  # the last accepted alpha (the next line search starts at 4x it)
    samples_used: int = 0
    num_checks: int = 0
    check: Optional[dict] = None
    converged: bool = False
    failed: Optional[str] = None            # why the iteration stopped early (line search), or None

    KIND = 'newton'
    VERSION = 1

    def to_dict(self):
        out = dict(kind=self.KIND, version=self.VERSION)
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.detach().cpu().clone() if torch.is_tensor(v) else v
        return out

    @classmethod
    def from_dict(cls, d):
        kind = d.get('kind') if isinstance(d, dict) else None
        version = d.get('version') if isinstance(d, dict) else None
        if kind != cls.KIND or version != cls.VERSION:
            raise ValueError(f'resume must be a Newton solver state (kind {cls.KIND!r}, version {cls.VERSION}); '
                             f'got {type(d).__name__} of kind {kind!r}, version {version}')
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(d))
        if missing:
            raise ValueError(f'the Newton solver state lacks {", ".join(missing)}; it is damaged: start over')
        return cls(**{k: (d[k].clone() if torch.is_tensor(d[k]) else d[k]) for k in names})


@dataclasses.dataclass(frozen=True)
class NewtonSolver:
    """Damped Newton solver on exact cell masses for d <= 3 (see the module docstring).

    Args:
        max_iters: Newton iterations in total (a resumed run counts the earlier ones).
        tol: the check's tolerance: converged when the debiased rms relative cell-mass error on fresh check
            samples is <= tol and no check cell is empty; 0: no check (converged when mass_tol is reached).
        mass_tol: the iteration stops when max_i |N mu_i - 1| <= mass_tol (exact masses).
        check_samples: samples of the check (default max(20 N, 4 sqrt(2 N) / tol^2)).
        block_size, chunk_size: the check's samples and targets scored at a time.
        distributed: split the check across the ranks of an active process group, and follow rank 0.
    """
    max_iters: int = 100
    tol: float = 0.05
    mass_tol: float = 1e-4
    check_samples: Optional[int] = None
    block_size: int = 2048
    chunk_size: int = 4096
    distributed: bool = True

    def __post_init__(self):
        if self.max_iters < 0:
            raise ValueError(f'max_iters={self.max_iters} must be >= 0')
        if not self.tol >= 0:
            raise ValueError(f'tol={self.tol} must be >= 0 (0 disables the check)')
        if not 0 < self.mass_tol < 1:
            raise ValueError(f'mass_tol={self.mass_tol} must lie in (0, 1)')
        if self.check_samples is not None and int(self.check_samples) < 2:
            raise ValueError(f'check_samples={self.check_samples} must be >= 2 (or None for the default)')

    def __call__(self, prob, generator=None, *, h0=None, resume=None, callback=None):
        """Solve `prob` (d <= 3, distinct targets).

        Args:
            prob: SemidiscreteProblem.
            generator: torch.Generator that seeds the check's samples (ignored with resume=; default seed 0).
            h0: optional [N] uncentred heights to start from; every cell must be non-empty there (default:
                the Voronoi start of SemidiscreteSolver's init='voronoi').
            resume: SemidiscreteOutput.state (or a NewtonState) of an earlier run with the same problem.
            callback: optional callback(iter, row) after every iteration; returning True stops (resumable).
        Returns:
            SemidiscreteOutput (history rows: iter, rms, max_rel_err, empty (exact), step (the accepted
            alpha), evaluations (cell-mass computations), time_s and the check_* fields of the check).
        """
        if not isinstance(prob, SemidiscreteProblem):
            raise TypeError(f'prob must be a SemidiscreteProblem, got {type(prob).__name__}')
        check_exact_problem(prob)
        run = _NewtonRun(self, prob, generator, h0, resume)
        st, history, t0 = run.st, [], time.perf_counter()
        while not st.converged and st.failed is None and (st.iter < self.max_iters or run.pending_check):
            row = run.iteration()
            row['time_s'] = time.perf_counter() - t0
            history.append(row)
            if callback is not None and callback(st.iter, row):
                break
        return SemidiscreteOutput(h=prob.from_centred(st.g.to(prob.device)), converged=bool(st.converged),
                                  history=history, num_iters=st.iter, num_samples_used=st.samples_used,
                                  check=st.check, state=st.to_dict())


class _NewtonRun:
    """One call of NewtonSolver: state, the targets as float64 NumPy, the current cells, the check engine."""

    def __init__(self, solver, prob, generator, h0, resume):
        self.solver, self.prob = solver, prob
        self.use_dist = solver.distributed and dist_utils.is_distributed()
        self.yc = prob._yc.double().cpu().numpy()
        N = prob.num_targets
        if resume is not None:
            st = NewtonState.from_dict(resume.to_dict() if isinstance(resume, NewtonState) else resume)
            want = dict(num_targets=N, dim=prob.dim, source=prob.source)
            got = {k: getattr(st, k) for k in want}
            if got != want:
                raise ValueError(f'resume state is for a different problem: {got} vs this problem {want}')
            st.converged, st.failed = False, None
        else:
            g0 = prob.to_centred(h0).cpu() if h0 is not None else _init_voronoi(prob)
            st = NewtonState(num_targets=N, dim=prob.dim, source=prob.source,
                             seed=_seed_from(generator, self.use_dist), g=g0 - g0.mean())
        self.st = st
        self.cells = power_cells.cell_masses(self.yc, st.g.numpy(), prob.source,
                                             mirrors=None if st.mirrors is None else st.mirrors.numpy())
        st.mirrors = torch.from_numpy(self.cells.mirrors)
        masses = self.cells.masses
        if st.eps0 is None:
            if masses.min() <= 0:
                raise ValueError(f'h0 leaves {int((masses <= 0).sum())} cells empty; the Newton method needs every '
                                 'cell non-empty at the start: omit h0 (the Voronoi start has none empty)')
            st.eps0 = float(min(masses.min(), 1.0 / N) / 2)
        tol = max(solver.tol, 1e-6)
        self.check_M = int(solver.check_samples or max(20 * N, math.ceil(4 * math.sqrt(2 * N) / tol**2)))
        small = self._errors(masses)[2] <= solver.mass_tol
        self.pending_check = small and solver.tol > 0
        st.converged = small and solver.tol == 0
        self.evaluations = 1

    def _errors(self, masses):
        r = masses * self.st.num_targets - 1.0
        return r, float(np.sqrt(np.mean(r * r))), float(np.abs(r).max())

    def iteration(self):
        """One damped Newton step, or the check once the exact error is small; returns the history row."""
        st, s = self.st, self.solver
        r, rms, max_abs = self._errors(self.cells.masses)
        check, step, evals = None, None, 0
        if max_abs <= s.mass_tol:
            check = self._check()
        else:
            step, evals = self._newton_step()
            r, rms, max_abs = self._errors(self.cells.masses)
            self.pending_check = max_abs <= s.mass_tol and s.tol > 0
            if max_abs <= s.mass_tol and s.tol == 0:
                st.converged = True
        self._follow_rank0()
        return dict(iter=st.iter, rms=rms, max_rel_err=max_abs, empty=int((self.cells.masses <= 0).sum()),
                    step=step, evaluations=evals, time_s=None,
                    check_rms=None if check is None else check['rms'],
                    check_max_abs=None if check is None else check['max_abs'],
                    check_noise_floor=None if check is None else check['noise_floor'],
                    check_empty=None if check is None else check['empty'])

    def _newton_step(self):
        """Solve for the Newton direction and damp it (KMT's rule); returns (alpha, cell evaluations)."""
        st, N = self.st, self.st.num_targets
        masses, H = self.cells.masses, self.cells.hessian
        b = 1.0 / N - masses
        L = (scipy.sparse.diags(np.asarray(H.sum(axis=1)).ravel()) - H).tocsc()
        direction = np.zeros(N)
        direction[:-1] = scipy.sparse.linalg.spsolve(L[:-1, :-1], b[:-1] - b.mean())    # pin g_N (mean 0 after)
        direction -= direction.mean()
        g = st.g.numpy()
        err = np.linalg.norm(b)
        alpha, evals = min(1.0, 4.0 * st.last_step), 0
        while alpha >= MIN_STEP:
            evals += 1
            try:
                cells = power_cells.cell_masses(self.yc, g + alpha * direction, self.prob.source,
                                                mirrors=self.cells.mirrors)
            except power_cells.CellGeometryError:
                alpha *= 0.5
                continue
            if cells.masses.min() >= st.eps0 and np.linalg.norm(1.0 / N - cells.masses) <= (1 - alpha / 2) * err:
                st.g = torch.from_numpy(g + alpha * direction)
                st.iter += 1
                self.cells, st.mirrors, st.last_step = cells, torch.from_numpy(cells.mirrors), alpha
                self.evaluations += evals
                return alpha, evals
            alpha *= 0.5
        st.iter += 1
        st.failed = (f'the line search found no step >= {MIN_STEP:g} that reduces the error (max relative '
                     f'cell-mass error {self._errors(masses)[2]:.3g})')
        return 0.0, evals

    def _check(self):
        """The check of SemidiscreteSolver on fresh samples; sets converged."""
        st, prob = self.st, self.prob
        engine = _Engine(prob, _Sampler(prob, st.seed), None, self.solver.chunk_size, self.solver.block_size, 1,
                         False, self.use_dist)
        counts, _ = engine.batch(st.g.to(prob.device, prob._exact), _CHECK, st.num_checks, self.check_M)
        st.num_checks += 1
        st.samples_used += self.check_M
        st.check = mass_error_stats(counts, self.check_M)
        st.converged = st.check['rms'] <= self.solver.tol and st.check['empty'] == 0
        if not st.converged:
            st.failed = (f'the exact cell masses are within {self.solver.mass_tol:g} but a check on '
                         f'{self.check_M} fresh samples found rms {st.check["rms"]:.4f} and {st.check["empty"]} '
                         'empty cells (rounding in the scores or the geometry)')
        self.pending_check = False
        return st.check

    def _follow_rank0(self):
        """Under torchrun, every rank continues from rank 0's iterate (they agree unless rounding differs)."""
        if not self.use_dist:
            return
        st = self.st
        g, flags = dist_utils.broadcast_object((st.g, (st.converged, st.failed, self.pending_check)))
        if not torch.equal(g, st.g):
            st.g = g
            self.cells = power_cells.cell_masses(self.yc, g.numpy(), self.prob.source, mirrors=self.cells.mirrors)
        st.converged, st.failed, self.pending_check = flags
