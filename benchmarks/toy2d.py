"""2-D toy recipes for one-step EOT, with figures: source, target, one-step outputs, the spread of G for a
few inputs, and SDE trajectories, for several gamma.

    python -m benchmarks.toy2d --tasks=8gaussians-moons,gaussian-swissroll --gammas=0.01,0.1,1 \\
        --kimg=100 --outdir=/tmp/toy2d --figdir=docs

Each (task, gamma) trains through train.py on .npz data (dataset_tool.py writes the same files with
--source=toy:NAME), translates held-out inputs with generate.py (one step) and runs the f-SDE through the
library (sampling.translation.sample_sde with return_trajectory) to draw the paths. One PNG per task:
docs/toy2d-<task>.png, one row per gamma. Besides the figures it prints, per run, the sliced W2 distance
of the G and SDE outputs to held-out target samples (and that of two independent target samples, the
noise floor) and the mean transport cost E|x - y|^2 / 2, with wall times.
"""

import json
import os
import pickle
import shlex
import sys
import time

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from benchmarks.gaussian_eot import run
from data import toy
from metrics import distances
from sampling.translation import sample_sde
from torch_utils.images import PALETTE, save_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# Tasks: (source, target) samplers; each returns float32 [num, 2].

def _standard_gaussian(num, rng):
    return toy.gaussian(num, rng, mean=np.zeros(2), cov=np.eye(2))['x']


SAMPLERS = {
    'gaussian': _standard_gaussian,
    '8gaussians': lambda num, rng: toy.eight_gaussians(num, rng)['x'],
    'moons': lambda num, rng: toy.moons(num, rng)['x'] - np.float32([0.5, 0.25]),  # centred on 0
    'swissroll': lambda num, rng: toy.swiss_roll(num, rng)['x'],
    'checkerboard': lambda num, rng: toy.checkerboard(num, rng)['x'],
}


def parse_task(task):
    source, _, target = task.partition('-')
    for name in (source, target):
        if name not in SAMPLERS:
            raise click.BadParameter(f'unknown distribution "{name}" in task "{task}"; use SOURCE-TARGET with '
                                     f'names from {", ".join(SAMPLERS)}')
    return source, target


def write_task_data(task, folder, num, num_test, seed):
    """source.npz / target.npz for training, test.npz (source) and target_test.npz held out."""
    source, target = parse_task(task)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = {}
    for name, dist_name, n in (('source', source, num), ('target', target, num), ('test', source, num_test),
                               ('target_test', target, num_test)):
        paths[name] = os.path.join(folder, f'{name}.npz')
        np.savez(paths[name], x=np.asarray(SAMPLERS[dist_name](n, rng), dtype=np.float32))
    return paths

#----------------------------------------------------------------------------
# Drawing (Pillow): panels with shared bounds, points and polylines.

class Panel:
    """A square plot of 2-D data within fixed bounds (lo, hi) [2] each; draw points and paths, then .image."""

    def __init__(self, bounds, size=256, title=''):
        self.lo, self.hi = np.asarray(bounds[0], float), np.asarray(bounds[1], float)
        self.size = size
        self.image = PIL.Image.new('RGB', (size, size), (255, 255, 255))
        self.draw = PIL.ImageDraw.Draw(self.image)
        self.draw.rectangle([0, 0, size - 1, size - 1], outline=(200, 200, 200))
        self.title = title

    def _px(self, pts):
        pts = np.asarray(pts, dtype=np.float64)[..., :2]
        span = (self.hi - self.lo).max()
        u = (pts - (self.lo + self.hi) / 2) / span * (self.size - 8) + self.size / 2
        return np.stack([u[..., 0], self.size - u[..., 1]], axis=-1)

    def points(self, pts, color, radius=1.0):
        for x, y in self._px(pts):
            self.draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color)

    def paths(self, trajectories, color, width=1):
        """trajectories: [steps + 1, N, 2]; one polyline per sample."""
        px = self._px(np.asarray(trajectories))
        for k in range(px.shape[1]):
            self.draw.line([tuple(p) for p in px[:, k]], fill=color, width=width)

    def finish(self, legend=()):
        if self.title:
            self.draw.text((6, 4), self.title, fill=(0, 0, 0))
        for k, (name, color) in enumerate(legend):
            y = self.size - 14 * (len(legend) - k) - 2
            self.draw.rectangle([6, y + 2, 12, y + 8], fill=color)
            self.draw.text((16, y), name, fill=(0, 0, 0))
        return self.image


def light(color, amount=0.7):
    return tuple(int(c + (255 - c) * amount) for c in color)


def compose(rows, pad=4):
    """rows of PIL images (same size) -> one uint8 RGB array with padding."""
    h, w = rows[0][0].size[1], rows[0][0].size[0]
    cols = max(len(r) for r in rows)
    out = PIL.Image.new('RGB', (cols * (w + pad) + pad, len(rows) * (h + pad) + pad), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            out.paste(img, (pad + j * (w + pad), pad + i * (h + pad)))
    return np.asarray(out)

#----------------------------------------------------------------------------
# Training, sampling, measures.

def sliced_w2(a, b, num_proj=256, seed=0):
    """metrics.distances.sliced_w2 between equal-size samples [N, 2] along the random directions that the figures
    of docs/toy2d.md were measured with (NumPy's generator; metrics.distances draws its own with torch's)."""
    return distances.sliced_w2(a, b, directions=np.random.default_rng(seed).normal(size=(2, num_proj)))


def train_and_sample(paths, run_dir, gamma, kimg, seed, train_args, threads, num_test, spread_inputs, spread_draws,
                     num_paths):
    """Train, translate (generate.py, G), run the SDE with trajectories; returns dict of arrays and times."""
    cmd = [sys.executable, 'train.py', '--name=toy2d', f'--outdir={run_dir}', '--nosubdir',
           f'--data1train={paths["source"]}', f'--data2train={paths["target"]}', f'--data1test={paths["test"]}',
           f'--gamma={gamma}', f'--duration={kimg / 1000}', f'--tick={max(kimg / 10, 0.001)}', '--snap=100000',
           '--dump=100000', '--workers=0', '--device=cpu', '--no-tensorboard', f'--seed={seed}'] + train_args
    train_s = run(cmd, run_dir + '.log', threads)
    snap_path = os.path.join(run_dir, sorted(f for f in os.listdir(run_dir) if f.startswith('network-snapshot-'))[-1])
    out_dir = run_dir + '-G'
    t0 = time.perf_counter()
    run([sys.executable, 'generate.py', f'--network={snap_path}', f'--data={paths["test"]}', f'--outdir={out_dir}',
         '--sampler=G', f'--max={num_test}', '--batch=4096', '--device=cpu'], out_dir + '.log', threads)
    with np.load(os.path.join(out_dir, 'samples.npz')) as f:
        x, y_g = f['x'], f['y'][:, 0]
    spread_dir = run_dir + '-spread'
    run([sys.executable, 'generate.py', f'--network={snap_path}', f'--data={paths["test"]}', f'--outdir={spread_dir}',
         '--sampler=G', f'--max={spread_inputs}', f'--repeats={spread_draws}', '--device=cpu'],
        spread_dir + '.log', threads)
    with np.load(os.path.join(spread_dir, 'samples.npz')) as f:
        spread = f['y']
    with open(snap_path, 'rb') as f:
        snap = pickle.load(f)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        y_sde, traj = sample_sde(snap['f'], torch.as_tensor(x), snap['gamma'], snap['sde_steps'],
                                 randn_like=lambda a: torch.randn(a.shape, generator=gen), return_trajectory=True)
    sample_s = time.perf_counter() - t0
    traj = torch.stack(traj)[:, :num_paths].numpy()
    return dict(x=x, y_g=y_g, spread=spread, y_sde=y_sde.numpy(), traj=traj, train_s=train_s, sample_s=sample_s)


def task_figure(task, rows, source, target, path):
    """One row per gamma: data | G outputs | G spread for a few inputs | SDE paths."""
    every = np.concatenate([source, target] + [np.concatenate([r['y_g'], r['y_sde']]) for _, r in rows])
    lo, hi = np.percentile(every, 0.5, axis=0), np.percentile(every, 99.5, axis=0)
    pad = 0.08 * (hi - lo).max()
    bounds = (lo - pad, hi + pad)
    blue, orange, green, red = PALETTE[0], PALETTE[1], PALETTE[2], PALETTE[3]
    images = []
    for gamma, r in rows:
        p0 = Panel(bounds, title=f'{task}: data')
        p0.points(target, light(orange, 0.3))
        p0.points(source, light(blue, 0.3))
        p1 = Panel(bounds, title=f'gamma={gamma:g}: G(x)')
        p1.points(target, light(orange, 0.8))
        p1.points(r['y_g'], green)
        p2 = Panel(bounds, title=f'gamma={gamma:g}: G(x, z), {r["spread"].shape[1]} z per x')
        p2.points(target, light(orange, 0.85))
        for k in range(r['spread'].shape[0]):
            color = PALETTE[(k + 2) % len(PALETTE)]
            p2.points(r['spread'][k], color, radius=1.2)
            p2.points(r['x'][k:k + 1], (0, 0, 0), radius=3)
        p3 = Panel(bounds, title=f'gamma={gamma:g}: SDE paths')
        p3.points(target, light(orange, 0.85))
        p3.paths(r['traj'], light(blue, 0.55))
        p3.points(r['traj'][0], blue, radius=1.5)
        p3.points(r['traj'][-1], red, radius=1.5)
        images.append([p0.finish([('source', blue), ('target', orange)]), p1.finish([('G output', green)]),
                       p2.finish([('input x', (0, 0, 0))]), p3.finish([('x0', blue), ('x1', red)])])
    save_png(compose(images), path)

#----------------------------------------------------------------------------

@click.command(context_settings=dict(max_content_width=120))
@click.option('--tasks', help='SOURCE-TARGET pairs, comma-separated', metavar='LIST',
              default='8gaussians-moons,gaussian-swissroll', show_default=True)
@click.option('--gammas', help='Entropies (train.py --gamma), one figure row each', metavar='LIST',
              default='0.01,0.1,1', show_default=True)
@click.option('--kimg', help='Training duration per run in kimg', type=float, default=100, show_default=True)
@click.option('--train-opts', help='Extra train.py options', metavar='STR',
              default='--batch=256 --model_channels=16 --lr-rampup=0 --ema=0.01 --g-loss=stated',
              show_default=True)
@click.option('--num', help='Training samples per domain', type=int, default=20000, show_default=True)
@click.option('--num-test', help='Held-out inputs (and target samples) for plots and measures', type=int, default=1000, show_default=True)
@click.option('--threads', help='OpenMP threads per process', type=int, default=1, show_default=True)
@click.option('--seed', type=int, default=0, show_default=True)
@click.option('--outdir', help='Work directory (data, runs)', metavar='DIR', required=True)
@click.option('--figdir', help='Where to write toy2d-<task>.png', metavar='DIR', required=True)
def main(tasks, gammas, kimg, train_opts, num, num_test, threads, seed, outdir, figdir):
    """Train one-step EOT on 2-D toy pairs for several gamma; write one figure per task."""
    torch.set_num_threads(threads)
    os.makedirs(figdir, exist_ok=True)
    args = shlex.split(train_opts)
    print(f'{"task":<22} {"gamma":>6} {"SW2 G":>7} {"SW2 SDE":>8} {"SW2 floor":>9} {"cost G":>7} {"cost SDE":>8} '
          f'{"train_s":>8} {"sample_s":>8}')
    for task in tasks.split(','):
        paths = write_task_data(task, os.path.join(outdir, task, 'data'), num, num_test, seed)
        with np.load(paths['source']) as f:
            source = f['x'][:num_test]
        with np.load(paths['target']) as f:
            target = f['x'][:num_test]
        with np.load(paths['target_test']) as f:
            target_test = f['x']
        rows = []
        for gamma in [float(g) for g in gammas.split(',')]:
            r = train_and_sample(paths, os.path.join(outdir, task, f'gamma{gamma:g}'), gamma, kimg, seed, args,
                                 threads, num_test, spread_inputs=4, spread_draws=100, num_paths=64)
            rows.append((gamma, r))
            row = dict(task=task, gamma=gamma, kimg=kimg, train_opts=train_opts,
                       sw2_G=sliced_w2(r['y_g'], target_test), sw2_SDE=sliced_w2(r['y_sde'], target_test),
                       sw2_floor=sliced_w2(target, target_test),
                       cost_G=float(((r['y_g'] - r['x']) ** 2).sum(1).mean() / 2),
                       cost_SDE=float(((r['y_sde'] - r['x']) ** 2).sum(1).mean() / 2),
                       train_s=r['train_s'], sample_s=r['sample_s'])
            with open(os.path.join(outdir, 'results.jsonl'), 'a') as f:
                f.write(json.dumps(row) + '\n')
            print(f'{task:<22} {gamma:>6g} {row["sw2_G"]:>7.3f} {row["sw2_SDE"]:>8.3f} {row["sw2_floor"]:>9.3f} '
                  f'{row["cost_G"]:>7.3f} {row["cost_SDE"]:>8.3f} {row["train_s"]:>8.0f} {row["sample_s"]:>8.1f}',
                  flush=True)
        path = os.path.join(figdir, f'toy2d-{task}.png')
        task_figure(task, rows, source, target, path)
        print(f'Wrote {path} ({os.path.getsize(path) / 1024:.0f} KB)')


if __name__ == '__main__':
    main()
