"""EOT pairs with a known plan whose potential is NOT a Gaussian mixture: a product of Laplace factors.

The Schrodinger form makes any potential v give an EOT plan: pi(y | x) proportional to N(y; x, eps I) v(y) is the
EOT plan (cost |x - y|^2 / 2, entropy eps) between p0 and its own second marginal p1 (docs/eot_benchmarks.md).
Here v(y) = prod_d exp(-|y_d - c_d| / b_d), so the cost being a sum over coordinates, pi(y | x) is a product of
one-dimensional laws

    pi_d(y | x_d) proportional to exp(-(y - x_d)^2 / (2 eps) - |y - c_d| / b_d),

each a two-piece mixture of truncated Gaussians: N(x_d - eps / b_d, eps) on [c_d, inf) and N(x_d + eps / b_d, eps)
on (-inf, c_d), with weights proportional to Phi(+-(x_d -+ eps / b_d - c_d) / sqrt(eps)) exp(-+(x_d - c_d) / b_d).
Its moments and samples are exact (truncated-normal formulas). Unimodal but not Gaussian (a kink at c_d, exponential
tails), and not of the Gaussian-mixture family of the light G-step's potential (models.light_sb): the check that
its results do not come from the benchmark sharing the teacher's family.

`LaplacePair` has the interface of transport.mixture.MixturePair that the benchmark uses (source, eps, dim,
conditional_moments, sample_conditional, sample_target, target_moments, target_variance, floor), so
transport.mixture.cbw2_uvp scores a model against it.
"""

import dataclasses

import numpy as np
from scipy import special

from transport import mixture as mx

#----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class LaplacePair(mx.KnownPlan):
    """Input law `source` (a transport.mixture.GaussianMixtureLaw), potential prod_d exp(-|y_d - centers_d| /
    scales_d), entropy `eps` > 0."""
    source: mx.GaussianMixtureLaw
    centers: np.ndarray
    scales: np.ndarray
    eps: float

    def __post_init__(self):
        centers, scales = np.asarray(self.centers, dtype=np.float64), np.asarray(self.scales, dtype=np.float64)
        if centers.shape != (self.source.dim,) or scales.shape != centers.shape or not np.all(scales > 0):
            raise ValueError(f'centers and scales must be [{self.source.dim}] with scales > 0; got '
                             f'{list(centers.shape)} and {list(scales.shape)}')
        if not self.eps > 0:
            raise ValueError(f'eps must be > 0; got {self.eps}')
        object.__setattr__(self, 'centers', centers)
        object.__setattr__(self, 'scales', scales)
        object.__setattr__(self, 'eps', float(self.eps))
        object.__setattr__(self, '_target_moments', None)

    @property
    def dim(self):
        return self.source.dim

    def _pieces(self, x):
        """For x [N, D]: the weight of the upper piece [N, D], and per piece its untruncated mean [N, D] and
        truncation point in standard units [N, D] (upper: y >= c, a = (c - mean) / sd; lower: y < c, likewise)."""
        x = np.asarray(x, dtype=np.float64)
        sd, shift = np.sqrt(self.eps), self.eps / self.scales
        upper_mean, lower_mean = x - shift, x + shift
        a_upper, a_lower = (self.centers - upper_mean) / sd, (self.centers - lower_mean) / sd
        log_upper = special.log_ndtr(-a_upper) - (x - self.centers) / self.scales
        log_lower = special.log_ndtr(a_lower) + (x - self.centers) / self.scales
        w_upper = np.exp(log_upper - np.logaddexp(log_upper, log_lower))
        return w_upper, (upper_mean, a_upper), (lower_mean, a_lower)

    def conditional_moments(self, x):
        """Mean [N, D] and covariance [N, D, D] (diagonal: the coordinates are independent given x) of pi(y | x).
        Truncated-normal moments: on [a, inf) the standard normal has mean r = phi(a) / Q(a) and variance
        1 + a r - r^2; on (-inf, a] mean -s, s = phi(a) / Phi(a), and variance 1 - a s - s^2."""
        sd = np.sqrt(self.eps)
        w, (m1, a1), (m0, a0) = self._pieces(x)
        log_phi = lambda a: -0.5 * a ** 2 - 0.5 * np.log(2 * np.pi)
        r, s = np.exp(log_phi(a1) - special.log_ndtr(-a1)), np.exp(log_phi(a0) - special.log_ndtr(a0))
        mean1, var1 = m1 + sd * r, self.eps * np.maximum(1 + a1 * r - r ** 2, 0)
        mean0, var0 = m0 - sd * s, self.eps * np.maximum(1 - a0 * s - s ** 2, 0)
        mean = w * mean1 + (1 - w) * mean0
        var = w * var1 + (1 - w) * var0 + w * (1 - w) * (mean1 - mean0) ** 2
        return mean, var[:, :, None] * np.eye(self.dim)[None]

    def sample_conditional(self, x, repeats, rng):
        """`repeats` draws of y ~ pi(y | x) per row of x [N, D] -> [N, repeats, D] (inverse CDF of each piece, taken
        in its tail's own terms: z = -Phi^-1(u Q(a)) >= a on the upper piece, z = Phi^-1(u Phi(a)) <= a below)."""
        x = np.repeat(np.asarray(x, dtype=np.float64), repeats, axis=0)
        sd = np.sqrt(self.eps)
        w, (m1, a1), (m0, a0) = self._pieces(x)
        u = rng.random(x.shape)
        with np.errstate(divide='ignore'): # A piece of weight 0 may give +-inf; it is never picked.
            z1 = -special.ndtri(u * special.ndtr(-a1))
            z0 = special.ndtri(u * special.ndtr(a0))
        y = np.where(rng.random(x.shape) < w, m1 + sd * z1, m0 + sd * z0)
        return y.reshape(-1, repeats, self.dim)

    def sample_target(self, num, rng):
        """`num` samples of p1 (the plan's second marginal)."""
        return self.sample_conditional(self.source.sample(num, rng), 1, rng)[:, 0]

    def _target_moments_of(self, num, seed):
        """(mean [D], covariance [D, D]) of p1 by the law of total covariance over `num` inputs (exact in y)."""
        mean, cov = self.conditional_moments(self.source.sample(num, np.random.default_rng(seed)))
        return mean.mean(0), cov.mean(0) + np.cov(mean.T, bias=True)


def laplace_pair(dim, eps, seed=0):
    """The input of transport.mixture.benchmark_pair(dim, eps, seed) and a Laplace potential drawn with numpy's
    Generator([seed, dim, round(1000 eps), 3]): centres uniform in [-2, 2], scales uniform in [0.5, 1.5]."""
    source = mx.benchmark_pair(dim, eps, seed).source
    rng = np.random.default_rng([seed, int(dim), int(round(1000 * eps)), 3])
    return LaplacePair(source, rng.uniform(-2, 2, size=dim), rng.uniform(0.5, 1.5, size=dim), eps)
