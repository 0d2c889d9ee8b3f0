"""The demo's settings on real handwriting: scikit-learn's bundled scans of digits, 2 -> 3.

scikit-learn's `load_digits` holds 1797 handwritten digits, 8x8 pixels with 17 grey levels (the UCI optical
recognition set; bundled with scikit-learn, no download). This script makes them look like the demo's data with
dataset_tool.py (--resolution=16x16 upscales with Lanczos, --colorize tints each digit with one random saturated
colour, exactly as the demo's synthetic digits), trains the demo's model with train.py and demo.py's settings
(demo.FULL, in two processes as the demo), translates the held-out 2s with generate.py, and judges the outputs
with the demo's classifier architecture trained on the other real digits.

Seeded split of every class: the 2s and the 3s go half to training the translation (train.py), a quarter to its
test set (the 2s translated, the 3s a reference) and a quarter to the judge, which also gets every digit of the
other eight classes. So the judge never sees a digit that train.py saw or that is scored.

scikit-learn is an extra for this benchmark only (not in requirements.txt):

    .venv/bin/python -m pip install scikit-learn
    .venv/bin/python -m benchmarks.real_digits --outdir=real-digits-run      # about as long as the demo
"""

import io
import json
import os
import time
import zipfile

import click
import numpy as np
import PIL.Image
import torch

import dataset_tool
import demo
from data.dataset import open_dataset

PARTS = ('train', 'test', 'judge')
JUDGE = 'the demo\'s CNN trained on the other real digits (all ten classes, none used or scored here)'

#----------------------------------------------------------------------------

def load_sklearn_digits():
    """(images uint8 [N, 8, 8] scaled from 0..16 to 0..255, labels int [N]); a clear error without scikit-learn."""
    try:
        from sklearn.datasets import load_digits # Optional: this benchmark only.
    except ImportError:
        raise click.ClickException('this benchmark needs scikit-learn (not a requirement of the toolkit): '
                                   '.venv/bin/python -m pip install scikit-learn') from None
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def split_parts(labels, seed):
    """part name of every digit: classes 2 and 3 half 'train', a quarter each 'test' and 'judge' (seeded);
    every other class 'judge'."""
    parts = np.array(['judge'] * len(labels), dtype=object)
    rng = np.random.default_rng(seed)
    for c in (2, 3):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train, n_test = len(idx) // 2, len(idx) // 4
        parts[idx[:n_train]] = 'train'
        parts[idx[n_train:n_train + n_test]] = 'test'
    return parts


def write_grey_zip(path, images, labels):
    """8x8 grey PNGs with a dataset.json of labels: a source for dataset_tool.py."""
    with zipfile.ZipFile(path, 'w') as zf:
        names = []
        for i, (img, label) in enumerate(zip(images, labels)):
            buf = io.BytesIO()
            PIL.Image.fromarray(img, mode='L').save(buf, format='PNG')
            names.append([f'img{i:05d}.png', int(label)])
            zf.writestr(names[-1][0], buf.getvalue())
        zf.writestr('dataset.json', json.dumps({'labels': names}))


def build_data(outdir, seed, resolution):
    """The coloured 16x16 data sets, made by dataset_tool.py from the split scans. Returns their paths."""
    images, labels = load_sklearn_digits()
    parts = split_parts(labels, seed)
    data_dir = os.path.join(outdir, 'data')
    os.makedirs(data_dir, exist_ok=True)
    paths = {}
    for part in PARTS:
        source = os.path.join(data_dir, f'scans_{part}.zip')
        write_grey_zip(source, images[parts == part], labels[parts == part])
        for digit in ((2, 3) if part != 'judge' else (None,)):
            name = f'{digit}_{part}' if digit is not None else 'judge'
            dest = os.path.join(data_dir, f'{name}.zip')
            args = [f'--source={source}', f'--dest={dest}', f'--resolution={resolution}x{resolution}', '--colorize',
                    f'--seed={seed}'] + ([f'--classes={digit}'] if digit is not None else [])
            dataset_tool.main(args, standalone_mode=False)
            paths[name] = dest
    return paths


def train_judge(path, epochs, seed):
    """The demo's classifier, fitted to four fifths of the judge's digits (seeded); its accuracy on the rest."""
    ds = open_dataset(path, use_labels=True)
    x = demo.load_dataset(path)
    y = torch.as_tensor(np.array([ds.get_label(i).argmax() for i in range(len(ds))]))
    held = torch.as_tensor(np.random.default_rng(seed).permutation(len(x)) < len(x) // 5)
    return demo.fit_classifier(x[~held], y[~held], x[held], y[held], epochs, seed)

#----------------------------------------------------------------------------

@click.command()
@click.option('--outdir',  help='Where to write everything', metavar='DIR', type=str, default='real-digits-run', show_default=True)
@click.option('--kimg',    help='Training length  [default: the demo\'s]', metavar='KIMG', type=click.FloatRange(min=1))
@click.option('--epochs',  help='Epochs of the judge', metavar='INT', type=click.IntRange(min=1), default=40, show_default=True)
@click.option('--seed',    help='Seed of the split and the colours', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--threads', help='CPU threads per process', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
def main(outdir, kimg, epochs, seed, threads):
    """Real scanned digits 2 -> 3 with the demo's settings; prints and writes the demo's figures."""
    start = time.time()
    torch.set_num_threads(threads)
    cfg = dict(demo.FULL, kimg=kimg or demo.FULL['kimg'])
    outdir = os.path.abspath(outdir)
    demo._prepare_outdir(outdir)
    click.echo(f'Real digits (scikit-learn load_digits) 2 -> 3, the demo\'s settings, {cfg["kimg"]:g} kimg; '
               f'output in {outdir}')
    paths = build_data(outdir, seed, cfg['resolution'])
    judge, accuracy = train_judge(paths['judge'], epochs, seed)
    torch.save(judge.state_dict(), os.path.join(outdir, 'classifier.pt'))
    click.echo(f'Judge: {100 * accuracy:.1f}% accuracy on the held-out fifth of its real digits')
    run_dir = os.path.join(outdir, 'train')
    demo.train(cfg, paths, run_dir, threads, deadline=float('inf'))
    snaps = demo.snapshots(run_dir)
    scores, reference, rows = demo.evaluate(outdir, paths, judge, snaps)
    demo.summary_figure(rows, ['input 2s', 'untrained G', f'trained G ({cfg["kimg"]:g} kimg)'],
                        os.path.join(outdir, 'demo.png'))
    report = dict(test_inputs=len(rows[0]), judge=JUDGE, classifier_accuracy=accuracy, kimg=cfg['kimg'], planned_kimg=cfg['kimg'],
                  undertrained=False, reference=reference, train_sizes={k: len(open_dataset(paths[k]))
                                                                         for k in ('2_train', '3_train')},
                  **{k: dict(snapshot=os.path.relpath(s, outdir), transport_cost=scores[k][0], read_as_3=scores[k][1])
                     for k, s in (('untrained', snaps[0]), ('trained', snaps[-1]))})
    with open(os.path.join(outdir, 'results.json'), 'w', encoding='utf-8') as f:
        json.dump(report, f, indent=2)
    demo.print_report(report, outdir)
    click.echo(f'Done in {(time.time() - start) / 60:.1f} min.')


if __name__ == '__main__':
    main()
