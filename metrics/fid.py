"""Frechet Inception Distance: image quantisation, detector feature statistics, the distance itself.

Feature statistics are accumulated as float64 sums (count, sum x, sum x x^T) on each rank and summed
across ranks, so every rank passes its own share of the images and all ranks get the same (mu, sigma).
"""

import warnings

import numpy as np
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist_utils

#----------------------------------------------------------------------------
# Images.

def select_indices(num_total, num=None, seed=0):
    """Sorted indices of `num` images drawn without replacement from `num_total` with `seed` (all if num is None)."""
    if num is None or num == num_total:
        return np.arange(num_total)
    if num > num_total:
        raise ValueError(f'Asked for {num} images but the data set holds only {num_total}; lower --num')
    if num < 1:
        raise ValueError(f'The number of images must be positive, got {num}')
    return np.sort(np.random.default_rng(seed).choice(num_total, size=num, replace=False))


class _Subset(torch.utils.data.Dataset):
    def __init__(self, dataset, indices):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, idx):
        item = self.dataset[self.indices[idx]]
        image = item[0] if isinstance(item, (tuple, list)) else item
        return torch.as_tensor(np.asarray(image))


def dataset_batches(dataset, batch_size=64, indices=None, rank=None, world_size=None, num_workers=0):
    """This rank's share of a data set's images, as a DataLoader of uint8 [B, C, H, W] tensors.

    Args:
        dataset: indexable; item i is a uint8 CHW image or a tuple (image, label, ...), as
            data.dataset.ImageFolderDataset gives.
        batch_size: images per batch.
        indices: which items to use (default all); rank r takes indices[r::world_size].
        rank, world_size: default to the torch.distributed values.
        num_workers: DataLoader worker processes.
    """
    rank = dist_utils.get_rank() if rank is None else rank
    world_size = dist_utils.get_world_size() if world_size is None else world_size
    indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    subset = _Subset(dataset, indices[rank::world_size])
    return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                       prefetch_factor=(2 if num_workers > 0 else None))

#----------------------------------------------------------------------------
# Detector features.

def _as_uint8_batch(item):
    if isinstance(item, (tuple, list)):
        item = item[0] # (images, labels) as a DataLoader gives.
    if not isinstance(item, torch.Tensor):
        item = torch.as_tensor(np.asarray(item))
    if item.dtype != torch.uint8:
        raise TypeError(f'Expected uint8 image batches, got {item.dtype}; convert images in [-1, 1] with '
                        f'torch_utils.images.to_uint8()')
    if item.ndim != 4:
        raise ValueError(f'Expected image batches of shape [N, C, H, W], got {list(item.shape)}')
    return item


def iterate_features(images, detector, batch_size=64, progress=False):
    """Run `detector` over `images` and yield float32 feature batches [n, D] (this rank only).

    `images` is an iterable of uint8 [N, C, H, W] tensors/arrays (or (images, labels) tuples), of any
    batch size; they are re-cut into detector batches of at most `batch_size`. With `progress`, rank 0
    shows a tqdm bar counting the iterable's batches (with a total when len(images) is known).
    `detector` may also be a dict {name: fn}: then every fn runs on each batch and a dict is yielded.
    """
    bar = None
    if progress and dist_utils.get_rank() == 0:
        total = len(images) if hasattr(images, '__len__') else None
        bar = tqdm.tqdm(total=total, unit='batch', desc='Detector features', dynamic_ncols=True)
    try:
        for item in images:
            batch = _as_uint8_batch(item)
            for start in range(0, batch.shape[0], batch_size):
                part = batch[start : start + batch_size]
                yield {k: fn(part) for k, fn in detector.items()} if isinstance(detector, dict) else detector(part)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()


def _accum_device(device):
    # float64 sums need a device that has float64 (not MPS); otherwise sum on the CPU.
    device = torch.device(device)
    return device if device.type in ('cpu', 'cuda') else torch.device('cpu')


class FeatureMoments:
    """Running float64 count, sum and sum of outer products of feature vectors, summable across ranks."""

    def __init__(self, feature_dim, device='cpu'):
        self.device = _accum_device(device)
        self.count = torch.zeros([], dtype=torch.float64, device=self.device)
        self.sum = torch.zeros([feature_dim], dtype=torch.float64, device=self.device)
        self.sum_outer = torch.zeros([feature_dim, feature_dim], dtype=torch.float64, device=self.device)

    def update(self, features):
        x = torch.as_tensor(features).to(self.device, torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)
        self.sum_outer += x.T @ x

    def all_reduce(self):
        """Sum the moments of all ranks (in place; a no-op in one process)."""
        for t in (self.count, self.sum, self.sum_outer):
            dist_utils.all_reduce_(t)
        return self

    def mean_cov(self):
        """(mu [D], sigma [D, D]) as float64 numpy arrays; sigma is the unbiased (n - 1) covariance."""
        n = int(self.count.item())
        if n < 2:
            raise ValueError(f'Feature statistics need at least 2 images, got {n}')
        mu = self.sum / n
        sigma = (self.sum_outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def compute_feature_stats(images, detector, batch_size=64, device=None, progress=False):
    """Mean and covariance of the detector features of `images`, summed over all ranks.

    Args:
        images: this rank's share of the images: an iterable of uint8 [N, C, H, W] tensors or arrays
            (or (images, labels) tuples), e.g. dataset_batches(...) or a generator that samples and
            calls torch_utils.images.to_uint8(). Every rank must call this function (it all-reduces).
        detector: a metrics.detector.Detector (or any callable uint8 NCHW -> [N, D] features with a
            `feature_dim` attribute).
        batch_size: detector batch size.
        device: where the float64 sums live (default: detector.device).
        progress: tqdm progress bar on rank 0.
    Returns:
        (mu, sigma): float64 numpy arrays [D] and [D, D], identical on every rank.
    """
    device = getattr(detector, 'device', 'cpu') if device is None else device
    moments = FeatureMoments(detector.feature_dim, device=device)
    for features in iterate_features(images, detector, batch_size=batch_size, progress=progress):
        moments.update(features)
    return moments.all_reduce().mean_cov()


def compute_features(images, detector, batch_size=64, progress=False):
    """All detector features of `images`, gathered from every rank in rank order.

    Same arguments as compute_feature_stats. Returns a float32 CPU tensor [N_total, D] on every rank
    (used by precision/recall, which needs the features themselves).
    """
    return compute_outputs(images, dict(features=detector), batch_size, progress)['features']


def compute_outputs(images, fns, batch_size=64, progress=False):
    """One pass over `images` (this rank's share, as for compute_feature_stats) through every function of `fns`
    ({name: fn(uint8 batch) -> float [n, D]}, e.g. the detector's features and its class probabilities, a
    classifier's), gathered from every rank in rank order: {name: float32 CPU tensor [N_total, D]}."""
    parts = {k: [] for k in fns}
    for outs in iterate_features(images, fns, batch_size=batch_size, progress=progress):
        for k, v in outs.items():
            parts[k].append(v.detach().to('cpu', torch.float32))
    out = {}
    for k, v in parts.items():
        mine = torch.cat(v) if v else None
        gathered = [g for g in dist_utils.all_gather_object(mine) if g is not None]
        if not gathered:
            raise ValueError('no images to evaluate on any rank')
        out[k] = torch.cat([torch.as_tensor(g) for g in gathered])
    return out


def mean_cov(features):
    """(mu, sigma) of a feature matrix [N, D] with the same float64 formula as compute_feature_stats."""
    features = torch.as_tensor(features)
    moments = FeatureMoments(features.shape[1], device=features.device)
    moments.update(features)
    return moments.mean_cov()

#----------------------------------------------------------------------------
# Reference statistics files.

def save_ref_stats(path, mu, sigma, **meta):
    """Write `mu`, `sigma` (and string/number `meta` such as detector, num_images) to an .npz, atomically."""
    arrays = dict(mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))
    arrays.update({k: np.asarray(v) for k, v in meta.items()})
    with dnnlib.util.atomic_write(path, 'wb') as f:
        np.savez(f, **arrays)


def load_ref_stats(path_or_url, return_meta=False):
    """Read reference statistics from an .npz path or URL (cached download).

    Returns (mu, sigma) as float64 numpy arrays; with return_meta=True, (mu, sigma, meta) where meta is a
    dict of the other entries (e.g. 'detector', 'num_images') as Python scalars/strings.
    """
    with dnnlib.util.open_url(path_or_url, verbose=(dist_utils.get_rank() == 0)) as f:
        try:
            with np.load(f, allow_pickle=False) as npz: # mu, sigma and small entries: not an ADM batch's images.
                small = [k for k in npz.files if npz.zip.getinfo(f'{k}.npy').file_size < 4096]
                data = {k: npz[k] for k in npz.files if k in ('mu', 'sigma') or k in small}
                files = sorted(npz.files)
        except Exception as err:
            raise ValueError(f'Cannot read reference statistics "{path_or_url}" as an .npz file ({err}); '
                             f'make one with `python fid.py ref --data=DATA --dest=stats.npz`') from err
    missing = [k for k in ('mu', 'sigma') if k not in data]
    if missing:
        hint = (' it holds images (arr_0): pass it as --ref-data to compute their statistics, or' if 'arr_0' in files
                else '')
        raise ValueError(f'Reference statistics "{path_or_url}" lack {missing} (it holds {files});{hint} '
                         f'make statistics with `python fid.py ref --data=DATA --dest=stats.npz`')
    mu, sigma = data.pop('mu').astype(np.float64), data.pop('sigma').astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f'Reference statistics "{path_or_url}" have mu {mu.shape} and sigma {sigma.shape}; '
                         f'expected [D] and [D, D]')
    if not return_meta:
        return mu, sigma
    return mu, sigma, {k: v.item() for k, v in data.items() if v.ndim == 0}

#----------------------------------------------------------------------------
# The distance.

def _symmetric(a):
    return (a + a.T) / 2


def _cholesky_or_none(a, rcond):
    """Lower Cholesky factor of the float64 tensor `a`, or None if `a` is not numerically positive definite.

    Near-singular means a failed factorisation or a pivot L_ii^2 <= rcond x max_i a_ii (pivots of an
    SPD matrix are bounded below by its smallest eigenvalue; a rank-deficient one leaves round-off pivots).
    """
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0 or not bool(torch.isfinite(chol).all()):
        return None
    if torch.diagonal(chol).min() ** 2 <= rcond * torch.diagonal(a).max():
        return None
    return chol


def calculate_fid_from_inception_stats(mu, sigma, mu_ref, sigma_ref, eps=1e-6, rcond=1e-10):
    """Frechet distance between Gaussians N(mu, sigma) and N(mu_ref, sigma_ref).

    FID = |mu - mu_ref|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2). With S1 = L L^T (Cholesky), S1 S2 is
    similar to the symmetric PSD matrix L^T S2 L, so tr((S1 S2)^1/2) is the sum of the square roots of
    its eigenvalues (float64 on the CPU, no sqrtm). If a covariance is near-singular (e.g. fewer images
    than feature dimensions; see _cholesky_or_none for the test with `rcond`), `eps` is added to both
    diagonals with a RuntimeWarning. Inputs: numpy arrays or tensors. Returns a Python float.
    """
    mu, mu_ref = np.asarray(mu, np.float64), np.asarray(mu_ref, np.float64)
    sigma, sigma_ref = np.asarray(sigma, np.float64), np.asarray(sigma_ref, np.float64)
    if mu.ndim != 1 or mu.shape != mu_ref.shape:
        raise ValueError(f'mu and mu_ref must be vectors of the same length, got {mu.shape} and {mu_ref.shape}')
    d = mu.shape[0]
    if sigma.shape != (d, d) or sigma_ref.shape != (d, d):
        raise ValueError(f'sigma and sigma_ref must be [{d}, {d}] to match mu, got {sigma.shape} and {sigma_ref.shape}')
    for name, a in (('mu', mu), ('sigma', sigma), ('mu_ref', mu_ref), ('sigma_ref', sigma_ref)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f'{name} holds {np.count_nonzero(~np.isfinite(a))} non-finite values')
    s1, s2 = _symmetric(torch.from_numpy(sigma)), _symmetric(torch.from_numpy(sigma_ref))
    chol1 = _cholesky_or_none(s1, rcond)
    singular = [name for name, ok in (('sigma', chol1 is not None), ('sigma_ref', _cholesky_or_none(s2, rcond) is not None)) if not ok]
    if singular:
        warnings.warn(f'FID: {" and ".join(singular)} near-singular (fewer images than feature dimensions?); '
                      f'adding {eps:g} to both diagonals', RuntimeWarning, stacklevel=2)
        offset = eps * torch.eye(d, dtype=torch.float64)
        s1, s2 = s1 + offset, s2 + offset
        chol1 = torch.linalg.cholesky(s1)
    lam = torch.linalg.eigvalsh(_symmetric(chol1.T @ s2 @ chol1)) # Eigenvalues of S1 S2 (a similar matrix).
    tr_covmean = lam.clamp_min(0).sqrt().sum()
    diff = torch.from_numpy(mu - mu_ref)
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)

#----------------------------------------------------------------------------
