"""What DPM-OT is for, measured offline: sample quality at ~10 network evaluations (NFE) on a Gaussian mixture
with many modes, against the plain Euler / Heun samplers at ~10 NFE and at 35+ NFE.

    python -m benchmarks.dpmot_quality --outdir=/tmp/dpmot-bench            # ~45 min on 2 shared CPU cores
    python -m benchmarks.dpmot_quality --outdir=/tmp/dpmot-bench --quick    # a smoke run (~10 min)
    python -m benchmarks.dpmot_quality --outdir=/tmp/dpmot-bench --reuse    # metrics again, same network

Pipeline, through the project's own tools:
1. Data: a mixture of `--modes` isotropic Gaussians (std `--mode-std`, means uniform in [-2, 2]^dim), written as
   an .npz; fresh samples of the same mixture for the metrics.
2. `train.py --kind=denoiser` trains an MLP denoiser (EDM preconditioning and loss) on it. The closed-form
   denoiser of the mixture ("oracle") is evaluated too: it separates the sampler's error from the network's.
3. `potential.py` forward-diffuses `--num-targets` training items to sigma_(S-K) of an S-step EDM schedule and
   solves the semi-discrete OT potential.
4. `sampling.dpmot.generate_samples`: the plain samplers from noise and DPM-OT (top-1 and top-k) from the
   potential, `--samples` seeds each.

Metrics against fresh data (noise floor: a second fresh sample): sliced W2 (256 directions), MMD^2 (RBF kernels
of widths 0.2, 1 and 5, unbiased), mode mixture (share of samples farther from every mode than the 99.9%
quantile of a mode's own radius, sqrt(chi2_d(0.999)) std), mode-weight error (total variation between the
samples' nearest-mode histogram and the mixture weights), and copying (median distance to the nearest of the N
training items behind the latents, divided by the same for fresh data: below 1 means closer to the training
set than new data would be). Prints a Markdown table (docs/dpmot.md holds one) and writes results.json.
"""

import json
import math
import os
import time

import click
import numpy as np
import torch
from scipy.stats import chi2

import potential
import train
from data import toy
from metrics import distances
from sampling import dpmot, snapshots
from sampling import potential as potential_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# The closed-form denoiser of an isotropic Gaussian mixture.

class MixtureDenoiser(torch.nn.Module):
    """D(x; sigma) = E[x0 | x] for x0 ~ sum_k w_k N(mu_k, s^2 I), x = x0 + sigma n:
    sum_k p(k | x) (mu_k + s^2 / (s^2 + sigma^2) (x - mu_k)), p(k | x) ~ w_k N(x; mu_k, (s^2 + sigma^2) I)."""

    def __init__(self, means, weights, std):
        super().__init__()
        self.register_buffer('means', torch.as_tensor(means, dtype=torch.float64))
        self.register_buffer('log_w', torch.as_tensor(weights, dtype=torch.float64).log())
        self.s2 = float(std) ** 2
        self.data_shape = (self.means.shape[1],)
        self.sigma_min, self.sigma_max = 0.002, 80.0

    def forward(self, x, sigma):
        x64 = x.to(torch.float64)
        var = self.s2 + torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2      # [N, 1]
        d2 = torch.cdist(x64, self.means).square()                                            # [N, K]
        post = torch.softmax(self.log_w - d2 / (2 * var), dim=1)
        shrink = self.s2 / var
        return (post @ self.means) * (1 - shrink) + shrink * x64

#----------------------------------------------------------------------------
# Metrics (the distances are metrics.distances).

def mode_stats(x, means, weights, std):
    """(share of samples beyond the 99.9% radius of every mode, total variation of the nearest-mode histogram)."""
    d = torch.cdist(x.double(), torch.as_tensor(means)).min(dim=1)
    radius = std * math.sqrt(chi2.ppf(0.999, means.shape[1]))
    far = float((d.values > radius).double().mean())
    hist = torch.bincount(d.indices, minlength=len(means)).double() / len(x)
    tv = 0.5 * float((hist - torch.as_tensor(weights)).abs().sum())
    return far, tv


def evaluate(x, fresh, fresh2, means, weights, std, train_targets):
    far, tv = mode_stats(x, means, weights, std)
    return dict(sw2=distances.sliced_w2(x, fresh), mmd2=distances.mmd2(x, fresh), mixture=far, mode_tv=tv,
                copy=distances.median_nn_distance(x, train_targets) / distances.median_nn_distance(fresh2, train_targets))

#----------------------------------------------------------------------------

def _cli(main, args):
    """Run a click command in this process; raise on failure."""
    print('$ ' + main.name + ' ' + ' '.join(args), flush=True)
    main.main(args=args, standalone_mode=False)


def parse_back_steps(back_steps, steps):
    """--back-steps as a list of ints in [1, steps]; click.BadParameter otherwise."""
    try:
        ks = [int(k) for k in str(back_steps).split(',')]
        if min(ks) < 1 or max(ks) > steps:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f'--back-steps={back_steps} must be a comma list of ints in [1, --steps={steps}]')
    return ks


def latest_snapshot(run_root):
    """(run directory, path of its last network snapshot) of the newest run under run_root."""
    run_dir = os.path.join(run_root, sorted(os.listdir(run_root))[-1])
    snapshot = sorted(f for f in os.listdir(run_dir) if f.startswith('network-snapshot-'))[-1]
    return run_dir, os.path.join(run_dir, snapshot)


def solve_potentials(network, data_path, outdir, steps, back_steps, num_targets, seed, reuse, timing, extra=()):
    """potential.py once per K into outdir/potential-K<K> (resumed, or reused when finished, with --reuse);
    returns {K: potential} and adds potential_K<K>_s to `timing`."""
    pots = {}
    for K in back_steps:
        pot_dir = os.path.join(outdir, f'potential-K{K}')
        t0 = time.time()
        _cli(potential.main, [f'--network={network}', f'--data={data_path}', f'--steps={steps}', f'--back-steps={K}',
                              f'--num-targets={num_targets}', '--source=uniform', f'--outdir={pot_dir}',
                              f'--seed={seed}', *extra, '--max-iters=3000', '--device=cpu', '--no-progress']
             + ([] if reuse else ['--no-resume']))
        timing[f'potential_K{K}_s'] = time.time() - t0
        pots[K] = potential_lib.load_potential(os.path.join(pot_dir, 'potential.pt'))
    return pots


def dpmot_configs(pots):
    """The DPM-OT rows of both benchmarks, per potential: (label, potential, sampler, steps, generate kwargs)."""
    configs = []
    for p in pots.values():
        configs += [('DPM-OT Euler', p, 'euler', None, {}), ('DPM-OT Heun', p, 'heun', None, {}),
                    ('DPM-OT Heun top-4', p, 'heun', None, dict(topk=4)),
                    ('DPM-OT Heun top-4, angle 0.3', p, 'heun', None, dict(topk=4, angle_threshold=0.3)),
                    ('DPM-OT Langevin', p, 'langevin', None, {})]
    return configs


def report_potentials(pots, steps):
    """Print a line per potential (noise level, convergence, errors); return the same as a dict for results.json."""
    potentials = {K: dict(sigma=p['sigma'], converged=p['solver']['converged'], num_iters=p['solver']['num_iters'],
                          eval_rms=p['solver']['eval']['rms'], empty=p['solver']['eval']['empty'])
                  for K, p in pots.items()}
    for K, p in potentials.items():
        print(f'potential K={K}: latents at sigma_{steps - K} = {p["sigma"]:.4g}, converged {p["converged"]} after '
              f'{p["num_iters"]} iterations, eval rms {p["eval_rms"]:.3f}, empty cells {p["empty"]}')
    return potentials


#----------------------------------------------------------------------------

def make_data(outdir, num_train, dim, modes, mode_std, samples, seed):
    """The training mixture (written to outdir/train.npz) and two fresh samples of it: dict with data_path,
    means, weights, fresh, fresh2 (torch [samples, dim]) and sigma_data."""
    rng = np.random.default_rng(seed)
    mix = toy.gaussian_mixture(num_train, rng, dim=dim, components=modes, radius=2.0, std=mode_std)
    data_path = os.path.join(outdir, 'train.npz')
    np.savez(data_path, x=mix['x'])
    fresh_rng = np.random.default_rng(seed + 1000)
    fresh = torch.as_tensor(toy.gaussian_mixture(samples, fresh_rng, means=mix['means'], std=mode_std)['x'])
    fresh2 = torch.as_tensor(toy.gaussian_mixture(samples, fresh_rng, means=mix['means'], std=mode_std)['x'])
    return dict(data_path=data_path, means=mix['means'], weights=mix['weights'], fresh=fresh, fresh2=fresh2,
                sigma_data=float(np.std(mix['x'])))


def train_denoiser(run_root, data_path, sigma_data, train_kimg, seed):
    """train.py --kind=denoiser: an MLP denoiser with EDM preconditioning, into a new run under run_root."""
    _cli(train.main, ['--kind=denoiser', '--name=gmm', f'--outdir={run_root}', f'--data={data_path}', '--precond=edm',
                      '--model_channels=32', f'--net-opts={{"sigma_data": {sigma_data:.4f}}}', '--batch=512',
                      '--lr=2e-3', f'--lr-rampup={train_kimg / 20:g}', f'--ema={train_kimg / 20000:g}',
                      f'--duration={train_kimg / 1000:g}', f'--tick={train_kimg / 10:g}', '--snap=100', '--dump=100',
                      '--workers=0', f'--seed={seed}', '--device=cpu', '--no-tensorboard', '--grad-clip=0'])


def sample_and_score(denoisers, configs, samples, score):
    """One row per (denoiser, configuration): generate `samples` seeds, score them; print each row as JSON."""
    seeds = range(10 ** 6, 10 ** 6 + samples)
    rows = []
    for den_name, den, check_network in denoisers:
        for label, p, sampler, S, kw in configs:
            t0 = time.time()
            x, info = dpmot.generate_samples(den, seeds, potential=p, sampler=sampler, steps=S, batch_size=1000,
                                             check_network=check_network, **kw)
            row = dict(denoiser=den_name, method=label, sampler=sampler, nfe=info['nfe'],
                       steps=S if p is None else f'{p["num_steps"]}, K={p["back_steps"]}', time_s=time.time() - t0,
                       **score(x))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def report(rows, floor):
    """Print the Markdown table and, per denoiser, each DPM-OT row against plain Heun at 35 NFE; return the table."""
    header = ('| denoiser | method | steps | NFE | sliced W2 | MMD^2 x1e3 | mode mixture | mode-weight TV | copying |\n'
              '|---|---|---|---:|---:|---:|---:|---:|---:|')
    lines = [header, f'| fresh data | (noise floor) | | | {floor["sw2"]:.4f} | {1e3 * floor["mmd2"]:.3f} | '
                     f'{100 * floor["mixture"]:.2f}% | {floor["mode_tv"]:.3f} | 1.00 |']
    for r in rows:
        lines.append(f'| {r["denoiser"]} | {r["method"]} | {r["steps"]} | {r["nfe"]} | {r["sw2"]:.4f} | '
                     f'{1e3 * r["mmd2"]:.3f} | {100 * r["mixture"]:.2f}% | {r["mode_tv"]:.3f} | {r["copy"]:.2f} |')
    table = '\n'.join(lines)
    print()
    print(table)
    # Ratios measured in this run: each DPM-OT row against the plain Heun sampler at 35 NFE, same denoiser.
    print()
    for den_name in ('oracle', 'MLP'):
        ref = next(r for r in rows if r['denoiser'] == den_name and r['method'] == 'Heun' and r['nfe'] == 35)
        for r in rows:
            if r['denoiser'] == den_name and r['method'].startswith('DPM-OT'):
                print(f'{den_name:6s} {r["method"]:30s} K={r["steps"].split("K=")[1]:>2s}: NFE {r["nfe"]}/35, sliced W2 x'
                      f'{r["sw2"] / ref["sw2"]:.2f}, mode mixture {100 * r["mixture"]:.2f}% vs '
                      f'{100 * ref["mixture"]:.2f}% of plain Heun at 35 NFE')
    return table


@click.command()
@click.option('--outdir', help='Working directory (data, run, potential, results.json)', metavar='DIR', required=True)
@click.option('--dim', help='Data dimension', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--modes', help='Mixture components', type=click.IntRange(min=2), default=32, show_default=True)
@click.option('--mode-std', help='Std of every component', type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True)
@click.option('--num-train', help='Training items', type=click.IntRange(min=100), default=20000, show_default=True)
@click.option('--train-kimg', help='Denoiser training duration (thousands of samples)', type=click.FloatRange(min=1), default=1200, show_default=True)
@click.option('--num-targets', help='N: latents of the potential', type=click.IntRange(min=2), default=2000, show_default=True)
@click.option('--steps', help='S: steps of the schedule the potential is made for', type=click.IntRange(min=2), default=18, show_default=True)
@click.option('--back-steps', help='K: steps run after the OT map (Heun: 2K - 1 NFE); a comma list makes one potential each', metavar='LIST', default='5,8', show_default=True)
@click.option('--samples', help='Samples per configuration (and fresh samples)', type=click.IntRange(min=100), default=5000, show_default=True)
@click.option('--solver-step', help='potential.py --solver-step', default='adam', show_default=True)
@click.option('--quick', help='A small smoke run (fewer items, shorter training, fewer samples)', is_flag=True)
@click.option('--reuse', help='Reuse the trained snapshot and potentials already in --outdir (same settings)', is_flag=True)
@click.option('--seed', help='Seed of the data, training and potential', type=int, default=0, show_default=True)
def main(outdir, dim, modes, mode_std, num_train, train_kimg, num_targets, steps, back_steps, samples, solver_step,
         quick, reuse, seed):
    """Quality of DPM-OT at ~10 NFE against the plain samplers at ~10 and 35+ NFE on a Gaussian mixture."""
    if quick:
        num_train, train_kimg, num_targets, samples = 4000, 300, 500, 2000
    back_steps = parse_back_steps(back_steps, steps)
    os.makedirs(outdir, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    timing = {}

    # 1. Data; 2. denoiser training (or the run already there, with --reuse).
    data = make_data(outdir, num_train, dim, modes, mode_std, samples, seed)
    run_root = os.path.join(outdir, 'runs')
    t0 = time.time()
    trained = not (reuse and os.path.isdir(run_root))
    if trained:
        train_denoiser(run_root, data['data_path'], data['sigma_data'], train_kimg, seed)
    timing['train_s'] = time.time() - t0 if trained else None
    _, network = latest_snapshot(run_root)
    net, _ = snapshots.load_denoiser(network)
    oracle = MixtureDenoiser(data['means'], data['weights'], mode_std)

    # 3. Potentials (one per K; the solver resumes or reuses a finished one with the same settings).
    pots = solve_potentials(network, data['data_path'], outdir, steps, back_steps, num_targets, seed, reuse, timing,
                            extra=[f'--solver-step={solver_step}'])
    targets_clean = torch.as_tensor(np.load(data['data_path'])['x'][pots[back_steps[0]]['indices'].numpy()])

    # 4. Generation and metrics.
    fresh, fresh2, means, weights = data['fresh'], data['fresh2'], data['means'], data['weights']
    configs = [('Euler', None, 'euler', 10, {}), ('Heun', None, 'heun', 6, {}),
               ('Euler', None, 'euler', 35, {}), ('Heun', None, 'heun', 18, {}), ('Heun', None, 'heun', 50, {})]
    configs += dpmot_configs(pots)
    floor = dict(sw2=distances.sliced_w2(fresh2, fresh), mmd2=distances.mmd2(fresh2, fresh),
                 mixture=mode_stats(fresh2, means, weights, mode_std)[0],
                 mode_tv=mode_stats(fresh2, means, weights, mode_std)[1], copy=1.0)
    rows = sample_and_score([('oracle', oracle, False), ('MLP', net, True)], configs, samples,
                            lambda x: evaluate(x, fresh, fresh2, means, weights, mode_std, targets_clean))

    # Report.
    table = report(rows, floor)
    print(f'\ntimes (s): {json.dumps({k: None if v is None else round(v) for k, v in timing.items()})}')
    potentials = report_potentials(pots, steps)
    summary = dict(config=dict(dim=dim, modes=modes, mode_std=mode_std, num_train=num_train, train_kimg=train_kimg,
                               num_targets=num_targets, steps=steps, back_steps=back_steps, samples=samples,
                               solver_step=solver_step, seed=seed),
                   timing=timing, potentials=potentials, floor=floor, rows=rows, table=table,
                   torch_threads=torch.get_num_threads())
    with open(os.path.join(outdir, 'results.json'), 'w') as f:
        json.dump(summary, f, indent=2)


if __name__ == '__main__':
    main()
