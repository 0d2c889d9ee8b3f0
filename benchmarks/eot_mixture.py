"""One-step EOT on the mixture benchmark of Gushchin et al. (NeurIPS 2023): cBW2-UVP of G and of the SDE.

For each dimension D and entropy eps, a pair with the published structure (transport.mixture.benchmark_pair:
input p0 a 3-component Gaussian mixture, potential a 5-component one, the EOT plan known in closed form) is
drawn with --seed; independent samples of p0 (source.npz) and of p1 (target.npz) and held-out inputs (test.npz)
are written as vector data sets; train.py learns the translation with --gamma=eps, generate.py --repeats draws
outputs for the held-out inputs with G and with the f-SDE, and the outputs are scored against the plan.
The pieces shared with the Gaussian benchmark (running train.py and generate.py) are benchmarks.gaussian_eot's.
A quick run on a CPU (under a minute of training at the 0.8-0.9 s/kimg measured here, plus sampling):

    python -m benchmarks.eot_mixture --dims=2 --eps=1 --kimg=20 --eval-inputs=100 --repeats=200 --outdir=/tmp/mix-quick

Reported per (D, eps, sampler), in %:
  cBW2-UVP  100 E_x W2^2(N fitted to the outputs for x, N(mean, cov of pi(. | x))) / Var(y), over --eval-inputs
            held-out inputs with --repeats outputs each (the benchmark's 1000 x 1000 by default);
  floor     the same estimator on exact plan samples for the same inputs and counts (its own error);
  BW2-UVP   of the pooled outputs against the target's mean and covariance (the marginal fit), with its floor;
  published the papers' cBW2-UVP at this (D, eps) (PUBLISHED; on the authors' own pairs, not these).
with the training and sampling wall times, the budget (kimg) and the load average before and after each cell.
Results are appended as JSON lines to OUTDIR/results.jsonl.
"""

import json
import os
import platform
import shlex
import time

import click
import numpy as np
import torch

from benchmarks.gaussian_eot import sample, train, train_args
from dnnlib.util import atomic_write
from transport import gaussian as ge
from transport import laplace as lp
from transport import mixture as mx

# Published cBW2-UVP (%) on the benchmark's own pairs, D = 2 / 16 / 64 / 128 (copied from the papers' tables as
# quoted in the issue: LightSB, LightSB-M, ASBM, DSBM, SF2M-Sink, and the best solver of the original benchmark).
PUBLISHED_DIMS = (2, 16, 64, 128)
PUBLISHED = {
    'LightSB': {0.1: (0.03, 0.08, 0.28, 0.60), 1: (0.05, 0.09, 0.24, 0.62), 10: (0.07, 0.11, 0.21, 0.37)},
    'LightSB-M': {0.1: (0.04, 0.18, 0.77, 1.66), 1: (0.09, 0.18, 0.47, 1.2), 10: (0.12, 0.19, 0.36, 0.71)},
    'ASBM': {1: (0.19, 1.6, 5.8, 10.5)},
    'DSBM': {0.1: (5.2, 16.8, 37.3, 35), 1: (0.3, 1.1, 9.7, 31), 10: (3.7, 105, 3557, 15000)},
    'SF2M-Sink': {0.1: (0.54, 3.7, 9.5, 10.9), 1: (0.2, 1.1, 9, 23), 10: (0.31, 4.9, 319, 819)},
    'best-2023': {0.1: (1.94, 13.67, 11.74, 11.4), 1: (1.04, 9.08, 18.05, 15.23), 10: (1.40, 1.27, 2.36, 1.31)},
}

DEFAULT_TRAIN_OPTS = '' # train.py's defaults for vectors (with --loss=light: lr 1e-3, EMA 0.2 Mimg, 1 G- and f-step)


# The pairs: the benchmark's (Gaussian-mixture potentials, the family of the light G-step's potential too) and a
# check outside that family (a product of Laplace potentials, transport.laplace), with the same input laws.
PAIRS = dict(mixture=mx.benchmark_pair, laplace=lp.laplace_pair)


def published(dim, eps):
    """{solver: published cBW2-UVP (%)} at (dim, eps); solvers without a figure there are left out."""
    if dim not in PUBLISHED_DIMS:
        return {}
    col = PUBLISHED_DIMS.index(dim)
    return {name: table[eps][col] for name, table in PUBLISHED.items() if eps in table}

#----------------------------------------------------------------------------
# Data.

def write_vectors(path, x):
    """A vector data set as train.py reads it (data.dataset.VectorDataset): an .npz with float32 `x` [N, D],
    written atomically (as dataset_tool.py writes its toy sources)."""
    with atomic_write(path, 'wb') as f:
        np.savez(f, x=np.asarray(x, dtype=np.float32))
    return path


def write_data(pair, folder, num, num_test, seed):
    """source.npz (num draws of p0), target.npz (num independent draws of p1) and test.npz (num_test held-out
    draws of p0), drawn with numpy Generator([seed, D, round(1000 eps), 7]). Returns {name: path}."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng([seed, pair.dim, int(round(1000 * pair.eps)), 7])
    draws = dict(source=lambda n: pair.source.sample(n, rng), target=lambda n: pair.sample_target(n, rng),
                 test=lambda n: pair.source.sample(n, rng))
    return {name: write_vectors(os.path.join(folder, f'{name}.npz'), draw(num_test if name == 'test' else num))
            for name, draw in draws.items()}

#----------------------------------------------------------------------------
# Measures.

def measures(pair, x, y, seed):
    """cBW2-UVP (%) of outputs y [N, R, D] for inputs x [N, D], BW2-UVP (%) of the pooled outputs against the
    target's moments, and both estimators on exact plan samples with the same inputs and counts (the floors)."""
    mean1, cov1 = pair.target_moments()
    exact = pair.sample_conditional(x, y.shape[1], np.random.default_rng([seed, 11]))
    return dict(cbw2_uvp=mx.cbw2_uvp(x, y, pair), floor_cbw2_uvp=mx.cbw2_uvp(x, exact, pair),
                bw2_uvp=ge.bw2_uvp(y.reshape(-1, pair.dim), mean1, cov1),
                floor_bw2_uvp=ge.bw2_uvp(exact.reshape(-1, pair.dim), mean1, cov1))


def independent_coupling(pair, x, repeats, seed):
    """cBW2-UVP (%) of the independent coupling (y drawn from p1 whatever x): the score of ignoring the input."""
    y = pair.sample_target(len(x) * repeats, np.random.default_rng([seed, 12])).reshape(len(x), repeats, pair.dim)
    return mx.cbw2_uvp(x, y, pair)


def load_average():
    """The 1-minute load average, or nan where the platform has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float('nan')


def hardware(threads):
    """The CPU model (from /proc/cpuinfo where there is one), its core count, torch's version and the threads."""
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
    except OSError:
        pass
    return f'{model}, {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} thread(s) per process'

#----------------------------------------------------------------------------

def run_cell(dim, eps, opts, threads, results_path):
    """Build, train, sample and score one (D, eps); append one row per sampler to results_path; returns them."""
    pair = PAIRS[opts['pair']](dim, eps, opts['seed'])
    folder = os.path.join(opts['outdir'], f'D{dim}-eps{eps:g}' + ('' if opts['pair'] == 'mixture' else f'-{opts["pair"]}'))
    load0 = load_average()
    paths = write_data(pair, os.path.join(folder, 'data'), opts['num'], opts['eval_inputs'], opts['seed'])
    args = train_args(opts['train_opts'], opts['noise_dim'], dim)
    snapshot, train_s = train(paths, os.path.join(folder, 'run'), eps, opts['kimg'], opts['seed'], args, threads,
                              opts['loss'], name=f'mix{dim}')
    with np.load(paths['test']) as f:
        indep = independent_coupling(pair, f['x'].astype(np.float64), opts['repeats'], opts['seed'])
    rows = []
    for sampler in ('G', 'sde'):
        x, y, sample_s = sample(snapshot, paths['test'], os.path.join(folder, f'samples-{sampler}'), sampler,
                                opts['repeats'], opts['eval_inputs'], threads, opts['via'])
        rows.append(dict(dim=dim, eps=eps, sampler=sampler, loss=opts['loss'], kimg=opts['kimg'],
                         train_opts=shlex.join(args), eval_inputs=len(x), repeats=y.shape[1], num=opts['num'],
                         seed=opts['seed'], train_s=train_s, sample_s=sample_s, load_before=load0,
                         load_after=load_average(), hardware=hardware(threads), independent_cbw2_uvp=indep,
                         pair=opts['pair'], published=published(dim, eps) if opts['pair'] == 'mixture' else {},
                         **measures(pair, x, y, opts['seed'])))
    with open(results_path, 'a') as f:
        f.writelines(json.dumps(row) + '\n' for row in rows)
    return rows


def format_row(row):
    pub = ' '.join(f'{k} {v:g}' for k, v in row['published'].items()) or '-'
    return (f'{row["dim"]:>4} {row["eps"]:>5g} {row["sampler"]:>4} {row["cbw2_uvp"]:>8.2f} {row["floor_cbw2_uvp"]:>6.2f} '
            f'{row["independent_cbw2_uvp"]:>6.1f} {row["bw2_uvp"]:>8.2f} {row["floor_bw2_uvp"]:>6.2f} {row["kimg"]:>6g} '
            f'{row["train_s"]:>7.0f} {row["sample_s"]:>6.1f} {row["load_before"]:>4.1f}/{row["load_after"]:<4.1f}  {pub}')


def _floats(text):
    return [float(v) for v in text.split(',') if v]


@click.command(context_settings=dict(max_content_width=120))
@click.option('--dims', help='Dimensions', metavar='LIST', default='2,16,64,128', show_default=True)
@click.option('--eps', 'eps_list', help='Entropies (train.py --gamma): 0.1, 1 and/or 10, the benchmark\'s', metavar='LIST', default='0.1,1,10', show_default=True)
@click.option('--kimg', help='Training duration per cell in kimg (train.py --duration / 1000)', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=8000, show_default=True)
@click.option('--loss', help='G-step transport term (train.py --g-loss)', type=click.Choice(['stated', 'kinetic', 'light']), default='light', show_default=True)
@click.option('--train-opts', help='Extra train.py options (network size, iterations, learning rates, ...)', metavar='STR', default=DEFAULT_TRAIN_OPTS, show_default=True)
@click.option('--noise-dim', help='G noise dimension: "dim" (one per coordinate), an int, or "default" (train.py\'s)', default='dim', show_default=True)
@click.option('--num', help='Training samples per domain', type=click.IntRange(min=1), default=100000, show_default=True)
@click.option('--eval-inputs', help='Held-out inputs for cBW2-UVP (the benchmark: 1000)', type=click.IntRange(min=1), default=1000, show_default=True)
@click.option('--repeats', help='Outputs per input (generate.py --repeats; the benchmark: 1000)', type=click.IntRange(min=2), default=1000, show_default=True)
@click.option('--via', help='Sample with generate.py or the library (pickle + G / sample_sde)', type=click.Choice(['generate', 'library']), default='generate', show_default=True)
@click.option('--threads', help='OpenMP threads of each training / sampling process', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--pair', help='mixture: the benchmark\'s construction; laplace: the same inputs with a product of Laplace potentials (transport.laplace), outside the Gaussian-mixture family (no published figures)', type=click.Choice(sorted(PAIRS)), default='mixture', show_default=True)
@click.option('--seed', help='Seed of the pairs (transport.mixture.benchmark_pair), data and training', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--outdir', help='Work directory (data, runs, samples, results.jsonl)', metavar='DIR', required=True)
def main(dims, eps_list, threads, **opts):
    """Train one-step EOT on mixture pairs with a known EOT plan; print G's and the SDE's cBW2-UVP beside the
    published solvers' and the estimator's floor."""
    dim_list = [int(d) for d in dims.split(',') if d]
    eps_values = _floats(eps_list)
    bad = [e for e in eps_values if e not in mx.POTENTIAL_STD_SCALE]
    if bad or not dim_list or min(dim_list) < 1:
        raise click.BadParameter(f'--dims={dims} --eps={eps_list}: dimensions must be >= 1 and every eps one of '
                                 f'{sorted(mx.POTENTIAL_STD_SCALE)} (the benchmark\'s)')
    torch.set_num_threads(threads)
    os.makedirs(opts['outdir'], exist_ok=True)
    results_path = os.path.join(opts['outdir'], 'results.jsonl')
    print(f'Hardware: {hardware(threads)}; budget {opts["kimg"]:g} kimg per cell, --loss={opts["loss"]} '
          f'{opts["train_opts"]}; cBW2-UVP over {opts["eval_inputs"]} inputs x {opts["repeats"]} outputs')
    print(f'{"D":>4} {"eps":>5} {"smp":>4} {"cBW2-UVP":>8} {"floor":>6} {"indep":>6} {"BW2-UVP":>8} {"floor":>6} '
          f'{"kimg":>6} {"train_s":>7} {"smp_s":>6} {"load":>9}  published cBW2-UVP', flush=True)
    for dim in dim_list:
        for eps in eps_values:
            for row in run_cell(dim, eps, opts, threads, results_path):
                print(format_row(row), flush=True)
    print(f'Results appended to {results_path}')


if __name__ == '__main__':
    main()
