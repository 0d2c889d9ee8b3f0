"""Toy vector distributions for EOT tasks, one function per source.

Every function takes the number of samples and a numpy Generator and returns a dict of arrays to be
stored in a `.npz`: always `x` (float32 [num, dim]); `labels` (int64 [num]) where the samples come from
identifiable components; `mean` and `cov` (float64) for Gaussians, so that benchmarks can use the
closed-form EOT plan.
"""

import numpy as np

#----------------------------------------------------------------------------

def random_rotation(dim, rng):
    """A Haar-distributed rotation matrix [dim, dim] (QR of a Gaussian matrix, signs fixed, det +1)."""
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    q = q * np.sign(np.diag(r))[None, :]      # makes the distribution uniform over O(dim)
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def random_covariance(dim, rng, spectrum=(0.5, 2.0)):
    """Q diag(s) Q^T with Q a random rotation and s evenly spaced over `spectrum` (ENOT benchmark style)."""
    q = random_rotation(dim, rng)
    s = np.linspace(spectrum[0], spectrum[1], dim)
    return (q * s[None, :]) @ q.T


def gaussian(num, rng, dim=2, mean=None, cov=None):
    """Samples of N(mean, cov).

    Args:
        num: number of samples.
        rng: numpy Generator.
        dim: dimension, used when mean / cov are not given.
        mean: [dim] or None for a random mean ~ N(0, I).
        cov: [dim, dim] symmetric positive definite, or None for random_covariance(dim, rng).
    Returns:
        dict(x=float32 [num, dim], mean=float64 [dim], cov=float64 [dim, dim]).
    """
    if mean is not None:
        dim = len(mean)
    elif cov is not None:
        dim = len(cov)
    _check_counts(num, dim)
    mean = rng.normal(size=dim) if mean is None else np.asarray(mean, dtype=np.float64).reshape(-1)
    cov = random_covariance(dim, rng) if cov is None else np.asarray(cov, dtype=np.float64)
    if mean.shape != (dim,) or cov.shape != (dim, dim):
        raise ValueError(f'gaussian: mean has shape {mean.shape} and cov {cov.shape}; expected [{dim}] and [{dim}, {dim}]')
    if not np.allclose(cov, cov.T):
        raise ValueError('gaussian: cov is not symmetric; pass (cov + cov.T) / 2')
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise ValueError(f'gaussian: cov is not positive definite (smallest eigenvalue {np.linalg.eigvalsh(cov).min():.3g})') from None
    x = mean[None, :] + rng.normal(size=(num, dim)) @ chol.T
    return dict(x=x.astype(np.float32), mean=mean, cov=cov)


def gaussian_mixture(num, rng, dim=2, components=8, radius=None, std=None, means=None, weights=None):
    """Samples of an isotropic Gaussian mixture.

    Args:
        num: number of samples.
        rng: numpy Generator.
        dim: dimension (ignored when `means` is given).
        components: number of components when `means` is None; their means are then drawn uniformly
            from [-radius, radius]^dim, radius defaulting to 4.
        radius: see `components`.
        std: standard deviation of every component (default 0.5).
        means: [K, dim] component means, or None.
        weights: [K] mixture weights (normalised here), or None for equal weights.
    Returns:
        dict(x=float32 [num, dim], labels=int64 [num] (component index), means=[K, dim], weights=[K], std=scalar).
    """
    std = 0.5 if std is None else float(std)
    if means is None:
        radius = 4.0 if radius is None else float(radius)
        means = rng.uniform(-radius, radius, size=(int(components), int(dim)))
    means = np.asarray(means, dtype=np.float64)
    if means.ndim != 2 or len(means) == 0:
        raise ValueError(f'gaussian_mixture: means must have shape [K, dim] with K >= 1, got {means.shape}')
    _check_counts(num, means.shape[1])
    k = len(means)
    weights = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != (k,) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(f'gaussian_mixture: weights must be {k} non-negative numbers with a positive sum, got {weights}')
    weights = weights / weights.sum()
    labels = rng.choice(k, size=num, p=weights)
    x = means[labels] + std * rng.normal(size=(num, means.shape[1]))
    return dict(x=x.astype(np.float32), labels=labels.astype(np.int64), means=means, weights=weights, std=np.float64(std))


def eight_gaussians(num, rng, radius=2.0, std=0.2):
    """The classic 2-D ring of 8 equal Gaussians with means radius * (cos(k pi/4), sin(k pi/4))."""
    angles = np.arange(8) * np.pi / 4
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return gaussian_mixture(num, rng, means=means, std=std)


def moons(num, rng, noise=0.1):
    """Two interleaved half circles (as in scikit-learn's make_moons), 2-D.

    Moon 0: (cos t, sin t), moon 1: (1 - cos t, 1/2 - sin t), t ~ U(0, pi), plus N(0, noise^2) noise.
    Returns dict(x=float32 [num, 2], labels=int64 [num] (which moon)).
    """
    _check_counts(num, 2)
    labels = rng.integers(0, 2, size=num)
    t = rng.uniform(0, np.pi, size=num)
    x = np.where(labels[:, None] == 0,
                 np.stack([np.cos(t), np.sin(t)], axis=1),
                 np.stack([1 - np.cos(t), 0.5 - np.sin(t)], axis=1))
    x = x + noise * rng.normal(size=(num, 2))
    return dict(x=x.astype(np.float32), labels=labels.astype(np.int64))


def swiss_roll(num, rng, noise=0.1, scale=0.2):
    """The 2-D swiss roll: scale * (t cos t, t sin t), t ~ U(1.5 pi, 4.5 pi), plus N(0, noise^2) noise.

    Returns dict(x=float32 [num, 2]).
    """
    _check_counts(num, 2)
    t = rng.uniform(1.5 * np.pi, 4.5 * np.pi, size=num)
    x = scale * np.stack([t * np.cos(t), t * np.sin(t)], axis=1) + noise * rng.normal(size=(num, 2))
    return dict(x=x.astype(np.float32))


def checkerboard(num, rng, squares=4, size=1.0):
    """Uniform on the 'black' cells of a squares x squares board of cells of side `size`, centred on 0.

    A cell (i, j) is black when i + j is even. Returns dict(x=float32 [num, 2]).
    """
    _check_counts(num, 2)
    squares = int(squares)
    if squares < 2:
        raise ValueError(f'checkerboard: squares must be at least 2, got {squares}')
    black = np.array([(i, j) for i in range(squares) for j in range(squares) if (i + j) % 2 == 0])
    cells = black[rng.integers(0, len(black), size=num)]
    x = (cells + rng.uniform(size=(num, 2)) - squares / 2) * size
    return dict(x=x.astype(np.float32))

#----------------------------------------------------------------------------

SOURCES = {
    'gaussian': gaussian,
    'gaussian-mixture': gaussian_mixture,
    '8gaussians': eight_gaussians,
    'moons': moons,
    'swiss-roll': swiss_roll,
    'checkerboard': checkerboard,
}

DIM_SOURCES = ('gaussian', 'gaussian-mixture')  # the sources whose dimension can be chosen


# Bounds of what make_toy draws: a Gaussian's covariance is [dim, dim] (float64) and its random rotation a QR of
# that size; the samples are drawn in float64 (num * dim values). 4096 and 2^27 keep each under 1 GiB.
MAX_TOY_DIM = 4096
MAX_TOY_VALUES = 1 << 27


def make_toy(name, num, seed, dim=None):
    """Draw `num` samples of the toy source `name` (a key of SOURCES) with np.random.default_rng(seed).

    `dim` applies to the sources in DIM_SOURCES (default 2); the others are 2-D. dim <= MAX_TOY_DIM and
    num * dim <= MAX_TOY_VALUES (ValueError naming the bound otherwise).
    Returns the source function's dict of arrays.
    """
    if name not in SOURCES:
        raise ValueError(f'Unknown toy source "{name}"; choose one of {", ".join(SOURCES)}')
    kwargs = {}
    if dim is not None:
        if name not in DIM_SOURCES:
            raise ValueError(f'Toy source "{name}" is 2-D; a dimension ({dim}) applies only to {", ".join(DIM_SOURCES)}')
        if int(dim) > MAX_TOY_DIM:
            raise ValueError(f'dimension {dim} is over the bound of {MAX_TOY_DIM} (a [dim, dim] covariance is drawn)')
        kwargs['dim'] = int(dim)
    if int(num) * kwargs.get('dim', 2) > MAX_TOY_VALUES:
        values = int(num) * kwargs.get('dim', 2)
        raise ValueError(f'{num} vectors of dimension {kwargs.get("dim", 2)} are {values} values, over the bound of '
                         f'{MAX_TOY_VALUES} (2^27); draw fewer or in several files')
    return SOURCES[name](int(num), np.random.default_rng(int(seed)), **kwargs)


def _check_counts(num, dim):
    if int(num) < 1 or int(dim) < 1:
        raise ValueError(f'Need at least one sample and one dimension, got num={num}, dim={dim}')

#----------------------------------------------------------------------------
