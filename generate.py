"""Translate data with a one-step EOT snapshot, sample a denoiser snapshot, or export a snapshot safely.

    python generate.py --network=runs/00000-demo/network-snapshot-000200.pkl --data=datasets/2_test.zip \\
        --outdir=out/2to3 --grid                                        # PNGs in out/2to3, grid in out/2to3-grid.png
    torchrun --standalone --nproc_per_node=4 generate.py --network=... --data=... --outdir=... --sampler=sde
    python generate.py --network=DENOISER.pkl --potential=potential.pt --outdir=out/dpmot --seeds=0-99
    python generate.py --network=snapshot.pkl --export-safe=snapshot-safe/

The script parses options and writes files; the work is in sampling/ (snapshots, translation, dpmot).
"""

import os

import click
import numpy as np
import PIL.Image
import torch

import dnnlib
from sampling import GenerationError, dpmot, outputs, rng, snapshots, translation
from sampling import potential as potential_lib
from torch_utils import distributed as dist
from torch_utils.images import save_png, scatter_plot, to_uint8

#----------------------------------------------------------------------------
# Checking options against the snapshot's kind.

_EOT_ONLY = ('data', 'max', 'repeats', 'gamma')
_SCHEDULE = ('sigma_min', 'sigma_max', 'rho')                        # the plain sampler's schedule (edm's options)
_CHURN = ('S_churn', 'S_min', 'S_max', 'S_noise')                   # edm's stochastic sampler (euler, heun)
_DENOISER_ONLY = ('potential', 'topk', 'angle_threshold', 'class_idx') + _SCHEDULE + _CHURN
_NAMES = dict(class_idx='--class', max='--max', S_churn='--S_churn', S_min='--S_min', S_max='--S_max',
              S_noise='--S_noise', sigma_min='--sigma_min', sigma_max='--sigma_max')


def _option_name(key):
    return _NAMES.get(key, '--' + key.replace('_', '-'))


def check_options(opts, model):
    """Resolve the sampler and its defaults for the snapshot's kind; ClickException on misuse."""
    kind = model.kind
    if kind == 'classifier':
        raise click.ClickException(f'"{opts.network}" is a classifier: it judges samples (fid.py calc --metrics=mmr '
                                   '--classifier=...) and generates nothing; --export-safe writes its safe export')
    if opts.npz is not None and len(model.data_shape) != 3:
        raise click.ClickException(f'--npz writes images (an ADM-style sample batch), but "{opts.network}" works on '
                                   f'vectors of dimension {list(model.data_shape)}; its outputs go to samples.npz')
    sampler = opts.sampler or snapshots.DEFAULT_SAMPLER[kind]
    if sampler not in snapshots.SAMPLERS[kind]:
        other = 'denoiser' if kind == 'eot' else 'eot'
        raise click.ClickException(f'--sampler={sampler} applies to snapshots of kind {other}, but "{opts.network}" is '
                                   f'of kind {kind}; use --sampler={"|".join(snapshots.SAMPLERS[kind])}')
    for key in (_DENOISER_ONLY if kind == 'eot' else _EOT_ONLY):
        if opts[key] is not None:
            raise click.ClickException(f'{_option_name(key)} does not apply to {kind} snapshots ("{opts.network}")')
    if kind == 'eot':
        if opts.data is None:
            raise click.ClickException('--data is required for EOT snapshots: the inputs to translate (zip, folder or .npz)')
        if sampler == 'G' and (opts.steps is not None or opts.gamma is not None):
            raise click.ClickException('--steps and --gamma apply to --sampler=sde only; the one-step G takes neither')
    return sampler


def _grid_path(grid, outdir):
    """--grid's file: beside --outdir by default (OUTDIR-grid.png), never inside it, where fid.py calc --images=OUTDIR
    would read it as one more (larger) image."""
    path = os.path.normpath(outdir) + '-grid.png' if grid == '' else grid
    inside = os.path.commonpath([os.path.abspath(path), os.path.abspath(outdir)]) == os.path.abspath(outdir)
    if inside:
        raise click.ClickException(f'--grid="{path}" lies inside --outdir="{outdir}", where fid.py calc would read it as '
                                   'one more image; write it elsewhere (--grid alone writes OUTDIR-grid.png)')
    outputs.check_output_file(path, '--grid')
    return path


def _seeds(opts):
    if opts.seeds is None:
        return None
    try:
        return rng.parse_int_list(opts.seeds)
    except GenerationError as err:
        raise click.ClickException(str(err)) from None

#----------------------------------------------------------------------------
# Writing.

def _save_image(image, path):
    """uint8 [C, H, W] -> PNG (atomic)."""
    array = image.cpu().numpy().transpose(1, 2, 0)
    save_png(array[:, :, 0] if array.shape[2] == 1 else array, path)


def _uint8_grid(rows):
    """Rows of uint8 [N, C, H, W] tensors (rows may be shorter) -> one HWC (or HW) uint8 array."""
    cols = max(len(r) for r in rows)
    c, h, w = rows[0].shape[1:]
    grid = np.zeros([len(rows) * h, cols * w, c], dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row.cpu().numpy()):
            grid[i * h:(i + 1) * h, j * w:(j + 1) * w] = image.transpose(1, 2, 0)
    return grid[:, :, 0] if c == 1 else grid


def _gather_to_rank0(parts):
    """Every rank's list of numpy items, concatenated on rank 0 (None elsewhere)."""
    everything = dist.all_gather_object(parts)
    return [item for rank_parts in everything for item in rank_parts] if dist.get_rank() == 0 else None


def _write_sample_batch(path, png_paths, labels=None):
    """Rank 0: the ADM-style sample batch of the evaluators of the DPM-OT and ADM papers: an .npz with arr_0,
    uint8 [N, H, W, C] (C = 1 or 3), the written PNGs read back in order, and arr_1, int64 [N] labels, when the
    network is class-conditional. Written atomically."""
    arrays = [np.asarray(PIL.Image.open(p)) for p in png_paths]
    arr_0 = np.stack([a[:, :, None] if a.ndim == 2 else a for a in arrays]).astype(np.uint8)
    with dnnlib.util.atomic_write(path, 'wb') as f:
        np.savez(f, arr_0=arr_0, **({} if labels is None else dict(arr_1=np.asarray(labels, dtype=np.int64))))
    return f'{path} (arr_0 {list(arr_0.shape)}' + ('' if labels is None else f', arr_1 [{len(labels)}]') + ')'


def translate_dataset(opts, model, sampler, device):
    """EOT: translate --data; PNGs per output (each rank its own), or samples.npz for vectors (rank 0)."""
    dataset = translation.open_inputs(opts.data, model)
    num = len(dataset) if opts.max is None else min(opts.max, len(dataset))
    seeds = _seeds(opts)
    repeats = opts.repeats or 1
    if num * repeats > rng.MAX_SEEDS:
        raise click.ClickException(f'{num} input(s) x --repeats={repeats} asks for {num * repeats:,} outputs; at most '
                                   f'{rng.MAX_SEEDS:,} outputs per call (fewer --repeats, or --max with several calls)')
    if seeds is not None and len(seeds) != num:
        raise click.ClickException(f'--seeds={opts.seeds} gives {len(seeds)} seeds for {num} inputs; give exactly '
                                   f'one per input (e.g. --seeds=0-{num - 1}) or set --max={len(seeds)}')
    images = len(model.data_shape) == 3
    grid_inputs = min(num, 16) if images else num
    grid_repeats = min(repeats, 7)
    dist.print0(f'Translating {num} input(s) x {repeats} repeat(s) of "{opts.data}" with --sampler={sampler}'
                + (f' ({opts.steps or model.sde_steps} steps, gamma={model.gamma if opts.gamma is None else opts.gamma:g})'
                   if sampler == 'sde' else '') + f' on {dist.get_world_size()} process(es)')
    if dist.get_rank() == 0:
        outputs.make_output_dir(opts.outdir)
    dist.barrier()
    kept = [] # (index, repeat, output) kept for samples.npz or the grid.
    for batch in translation.iterate_translations(model, dataset, seeds=seeds, num=num, sampler=sampler,
                                                 steps=opts.steps, gamma=opts.gamma, repeats=repeats,
                                                 batch_size=opts.batch, device=device, progress=True):
        if images:
            out = to_uint8(batch.y)
            for k, (i, r) in enumerate(zip(batch.index, batch.repeat)):
                name = f'{i:06d}.png' if repeats == 1 else f'{i:06d}-{r:02d}.png'
                _save_image(out[k], os.path.join(opts.outdir, name))
                if opts.grid is not None and i < grid_inputs and r < grid_repeats:
                    kept.append((int(i), int(r), out[k].cpu()))
        else:
            kept.append((batch.index, batch.repeat, batch.y.cpu().numpy()))
    kept = _gather_to_rank0(kept)
    if dist.get_rank() != 0:
        return
    written = []
    if not images:
        dim = model.data_shape[0]
        y = np.full([num, repeats, dim], np.nan, dtype=np.float32)
        for index, repeat, out in kept:
            y[index, repeat] = out
        x = np.stack([dataset[i][0] for i in range(num)]).astype(np.float32)
        seed_table = rng.repeat_seeds(list(range(num)) if seeds is None else seeds, repeats)
        path = os.path.join(opts.outdir, 'samples.npz')
        with dnnlib.util.atomic_write(path, 'wb') as f:
            np.savez(f, x=x, y=y, seeds=seed_table)
        written.append(f'{path} (x {list(x.shape)}, y {list(y.shape)})')
    else:
        written.append(f'{num * repeats} PNG(s) in {opts.outdir}')
        if opts.npz is not None:
            names = [f'{i:06d}.png' if repeats == 1 else f'{i:06d}-{r:02d}.png' for i in range(num) for r in range(repeats)]
            written.append(_write_sample_batch(opts.npz, [os.path.join(opts.outdir, n) for n in names]))
    if opts.grid is not None:
        path = opts.grid
        if images:
            x = to_uint8(translation.load_items(dataset, range(grid_inputs), 'cpu'))
            rows = [x] + [torch.stack([img for i, r, img in sorted(kept) if r == rr]) for rr in range(grid_repeats)]
            grid = _uint8_grid(rows)
        else:
            outs = np.concatenate([out.reshape(-1, model.data_shape[0]) for _, _, out in kept])
            grid = scatter_plot({'input': np.stack([dataset[i][0] for i in range(num)]), 'output': outs})
        save_png(grid, path)
        written.append(f'{path}')
    dist.print0('Wrote ' + ', '.join(written))


def _denoiser_kwargs(opts, model, sampler):
    """The options of dpmot.iterate_samples from the command line, checked (ClickException on misuse)."""
    topk = 1 if opts.topk is None else opts.topk
    if opts.angle_threshold is not None and (opts.potential is None or topk < 2):
        raise click.ClickException('--angle-threshold applies to DPM-OT with --potential and --topk >= 2; add them or '
                                   'drop --angle-threshold')
    if opts.potential is not None:
        if not os.path.isfile(opts.potential):
            raise click.ClickException(f'--potential: no such file: "{opts.potential}" (write one with potential.py)')
        warning = potential_lib.unconverged_warning(opts.potential)
        if warning is not None and dist.get_rank() == 0:
            click.secho(f'WARNING: {warning}', fg='red', err=True)
        given = [_option_name(k) for k in _SCHEDULE if opts[k] is not None]
        if given:
            raise click.ClickException(f'{", ".join(given)}: the potential fixes the schedule (the one potential.py '
                                       'was run with); drop them, or set them on potential.py')
    churn = [_option_name(k) for k in _CHURN if opts[k] is not None]
    if churn and sampler == 'langevin':
        raise click.ClickException(f'{", ".join(churn)} apply to --sampler=euler|heun (edm\'s stochastic sampler), '
                                   'not to langevin')
    kwargs = {k: opts[k] for k in _SCHEDULE + _CHURN + ('angle_threshold',) if opts[k] is not None}
    return dict(kwargs, steps=opts.steps, potential=opts.potential, topk=topk, class_label=opts.class_idx)


def _describe_labels(opts, model):
    """One line on the labels a class-conditional network is sampled with (None for unconditional ones)."""
    if model.label_dim == 0 or opts.class_idx is not None:
        return None
    if opts.potential is not None:
        return (f'The network is class-conditional ({model.label_dim} classes): each sample takes the label of its '
                'OT cell (or the potential\'s class)')
    return (f'The network is class-conditional ({model.label_dim} classes) and --class is not set: each seed draws its '
            'label from its own generator right after its latent (edm\'s default); --class=C samples class C')


def sample_denoiser(opts, model, sampler, device):
    """Denoiser: DPM-OT / plain sampling for --seeds; PNGs per seed, or samples.npz for vectors."""
    seeds = _seeds(opts) or list(range(64))
    kwargs = _denoiser_kwargs(opts, model, sampler)
    images = len(model.data_shape) == 3
    prepared = dpmot.prepare(model, sampler, device=device, **kwargs)
    dist.print0(f'Sampling {len(seeds)} seed(s) with --sampler={sampler}, {prepared.num_steps} steps'
                + (f' (the last {prepared.back_steps} run)' if opts.potential else '')
                + f' from sigma {float(prepared.sigmas[0]):.4g} to {float(prepared.sigmas[-2]):.4g}'
                + (f', potential "{opts.potential}", top-k {kwargs["topk"]}' if opts.potential else '')
                + (f', class {prepared.class_label}' if prepared.class_label is not None else '')
                + f' on {dist.get_world_size()} process(es)')
    note = _describe_labels(opts, model)
    if note is not None:
        dist.print0(note)
    if dist.get_rank() == 0:
        outputs.make_output_dir(opts.outdir)
    dist.barrier()
    kept, grid_seeds, nfe = [], set(seeds[:64]), None
    for batch_seeds, samples, info in dpmot.iterate_samples(prepared, seeds, batch_size=opts.batch, progress=True):
        nfe = info['nfe']
        labels = info.get('labels', [None] * len(batch_seeds))
        if images:
            out = to_uint8(samples)
            for k, seed in enumerate(batch_seeds):
                _save_image(out[k], os.path.join(opts.outdir, f'{seed:06d}.png'))
                kept.append((int(seed), None if labels[k] is None else int(labels[k]),
                             out[k].cpu() if opts.grid is not None and int(seed) in grid_seeds else None))
        else:
            kept += [(int(s), None if l is None else int(l), y) for s, l, y in zip(batch_seeds, labels, samples.numpy())]
    kept = _gather_to_rank0(kept)
    nfe = [n for n in dist.all_gather_object(nfe) if n is not None]
    if dist.get_rank() == 0:
        order = {s: k for k, s in enumerate(seeds)}
        _write_denoiser_outputs(opts, model, sorted(kept, key=lambda item: order[item[0]]), nfe[0] if nfe else None)


def _write_denoiser_outputs(opts, model, kept, nfe):
    """Rank 0: samples.npz (vectors), the --npz batch and the --grid PNG from `kept`, [(seed, label or None, image or
    vector)] in order."""
    written = []
    labels = None if kept[0][1] is None else np.asarray([l for _, l, _ in kept], dtype=np.int64)
    if len(model.data_shape) == 3:
        written.append(f'{len(kept)} PNG(s) in {opts.outdir}')
        if opts.npz is not None:
            written.append(_write_sample_batch(opts.npz, [os.path.join(opts.outdir, f'{s:06d}.png') for s, _, _ in kept],
                                               labels))
    else:
        path = os.path.join(opts.outdir, 'samples.npz')
        y = np.stack([sample for _, _, sample in kept]).astype(np.float32) # Under y, as EOT outputs are.
        arrays = dict(y=y, seeds=np.asarray([s for s, _, _ in kept], dtype=np.int64))
        with dnnlib.util.atomic_write(path, 'wb') as f:
            np.savez(f, **arrays, **({} if labels is None else dict(labels=labels)))
        written.append(f'{path} (y {list(y.shape)})')
    if opts.grid is not None:
        path = opts.grid
        if len(model.data_shape) == 3:
            images_ = torch.stack([img for _, _, img in kept if img is not None])
            grid = _uint8_grid([images_[i:i + 8] for i in range(0, len(images_), 8)])
        else:
            grid = scatter_plot({'sample': np.stack([y for _, _, y in kept])})
        save_png(grid, path)
        written.append(path)
    if labels is not None:
        counts = np.bincount(labels, minlength=model.label_dim)
        dist.print0('Samples per class: ' + ', '.join(f'{c}: {n}' for c, n in enumerate(counts)))
    dist.print0(f'NFE per sample: {nfe}' if nfe is not None else 'NFE per sample: not reported')
    dist.print0('Wrote ' + ', '.join(written))

#----------------------------------------------------------------------------

@click.command(context_settings=dict(max_content_width=120))
@click.option('--network',     help='Snapshot: network-snapshot-*.pkl (path or URL; pickles run code: trusted files only), or a folder / network.json written by --export-safe', metavar='PKL|DIR|JSON', type=str, required=True)
@click.option('--outdir',      help='Where to write the outputs (PNGs, samples.npz, grid.png): a new or empty folder; one that already holds files is refused (fid.py calc would score the old files with the new ones), nothing is deleted', metavar='DIR', type=str)
@click.option('--data',        help='EOT: the inputs to translate (domain 1): image zip/folder or vector .npz', metavar='ZIP|DIR|NPZ', type=str)
@click.option('--max', '--count', 'max', help='EOT: translate only the first N inputs (under torchrun write --count: torchrun mistakes --max for its --max-restarts)  [default: all]', metavar='N', type=click.IntRange(min=1))
@click.option('--seeds',       help='Per-sample seeds, e.g. 0-99 or 1,5,10-19. EOT: one per input (input i uses seeds[i]; default 0, 1, 2, ...); denoiser: one per sample  [default: 0-63]', metavar='LIST', type=str)
@click.option('--sampler',     help='EOT: G (one step) or sde (Euler-Maruyama of the f-SDE); denoiser: euler, heun or langevin  [default: G for EOT, heun for denoisers]', type=click.Choice(['G', 'sde', 'euler', 'heun', 'langevin']))
@click.option('--steps',       help="Sampler steps  [default: the snapshot's SDE steps for sde, 18 for denoisers (with --potential: the potential's)]", metavar='INT', type=click.IntRange(min=1))
@click.option('--sigma_min', '--sigma-min', 'sigma_min', help="Denoiser: lowest noise level of the schedule, clamped to the network's range as edm does  [default: 0.002]", metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_max', '--sigma-max', 'sigma_max', help="Denoiser: highest noise level, clamped to the network's range as edm does  [default: 80]", metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--rho',         help='Denoiser: exponent of the EDM time steps  [default: 7]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--S_churn', '--S-churn', 'S_churn', help='Denoiser, euler/heun: stochasticity strength (edm\'s churn; its noise is drawn at every step, in float64, as edm draws it)  [default: 0]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--S_min', '--S-min', 'S_min', help='Denoiser, euler/heun: lowest noise level with churn  [default: 0]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--S_max', '--S-max', 'S_max', help='Denoiser, euler/heun: highest noise level with churn  [default: inf]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--S_noise', '--S-noise', 'S_noise', help='Denoiser, euler/heun: churn noise inflation  [default: 1]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--class', 'class_idx', help='Denoiser, class-conditional network: sample this class  [default: one random label per seed, drawn from its generator as edm does; with --potential: the OT cell\'s label]', metavar='INT', type=click.IntRange(min=0))
@click.option('--gamma',       help="EOT, --sampler=sde: entropy of the SDE noise  [default: the snapshot's trained gamma]", metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--repeats',     help='EOT: outputs per input; repeat r of input i uses the seed seeds[i] * R + r  [default: 1]', metavar='R', type=click.IntRange(min=1))
@click.option('--potential',   help='Denoiser: DPM-OT potential from potential.py (without it: the plain sampler from noise)', metavar='PT', type=str)
@click.option('--topk',        help='Denoiser with --potential: interpolate between the targets of the best K cells  [default: 1]', metavar='K', type=click.IntRange(min=1))
@click.option('--angle-threshold', 'angle_threshold', help='Denoiser with --potential and --topk >= 2: keep neighbour cells whose normalised dihedral angle is at most this (AE-OT rule; 0.3 blended fewer modes than 0.7 in docs/dpmot.md)  [default: 0.7, the reference\'s]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--batch',       help='Batch size per process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--npz',         help='Images: also write an ADM-style sample batch to this .npz (arr_0: uint8 [N, H, W, C] in seed order, as the PNGs; arr_1: int64 labels of a class-conditional network), the format of the evaluators of ADM and DPM-OT; fid.py calc reads it too', metavar='FILE', type=str)
@click.option('--grid',        help='Also write a grid of inputs and outputs (images) or a scatter plot (vectors) to PNG, beside --outdir (never in it, where fid.py calc would read it)  [default with --grid alone: OUTDIR-grid.png]', metavar='[PNG]', is_flag=False, flag_value='', default=None, type=str)
@click.option('--device',      help='Device', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
@click.option('--export-safe', 'export_safe', help='Instead of generating, write a code-free export of --network to DIR: weights.pt (state_dicts, loads with weights_only=True) and network.json (architecture)', metavar='DIR', type=str)
def main(**kwargs):
    """Translate with an EOT snapshot, sample a denoiser snapshot (DPM-OT), or export a snapshot safely.

    Outputs do not depend on --batch or the number of processes: every random tensor of a sample
    comes from a generator seeded with that sample's seed. Under torchrun the work is split across
    processes; each writes its own PNGs, and rank 0 writes samples.npz and grid.png.

    \b
    Examples:
    # Translate the test 2s to 3s with the one-step G, plus a grid in out/2to3-grid.png
    python generate.py --network=runs/00000-demo/network-snapshot-000200.pkl \\
        --data=datasets/2_test.zip --outdir=out/2to3 --grid
    # The SDE with 20 steps on 4 GPUs
    torchrun --standalone --nproc_per_node=4 generate.py --network=snapshot.pkl \\
        --data=datasets/2_test.zip --outdir=out/2to3-sde --sampler=sde --steps=20
    # A conditional plan on a toy task: 16 outputs per input -> out/toy/samples.npz
    python generate.py --network=snapshot.pkl --data=gauss.npz --outdir=out/toy --repeats=16
    # DPM-OT sampling of a denoiser
    python generate.py --network=denoiser.pkl --potential=potential.pt --outdir=out/dpmot --seeds=0-99
    # Export weights + JSON (no code) and generate from the export
    python generate.py --network=snapshot.pkl --export-safe=snapshot-safe
    python generate.py --network=snapshot-safe --data=datasets/2_test.zip --outdir=out/2to3
    """
    opts = dnnlib.EasyDict(kwargs)
    try:
        device = dist.init(opts.device)
    except (RuntimeError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    warning = snapshots.plain_http_warning(opts.network, '--network')
    if warning is not None:
        dist.print0(warning)
    try:
        if opts.export_safe is not None:
            given = [_option_name(k) for k in ('outdir', 'seeds', 'sampler', 'steps', 'npz', 'grid') + _EOT_ONLY + _DENOISER_ONLY
                     if opts[k] is not None]
            if given:
                raise click.ClickException(f'--export-safe only writes an export; drop {", ".join(given)} and generate '
                                           'afterwards with --network=' + opts.export_safe)
            outputs.check_output_dir(opts.export_safe, '--export-safe', empty=False)
            model = snapshots.load_network(opts.network)
            if dist.get_rank() == 0:
                path = snapshots.export_safe(model, opts.export_safe)
                print(f'Wrote a safe export of "{opts.network}" ({model.kind}: {", ".join(model.nets)}) to {path} '
                      f'and {os.path.join(opts.export_safe, snapshots.EXPORT_WEIGHTS)}')
            return
        if opts.outdir is None:
            raise click.ClickException('--outdir is required (where to write the outputs)')
        outputs.check_output_dir(opts.outdir)
        if opts.npz is not None:
            outputs.check_output_file(opts.npz, '--npz')
        if opts.grid is not None:
            opts.grid = _grid_path(opts.grid, opts.outdir)
        dist.barrier() # Every rank has checked --outdir before rank 0 makes it.
        model = snapshots.load_network(opts.network, device)
        sampler = check_options(opts, model)
        if model.kind == 'eot':
            translate_dataset(opts, model, sampler, device)
        else:
            sample_denoiser(opts, model, sampler, device)
    except GenerationError as err:
        raise click.ClickException(str(err)) from None
    finally:
        dist.shutdown()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
