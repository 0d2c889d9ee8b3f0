"""DPM-OT end to end on the 2-D toy that users try first: 16 tight Gaussians on a 4 x 4 grid.

    python -m benchmarks.dpmot_toy2d --outdir=/tmp/dpmot-toy2d --figure=docs/dpmot-toy2d.png
    python -m benchmarks.dpmot_toy2d --outdir=/tmp/dpmot-toy2d --reuse      # again from the trained snapshot

Every step is a command a user would type, run as a subprocess (its output in OUTDIR/<step>.log, the command
line printed):
1. Data: 20000 items of a mixture of 16 Gaussians (std 0.05) centred on {0, 1, 2, 3}^2, written as
   OUTDIR/gmm16.npz (np.savez(path, x=...), the format train.py reads).
2. train.py --kind=denoiser (EDM preconditioning and loss, the MLP denoiser) for --kimg thousand samples.
3. potential.py --steps=18 --back-steps=5 --num-targets=2000 with every other option at its default (d = 2:
   the exact solver); with --monte-carlo-seconds=T also --solver=monte-carlo, stopped after T seconds, to show
   how far the stochastic solver gets on the same problem.
4. generate.py: DPM-OT (Euler: 5 NFE, Heun: 9 NFE) and the plain samplers at equal NFE (Heun 5 steps and
   Euler 9 steps: 9 NFE) and at 35 NFE (Heun 18 steps), --samples seeds each.

Mode mixture: the share of samples farther from every centre than the 99.9% radius of a component
(0.05 sqrt(chi2_2(0.999)) = 0.186); mode-weight TV: total variation between the nearest-centre histogram and
the uniform weights (benchmarks.dpmot_quality.mode_stats). Prints a Markdown table with the times of every
step and writes results.json and samples.png (data and four rows of samples on the same axes).
"""

import json
import math
import os
import subprocess
import sys
import time

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from benchmarks.dpmot_quality import latest_snapshot, mode_stats
from benchmarks.gaussian_eot import run
from torch_utils.images import save_png

CENTRES = np.array([[i, j] for i in range(4) for j in range(4)], dtype=np.float64)
STD = 0.05
ROWS = [  # label, generate.py options (beyond network / seeds / outdir), NFE
    ('plain Heun, 5 steps', ['--sampler=heun', '--steps=5'], 9),
    ('plain Euler, 9 steps', ['--sampler=euler', '--steps=9'], 9),
    ('DPM-OT Euler, K = 5', ['--sampler=euler', '--potential={pot}'], 5),
    ('DPM-OT Heun, K = 5', ['--sampler=heun', '--potential={pot}'], 9),
    ('plain Heun, 18 steps', ['--sampler=heun', '--steps=18'], 35),
]

#----------------------------------------------------------------------------

def write_data(path, num, seed):
    """The 16-Gaussian training set as an .npz with x [num, 2] float32 (and labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CENTRES), size=num)
    x = CENTRES[labels] + STD * rng.standard_normal((num, 2))
    np.savez(path, x=x.astype(np.float32), labels=labels.astype(np.int64))
    return x


def _panel(points, title, size=300, lo=-0.75, hi=3.75):
    img = PIL.Image.new('RGB', (size, size + 18), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(img)
    draw.text((4, 2), title, fill=(0, 0, 0))
    scale = size / (hi - lo)
    for x, y in points[:4000]:
        px, py = (x - lo) * scale, 18 + size - (y - lo) * scale
        draw.point((px, py), fill=(30, 80, 200))
    for cx, cy in CENTRES:                      # the 99.9% radius of each component, in grey
        r = STD * math.sqrt(-2 * math.log(0.001)) * scale
        px, py = (cx - lo) * scale, 18 + size - (cy - lo) * scale
        draw.ellipse((px - r, py - r, px + r, py + r), outline=(170, 170, 170))
    return np.asarray(img)


def save_figure(path, panels):
    """Panels (title, points) side by side, on the same axes."""
    save_png(np.concatenate([_panel(p, t) for t, p in panels], axis=1), path)


def _command(script, *args):
    return [sys.executable, script, *[str(a) for a in args]]


def train_and_solve(outdir, kimg, num_targets, reuse, threads, seed, mc_seconds):
    """Steps 1-3; returns (snapshot path, potential path, timings)."""
    data = os.path.join(outdir, 'gmm16.npz')
    timing = {}
    x = np.load(data)['x'] if reuse and os.path.isfile(data) else write_data(data, 20000, seed)
    runs = os.path.join(outdir, 'runs')
    if not (reuse and os.path.isdir(runs) and os.listdir(runs)):
        cmd = _command('train.py', '--kind=denoiser', '--name=gmm16', f'--outdir={runs}', f'--data={data}',
                       '--model_channels=32', f'--net-opts={{"sigma_data": {float(np.std(x)):.4f}}}', '--batch=512', '--lr=2e-3', f'--lr-rampup={kimg / 20:g}',
                       f'--ema={kimg / 20000:g}', f'--duration={kimg / 1000:g}', f'--tick={kimg / 10:g}', '--snap=100',
                       '--dump=100', '--workers=0', f'--seed={seed}', '--device=cpu', '--no-tensorboard', '--grad-clip=0')
        print('$ ' + ' '.join(cmd[1:]), flush=True)
        timing['train_s'] = run(cmd, os.path.join(outdir, 'train.log'), threads)
    _, snapshot = latest_snapshot(runs)
    pot_dir = os.path.join(outdir, 'potential')
    cmd = _command('potential.py', f'--network={snapshot}', f'--data={data}', '--steps=18', '--back-steps=5',
                   f'--num-targets={num_targets}', f'--outdir={pot_dir}', '--no-progress', *([] if reuse else ['--no-resume']))
    print('$ ' + ' '.join(cmd[1:]), flush=True)
    timing['potential_s'] = run(cmd, os.path.join(outdir, 'potential.log'), threads)
    if mc_seconds > 0:
        timing['monte_carlo'] = monte_carlo_attempt(snapshot, data, num_targets, outdir, threads, mc_seconds)
    return snapshot, os.path.join(pot_dir, 'potential.pt'), timing


def monte_carlo_attempt(snapshot, data, num_targets, outdir, threads, seconds):
    """potential.py --solver=monte-carlo on the same problem, stopped after `seconds`; its last check."""
    cmd = _command('potential.py', f'--network={snapshot}', f'--data={data}', '--steps=18', '--back-steps=5',
                   f'--num-targets={num_targets}', f'--outdir={os.path.join(outdir, "potential-mc")}', '--no-progress',
                   '--no-resume', '--solver=monte-carlo')
    print('$ ' + ' '.join(cmd[1:]) + f'    (stopped after {seconds:g} s)', flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    log_path = os.path.join(outdir, 'potential-mc.log')
    t0 = time.perf_counter()
    with open(log_path, 'w') as log:
        try:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=seconds,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        except subprocess.TimeoutExpired:
            pass
    checks = [line.strip() for line in open(log_path) if 'check on fresh samples' in line or 'Converged' in line]
    return dict(seconds=time.perf_counter() - t0, last=checks[-1] if checks else 'no check yet')


def sample_rows(snapshot, potential, outdir, samples, threads):
    """Step 4: generate.py for every row; {label: (samples [n, 2], seconds, NFE)}."""
    out = {}
    for label, opts, nfe in ROWS:
        dest = os.path.join(outdir, 'samples-' + label.split(',')[0].replace(' ', '-').lower() + f'-{nfe}nfe')
        cmd = _command('generate.py', f'--network={snapshot}', f'--seeds=0-{samples - 1}', f'--outdir={dest}',
                       '--device=cpu', *[o.format(pot=potential) for o in opts])
        print('$ ' + ' '.join(cmd[1:]), flush=True)
        seconds = run(cmd, dest + '.log', threads)
        out[label] = (np.load(os.path.join(dest, 'samples.npz'))['y'].reshape(samples, 2), seconds, nfe)
    return out


@click.command()
@click.option('--outdir', help='Working directory (data, run, potential, samples, results.json, samples.png)', metavar='DIR', required=True)
@click.option('--kimg', help='Denoiser training duration (thousands of samples)', type=click.FloatRange(min=1), default=500, show_default=True)
@click.option('--num-targets', help='N: latents of the potential', type=click.IntRange(min=2), default=2000, show_default=True)
@click.option('--samples', help='Samples per row', type=click.IntRange(min=100), default=10000, show_default=True)
@click.option('--monte-carlo-seconds', help='Also run potential.py --solver=monte-carlo for this long (0: skip)', type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--figure', help='Also write the samples figure here (e.g. docs/dpmot-toy2d.png)', metavar='PNG', default=None)
@click.option('--reuse', help='Reuse the data and trained snapshot in --outdir (the potential is resumed)', is_flag=True)
@click.option('--threads', help='Threads per step', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--seed', help='Seed of the data and training', type=int, default=0, show_default=True)
def main(outdir, kimg, num_targets, samples, monte_carlo_seconds, figure, reuse, threads, seed):
    """Train, solve and sample the 2-D 16-Gaussian toy; mode mixture of DPM-OT and plain samplers at equal NFE."""
    os.makedirs(outdir, exist_ok=True)
    snapshot, potential, timing = train_and_solve(outdir, kimg, num_targets, reuse, threads, seed, monte_carlo_seconds)
    rows = sample_rows(snapshot, potential, outdir, samples, threads)
    fresh = write_data(os.path.join(outdir, 'fresh.npz'), samples, seed + 1)
    weights = np.full(len(CENTRES), 1 / len(CENTRES))
    table = {'fresh data (noise floor)': (*mode_stats(torch.as_tensor(fresh), CENTRES, weights, STD), None, None)}
    for label, (x, seconds, nfe) in rows.items():
        table[label] = (*mode_stats(torch.as_tensor(x), CENTRES, weights, STD), nfe, seconds)
    print(f'\n| method | NFE | mode mixture | mode-weight TV | generate.py time ({samples} samples) |\n|---|---:|---:|---:|---:|')
    for label, (far, tv, nfe, seconds) in table.items():
        print(f'| {label} | {nfe or ""} | {100 * far:.2f}% | {tv:.3f} | {"" if seconds is None else f"{seconds:.1f} s"} |')
    print(json.dumps(timing, indent=1))
    with open(os.path.join(outdir, 'results.json'), 'w') as f:
        json.dump(dict(table=table, timing=timing), f, indent=1)
    panels = [('data', fresh)] + [(f'{label} ({nfe} NFE)', rows[label][0]) for label, _, nfe in ROWS
                                  if label in ('plain Heun, 5 steps', 'DPM-OT Heun, K = 5', 'plain Heun, 18 steps')]
    for path in [os.path.join(outdir, 'samples.png')] + ([figure] if figure else []):
        save_figure(path, panels)


if __name__ == '__main__':
    main()
