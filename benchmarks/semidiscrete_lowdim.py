"""The semi-discrete OT solvers on low-dimensional clustered targets: the exact (Newton) solver on a grid of
problems, and optionally the Monte Carlo solver on the same problems for a fixed time.

    python -m benchmarks.semidiscrete_lowdim                                    # the grid of docs/dpmot.md
    python -m benchmarks.semidiscrete_lowdim --dims=2 --sizes=2000 --monte-carlo-seconds=300

Targets: a grid of Gaussian clusters (4 x 4 centres of spacing 1 in 2-D, 3 x 3 x 2 in 3-D), each item plus
N(0, std^2) ('tight': std 0.01, 'loose': std 0.3) or, as in the issue, std 0.05 plus forward-diffusion noise
sigma_13 = 0.1395 of an 18-step EDM schedule ('issue'). Every problem is judged by one rule: the debiased rms
relative cell-mass error of the heights on 100 N independent samples (fixed seed, never used to fit; the
clock stops) <= --tol with no empty cell. Times are wall-clock seconds of the solver call on this machine's
threads (OMP_NUM_THREADS); the exact solver's geometry (qhull) is single-threaded.
"""

import math
import time

import click
import torch

from transport import semidiscrete as sd
from transport.newton import NewtonSolver

CLUSTERS = dict(tight=(0.01, 0.0), loose=(0.3, 0.0), issue=(0.05, 0.1395))


def clustered_targets(N, d, std, noise=0.0, seed=0):
    """[N, d] float32 targets: cluster centres on a grid (4 x 4 in 2-D, 3 x 3 x 2 in 3-D, spacing 1), plus
    N(0, std^2) and N(0, noise^2)."""
    gen = torch.Generator().manual_seed(seed)
    axes = {2: [torch.arange(4.0)] * 2, 3: [torch.arange(3.0), torch.arange(3.0), torch.arange(2.0)]}[d]
    centres = torch.stack(torch.meshgrid(*axes, indexing='ij'), -1).reshape(-1, d)
    x = centres[torch.randint(len(centres), (N,), generator=gen)] + std * torch.randn(N, d, generator=gen)
    return x + noise * torch.randn(N, d, generator=gen)


def judge(prob, h, tol):
    ev = sd.evaluate(prob, h, 100 * prob.num_targets, torch.Generator().manual_seed(12345))
    return ev, ev['rms'] <= tol and ev['empty'] == 0


def run_exact(prob, tol):
    t0 = time.perf_counter()
    out = NewtonSolver(tol=tol)(prob, generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - t0
    ev, ok = judge(prob, out.h, tol)
    evals = sum(r['evaluations'] for r in out.history)
    return dict(seconds=seconds, iters=out.num_iters, evaluations=evals, converged=out.converged, rms=ev['rms'],
                empty=ev['empty'], reached=ok)


def run_monte_carlo(prob, tol, seconds):
    """The Monte Carlo solver with its defaults, stopped after `seconds`; judged on its last heights."""
    t0 = time.perf_counter()
    out = sd.SemidiscreteSolver(max_iters=10**6, tol=tol)(
        prob, generator=torch.Generator().manual_seed(0), callback=lambda it, row: time.perf_counter() - t0 > seconds)
    spent = time.perf_counter() - t0
    ev, ok = judge(prob, out.h, tol)
    return dict(seconds=spent, iters=out.num_iters, converged=out.converged, rms=ev['rms'], empty=ev['empty'],
                reached=ok)


@click.command()
@click.option('--dims', help='Dimensions (comma list)', default='2,3', show_default=True)
@click.option('--sizes', help='Numbers of targets N (comma list)', default='500,2000,20000', show_default=True)
@click.option('--clusters', help=f'Cluster kinds (comma list of {", ".join(CLUSTERS)})', default='tight,loose,issue', show_default=True)
@click.option('--sources', help='Source laws (comma list)', default='uniform,normal', show_default=True)
@click.option('--tol', help='Debiased rms relative cell-mass error to reach', type=float, default=0.05, show_default=True)
@click.option('--monte-carlo-seconds', help='Also run the Monte Carlo solver this long per problem (0: skip)', type=float, default=0, show_default=True)
def main(dims, sizes, clusters, sources, tol, monte_carlo_seconds):
    """Time the exact solver (and optionally the Monte Carlo one) on clustered low-dimensional targets."""
    print(f'threads = {torch.get_num_threads()}, target: rms <= {tol} and no empty cell on 100 N independent samples')
    print('| d | N | clusters | source | exact: time | iterations (cell evaluations) | eval rms | empty |'
          + (' Monte Carlo: iterations in the time | eval rms | empty |' if monte_carlo_seconds else ''))
    print('|---|---:|---|---|---:|---:|---:|---:|' + ('---:|---:|---:|' if monte_carlo_seconds else ''))
    for d in map(int, dims.split(',')):
        for N in map(int, sizes.split(',')):
            for kind in clusters.split(','):
                for source in sources.split(','):
                    std, noise = CLUSTERS[kind]
                    prob = sd.SemidiscreteProblem(clustered_targets(N, d, std, noise), source)
                    ex = run_exact(prob, tol)
                    line = (f'| {d} | {N} | {kind} | {source} | {ex["seconds"]:.1f} s{"" if ex["reached"] else " (not reached)"} '
                            f'| {ex["iters"]} ({ex["evaluations"]}) | {ex["rms"]:.4f} | {ex["empty"]} |')
                    if monte_carlo_seconds:
                        mc = run_monte_carlo(prob, tol, monte_carlo_seconds)
                        line += (f' {mc["iters"]} in {mc["seconds"]:.0f} s{", reached" if mc["reached"] else ""} '
                                 f'| {mc["rms"]:.4f} | {mc["empty"]} |')
                    print(line, flush=True)


if __name__ == '__main__':
    main()
