"""The main job on the embedded default data: coloured digits 2 -> 3, one-step EOT, trained on the CPU.

    python3 dev.py demo                     # runs this file in .venv; about 3 minutes on 2 quiet CPU cores
    python demo.py --outdir=demo-run --minutes=30
    python demo.py --quick                  # a tiny smoke version (seconds; used by tests/test_demo.py)

The work is fixed and seeded (FULL below): the same command gives the same results.json on a quiet or a busy
machine, only later on a busy one. --minutes is a time limit: if it stops training, the demo evaluates the last
snapshot and says plainly that the result is undertrained.

It uses the toolkit's own command-line tools, so it also shows how to use them:

 1. dataset_tool.py: coloured synthetic digits (Pillow's font, no download), 2s and 3s, train and test.
 2. A small digit classifier, trained here on freshly rendered digits of all ten classes with the same
    colouring (data.digits): the judge of the quality figure. It trains while step 3 runs.
 3. train.py: a small one-step EOT model 2 -> 3, FULL['kimg'] thousand images, in two processes under torchrun
    (gloo, one per core, each with half of the batch; --procs), with a progress bar and an ETA.
 4. generate.py: translates the test 2s with the tick-0 snapshot (untrained) and with the last one.
 5. Prints the quality figures of both (transport cost mean |x - G(x)|^2, share of outputs read as a 3)
    and writes demo.png (inputs, untrained and trained outputs).
"""

import json
import os
import pickle
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

import dataset_tool
import dnnlib
from data import digits
from data.dataset import open_dataset

ROOT = os.path.dirname(os.path.abspath(__file__))
MARKER = '.made-by-demo'

# Everything the demo's numbers depend on (the work is fixed: `kimg` of training, whatever the machine).
FULL = dict(
    resolution=16, num_train=2000, num_test=500,               # data: per class; test 2s are translated
    classifier_images=6000, classifier_epochs=3,              # the judge
    # One step each per iteration, the generator slowest: G exploits a lagging f (the transport term is linear
    # in G's output), so lr_g > lr_f diverged and G_iters > D_iters left the critic too weak to teach G. Without
    # a gradient penalty the critic's scores grew without bound and the share read as 3 swung between 14% and
    # 69% over 160 kimg; with --d-gp=10 it reached 91% at 40 kimg. Even so, with Adam's default betas the share
    # swung between 20% and 97% from one kimg to the next late in training (seed 1; seed 0: 90% at 46 kimg, 4% at
    # 50); betas (0.5, 0.9), WGAN-GP's usual, gave a steady rise (seed 0: >= 95% from 45 to 56 kimg). The penalty on
    # every 4th critic step (weight x 4) learned as the penalty on every step did, 1.2x faster (docs/recipes.md).
    # The f- and D-steps train on the G-step's own outputs (reuse_G_output: one G pass per iteration instead of
    # three, 1.10-1.16x faster) and share its passes through f and D (share_passes, 1.1x more). With all that and
    # one critic step per iteration G collapsed onto one digit shape (colours following the inputs) and hopped
    # between shapes from snapshot to snapshot: 95 % read as a 3 at 50 kimg at one seed of four. Two critic steps
    # per iteration (1.2x the time per kimg) keep the shapes apart and the rise steady at every seed measured
    # (docs/recipes.md, "Six seeds"). Not taken: the penalty every 8th or 16th critic step (12.0% and 94.6% at
    # 50 kimg), batch 128 (half the steps; 3.0% with lr x sqrt 2), a minibatch-std feature in the critic, a
    # heavier transport term (both measured at seed 1: hops, or no 3s by 50 kimg), a critic of width 12 (1.13x
    # faster; 92.0% at seed 0, its shapes collapsing).
    batch=64, model_channels=8, gamma=0.1, G_iters=1, f_iters=1, D_iters=2, lr_g=2e-4, lr_f=3e-4, lr_D=3e-4,
    adam_betas='0.5,0.9', D_gp=10, D_gp_every=4, reuse_G_output=True, share_passes=True,
    net_opts={'num_blocks': 1, 'attn_resolutions': [], 'dropout': 0, 'channel_mult': [1, 2, 2],
              'G': {'residual': True}, 'D': {'model_channels': 16, 'zero_init': False}},
    # The judged G is the EMA of G's weights with a half-life of 8 kimg (ramped up as 0.2 x the images seen, so 8
    # from 40 kimg on): 97.2 % read as a 3 at seed 0 where the 2-kimg EMA read 93.2 %, 96.9 % on average over six
    # seeds against 95.4 %, and a lower transport cost (docs/recipes.md, "Six seeds"). The EMA does not change
    # training, only the snapshots.
    kimg=50, tick_kimg=1, snap_ticks=5, ema=0.008, ema_rampup=0.2, # snapshots every 5 kimg: what a time limit keeps
    # Two training processes (torchrun, gloo), each with half of the batch: the second core was idle, and two
    # processes train 1.45-1.48x faster per kimg (benchmarks/demo_procs.py). A fixed count, not the machine's: each
    # process draws its own random numbers, so the figures depend on it.
    procs=2,
)
# Few large steps (1 kimg in 8 iterations: per-step overhead dominates tiny networks), snapshots at kimg 0 and 1.
QUICK = dict(FULL, num_train=48, num_test=24, classifier_images=400, classifier_epochs=1, batch=128,
             model_channels=4, net_opts=dict(FULL['net_opts'], D={'model_channels': 4, 'zero_init': False}),
             kimg=1, tick_kimg=0.5, snap_ticks=100)

JUDGE = 'a CNN trained on rendered digits of all ten classes'

#----------------------------------------------------------------------------
# Small helpers.

def _stage(num, text):
    click.echo(f'\n[{num}/5] {text}', err=False)


def tool_env(**extra):
    """The environment of a toolkit script run as a subprocess (from ROOT, with ROOT importable), plus `extra`."""
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), **extra)


def _run_tool(args, log_path=None, echo=None):
    """Run one of the toolkit's scripts with this Python; on failure raise with the tail of its output."""
    cmd = [sys.executable, *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if echo is not None and echo(line):
            click.echo('      ' + line.rstrip())
    proc.wait()
    if log_path is not None:
        with open(log_path, 'a', encoding='utf-8') as f:
            f.writelines(lines)
    if proc.returncode != 0:
        tail = ''.join(lines[-25:])
        raise click.ClickException(f'{os.path.basename(args[0])} failed (exit status {proc.returncode}):\n{tail}')
    return ''.join(lines)


def _prepare_outdir(outdir):
    """Use `outdir` for a fresh demo run: it must be new, empty, or an earlier demo run (which is replaced)."""
    if os.path.isdir(outdir) and os.listdir(outdir):
        if not os.path.isfile(os.path.join(outdir, MARKER)):
            raise click.ClickException(f'--outdir="{outdir}" exists and was not made by demo.py; choose a new '
                                       'directory (nothing there was changed)')
        for name in ('data', 'train', 'generated', 'demo.png', 'results.json', 'classifier.pt', 'train-console.txt'):
            path = os.path.join(outdir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(outdir, exist_ok=True)
    open(os.path.join(outdir, MARKER), 'w').close()

#----------------------------------------------------------------------------
# 1. Data.

def data_paths(data_dir):
    """The demo's four image sets in `data_dir`: {'2_train' | '2_test' | '3_train' | '3_test': path of its zip}."""
    return {f'{digit}_{split}': os.path.join(data_dir, f'{digit}_{split}.zip')
            for digit in (2, 3) for split in ('train', 'test')}


def build_data(outdir, cfg):
    """The four image sets, with dataset_tool.py (its click command, in this process). Returns their paths."""
    data_dir = os.path.join(outdir, 'data')
    os.makedirs(data_dir, exist_ok=True)
    paths = data_paths(data_dir)
    for key, dest in paths.items():
        digit, split = key.split('_')
        args = ['--source=synthetic-digits', f'--classes={digit}', '--colorize', f'--split={split}',
                f'--num={cfg[f"num_{split}"]}', f'--resolution={cfg["resolution"]}x{cfg["resolution"]}', f'--dest={dest}']
        try:
            dataset_tool.main(args, standalone_mode=False)
        except click.ClickException as err:
            raise click.ClickException(f'dataset_tool.py {" ".join(args)}: {err.message}') from None
    return paths

#----------------------------------------------------------------------------
# 2. The judge: a digit classifier.

def render_coloured_digits(num, seed, resolution):
    """`num` digits of random classes 0..9, tinted with random saturated colours as dataset_tool.py --colorize
    does: (images float32 [num, 3, R, R] in [-1, 1], labels int64 [num])."""
    rng = np.random.default_rng([seed, 2024])
    labels = rng.integers(0, 10, size=num)
    grey = digits.render_digits(labels, seed=seed, resolution=resolution)
    colours = digits.hue_colors(rng.random(num))
    images = np.stack([digits.colorize(g, c) for g, c in zip(grey, colours)]).transpose(0, 3, 1, 2)
    return torch.as_tensor(images).float() / 127.5 - 1, torch.as_tensor(labels)


def add_clutter(x, gen):
    """Augmentation that makes the judge read shapes, not stray marks: to half of the images add a soft
    blob of a random colour at a random place, and to all a little pixel noise (a G can produce such marks
    cheaply; they must not make a 2 read as a 3)."""
    n, _, res, _ = x.shape
    coords = torch.arange(res, dtype=torch.float32)
    centre = torch.rand([n, 2], generator=gen) * res
    width = 0.5 + torch.rand([n, 1, 1], generator=gen) * res / 4
    blob = torch.exp(-((coords[None, :, None] - centre[:, 0, None, None]) ** 2 +
                       (coords[None, None, :] - centre[:, 1, None, None]) ** 2) / (2 * width ** 2))
    colour = torch.rand([n, 3, 1, 1], generator=gen) * 2 * (torch.rand([n, 1, 1, 1], generator=gen) < 0.5)
    noise = torch.randn(x.shape, generator=gen) * 0.1 * torch.rand([n, 1, 1, 1], generator=gen)
    return (x + colour * blob[:, None] + noise).clamp(-1, 1)


def make_classifier(resolution):
    """A small CNN: two conv-ReLU-maxpool stages and a two-layer head, 10 classes."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(64 * (resolution // 4) ** 2, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def train_classifier(cfg, seed=0):
    """Train the judge on freshly rendered digits (with add_clutter); returns (classifier in eval mode,
    accuracy on clean held-out digits)."""
    res = cfg['resolution']
    x, y = render_coloured_digits(cfg['classifier_images'], seed + 100, res)
    x_test, y_test = render_coloured_digits(max(cfg['classifier_images'] // 5, 100), seed + 101, res)
    return fit_classifier(x, y, x_test, y_test, cfg['classifier_epochs'], seed)


def fit_classifier(x, y, x_test, y_test, epochs, seed=0):
    """A make_classifier() CNN fitted to images x [N, 3, R, R] in [-1, 1] with labels y (Adam, batches of 128,
    add_clutter on every batch); returns (classifier in eval mode, accuracy on x_test)."""
    torch.manual_seed(seed)
    net = make_classifier(x.shape[-1])
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            loss = torch.nn.functional.cross_entropy(net(add_clutter(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval().requires_grad_(False)
    accuracy = float((classify(net, x_test) == y_test).float().mean())
    return net, accuracy


@torch.no_grad()
def classify(net, images):
    return torch.cat([net(images[i:i + 500]).argmax(dim=1) for i in range(0, len(images), 500)])


class Background(threading.Thread):
    """Run fn() in a thread (torch ops release the GIL); .result() re-raises its exception."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.value, self.error = fn, None, None

    def run(self):
        try:
            self.value = self.fn()
        except BaseException as err: # Re-raised in the main thread.
            self.error = err

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.value

#----------------------------------------------------------------------------
# 3. Training: a fixed amount of work, in one train.py run (--procs processes).

def _train_args(cfg, paths, run_dir, threads):
    args = ['train.py', '--name=demo', f'--outdir={run_dir}', '--nosubdir', '--device=cpu', f'--threads={threads}',
            f'--data1train={paths["2_train"]}', f'--data2train={paths["3_train"]}',
            f'--data1test={paths["2_test"]}', f'--data2test={paths["3_test"]}',
            f'--batch={cfg["batch"]}', f'--model-channels={cfg["model_channels"]}',
            f'--net-opts={json.dumps(cfg["net_opts"])}', f'--gamma={cfg["gamma"]}',
            f'--g-iters={cfg["G_iters"]}', f'--f-iters={cfg["f_iters"]}', f'--d-iters={cfg["D_iters"]}',
            f'--lr-g={cfg["lr_g"]}', f'--lr-f={cfg["lr_f"]}', f'--lr-d={cfg["lr_D"]}', f'--d-gp={cfg["D_gp"]}',
            f'--d-gp-every={cfg["D_gp_every"]}', f'--adam-betas={cfg["adam_betas"]}', '--lr-rampup=0',
            f'--reuse-g-output={cfg["reuse_G_output"]}', f'--share-passes={cfg["share_passes"]}',
            f'--ema={cfg["ema"]}', f'--ema-rampup={cfg["ema_rampup"]}',
            f'--duration={cfg["kimg"] / 1000:.6f}', f'--tick={cfg["tick_kimg"]}', f'--snap={cfg["snap_ticks"]}',
            '--dump=100000', '--workers=0', '--seed=0', '--no-tensorboard']
    return args


class TrainingProgress:
    """A progress bar with an ETA for train.py's run, fed with its console lines (the tick lines give kimg)."""

    def __init__(self, total_kimg, interval):
        self.total, self.kimg, self.t0 = total_kimg, 0.0, time.time()
        self.line = dnnlib.util.ProgressLine(interval=interval, delay=0)

    def feed(self, line):
        match = re.match(r'tick \d+\s+kimg (\S+)', line)
        if match:
            self.kimg = float(match.group(1))
        self.show()

    def show(self, force=False):
        elapsed = time.time() - self.t0
        frac = min(self.kimg / self.total, 1.0)
        bar = '#' * int(round(24 * frac)) + '-' * (24 - int(round(24 * frac)))
        eta = dnnlib.util.format_time(elapsed * (1 - frac) / frac) if frac > 0 else '?'
        rate = f'{self.kimg / elapsed:.3g} kimg/s' if self.kimg > 0 else '? kimg/s'
        self.line.update(f'      [{bar}] {self.kimg:5.1f}/{self.total:g} kimg  {rate}  elapsed '
                         f'{dnnlib.util.format_time(elapsed)}  ETA {eta}', force=force)


def train_command(cfg, paths, run_dir, threads, procs):
    """The command line of the demo's training: train.py in one process, or under torchrun in `procs` CPU processes
    (gloo), each with 1/procs of the batch and its own random stream."""
    launcher = [sys.executable]
    if procs > 1:
        launcher += ['-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={procs}']
    return launcher + _train_args(cfg, paths, run_dir, threads)


def train(cfg, paths, run_dir, threads, deadline, progress_interval=30, procs=None):
    """Run train.py once for cfg['kimg'] kimg (in `procs` processes, default cfg['procs']), with a progress bar;
    stop it at time.time() `deadline`.

    Returns True if it finished, False if it was stopped at the deadline (the snapshots so far remain).
    """
    log = os.path.join(os.path.dirname(run_dir), 'train-console.txt')
    procs = cfg['procs'] if procs is None else procs
    cmd = train_command(cfg, paths, run_dir, threads, procs)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=tool_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)], daemon=True)
    reader.start()
    progress = TrainingProgress(cfg['kimg'], progress_interval)
    finished, tail = False, []
    with open(log, 'w', encoding='utf-8') as f:
        f.write(f'$ {shlex.join(cmd)}\n') # The command line, to rerun or vary (e.g. --seed).
        while not finished:
            if time.time() >= deadline:
                proc.terminate() # The time limit: the snapshots written so far are kept.
                break
            try:
                line = lines.get(timeout=max(0.01, min(1.0, deadline - time.time())))
            except queue.Empty:
                progress.show()
                continue
            finished = line is None
            if not finished:
                f.write(line)
                tail = (tail + [line])[-25:]
                progress.feed(line)
        proc.wait()
        reader.join()
        while not lines.empty(): # What train.py printed after the time limit.
            f.write(lines.get() or '')
    progress.show(force=True)
    progress.line.close()
    if finished and proc.returncode != 0:
        raise click.ClickException(f'train.py failed (exit status {proc.returncode}):\n{"".join(tail)}')
    return finished

#----------------------------------------------------------------------------
# 4.-5. Generation, figures.

def snapshots(run_dir):
    names = [n for n in os.listdir(run_dir) if re.fullmatch(r'network-snapshot-\d+\.pkl', n)]
    return [os.path.join(run_dir, n) for n in sorted(names)]


def snapshot_kimg(path):
    """The training progress (kimg) recorded in a snapshot."""
    with open(path, 'rb') as f:
        return round(float(pickle.load(f)['kimg']), 3)


def generate(snapshot, data, outdir):
    """generate.py with the one-step G on every input of `data` (input i with seed i), plus its grid
    (OUTDIR-grid.png, beside the folder)."""
    _run_tool(['generate.py', f'--network={snapshot}', f'--data={data}', f'--outdir={outdir}', '--device=cpu',
               '--grid', '--batch=100'], echo=lambda line: line.startswith('Wrote'))


def load_dataset(path):
    """Every item of an image dataset as float [N, C, H, W] in [-1, 1]."""
    ds = open_dataset(path)
    return torch.as_tensor(np.stack([ds[i][0] for i in range(len(ds))])).float() / 127.5 - 1


def load_images(paths):
    arrays = [np.asarray(PIL.Image.open(p).convert('RGB')) for p in paths]
    return torch.as_tensor(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def quality(classifier, x, y):
    """(transport cost: mean over images and pixels of (x - y)^2 in [-1, 1] units, share of y read as 3)."""
    cost = float((x - y).square().flatten(1).mean(1).mean())
    return cost, float((classify(classifier, y) == 3).float().mean())


def summary_figure(rows, labels, path, scale=4, columns=12):
    """Rows of images (uint8-exact float [-1, 1]) side by side with a label column, upscaled."""
    res = rows[0].shape[-1]
    cell = res * scale
    label_w = 110
    img = PIL.Image.new('RGB', (label_w + columns * cell, len(rows) * cell), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(img)
    for r, (row, label) in enumerate(zip(rows, labels)):
        draw.text((6, r * cell + cell // 2 - 6), label, fill=(0, 0, 0))
        for c in range(min(columns, len(row))):
            arr = ((row[c].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            tile = PIL.Image.fromarray(arr).resize((cell, cell), PIL.Image.NEAREST)
            img.paste(tile, (label_w + c * cell, r * cell))
    img.save(path)

#----------------------------------------------------------------------------

def evaluate(outdir, paths, classifier, snaps):
    """Translate the test 2s with the first and last snapshot (generate.py, two processes at once) and score both:
    {'untrained'|'trained': (transport cost, share read as 3)}, the references and the images for the figure."""
    gen_dirs = dict(untrained=os.path.join(outdir, 'generated', 'untrained'),
                    trained=os.path.join(outdir, 'generated', 'trained'))
    runs = [Background(lambda s=s, d=d: generate(s, paths['2_test'], d))
            for s, d in ((snaps[0], gen_dirs['untrained']), (snaps[-1], gen_dirs['trained']))]
    for run in runs: # Both at once: two processes for two cores.
        run.start()
    for run in runs:
        run.result()
    x, targets = load_dataset(paths['2_test']), load_dataset(paths['3_test'])
    outputs = {k: load_images([os.path.join(d, f'{i:06d}.png') for i in range(len(x))]) for k, d in gen_dirs.items()}
    scores = {k: quality(classifier, x, y) for k, y in outputs.items()}
    m = min(len(x), len(targets)) # (Equal in the demo; real data sets may differ by one.)
    reference = dict(real_3s_read_as_3=float((classify(classifier, targets) == 3).float().mean()),
                     input_2s_read_as_3=float((classify(classifier, x) == 3).float().mean()),
                     cost_2s_to_random_3s=float((x[:m] - targets[:m]).square().flatten(1).mean(1).mean()))
    return scores, reference, [x, outputs['untrained'], outputs['trained']]


def print_report(report, outdir):
    n, u, t, ref = report['test_inputs'], report['untrained'], report['trained'], report['reference']
    trained_label = f'trained G ({report["kimg"]:g} kimg)'
    click.echo(f'\n{n} test 2s translated by the one-step G. Judge: {report["judge"]} '
               f'({100 * report["classifier_accuracy"]:.1f}% held-out accuracy).')
    click.echo(f'  {"":34s}{"transport cost":>16s}{"read as a 3":>14s}')
    click.echo(f'  {"untrained G (tick-0 snapshot)":34s}{u["transport_cost"]:>16.4f}{100 * u["read_as_3"]:>13.1f}%')
    click.echo(f'  {trained_label:34s}{t["transport_cost"]:>16.4f}{100 * t["read_as_3"]:>13.1f}%')
    click.echo(f'  {"reference: the real test 3s":34s}{"":>16s}{100 * ref["real_3s_read_as_3"]:>13.1f}%')
    click.echo(f'  {"reference: 2s paired with random 3s":34s}{ref["cost_2s_to_random_3s"]:>16.4f}{"":>14s}')
    click.echo('  (transport cost: mean over images and pixels of (x - G(x))^2, pixels in [-1, 1])')
    if report['undertrained']:
        click.echo(f'\nUNDERTRAINED: the time limit stopped training at {report["kimg"]:g} of {report["planned_kimg"]:g} '
                   'kimg, so these are not the demo\'s figures. Run again with a larger --minutes (or on a less busy '
                   'machine: the same command always does the same work, only slower).')
    click.echo(f'\nResults in {outdir}:')
    click.echo(f'  demo.png                 inputs, untrained and trained outputs')
    click.echo(f'  generated/trained/       {n} translated PNGs, their grid beside them in trained-grid.png (untrained/: tick 0)')
    click.echo(f'  train/                   the run: snapshots, fakes-*.png, log.txt, stats.jsonl')
    click.echo(f'  results.json             the figures above (the same for the same command on any machine)')


@click.command()
@click.option('--outdir',  help='Where to write everything (replaced if it holds an earlier demo run)', metavar='DIR', type=str, default='demo-run', show_default=True)
@click.option('--minutes', help='Time limit of the whole demo: training stops there, and the result is reported as undertrained. The work itself is fixed (about 3 minutes on 2 quiet cores)', metavar='FLOAT', type=click.FloatRange(min=1), default=30.0, show_default=True)
@click.option('--quick',   help='A tiny smoke version (a few training steps; the numbers mean nothing)', is_flag=True)
@click.option('--threads', help='CPU threads per process (the figures depend on it in the last digits; 1 is fastest on a busy machine)', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--procs',   help=f'Training processes (torchrun, gloo), each with its share of the batch. The figures depend on it (each process draws its own random numbers)  [default: {FULL["procs"]}]', metavar='INT', type=click.IntRange(min=1))
@click.option('--progress-interval', help='Seconds between progress lines when the output is not a terminal', metavar='SEC', type=click.FloatRange(min=1), default=30, show_default=True)
def main(outdir, minutes, quick, threads, procs, progress_interval):
    """Coloured digits 2 -> 3 with one-step EOT on the CPU: data, training, generation, quality figures.

    The demo does a fixed, seeded amount of work: the same command writes the same results.json on a quiet or a
    busy machine (only the time differs), unless --minutes stops it first.
    """
    start, cpu0 = time.time(), _cpu_seconds()
    cfg = QUICK if quick else FULL
    procs = cfg['procs'] if procs is None else procs
    if cfg['batch'] % procs:
        raise click.BadParameter(f'{procs}: the batch of {cfg["batch"]} images is not divisible by {procs} processes; '
                                 f'use a divisor of {cfg["batch"]} (1, 2, 4, ...)', param_hint='--procs')
    torch.set_num_threads(threads)
    os.environ['OMP_NUM_THREADS'] = str(threads)
    outdir = os.path.abspath(outdir)
    _prepare_outdir(outdir)
    click.echo(f'Demo: coloured digits 2 -> 3 ({cfg["resolution"]}x{cfg["resolution"]}), {cfg["kimg"]:g} kimg of '
               f'training, time limit {minutes:g} min, output in {outdir}' + (' [quick smoke version]' if quick else ''))

    _stage(1, 'Building the data with dataset_tool.py (synthetic digits, coloured)')
    paths = build_data(outdir, cfg)

    _stage(2, 'Training a digit classifier (the judge) in the background')
    judge = Background(lambda: train_classifier(cfg))
    judge.start()

    _stage(3, f'Training one-step EOT with train.py ({cfg["kimg"]:g} kimg' +
           (f', {procs} processes under torchrun)' if procs > 1 else ')'))
    run_dir = os.path.join(outdir, 'train')
    reserve = 10 if quick else 45 # Generation, evaluation, figures.
    finished = train(cfg, paths, run_dir, threads, start + minutes * 60 - reserve, progress_interval, procs)
    snaps = snapshots(run_dir)
    if len(snaps) < 2:
        raise click.ClickException(f'--minutes={minutes:g} stopped training before its first snapshot after tick 0; '
                                   'nothing to evaluate. Give it more time.')
    kimg = cfg['kimg'] if finished else snapshot_kimg(snaps[-1])

    _stage(4, 'Translating the test 2s with generate.py (tick-0 snapshot and last snapshot)')
    classifier, accuracy = judge.result()
    torch.save(classifier.state_dict(), os.path.join(outdir, 'classifier.pt'))
    scores, reference, rows = evaluate(outdir, paths, classifier, snaps)

    _stage(5, 'Quality figures')
    summary_figure(rows, ['input 2s', 'untrained G', f'trained G ({kimg:g} kimg)'], os.path.join(outdir, 'demo.png'))
    report = dict(test_inputs=len(rows[0]), judge=JUDGE, classifier_accuracy=accuracy, kimg=kimg,
                  planned_kimg=cfg['kimg'], undertrained=not finished, reference=reference,
                  **{k: dict(snapshot=os.path.relpath(s, outdir), transport_cost=scores[k][0], read_as_3=scores[k][1])
                     for k, s in (('untrained', snaps[0]), ('trained', snaps[-1]))})
    with open(os.path.join(outdir, 'results.json'), 'w', encoding='utf-8') as f:
        json.dump(report, f, indent=2)
    print_report(report, outdir)
    load = os.getloadavg() if hasattr(os, 'getloadavg') else (float('nan'),) * 3
    click.echo(f'Done in {(time.time() - start) / 60:.1f} min ({(_cpu_seconds() - cpu0) / 60:.1f} min of CPU time; '
               f'load average now {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f} on {os.cpu_count()} CPUs).')


def _cpu_seconds():
    """CPU time of this process and its finished child processes."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
