"""DPM-OT at ~10 network evaluations (NFE) on images, measured offline: coloured synthetic digits (16x16, all
ten classes), against the plain Euler / Heun samplers at ~10 and 35 NFE with the same denoiser. The image half
of the benchmark whose Gaussian-mixture half is benchmarks/dpmot_quality.py (its pipeline helpers are used here).

    python -m benchmarks.dpmot_digits --outdir=/tmp/dpmot-digits            # ~35 min on 2 shared CPU cores
    python -m benchmarks.dpmot_digits --outdir=/tmp/dpmot-digits-q --quick  # a smoke run (~2 min; numbers mean nothing)
    python -m benchmarks.dpmot_digits --outdir=/tmp/dpmot-digits --reuse    # metrics again, same network and potentials

Pipeline, through the project's own tools:
1. Data: `dataset_tool.py --source=synthetic-digits --colorize` (all ten classes): the training set (split train,
   --seed), and two fresh sets from the same generator (split test, seeds --seed + 1 and + 2): the reference of
   the metrics and a second one for the noise floor.
2. The judge: demo.py's digit classifier (demo.make_classifier / train_classifier, trained on freshly rendered
   coloured digits of another seed); its held-out accuracy on the fresh set is reported.
3. `train.py --kind=denoiser`: a small U-Net denoiser (EDM preconditioning and loss) for --train-kimg kimg.
4. `potential.py`: --num-targets training items noised to sigma_(S-K) of an S-step EDM schedule, and the
   semi-discrete OT potential (uniform source).
5. `sampling.dpmot.generate_samples`: the plain samplers from noise and DPM-OT (top-1 and top-k) from the
   potential, --samples seeds each. Samples are quantised to 8 bits as PNGs would be (torch_utils.images.to_uint8).

Metrics against the fresh set (noise floor: the second fresh set; a copier: the N training items behind the
latents, resampled with replacement; the distances of metrics.distances): sliced W2 (256
directions) and unbiased MMD^2 in pixel space ([-1, 1]^768; RBF widths 0.5, 1 and 2 times the median distance
between fresh images) and MMD^2 in the judge's 128-d feature space (its penultimate layer; widths likewise);
unreadable: the share of samples the judge reads with max softmax < --judge-threshold (mode mixture: blends
of digits and broken strokes); class TV: total variation between the judge's class histogram and uniform;
copying: median distance to the nearest of the N training items behind the latents, over the same for fresh
images (below 1: closer to those training items than new digits are); distinct: the number of different 8-bit
images among the samples over the number of samples (DPM-OT top-1 with a deterministic sampler gives one image
per cell: at most N). Prints a Markdown table (docs/dpmot.md holds
one), writes results.json and samples.png (the first samples of every row, with demo.summary_figure).
"""

import json
import os
import time

import click
import numpy as np
import torch

import dataset_tool
import demo
import train
from benchmarks.dpmot_quality import (_cli, dpmot_configs, latest_snapshot, parse_back_steps, report_potentials,
                                      solve_potentials)
from data.dataset import open_dataset
from metrics import distances
from sampling import dpmot, snapshots
from torch_utils.images import to_model_space, to_uint8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# Metrics specific to images with a judge; the distances come from metrics.distances.

def quantize(x):
    """Images in model space as a PNG would hold them: 8-bit, clipped to [-1, 1]."""
    return to_model_space(to_uint8(x))


@torch.no_grad()
def judge_outputs(classifier, x, batch=500):
    """(softmax probabilities [M, classes], penultimate features [M, F]) of a torch.nn.Sequential classifier
    whose last module is the linear head (demo.make_classifier)."""
    body, head = classifier[:-1], classifier[-1]
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f'judge_outputs: the last module of the classifier must be its linear head, not {head}')
    feats = torch.cat([body(x[i:i + batch]) for i in range(0, len(x), batch)])
    return torch.softmax(head(feats).double(), dim=1), feats.double()


def judge_stats(probs, threshold=0.5):
    """(share of samples with max probability below `threshold`, total variation between the histogram of the
    predicted classes and the uniform law on the classes)."""
    conf, pred = probs.max(dim=1)
    unreadable = float((conf < threshold).double().mean())
    hist = torch.bincount(pred, minlength=probs.shape[1]).double() / len(probs)
    return unreadable, 0.5 * float((hist - 1.0 / probs.shape[1]).abs().sum())


def distinct_share(x):
    """Number of different 8-bit images among the samples, over the number of samples."""
    return len(torch.unique(to_uint8(x).flatten(1), dim=0)) / len(x)


def reference(fresh, fresh2, train_items, classifier, width_factors=(0.5, 1.0, 2.0)):
    """What evaluate() compares against: the fresh images and their judge features, the MMD widths, the N
    training items behind the latents and the fresh images' median distance to them."""
    _, feats = judge_outputs(classifier, fresh)
    fresh, train_items = fresh.flatten(1).double(), train_items.flatten(1).double()
    return dict(fresh=fresh, feats=feats, train=train_items,
                pixel_widths=tuple(f * distances.median_pairwise_distance(fresh) for f in width_factors),
                feature_widths=tuple(f * distances.median_pairwise_distance(feats) for f in width_factors),
                copy_base=distances.median_nn_distance(fresh2.flatten(1), train_items))


def evaluate(x, ref, classifier, threshold=0.5):
    """The metrics of images x [M, C, H, W] in model space (M equal to the number of fresh images)."""
    x = quantize(x)
    probs, feats = judge_outputs(classifier, x)
    unreadable, class_tv = judge_stats(probs, threshold)
    flat = x.flatten(1).double()
    return dict(sw2=distances.sliced_w2(flat, ref['fresh']),
                mmd2=distances.mmd2(flat, ref['fresh'], widths=ref['pixel_widths']),
                feat_mmd2=distances.mmd2(feats, ref['feats'], widths=ref['feature_widths']), unreadable=unreadable,
                class_tv=class_tv, copy=distances.median_nn_distance(flat, ref['train']) / ref['copy_base'],
                distinct=distinct_share(x))

#----------------------------------------------------------------------------

def load_images(path):
    """(images float32 [N, C, H, W] in [-1, 1], labels int64 [N]) of an image zip with labels."""
    ds = open_dataset(path, use_labels=True)
    x = to_model_space(np.stack([ds[i][0] for i in range(len(ds))]))
    labels = torch.as_tensor(np.stack([ds.get_label(i) for i in range(len(ds))]).argmax(axis=1))
    return x, labels


def build_digits(dest, split, per_class, resolution, seed, reuse):
    if reuse and os.path.isfile(dest):
        return
    _cli(dataset_tool.main, ['--source=synthetic-digits', '--colorize', f'--split={split}', f'--num={per_class}',
                             f'--resolution={resolution}x{resolution}', f'--seed={seed}', f'--dest={dest}',
                             '--overwrite'])


def train_seconds(run_dir):
    """Training wall time and kimg of a run, from its stats.jsonl (also for a reused run)."""
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        last = json.loads(f.read().strip().splitlines()[-1])
    return last['Timing/total_sec']['mean'], last['Progress/kimg']['mean']


QUICK = dict(per_class=100, train_kimg=3, model_channels=16, num_targets=200, samples=200, classifier_images=6000,
             classifier_epochs=2)


def make_data(outdir, per_class, resolution, samples, seed, reuse):
    """The training set (outdir/train.zip) and two fresh sets of the same generator, `samples` images each:
    (training set path, fresh images, their labels, second fresh images)."""
    data_path = os.path.join(outdir, 'train.zip')
    build_digits(data_path, 'train', per_class, resolution, seed, reuse)
    fresh_paths = [os.path.join(outdir, f'fresh{i}.zip') for i in (1, 2)]
    for i, path in enumerate(fresh_paths):
        build_digits(path, 'test', samples // 10, resolution, seed + 1 + i, reuse)
    (fresh, fresh_labels), (fresh2, _) = (load_images(p) for p in fresh_paths)
    return data_path, fresh, fresh_labels, fresh2


def make_judge(outdir, resolution, classifier_images, classifier_epochs, seed, reuse):
    """demo.py's digit classifier, trained (or, with --reuse, loaded from outdir/judge.pt):
    (classifier, held-out accuracy or None when loaded)."""
    judge_path = os.path.join(outdir, 'judge.pt')
    if reuse and os.path.isfile(judge_path):
        classifier = demo.make_classifier(resolution)
        classifier.load_state_dict(torch.load(judge_path, weights_only=True))
        return classifier.eval().requires_grad_(False), None
    torch.manual_seed(seed)
    judge_cfg = dict(resolution=resolution, classifier_images=classifier_images, classifier_epochs=classifier_epochs)
    classifier, heldout_accuracy = demo.train_classifier(judge_cfg, seed=seed)
    torch.save(classifier.state_dict(), judge_path)
    return classifier, heldout_accuracy


def train_denoiser(run_root, data_path, model_channels, batch, lr, train_kimg, seed, threads):
    """train.py --kind=denoiser: a small U-Net with EDM preconditioning, into a new run under run_root."""
    net_opts = {'num_blocks': 1, 'attn_resolutions': [], 'dropout': 0, 'channel_mult': [1, 2, 2]}
    _cli(train.main, ['--kind=denoiser', '--name=digits', f'--outdir={run_root}', f'--data={data_path}',
                      '--precond=edm', f'--model_channels={model_channels}', f'--net-opts={json.dumps(net_opts)}',
                      f'--batch={batch}', f'--lr={lr:g}', f'--lr-rampup={train_kimg / 20:g}',
                      f'--ema={train_kimg / 20000:g}', f'--duration={train_kimg / 1000:g}',
                      f'--tick={train_kimg / 10:g}', '--snap=100', '--dump=100', '--workers=0', f'--seed={seed}',
                      '--device=cpu', f'--threads={threads}', '--no-tensorboard', '--grad-clip=0'])


def sample_and_score(net, configs, samples, score):
    """One row per configuration (generate `samples` seeds, score them; each row printed as JSON), and the
    figure's rows and labels (the first 12 samples of each)."""
    seeds = range(10 ** 6, 10 ** 6 + samples)
    rows, figure_rows, figure_labels = [], [], []
    for label, p, sampler, S, kw in configs:
        t0 = time.time()
        x, info = dpmot.generate_samples(net, seeds, potential=p, sampler=sampler, steps=S, batch_size=500, **kw)
        gen_s = time.time() - t0
        row = dict(method=label, sampler=sampler, nfe=info['nfe'],
                   steps=S if p is None else f'{p["num_steps"]}, K={p["back_steps"]}', time_s=gen_s, **score(x))
        rows.append(row)
        figure_rows.append(quantize(x[:12]))
        short = label.replace('DPM-OT ', 'OT ').replace('Heun top-4, angle 0.3', 'top-4 a0.3').replace('Heun top-4', 'top-4')
        figure_labels.append(f'{short} {info["nfe"]}')
        print(json.dumps(row), flush=True)
    return rows, figure_rows, figure_labels


def report(rows, floor, copier, num_train_items):
    """Print the Markdown table and each DPM-OT row against plain Heun at 35 NFE; return the table."""
    header = ('| method | steps | NFE | sliced W2 | MMD^2 x1e3 | judge-feature MMD^2 x1e3 | unreadable | class TV | '
              'copying | distinct |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|')
    fmt = lambda r: (f'{r["sw2"]:.4f} | {1e3 * r["mmd2"]:.3f} | {1e3 * r["feat_mmd2"]:.3f} | '
                     f'{100 * r["unreadable"]:.2f}% | {r["class_tv"]:.3f} | {r["copy"]:.2f} | {100 * r["distinct"]:.1f}% |')
    lines = [header, '| fresh digits (noise floor) | | | ' + fmt(floor),
             f'| the {num_train_items} training items, resampled (a copier) | | | ' + fmt(copier)]
    lines += [f'| {r["method"]} | {r["steps"]} | {r["nfe"]} | ' + fmt(r) for r in rows]
    table = '\n'.join(lines)
    print()
    print(table)
    print()
    ref35 = next(r for r in rows if r['method'] == 'Heun' and r['nfe'] == 35)
    for r in rows:
        if r['method'].startswith('DPM-OT'):
            print(f'{r["method"]:30s} K={r["steps"].split("K=")[1]:>2s}: NFE {r["nfe"]}/35, sliced W2 x'
                  f'{r["sw2"] / ref35["sw2"]:.2f}, MMD^2 x{r["mmd2"] / ref35["mmd2"]:.2f}, unreadable '
                  f'{100 * r["unreadable"]:.2f}% vs {100 * ref35["unreadable"]:.2f}% of plain Heun at 35 NFE')
    return table


@click.command()
@click.option('--outdir', help='Working directory (data, judge, run, potentials, results)', metavar='DIR', required=True)
@click.option('--per-class', help='Training images per class (ten classes)', type=click.IntRange(min=10), default=1000, show_default=True)
@click.option('--resolution', help='Image side', type=click.IntRange(min=8), default=16, show_default=True)
@click.option('--train-kimg', help='Denoiser training duration (thousands of images)', type=click.FloatRange(min=0.1), default=350, show_default=True)
@click.option('--model-channels', help='U-Net base channels (channel_mult 1,2,2, one block per level, no attention)', type=click.IntRange(min=4), default=32, show_default=True)
@click.option('--batch', help='Denoiser training batch', type=click.IntRange(min=1), default=128, show_default=True)
@click.option('--lr', help='Denoiser learning rate', type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True)
@click.option('--num-targets', help='N: latents of the potential', type=click.IntRange(min=2), default=2000, show_default=True)
@click.option('--steps', help='S: steps of the schedule the potential is made for', type=click.IntRange(min=2), default=18, show_default=True)
@click.option('--back-steps', help='K: steps run after the OT map (Heun: 2K - 1 NFE); a comma list makes one potential each', metavar='LIST', default='5,8', show_default=True)
@click.option('--samples', help='Samples per row, and images of each fresh set (a multiple of 10)', type=click.IntRange(min=20), default=3000, show_default=True)
@click.option('--classifier-images', help='Training images of the judge', type=click.IntRange(min=100), default=12000, show_default=True)
@click.option('--classifier-epochs', help='Epochs of the judge', type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--judge-threshold', help='Unreadable: max softmax of the judge below this', type=click.FloatRange(0, 1), default=0.5, show_default=True)
@click.option('--quick', help='A small smoke run (few images, minutes of training, few samples)', is_flag=True)
@click.option('--reuse', help='Reuse the data, judge, trained snapshot and potentials already in --outdir', is_flag=True)
@click.option('--seed', help='Seed of the data, judge, training and potentials', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--threads', help='torch threads (this process and train.py)', type=click.IntRange(min=1), default=1, show_default=True)
def main(outdir, per_class, resolution, train_kimg, model_channels, batch, lr, num_targets, steps, back_steps, samples,
         classifier_images, classifier_epochs, judge_threshold, quick, reuse, seed, threads):
    """Quality of DPM-OT at ~10 NFE against the plain samplers at ~10 and 35 NFE on coloured digits."""
    if quick:
        per_class, train_kimg, model_channels, num_targets, samples = (QUICK[k] for k in (
            'per_class', 'train_kimg', 'model_channels', 'num_targets', 'samples'))
        classifier_images, classifier_epochs = QUICK['classifier_images'], QUICK['classifier_epochs']
    if samples % 10:
        raise click.BadParameter(f'--samples={samples} must be a multiple of 10 (fresh sets: samples / 10 per class)')
    back_steps = parse_back_steps(back_steps, steps)
    torch.set_num_threads(threads)
    os.makedirs(outdir, exist_ok=True)
    timing = {}

    # 1. Data: training set and two fresh sets of the same generator; 2. the judge.
    t0 = time.time()
    data_path, fresh, fresh_labels, fresh2 = make_data(outdir, per_class, resolution, samples, seed, reuse)
    timing['data_s'] = time.time() - t0
    t0 = time.time()
    classifier, heldout_accuracy = make_judge(outdir, resolution, classifier_images, classifier_epochs, seed, reuse)
    fresh_accuracy = float((judge_outputs(classifier, fresh)[0].argmax(dim=1) == fresh_labels).double().mean())
    timing['judge_s'] = time.time() - t0
    print(f'Judge: accuracy {100 * fresh_accuracy:.2f}% on the {len(fresh)} fresh digits', flush=True)

    # 3. Denoiser training (or the run already there, with --reuse); 4. potentials (one per K).
    run_root = os.path.join(outdir, 'runs')
    if not (reuse and os.path.isdir(run_root)):
        train_denoiser(run_root, data_path, model_channels, batch, lr, train_kimg, seed, threads)
    run_dir, network = latest_snapshot(run_root)
    timing['train_s'], trained_kimg = train_seconds(run_dir)
    net, _ = snapshots.load_denoiser(network)
    num_params = sum(p.numel() for p in net.parameters())
    pots = solve_potentials(network, data_path, outdir, steps, back_steps, num_targets, seed, reuse, timing)
    train_set = open_dataset(data_path)
    train_items = to_model_space(np.stack([train_set[int(i)][0] for i in pots[back_steps[0]]['indices']]))

    # 5. References (noise floor; a perfect copier: the N training items behind the latents, drawn with
    # replacement, what DPM-OT top-1 would give if the last K steps only removed the latents' noise), then
    # generation and metrics.
    t0 = time.time()
    ref = reference(fresh, fresh2, train_items, classifier)
    floor = evaluate(fresh2, ref, classifier, judge_threshold)
    draw = torch.randint(len(train_items), (samples,), generator=torch.Generator().manual_seed(seed))
    copier = evaluate(train_items[draw], ref, classifier, judge_threshold)
    timing['reference_s'] = time.time() - t0
    configs = [('Euler', None, 'euler', 10, {}), ('Heun', None, 'heun', 6, {}),
               ('Euler', None, 'euler', 35, {}), ('Heun', None, 'heun', 18, {})] + dpmot_configs(pots)
    rows, figure_rows, figure_labels = sample_and_score(net, configs, samples,
                                                        lambda x: evaluate(x, ref, classifier, judge_threshold))

    # Report.
    table = report(rows, floor, copier, len(train_items))
    demo.summary_figure([fresh2[:12]] + figure_rows, ['fresh digits'] + figure_labels,
                        os.path.join(outdir, 'samples.png'))
    print(f'\nnetwork: {num_params:,} parameters, {trained_kimg:g} kimg; judge accuracy on fresh digits '
          f'{100 * fresh_accuracy:.2f}%')
    print(f'times (s): {json.dumps({k: round(v) for k, v in timing.items()})}; generation and metrics per row: '
          f'{", ".join(str(round(r["time_s"])) for r in rows)}')
    summary = dict(config=dict(per_class=per_class, resolution=resolution, train_kimg=train_kimg,
                               model_channels=model_channels, batch=batch, lr=lr, num_targets=num_targets,
                               steps=steps, back_steps=back_steps, samples=samples, classifier_images=classifier_images,
                               classifier_epochs=classifier_epochs, judge_threshold=judge_threshold, seed=seed,
                               quick=quick),
                   network=dict(path=network, kimg=trained_kimg, parameters=num_params),
                   judge=dict(heldout_accuracy=heldout_accuracy, fresh_accuracy=fresh_accuracy),
                   widths=dict(pixel=ref['pixel_widths'], feature=ref['feature_widths']),
                   timing=timing, potentials=report_potentials(pots, steps), floor=floor, copier=copier, rows=rows,
                   table=table, torch_threads=torch.get_num_threads())
    with open(os.path.join(outdir, 'results.json'), 'w') as f:
        json.dump(summary, f, indent=2)


if __name__ == '__main__':
    main()
