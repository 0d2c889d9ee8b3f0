"""FID, Inception Score, improved precision/recall and the mode-mixture ratio of image sets.

  python fid.py ref  --data=target_train.zip --dest=stats.npz
  python fid.py calc --images=out/ --ref=stats.npz
  python fid.py calc --images=out/ --ref=stats.npz --metrics=fid,pr --ref-data=target_train.zip
  python fid.py calc --images=samples.npz --ref=cifar10-32x32.npz --metrics=fid,is,mmr --classifier=clf.pkl
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
from metrics import inception_score as is_lib
from metrics import mode_mixture as mmr_lib
from metrics.npz_images import NpzImages, NpzImagesError
from sampling import GenerationError, outputs, snapshots
from torch_utils import distributed as dist_utils
from torch_utils.images import to_model_space

#----------------------------------------------------------------------------

_DETECTOR_HELP = (f'Feature detector: a path or URL of the Inception-v3 pickle, or "standin:SEED" (a seeded random '
                  f'net for tests; its numbers are NOT FID). Default: ${detector_lib.DETECTOR_ENV} if set, else '
                  f'{detector_lib.DEFAULT_DETECTOR_URL} (downloaded once into the cache, $EOT_CACHE_DIR).')

_CONVENTIONS = ('Images are read as uint8 (float images in [-1, 1] are quantised as floor(127.5 x + 128) clipped '
                'to [0, 255]); 1-channel images are repeated to 3 channels; the detector resizes every image '
                'to 299x299 itself and returns 2048-d pool features. Reference statistics should come from the '
                'train split of the target domain (docs/metrics.md).')


def _open_images(path, what):
    """A folder or zip of images, or an ADM-style sample batch (.npz with arr_0 uint8 [N, H, W, C])."""
    try:
        return NpzImages(path) if str(path).lower().endswith('.npz') else ImageFolderDataset(path)
    except (DatasetError, NpzImagesError) as err:
        raise click.ClickException(f'{what}: {err}') from None


def _check_output_file(path, option):
    try:
        outputs.check_output_file(path, option)
    except GenerationError as err:
        raise click.ClickException(str(err)) from None


def _make_dir(path, option):
    try:
        outputs.make_output_dir(path, option)
    except GenerationError as err:
        raise click.ClickException(str(err)) from None


def _setup(device, detector):
    dev = dist_utils.init(device)
    warning = snapshots.plain_http_warning(detector_lib.resolve_detector_spec(detector), '--detector')
    if warning is not None:
        dist_utils.print0(warning)
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
    """FID, Inception Score, improved precision/recall and mode-mixture ratio of image sets (Inception-v3 detector).

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
    _check_output_file(dest, '--dest')
    det = _setup(device, detector)
    dataset = _open_images(data, '--data')
    batches, count = _image_batches(dataset, num, seed, batch, workers)
    dist_utils.print0(f'Computing reference statistics of {count} images from "{data}" with "{det.name}"...')
    mu, sigma = compute_feature_stats(batches, det, batch_size=batch, progress=True)
    if dist_utils.get_rank() == 0:
        if os.path.dirname(dest):
            _make_dir(os.path.dirname(dest), '--dest')
        fid_lib.save_ref_stats(dest, mu, sigma, detector=det.name, num_images=count, data=str(data))
        print(f'Saved "{dest}"')
    dist_utils.barrier()
    dist_utils.shutdown()


METRICS = ('fid', 'is', 'pr', 'mmr')


def _parse_metrics(value):
    names = [m.strip().lower() for m in value.split(',') if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise click.BadParameter(f'unknown metric(s) {bad or value!r}: use a comma-separated list of '
                                 f'{", ".join(METRICS)}, e.g. --metrics=fid,is,pr,mmr')
    return names


def _check_ref_detector(meta, det, ref):
    # Only stand-in vs real (or two stand-in seeds) is checked: a path and a URL may hold the same net.
    ref_det = str(meta.get('detector', ''))
    if not ref_det:
        return
    if ref_det.startswith('standin') != det.is_standin or (det.is_standin and ref_det != det.name):
        raise click.ClickException(f'The reference statistics "{ref}" were computed with detector "{ref_det}" but this '
                                   f'run uses "{det.name}"; recompute them with --detector={det.name} (or pass the matching --detector)')


def _load_classifier(path, device):
    """fn(uint8 images) -> class probabilities [N, K] of the user's classifier (pickle or safe export), which is
    called on float32 images in model space ([-1, 1], [N, C, H, W]) and returns logits [N, K]."""
    warning = snapshots.plain_http_warning(path, '--classifier')
    if warning is not None:
        dist_utils.print0(warning)
    try:
        net = snapshots.load_network(path, device, kind='classifier').classifier
    except GenerationError as err:
        raise click.ClickException(f'--classifier: {err}') from None

    @torch.no_grad()
    def probabilities(images):
        logits = net(to_model_space(images, device))
        if logits.ndim != 2 or logits.shape[0] != images.shape[0] or logits.shape[1] < 2:
            raise click.ClickException(f'--classifier="{path}" returned {list(logits.shape)} for {images.shape[0]} images '
                                       '[N, C, H, W] in [-1, 1]; it must return class logits [N, K] with K >= 2')
        return torch.softmax(logits.to(torch.float32), dim=1)
    return probabilities


def _check_calc_options(names, ref_path, ref_data, classifier):
    if ('mmr' in names) != (classifier is not None):
        raise click.UsageError('--metrics=mmr needs --classifier=PKL|DIR (class logits of images in [-1, 1]), and '
                               '--classifier is used by mmr alone')
    if 'pr' in names and ref_data is None:
        raise click.UsageError('--metrics=pr needs reference images: pass --ref-data=PATH (a folder, zip or .npz batch)')
    if 'fid' in names and ref_path is None and ref_data is None:
        raise click.UsageError('FID needs a reference: pass --ref=stats.npz (from `fid.py ref`, edm\'s fid.py ref or an '
                               'ADM reference batch) or --ref-data=PATH')


def _reference_stats(ref_path, det):
    dist_utils.print0(f'Loading reference statistics from "{ref_path}"...')
    try:
        mu_ref, sigma_ref, meta = load_ref_stats(ref_path, return_meta=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from err
    _check_ref_detector(meta, det, ref_path)
    return mu_ref, sigma_ref


def _evaluate(names, batches, det, classifier, batch, splits):
    """Rank 0's results of the metrics that need only the evaluated images (fid's statistics kept aside)."""
    if names == ['fid']:     # FID alone: summed moments, no features gathered
        return dict(stats=compute_feature_stats(batches, det, batch_size=batch, progress=True))
    fns = {}
    if 'fid' in names or 'pr' in names:
        fns['features'] = det
    if 'is' in names:
        fns['probs'] = det.probabilities
    if 'mmr' in names:
        fns['classifier'] = classifier
    outs = fid_lib.compute_outputs(batches, fns, batch_size=batch, progress=True)
    results = dict(features=outs.get('features'))
    if 'fid' in names:
        results['stats'] = fid_lib.mean_cov(outs['features'])
    if 'is' in names:
        results['is_mean'], results['is_std'] = is_lib.inception_score(outs['probs'].numpy(), splits=splits)
    if 'mmr' in names:
        results['mmr'] = mmr_lib.mode_mixture_ratio(outs['classifier'].numpy())
    return results


@main.command(epilog=_CONVENTIONS)
@click.option('--images', help='Images to evaluate: a folder or zip, or an ADM-style sample batch (.npz with arr_0, e.g. from generate.py --npz)', metavar='PATH', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (.npz path or URL with mu, sigma): from `fid.py ref`, edm\'s `fid.py ref`, or an ADM reference batch', metavar='NPZ|URL', type=str, default=None)
@click.option('--ref-data', help='Reference images (folder, zip or .npz batch), needed by --metrics=pr; also gives FID when --ref is not set', metavar='PATH', type=str, default=None)
@click.option('--metrics', 'metric_list', help='Comma-separated metrics: fid, is (Inception Score), pr (improved precision/recall), mmr (mode-mixture ratio, needs --classifier)', metavar='LIST', type=str, default='fid', show_default=True)
@click.option('--pr', 'with_pr', help='Same as adding pr to --metrics', is_flag=True)
@click.option('--classifier', help='For mmr: a classifier of the images, called on float32 [N, C, H, W] in [-1, 1] and returning class logits: a pickled torch module (runs code: trusted files only) or a safe export (generate.py --export-safe of such a pickle)', metavar='PKL|DIR', type=str, default=None)
@click.option('--splits', help='Inception Score: number of equal parts (mean and std over them)', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True)
@click.option('--num', help='Evaluate a random subset of this many images [default: all]', metavar='INT', type=click.IntRange(min=2), default=None)
@click.option('--ref-num', help='Use a random subset of this many reference images for pr [default: all]', metavar='INT', type=click.IntRange(min=2), default=None)
@click.option('--seed', help='Seed of the --num / --ref-num subsets', metavar='INT', type=int, default=0, show_default=True)
@click.option('--k', 'knn', help='Neighbourhood size of precision/recall', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--pr-chunk', help='Block size of the precision/recall distance matrix', metavar='INT', type=click.IntRange(min=1), default=4096, show_default=True)
@click.option('--out', help='Also write the results as JSON to this file', metavar='JSON', type=str, default=None)
@_with_common
def calc(images, ref_path, ref_data, metric_list, with_pr, classifier, splits, num, ref_num, seed, knn, pr_chunk, out,
         detector, batch, workers, device):
    """Print FID, Inception Score, precision/recall and mode-mixture ratio of IMAGES (as asked by --metrics)."""
    names = list(dict.fromkeys(_parse_metrics(metric_list) + (['pr'] if with_pr else [])))
    _check_calc_options(names, ref_path, ref_data, classifier)
    if out is not None:
        _check_output_file(out, '--out')
    det = _setup(device, detector)
    ref_stats = _reference_stats(ref_path, det) if 'fid' in names and ref_path is not None else None
    clf = _load_classifier(classifier, det.device) if 'mmr' in names else None
    dataset = _open_images(images, '--images')
    batches, count = _image_batches(dataset, num, seed, batch, workers)
    dist_utils.print0(f'Computing {", ".join(names)} of {count} images from "{images}" with "{det.name}"...')
    results = _evaluate(names, batches, det, clf, batch, splits)
    if 'pr' in names or ('fid' in names and ref_stats is None):
        ref_batches, ref_count = _image_batches(_open_images(ref_data, '--ref-data'), ref_num, seed, batch, workers)
        dist_utils.print0(f'Computing detector features of {ref_count} reference images from "{ref_data}"...')
        real_features = fid_lib.compute_features(ref_batches, det, batch_size=batch, progress=True)
        ref_stats = fid_lib.mean_cov(real_features) if ref_stats is None else ref_stats
        if 'pr' in names:
            dist_utils.print0(f'Computing precision/recall (k={knn})...')
            results['precision'], results['recall'] = pr_lib.compute_precision_recall(
                real_features, results['features'], k=knn, row_chunk=pr_chunk, col_chunk=pr_chunk, device=det.device)
    if 'fid' in names:
        results['fid'] = calculate_fid_from_inception_stats(*results['stats'], *ref_stats)
    if dist_utils.get_rank() == 0:
        _report(results, out, dict(images=images, num_images=count, ref=ref_path, ref_data=ref_data,
                                   detector=det.name, k=knn if 'pr' in names else None,
                                   splits=splits if 'is' in names else None, classifier=classifier))
    dist_utils.barrier()
    dist_utils.shutdown()


def _report(results, out, provenance):
    """Print one line per number (rank 0) and write --out."""
    record = {k: results[k] for k in ('fid', 'is_mean', 'is_std', 'precision', 'recall') if k in results}
    for name, value in record.items():
        print(f'{name}: {value:.6g}')
    if 'mmr' in results:
        record['mmr'] = {str(t): v for t, v in results['mmr'].items()}
        for tau, value in results['mmr'].items():
            print(f'mmr@{tau:g}: {value:.6g}')
    if out is not None:
        with dnnlib.util.atomic_write(out, 'w') as f:
            json.dump(dict(record, **provenance), f, indent=2)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    torch.set_grad_enabled(False)
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------
