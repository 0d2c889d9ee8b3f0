"""Entropic OT pairs with a known plan built from Gaussian mixtures (the construction of Gushchin et al.,
NeurIPS 2023, "Building the Bridge of Schrodinger: A Continuous Entropic Optimal Transport Benchmark").

Cost |x - y|^2 / 2, entropy eps. Take any input law p0 and a positive "potential" v(y); the coupling

    pi(x, y) = p0(x) pi(y | x),    pi(y | x) = N(y; x, eps I) v(y) / Z(x),    Z(x) = int N(y; x, eps I) v(y) dy,

has the Schrodinger form a(x) exp(-|x - y|^2 / (2 eps)) b(y) (a = p0 / Z up to constants, b = v), so it is
the EOT plan between p0 and its own second marginal p1 (the target). With a mixture potential
v(y) = sum_k a_k N(y; mu_k, S_k), pi(y | x) is a Gaussian mixture with

    weights   w_k(x) proportional to a_k N(x; mu_k, S_k + eps I),
    means     m_k(x) = T_k (S_k^-1 mu_k + x / eps),     covariances  T_k = (I / eps + S_k^-1)^-1,

and with a mixture input p0 everything can be sampled exactly: x ~ p0, then y ~ pi(y | x).

`MixturePair` holds one such pair (any SPD covariances); `benchmark_pair(dim, eps, seed)` draws one with the
published structure (3 input components, 5 potential components; `benchmark_pair` documents the recipe).
`cbw2_uvp` is the benchmark's measure: 100 E_x W2^2(N(mean, cov of the model's y | x), N(mean, cov of
pi(y | x))) / Var(y), where Var(y) = tr Cov(y) of the target; `MixturePair.floor` evaluates the same estimator
on exact plan samples (finite sample counts bias it upwards).
"""

import dataclasses

import numpy as np
from scipy.special import logsumexp

from transport.gaussian import bw2_squared, sqrtm_psd

#----------------------------------------------------------------------------
# Mixtures.

def _check_spd(covs, name):
    covs = np.asarray(covs, dtype=np.float64)
    if covs.ndim != 3 or covs.shape[1] != covs.shape[2]:
        raise ValueError(f'{name} must be [K, D, D]; got shape {list(covs.shape)}')
    if not np.allclose(covs, np.swapaxes(covs, 1, 2), rtol=1e-8, atol=1e-10):
        raise ValueError(f'{name} are not symmetric')
    low = np.linalg.eigvalsh(covs).min()
    if low <= 0:
        raise ValueError(f'{name} are not positive definite (smallest eigenvalue {low:.3g})')
    return (covs + np.swapaxes(covs, 1, 2)) / 2


def log_gaussian(x, means, covs):
    """log N(x_n; means_k, covs_k) for x [N, D], means [K, D], covs [K, D, D] -> [N, K]."""
    x = np.asarray(x, dtype=np.float64)
    chol = np.linalg.cholesky(covs)                                          # [K, D, D]
    diff = x[:, None, :] - means[None, :, :]                                 # [N, K, D]
    sol = np.stack([np.linalg.solve(chol[k], diff[:, k, :].T).T for k in range(len(means))], axis=1)
    logdet = 2 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(-1)        # [K]
    return -0.5 * ((sol ** 2).sum(-1) + logdet[None, :] + x.shape[1] * np.log(2 * np.pi))


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixtureLaw:
    """sum_k weights_k N(means_k, covs_k); weights [K] (normalised on construction), means [K, D], covs [K, D, D]."""
    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray

    def __post_init__(self):
        w = np.asarray(self.weights, dtype=np.float64).reshape(-1)
        means = np.asarray(self.means, dtype=np.float64)
        if means.ndim != 2 or len(w) != len(means) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(f'need weights [K] >= 0 with a positive sum and means [K, D]; got {w.shape}, {means.shape}')
        covs = _check_spd(self.covs, 'covs')
        if covs.shape[0] != len(w) or covs.shape[1] != means.shape[1]:
            raise ValueError(f'covs must be [K, D, D] = [{len(w)}, {means.shape[1]}, {means.shape[1]}]; got {list(covs.shape)}')
        object.__setattr__(self, 'weights', w / w.sum())
        object.__setattr__(self, 'means', means)
        object.__setattr__(self, 'covs', covs)

    @property
    def dim(self):
        return self.means.shape[1]

    def log_prob(self, x):
        """log density at x [N, D] -> [N]."""
        return logsumexp(np.log(self.weights)[None, :] + log_gaussian(x, self.means, self.covs), axis=1)

    def sample(self, num, rng, return_labels=False):
        """`num` samples [num, D] (and their component labels) with numpy Generator `rng`."""
        labels = rng.choice(len(self.weights), size=num, p=self.weights)
        chol = np.linalg.cholesky(self.covs)
        x = self.means[labels]
        z = rng.normal(size=(num, self.dim))
        for k in range(len(self.weights)):
            mask = labels == k
            x[mask] += z[mask] @ chol[k].T
        return (x, labels) if return_labels else x

    def mean(self):
        return self.weights @ self.means

    def cov(self):
        m = self.mean()
        dev = self.means - m
        return np.einsum('k,kij->ij', self.weights, self.covs) + (self.weights[:, None] * dev).T @ dev

#----------------------------------------------------------------------------
# The pair and its plan.

class KnownPlan:
    """What every pair with a known plan shares: the target's moments (cached for the default arguments), its
    variance and the estimator's floor. A subclass defines `_target_moments_of(num, seed)`, `sample_conditional` and
    `conditional_moments`, and sets `_target_moments = None` when it is built."""

    def target_moments(self, num=200_000, seed=0):
        """(mean [D], covariance [D, D]) of p1 over `num` inputs x ~ p0 drawn with `seed`."""
        if (num, seed) == (200_000, 0) and self._target_moments is not None:
            return self._target_moments
        result = self._target_moments_of(num, seed)
        if (num, seed) == (200_000, 0):
            object.__setattr__(self, '_target_moments', result)
        return result

    def target_variance(self):
        """Var(y) = tr Cov(y) of the target (the cBW2-UVP normaliser)."""
        return float(np.trace(self.target_moments()[1]))

    def floor(self, x, repeats, rng):
        """cBW2-UVP (%) of exact plan samples for inputs x [N, D] with `repeats` draws each: the estimator's floor."""
        return cbw2_uvp(x, self.sample_conditional(x, repeats, rng), self)


@dataclasses.dataclass(frozen=True, eq=False)
class MixturePair(KnownPlan):
    """Input law p0 (a GaussianMixtureLaw) and potential v = sum_k a_k N(mu_k, S_k) (a GaussianMixtureLaw; its
    normalisation does not matter); `eps` > 0 the entropy. The EOT plan between p0 and p1 (its second marginal)
    is p0(x) pi(y | x), pi(y | x) proportional to N(y; x, eps I) v(y) (see the module docstring)."""
    source: GaussianMixtureLaw
    potential: GaussianMixtureLaw
    eps: float

    def __post_init__(self):
        if not self.eps > 0:
            raise ValueError(f'eps must be > 0; got {self.eps}')
        if self.source.dim != self.potential.dim:
            raise ValueError(f'source and potential differ in dimension: {self.source.dim} vs {self.potential.dim}')
        eye = np.eye(self.dim)
        s_inv = np.linalg.inv(self.potential.covs)
        t = np.linalg.inv(eye / self.eps + s_inv)
        t = (t + np.swapaxes(t, 1, 2)) / 2
        object.__setattr__(self, 'eps', float(self.eps))
        object.__setattr__(self, '_cond_covs', t)                                           # T_k [K, D, D]
        object.__setattr__(self, '_cond_bias', np.einsum('kij,kjl,kl->ki', t, s_inv, self.potential.means))
        object.__setattr__(self, '_weight_covs', self.potential.covs + self.eps * eye)     # S_k + eps I
        object.__setattr__(self, '_target_moments', None)

    @property
    def dim(self):
        return self.source.dim

    # The conditional law pi(y | x) -------------------------------------------

    def conditional_components(self, x):
        """pi(y | x) as a mixture, for x [N, D]: (log weights [N, K], means [N, K, D], covariances [K, D, D])."""
        x = np.asarray(x, dtype=np.float64)
        logw = np.log(self.potential.weights)[None, :] + log_gaussian(x, self.potential.means, self._weight_covs)
        logw = logw - logsumexp(logw, axis=1, keepdims=True)
        means = self._cond_bias[None, :, :] + np.einsum('kij,nj->nki', self._cond_covs, x) / self.eps
        return logw, means, self._cond_covs

    def conditional_moments(self, x):
        """Mean [N, D] and covariance [N, D, D] of pi(y | x) for x [N, D], exactly (mixture moments)."""
        logw, means, covs = self.conditional_components(x)
        w = np.exp(logw)
        mean = np.einsum('nk,nki->ni', w, means)
        dev = means - mean[:, None, :]
        cov = np.einsum('nk,kij->nij', w, covs) + (w[:, :, None] * dev).transpose(0, 2, 1) @ dev
        return mean, (cov + np.swapaxes(cov, 1, 2)) / 2

    def conditional_log_prob(self, x, y):
        """log pi(y_n | x_n) for x, y [N, D] -> [N]."""
        logw, means, covs = self.conditional_components(x)
        y = np.asarray(y, dtype=np.float64)
        # log N(y_n; means_nk, covs_k): y_n - means_nk is y_n - T_k x_n / eps - bias_k, one Cholesky per component.
        chol = np.linalg.cholesky(covs)
        logdet = 2 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(-1)
        logn = np.stack([-0.5 * ((np.linalg.solve(chol[k], (y - means[:, k]).T) ** 2).sum(0) + logdet[k]
                                 + self.dim * np.log(2 * np.pi)) for k in range(len(logdet))], axis=1)
        return logsumexp(logw + logn, axis=1)

    def sample_conditional(self, x, repeats, rng):
        """`repeats` draws of y ~ pi(y | x) for each row of x [N, D] -> [N, repeats, D]."""
        logw, means, covs = self.conditional_components(x)
        n, k = logw.shape
        u = rng.random(size=(n, repeats, 1))
        labels = (u > np.cumsum(np.exp(logw), axis=1)[:, None, :]).sum(-1).clip(max=k - 1)   # [N, R]
        chol = np.linalg.cholesky(covs)
        y = np.take_along_axis(means, labels[:, :, None], axis=1)
        z = rng.normal(size=(n, repeats, self.dim))
        for k in range(k):
            mask = labels == k
            y[mask] += z[mask] @ chol[k].T
        return y

    def sample_plan(self, num, rng):
        """`num` pairs (x [num, D], y [num, D]) of the plan."""
        x = self.source.sample(num, rng)
        return x, self.sample_conditional(x, 1, rng)[:, 0]

    def sample_target(self, num, rng):
        """`num` samples of p1 (the plan's second marginal)."""
        return self.sample_plan(num, rng)[1]

    def log_plan_density(self, x, y):
        """log pi(x_n, y_n) = log p0(x_n) + log pi(y_n | x_n) -> [N]."""
        return self.source.log_prob(x) + self.conditional_log_prob(x, y)

    # The Schrodinger bridge ---------------------------------------------------

    def end_point(self, x, t):
        """E[x_1 | x_t = x] under the Schrodinger bridge of the plan (the exact f of the f-SDE), for x [N, D] and
        t in [0, 1) (a number or [N]).

        The bridge's forward drift is eps grad log phi_t with phi_t(x) = int N(y; x, eps (1 - t) I) v(y) dy
        = sum_k a_k N(x; mu_k, S_k + eps (1 - t) I), so E[x_1 | x_t] = x + (1 - t) eps grad log phi_t(x)
        = x + eps (1 - t) sum_k r_k (S_k + eps (1 - t) I)^-1 (mu_k - x), r_k proportional to
        a_k N(x; mu_k, S_k + eps (1 - t) I). At t = 0 this is the conditional mean of pi(y | x).
        """
        x = np.asarray(x, dtype=np.float64)
        s = np.broadcast_to(np.asarray(1 - np.asarray(t, dtype=np.float64)), (len(x),))
        out = np.empty_like(x)
        for level in np.unique(s):          # samplers call this with one t per step
            rows = s == level
            covs = self.potential.covs + self.eps * level * np.eye(self.dim)
            logr = np.log(self.potential.weights)[None, :] + log_gaussian(x[rows], self.potential.means, covs)
            r = np.exp(logr - logsumexp(logr, axis=1, keepdims=True))                   # [n, K]
            diff = self.potential.means[None, :, :] - x[rows][:, None, :]                # [n, K, D]
            pull = np.einsum('kij,nkj->nki', np.linalg.inv(covs), diff)
            out[rows] = x[rows] + self.eps * level * np.einsum('nk,nki->ni', r, pull)
        return out

    # The target's moments ---------------------------------------------------

    def _target_moments_of(self, num, seed):
        """(mean [D], covariance [D, D]) of p1, as E_x of the conditional moments over `num` inputs x ~ p0
        (law of total covariance; Monte Carlo over x only, exact in y)."""
        rng = np.random.default_rng(seed)
        weight_sum, first, second = 0.0, 0.0, 0.0
        for chunk in np.array_split(np.arange(num), max(1, num // 20_000)):
            logw, means, _ = self.conditional_components(self.source.sample(len(chunk), rng))
            w = np.exp(logw)                                                    # [N, K]
            weight_sum = weight_sum + w.sum(0)
            first = first + np.einsum('nk,nki->i', w, means)
            wm = (np.sqrt(w)[:, :, None] * means).reshape(-1, self.dim)
            second = second + wm.T @ wm                                         # sum_n sum_k w_nk m_nk m_nk^T
        # E[y y^T] = E_x sum_k w_k(x) (T_k + m_k(x) m_k(x)^T).
        mean = first / num
        cov = (np.einsum('k,kij->ij', weight_sum, self._cond_covs) + second) / num - np.outer(mean, mean)
        return mean, (cov + cov.T) / 2


def cbw2_uvp(x, y, pair, chunk=200):
    """cBW2-UVP (%) of conditional samples against the pair's plan.

    x: [N, D] inputs; y: [N, R, D], R >= 2 draws of the model's y | x for each input. Returns
    100 mean_n W2^2(N(mean, cov of y[n]), N(mean, cov of pi(. | x[n]))) / tr Cov(y), with W2 the Bures-Wasserstein
    distance (Gushchin et al. 2023, as in their `calculate_cond_bw`, which halves both terms).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if y.ndim != 3 or y.shape[0] != x.shape[0] or y.shape[2] != x.shape[1] or y.shape[1] < 2:
        raise ValueError(f'cbw2_uvp needs x [N, D] and y [N, R >= 2, D]; got {list(x.shape)} and {list(y.shape)}')
    total = 0.0
    for i in range(0, len(x), chunk):
        true_mean, true_cov = pair.conditional_moments(x[i:i + chunk])
        yc = y[i:i + chunk]
        mu = yc.mean(1)
        dev = yc - mu[:, None, :]
        cov = dev.transpose(0, 2, 1) @ dev / (yc.shape[1] - 1)
        total += float(bw2_squared(mu, cov, true_mean, true_cov).sum())
    return 100 * total / len(x) / pair.target_variance()

#----------------------------------------------------------------------------
# The benchmark's pairs.

# Standard deviation multiplier of the potential's components by eps and D, from the authors' construction
# notebook (notebooks/GaussianMixtureDraft.ipynb in github.com/ngushchin/EntropicOTBenchmark): std = 0.5 * s.
POTENTIAL_STD_SCALE = {
    0.1: {2: 0.5, 4: 0.5, 8: 1, 16: 1, 32: 4, 64: 8, 128: 8},
    1: {2: 0.5, 4: 0.5, 8: 1, 16: 1, 32: 2, 64: 2, 128: 2},
    10: {2: 0.5, 4: 0.5, 8: 1, 16: 1, 32: 2, 64: 2, 128: 2},
}


def grid_centers(dim, num, spacing, rng):
    """`num` centres in R^dim whose every coordinate is an independent random permutation of
    spacing * (0, 1, ..., num - 1), centred on 0 (the construction's `initialize_centers`)."""
    centers = np.stack([rng.permutation(num) for _ in range(dim)], axis=1).astype(np.float64) * spacing
    return centers - spacing * (num - 1) / 2


def random_isotropic_mixture(dim, num, spacing, std, rng):
    """Weights uniform(0, 1) normalised, grid_centers(dim, num, spacing), covariances std^2 I."""
    weights = rng.random(num)
    means = grid_centers(dim, num, spacing, rng)
    return GaussianMixtureLaw(weights, means, np.repeat((std ** 2 * np.eye(dim))[None], num, axis=0))


def benchmark_pair(dim, eps, seed=0):
    """A pair with the published structure (Gushchin et al. 2023), drawn with numpy's Generator([seed, dim]) for the
    input and Generator([seed, dim, round(1000 eps)]) for the potential (so that one input serves every eps, as in the
    published files):

    - p0: 3 components, weights ~ U(0, 1) normalised, centres with coordinates permutations of {-2, 0, 2}
      (spacing 2), covariances 0.5^2 I;
    - v: 5 components, weights ~ U(0, 1) normalised, centres with coordinates permutations of {-2, -1, 0, 1, 2}
      (spacing 1), covariances (0.5 s)^2 I with s = POTENTIAL_STD_SCALE[eps][dim] (dims 2, 4, ..., 128 and
      eps 0.1, 1, 10; other values use the nearest tabulated dimension at or above `dim`, and eps must be one
      of the three).

    The published files were drawn the same way with torch / numpy global seeds that are not published; these
    pairs share the structure, not the numbers.
    """
    dim = int(dim)
    if eps not in POTENTIAL_STD_SCALE:
        raise ValueError(f'eps must be one of {sorted(POTENTIAL_STD_SCALE)} (the benchmark\'s); got {eps}')
    table = POTENTIAL_STD_SCALE[eps]
    key = min([d for d in table if d >= dim], default=max(table))
    source = random_isotropic_mixture(dim, 3, 2.0, 0.5, np.random.default_rng([seed, dim]))
    potential = random_isotropic_mixture(dim, 5, 1.0, 0.5 * table[key],
                                         np.random.default_rng([seed, dim, int(round(1000 * eps))]))
    return MixturePair(source, potential, eps)
