"""Frechet Inception Distance and improved precision/recall of image sets.

  python fid.py ref  --data=target_train.zip --dest=stats.npz
  python fid.py calc --images=out/ --ref=stats.npz
  python fid.py calc --images=out/ --ref=stats.npz --metrics=fid,pr --ref-data=target_train.zip
  torchrun --standalone --nproc_per_node=8 fid.py calc ...   # images split across ranks

See docs/metrics.md for the conventions (detector resolution, quantisation, reference split).
"""

import json
import os
import click
import torch

import dnnlib

from metrics import detector as detector_lib
from metrics import fid as fid_lib
from metrics import precision_recall as pr_lib
from metrics.fid import calculate_fid_from_inception_stats, compute_feature_stats, load_ref_stats # noqa: F401 (re-exported)
from data.dataset import DatasetError, ImageFolderDataset
from torch_utils import distributed as dist_utils

#----------------------------------------------------------------------------

_DETECTOR_HELP = (f'Feature detector: a path or URL of the Inception-v3 pickle, or "standin:SEED" (a seeded random '
                  f'net for tests; its numbers are NOT FID). Default: ${detector_lib.DETECTOR_ENV} if set, else '
                  f'{detector_lib.DEFAULT_DETECTOR_URL} (downloaded once into the cache, $EOT_CACHE_DIR).')

_CONVENTIONS = ('Images are read as uint8 (float images in [-1, 1] are quantised as floor(127.5 x + 128) clipped '
                'to [0, 255]); 1-channel images are repeated to 3 channels; the detector resizes every image '
                'to 299x299 itself and returns 2048-d pool features. Reference statistics should come from the '
                'train split of the target domain (docs/metrics.md).')


def _open_images(path, what):
    if str(path).lower().endswith('.npz'):
        raise click.BadParameter(f'"{path}" is an .npz file; {what} must be a folder or zip of images')
    try:
        return ImageFolderDataset(path)
    except DatasetError as err:
        raise click.ClickException(str(err)) from err


def _setup(device, detector):
    dev = dist_utils.init(device)
    try:
        det = detector_lib.load_detector(detector, device=dev, verbose=(dist_utils.get_rank() == 0))
    except detector_lib.DetectorUnavailable as err:
        raise click.ClickException(str(err)) from err
    if det.is_standin:
        dist_utils.print0(f'Using the stand-in detector "{det.name}": its numbers are NOT FID.')
    return det


def _image_batches(dataset, num, seed, batch, workers):
    try:
        indices = fid_lib.select_indices(len(dataset), num, seed)
    except ValueError as err:
        raise click.ClickException(f'{dataset.path}: {err}') from err
    return fid_lib.dataset_batches(dataset, batch_size=batch, indices=indices, num_workers=workers), len(indices)

#----------------------------------------------------------------------------

@click.group(epilog=_CONVENTIONS)
def main():
    """FID (and improved precision/recall) of image sets, using the Inception-v3 feature detector.

    Runs in one process or under torchrun (images split across ranks, results on rank 0).
    """


_common = [
    click.option('--detector', help=_DETECTOR_HELP, metavar='PATH|URL|standin:SEED', type=str, default=None),
    click.option('--batch', help='Detector batch size (per rank)', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True),
    click.option('--workers', help='Data loader worker processes (per rank)', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True),
    click.option('--device', help='Device: auto, cpu, cuda or cuda:N', metavar='STR', type=str, default='auto', show_default=True),
]


def _with_common(fn):
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


@main.command(epilog=_CONVENTIONS)
@click.option('--data', help='Reference images: a folder or zip (the train split of the target domain)', metavar='PATH', type=str, required=True)
@click.option('--dest', help='Where to write the statistics (.npz with mu, sigma)', metavar='NPZ', type=str, required=True)
@click.option('--num', help='Use a random subset of this many images [default: all]', metavar='INT', type=click.IntRange(min=2), default=None)
@click.option('--seed', help='Seed of the --num subset', metavar='INT', type=int, default=0, show_default=True)
@_with_common
def ref(data, dest, num, seed, detector, batch, workers, device):
    """Write the detector-feature mean and covariance of a reference image set to DEST (.npz)."""
    det = _setup(device, detector)
    dataset = _open_images(data, '--data')
    batches, count = _image_batches(dataset, num, seed, batch, workers)
    dist_utils.print0(f'Computing reference statistics of {count} images from "{data}" with "{det.name}"...')
    mu, sigma = compute_feature_stats(batches, det, batch_size=batch, progress=True)
    if dist_utils.get_rank() == 0:
        if os.path.dirname(dest):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
        fid_lib.save_ref_stats(dest, mu, sigma, detector=det.name, num_images=count, data=str(data))
        print(f'Saved "{dest}"')
    dist_utils.barrier()
    dist_utils.shutdown()


def _parse_metrics(value):
    names = [m.strip().lower() for m in value.split(',') if m.strip()]
    bad = [m for m in names if m not in ('fid', 'pr')]
    if bad or not names:
        raise click.BadParameter(f'unknown metric(s) {bad or value!r}: use a comma-separated list of fid and pr, e.g. --metrics=fid,pr')
    return names


def _check_ref_detector(meta, det, ref):
    # Only stand-in vs real (or two stand-in seeds) is checked: a path and a URL may hold the same net.
    ref_det = str(meta.get('detector', ''))
    if not ref_det:
        return
    if ref_det.startswith('standin') != det.is_standin or (det.is_standin and ref_det != det.name):
        raise click.ClickException(f'The reference statistics "{ref}" were computed with detector "{ref_det}" but this '
                                   f'run uses "{det.name}"; recompute them with --detector={det.name} (or pass the matching --detector)')


@main.command(epilog=_CONVENTIONS)
@click.option('--images', help='Images to evaluate: a folder or zip', metavar='PATH', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (.npz path or URL) from `fid.py ref`', metavar='NPZ|URL', type=str, default=None)
@click.option('--ref-data', help='Reference images (folder or zip), needed by --metrics=pr; also gives FID when --ref is not set', metavar='PATH', type=str, default=None)
@click.option('--metrics', 'metric_list', help='Comma-separated metrics: fid, pr (improved precision/recall)', metavar='LIST', type=str, default='fid', show_default=True)
@click.option('--pr', 'with_pr', help='Same as adding pr to --metrics', is_flag=True)
@click.option('--num', help='Evaluate a random subset of this many images [default: all]', metavar='INT', type=click.IntRange(min=2), default=None)
@click.option('--ref-num', help='Use a random subset of this many reference images for pr [default: all]', metavar='INT', type=click.IntRange(min=2), default=None)
@click.option('--seed', help='Seed of the --num / --ref-num subsets', metavar='INT', type=int, default=0, show_default=True)
@click.option('--k', 'knn', help='Neighbourhood size of precision/recall', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--pr-chunk', help='Block size of the precision/recall distance matrix', metavar='INT', type=click.IntRange(min=1), default=4096, show_default=True)
@click.option('--out', help='Also write the results as JSON to this file', metavar='JSON', type=str, default=None)
@_with_common
def calc(images, ref_path, ref_data, metric_list, with_pr, num, ref_num, seed, knn, pr_chunk, out, detector, batch, workers, device):
    """Print FID (and precision/recall) of IMAGES against a reference."""
    names = _parse_metrics(metric_list) + (['pr'] if with_pr else [])
    names = list(dict.fromkeys(names))
    if 'pr' in names and ref_data is None:
        raise click.UsageError('--metrics=pr needs reference images: pass --ref-data=PATH (a folder or zip)')
    if 'fid' in names and ref_path is None and ref_data is None:
        raise click.UsageError('FID needs a reference: pass --ref=stats.npz (from `fid.py ref`) or --ref-data=PATH')

    det = _setup(device, detector)
    ref_stats = None
    if 'fid' in names and ref_path is not None:
        dist_utils.print0(f'Loading reference statistics from "{ref_path}"...')
        try:
            mu_ref, sigma_ref, meta = load_ref_stats(ref_path, return_meta=True)
        except (OSError, ValueError, RuntimeError) as err:
            raise click.ClickException(str(err)) from err
        _check_ref_detector(meta, det, ref_path)
        ref_stats = (mu_ref, sigma_ref)

    dataset = _open_images(images, '--images')
    batches, count = _image_batches(dataset, num, seed, batch, workers)
    dist_utils.print0(f'Computing detector features of {count} images from "{images}" with "{det.name}"...')
    results = {}
    if 'pr' in names:
        gen_features = fid_lib.compute_features(batches, det, batch_size=batch, progress=True)
        ref_batches, ref_count = _image_batches(_open_images(ref_data, '--ref-data'), ref_num, seed, batch, workers)
        dist_utils.print0(f'Computing detector features of {ref_count} reference images from "{ref_data}"...')
        real_features = fid_lib.compute_features(ref_batches, det, batch_size=batch, progress=True)
        dist_utils.print0(f'Computing precision/recall (k={knn})...')
        results['precision'], results['recall'] = pr_lib.compute_precision_recall(
            real_features, gen_features, k=knn, row_chunk=pr_chunk, col_chunk=pr_chunk, device=det.device)
        if 'fid' in names:
            stats = fid_lib.mean_cov(gen_features)
            if ref_stats is None:
                ref_stats = fid_lib.mean_cov(real_features)
    elif 'fid' in names:
        stats = compute_feature_stats(batches, det, batch_size=batch, progress=True)
        if ref_stats is None:
            ref_batches, _ = _image_batches(_open_images(ref_data, '--ref-data'), ref_num, seed, batch, workers)
            ref_stats = compute_feature_stats(ref_batches, det, batch_size=batch, progress=True)
    if dist_utils.get_rank() == 0:
        if 'fid' in names:
            results['fid'] = calculate_fid_from_inception_stats(*stats, *ref_stats)
        for name in ('fid', 'precision', 'recall'):
            if name in results:
                print(f'{name}: {results[name]:.6g}')
        if out is not None:
            record = dict(results, images=images, num_images=count, ref=ref_path, ref_data=ref_data,
                          detector=det.name, k=knn if 'pr' in names else None)
            with dnnlib.util.atomic_write(out, 'w') as f:
                json.dump(record, f, indent=2)
    dist_utils.barrier()
    dist_utils.shutdown()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    torch.set_grad_enabled(False)
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
