"""One-step EOT on Gaussians against the closed-form EOT plan: BW2-UVP and cBW2-UVP of G and of the SDE.

For each dimension D and entropy eps: source N(0, S0) and target N(0, S1) with S = Q diag(s) Q^T, Q a
seeded random rotation (data.toy); trains through the project's train.py on .npz data with
--gamma=eps, translates held-out inputs with generate.py --repeats (G and sde), and compares with
transport.gaussian. A quick run on a CPU:

    python -m benchmarks.gaussian_eot --dims=2 --eps=1 --kimg=20 --outdir=/tmp/geot-quick

Reported per (D, eps, sampler), all in %:
  BW2-UVP      of the fitted target against N(0, S1), over --marginal-samples held-out inputs, one output each;
  plan BW2-UVP of the joint (x, y) of those against the plan's joint Gaussian (the ENOT paper's plan measure);
  cBW2-UVP     of the conditionals y | x against the plan's (Gushchin et al. 2023), over --eval-inputs inputs
               with --repeats draws each;
  floors       the same three estimators on exact plan samples (same inputs and counts);
`theory`: the cBW2-UVP against the EOT plan of the population minimiser of the G-step transport term as
stated (t ~ U(0, 1), no weight; transport.gaussian.bridge_objective_optimum), i.e. what G converges to
with a perfect critic and f, and for the SDE the Markovian projection of that plan (what the f-SDE samples);
`rank`: the least cBW2-UVP of G's conditionals when its noise has fewer dimensions than D. Wall times of
training and sampling are printed per row. --loss=kinetic trains the 1/(1-t)^2-weighted variant instead
(train.py --G-loss=kinetic: models.eot_loss.KineticEOTLoss with f = x + (1-t) v).

Spectra: 'enot' draws S = W W^T with W = Q diag(exp(linspace(log 0.5, log 2, D))) (the ENOT notebook:
eigenvalues 0.25..4, log-spaced); 'toy' uses data.toy.random_covariance (eigenvalues 0.5..2, linear).
"""

import json
import os
import pickle
import shlex
import subprocess
import sys
import time

import click
import numpy as np
import torch

from data import toy
from models.eot_loss import KineticEOTLoss
from sampling.translation import sample_sde
from transport import gaussian as ge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# Problems and data.

def covariance(dim, rng, spectrum):
    """A seeded covariance: 'enot' (W W^T, W = Q diag of 0.5..2 log-spaced) or 'toy' (data.toy)."""
    if spectrum == 'toy':
        return toy.random_covariance(dim, rng)
    w = toy.random_rotation(dim, rng) * np.exp(np.linspace(np.log(0.5), np.log(2), dim))[None, :]
    return w @ w.T


def make_problem(dim, eps, seed, spectrum):
    """The closed-form EOT plan between N(0, S0) and N(0, S1); the covariances depend on (dim, seed) only."""
    rng = np.random.default_rng([seed, dim])
    s0, s1 = covariance(dim, rng, spectrum), covariance(dim, rng, spectrum)
    return ge.gaussian_eot_plan(None, s0, None, s1, eps)


def write_data(plan, folder, num, num_test, seed):
    """source.npz, target.npz (independent samples of the two marginals) and test.npz (held-out inputs)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng([seed, plan.dim, 7])
    paths = {}
    for name, mean, cov, n in (('source', plan.mean0, plan.cov0, num), ('target', plan.mean1, plan.cov1, num),
                               ('test', plan.mean0, plan.cov0, num_test)):
        paths[name] = os.path.join(folder, f'{name}.npz')
        np.savez(paths[name], **toy.gaussian(n, rng, mean=mean, cov=cov))
    return paths

#----------------------------------------------------------------------------
# Training and sampling through the command-line tools.

def run(cmd, log_path, threads):
    """Run a command (list) with `threads` OpenMP threads, its output to log_path; seconds, or raise."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    with open(log_path, 'w') as log:
        res = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if res.returncode != 0:
        tail = open(log_path).read()[-3000:]
        raise click.ClickException(f'{" ".join(cmd[:3])} ... failed (exit {res.returncode}); see {log_path}:\n{tail}')
    return time.perf_counter() - t0


def train_args(train_opts, noise_dim, dim):
    """train.py options from --train-opts, with G's noise dimension merged into (or added as) --net-opts."""
    args = shlex.split(train_opts)
    if noise_dim == 'default':
        return args
    net_opts, rest = {}, []
    for a in args:
        if a.startswith('--net-opts='):
            net_opts = json.loads(a.split('=', 1)[1])
        else:
            rest.append(a)
    net_opts.setdefault('G', {})['noise_dim'] = dim if noise_dim == 'dim' else int(noise_dim)
    return rest + ['--net-opts=' + json.dumps(net_opts, separators=(',', ':'))]


def train(paths, run_dir, eps, kimg, seed, args, threads, loss='stated', name='gauss'):
    """train.py --G-loss=`loss` into run_dir (no subdirectory) with extra options `args`; returns
    (last snapshot, seconds)."""
    cmd = [sys.executable, 'train.py', f'--name={name}', f'--G-loss={loss}', f'--outdir={run_dir}', '--nosubdir',
           f'--data1train={paths["source"]}', f'--data2train={paths["target"]}', f'--data1test={paths["test"]}',
           f'--gamma={eps}', f'--duration={kimg / 1000}', f'--tick={max(kimg / 10, 0.001)}', '--snap=100000',
           '--dump=100000', '--workers=0', '--device=cpu', '--no-tensorboard', f'--seed={seed}', f'--threads={threads}']
    seconds = run(cmd + args, run_dir + '.log', threads)
    snaps = sorted(f for f in os.listdir(run_dir) if f.startswith('network-snapshot-') and f.endswith('.pkl'))
    return os.path.join(run_dir, snaps[-1]), seconds


def sample(snapshot, data, out_dir, sampler, repeats, num, threads, via):
    """(x [N, D], y [N, R, D], seconds): generate.py --repeats (or the library with --via=library)."""
    t0 = time.perf_counter()
    if via == 'generate':
        cmd = [sys.executable, 'generate.py', f'--network={snapshot}', f'--data={data}', f'--outdir={out_dir}',
               f'--sampler={sampler}', f'--repeats={repeats}', f'--max={num}', f'--seeds=0-{num - 1}',
               '--batch=4096', '--device=cpu']
        seconds = run(cmd, out_dir + '.log', threads)
        with np.load(os.path.join(out_dir, 'samples.npz')) as f:
            return f['x'].astype(np.float64), f['y'].astype(np.float64), seconds
    with open(snapshot, 'rb') as f:
        snap = pickle.load(f)
    with np.load(data) as f:
        x = torch.as_tensor(f['x'][:num])
    gen = torch.Generator().manual_seed(0)
    xr = x.repeat_interleave(repeats, 0)
    with torch.no_grad():
        if sampler == 'G':
            y = snap['G'](xr, torch.randn([len(xr), *snap['G'].z_shape], generator=gen))
        else:
            y = sample_sde(snap['f'], xr, snap['gamma'], snap['sde_steps'],
                           randn_like=lambda a: torch.randn(a.shape, generator=gen))
    y = y.reshape(num, repeats, -1).double().numpy()
    return x.double().numpy(), y, time.perf_counter() - t0

#----------------------------------------------------------------------------
# Measures.

def measures(plan, xm, ym, xc, yc):
    """BW2-UVP (target) and plan BW2-UVP (%) of inputs xm [M, D] with one output each ym [M, D], and
    cBW2-UVP (%) of inputs xc [N, D] with R outputs each yc [N, R, D]."""
    return dict(bw2_uvp=ge.bw2_uvp(ym, plan.mean1, plan.cov1), plan_bw2_uvp=ge.plan_bw2_uvp(xm, ym, plan),
                cbw2_uvp=ge.cbw2_uvp(xc, yc, plan))


def floor(plan, xm, xc, repeats, seed):
    """The measures of exact plan samples for the same inputs and repeats: the estimators' own error."""
    rng = np.random.default_rng(seed)
    return measures(plan, xm, plan.sample_conditional(xm, 1, rng)[:, 0], xc, plan.sample_conditional(xc, repeats, rng))


def theory(plan, weight='uniform'):
    """cBW2-UVP (%) against the EOT plan of (G) the population minimiser of the G-step transport term (as
    stated: 'uniform' t; or 'kinetic') and (SDE) its Markovian projection, the plan of the f-SDE when f is
    exact."""
    t_max = 1 - KineticEOTLoss.U_MIN ** 2 if weight == 'kinetic' else None   # the loss's largest t
    found, _ = ge.bridge_objective_optimum(plan, plan.eps, weight, t_max=t_max)
    return dict(G=ge.plan_cbw2_uvp(found, plan),
                sde=ge.plan_cbw2_uvp(ge.markovian_projection(found, plan.eps), plan))


def rank_floor(plan, noise_dim):
    """Least cBW2-UVP (%) of conditionals of rank <= noise_dim (G(x, z) with z in R^noise_dim): the sum of
    the smallest D - noise_dim eigenvalues of Cov(y | x) over tr S1."""
    eig = np.sort(np.linalg.eigvalsh(plan.cond_cov))
    return 100 * float(eig[:max(plan.dim - noise_dim, 0)].sum()) / float(np.trace(plan.cov1))

#----------------------------------------------------------------------------

def _floats(text):
    return [float(v) for v in text.split(',') if v]


@click.command(context_settings=dict(max_content_width=120))
@click.option('--dims', help='Dimensions', metavar='LIST', default='2,16,64,128', show_default=True)
@click.option('--eps', 'eps_list', help='Entropies (train.py --gamma)', metavar='LIST', default='0.1,1,10', show_default=True)
@click.option('--kimg', help='Training duration per problem in kimg (train.py --duration / 1000)', metavar='KIMG', type=float, default=100, show_default=True)
@click.option('--train-opts', help='Extra train.py options (network size, iterations, learning rates, ...)', metavar='STR',
              default='--batch=256 --model_channels=16 --lr-rampup=0 --ema=0.01 --lr_g=3e-4 --lr_f=3e-4 --lr_D=3e-4',
              show_default=True)
@click.option('--noise-dim', help='G noise dimension: "dim" (one per coordinate) or an int; "default" leaves it to train.py (also D)', default='dim', show_default=True)
@click.option('--num', help='Training samples per domain', type=int, default=100000, show_default=True)
@click.option('--eval-inputs', help='Held-out inputs for cBW2-UVP', type=int, default=200, show_default=True)
@click.option('--repeats', help='Outputs per input for cBW2-UVP (generate.py --repeats)', type=int, default=1000, show_default=True)
@click.option('--marginal-samples', help='Held-out inputs (one output each) for BW2-UVP and plan BW2-UVP', type=int, default=50000, show_default=True)
@click.option('--spectrum', help='Covariance spectra (see the module docstring)', type=click.Choice(['enot', 'toy']), default='enot', show_default=True)
@click.option('--via', help='Sample with generate.py or the library (pickle + G / sample_sde)', type=click.Choice(['generate', 'library']), default='generate', show_default=True)
@click.option('--threads', help='OpenMP threads of each training / sampling process', type=int, default=1, show_default=True)
@click.option('--seed', help='Seed of the problems, data and training', type=int, default=0, show_default=True)
@click.option('--theory/--no-theory', 'theory_', help='Also compute the population optima (theory columns)', default=True, show_default=True)
@click.option('--loss', help='G-step transport term (train.py --G-loss): as stated (uniform t) or kinetic (1/(1-t)^2, importance-sampled)', type=click.Choice(['stated', 'kinetic']), default='stated', show_default=True)
@click.option('--outdir', help='Work directory (data, runs, samples, results.jsonl)', metavar='DIR', required=True)
def main(dims, eps_list, kimg, train_opts, noise_dim, num, eval_inputs, repeats, marginal_samples, spectrum, via, threads,
         seed, theory_, loss, outdir):
    """Train one-step EOT on Gaussian pairs and report (c)BW2-UVP of G and the SDE against the closed form."""
    torch.set_num_threads(threads)
    os.makedirs(outdir, exist_ok=True)
    results_path = os.path.join(outdir, 'results.jsonl')
    print(f'{"D":>4} {"eps":>5} {"sampler":>7} {"BW2-UVP":>8} {"plan-UVP":>8} {"cBW2-UVP":>8} {"floors(b/p/c)":>17} '
          f'{"theory":>7} {"rank":>6} {"train_s":>8} {"sample_s":>8}')
    for dim in [int(d) for d in dims.split(',') if d]:
        for eps in _floats(eps_list):
            plan = make_problem(dim, eps, seed, spectrum)
            folder = os.path.join(outdir, f'D{dim}-eps{eps:g}')
            paths = write_data(plan, os.path.join(folder, 'data'), num, max(eval_inputs, marginal_samples), seed)
            args = train_args(train_opts, noise_dim, dim)
            snapshot, train_s = train(paths, os.path.join(folder, 'run'), eps, kimg, seed, args, threads, loss)
            with open(snapshot, 'rb') as f:
                g_noise = pickle.load(f)['G'].z_shape[0]
            nan = float('nan')
            th = theory(plan, 'uniform' if loss == 'stated' else 'kinetic') if theory_ else dict(G=nan, sde=nan)
            for sampler in ('G', 'sde'):
                xm, ym, sm = sample(snapshot, paths['test'], os.path.join(folder, f'marginal-{sampler}'), sampler,
                                    1, marginal_samples, threads, via)
                xc, yc, sc = sample(snapshot, paths['test'], os.path.join(folder, f'conditional-{sampler}'), sampler,
                                    repeats, eval_inputs, threads, via)
                sample_s = sm + sc
                m, fl = measures(plan, xm, ym[:, 0], xc, yc), floor(plan, xm, xc, repeats, seed)
                rank = rank_floor(plan, g_noise) if sampler == 'G' else 0.0
                row = dict(dim=dim, eps=eps, sampler=sampler, loss=loss, kimg=kimg, train_opts=shlex.join(args),
                           spectrum=spectrum, eval_inputs=eval_inputs, repeats=repeats, marginal_samples=marginal_samples,
                           num=num, seed=seed,
                           train_s=train_s, sample_s=sample_s, theory_cbw2_uvp=th[sampler], rank_floor=rank, **m,
                           **{f'floor_{k}': v for k, v in fl.items()})
                with open(results_path, 'a') as f:
                    f.write(json.dumps(row) + '\n')
                print(f'{dim:>4} {eps:>5g} {sampler:>7} {m["bw2_uvp"]:>8.2f} {m["plan_bw2_uvp"]:>8.2f} '
                      f'{m["cbw2_uvp"]:>8.2f} {fl["bw2_uvp"]:>5.2f}/{fl["plan_bw2_uvp"]:>5.2f}/{fl["cbw2_uvp"]:>5.2f} {th[sampler]:>7.2f} {rank:>6.2f} {train_s:>8.0f} '
                      f'{sample_s:>8.1f}', flush=True)
    print(f'Results appended to {results_path}')


if __name__ == '__main__':
    main()
