"""A Schrodinger potential in closed form: the teacher of the `light` G-step for vector data.

The EOT plan with cost |x - y|^2 / 2 and entropy eps has the form pi(y | x) proportional to
N(y; x, eps I) v(y) for some potential v. With v a Gaussian mixture sum_k a_k N(y; mu_k, diag s_k) (the
parameterisation of LightSB, Korotin et al., ICLR 2024) everything is closed form:

    pi_v(y | x) = sum_k w_k(x) N(y; m_k(x), diag T_k),   w_k(x) proportional to a_k N(x; mu_k, diag(s_k + eps)),
    T_k = 1 / (1 / eps + 1 / s_k),                         m_k(x) = T_k (mu_k / s_k + x / eps),

and KL(pi || p0 pi_v) for the EOT plan pi between p0 and p1 is, up to a constant,

    E_{x ~ p0} log c_v(x) - E_{y ~ p1} log v(y),   c_v(x) = sum_k a_k N(x; mu_k, diag(s_k + eps)),

which needs only unpaired samples of the two marginals (LightSB's objective). `LightPotential.forward(x0, x1)`
returns that loss per sample; `sample(x, u, z)` draws from pi_v(. | x). Its family contains every plan whose
potential is a mixture of axis-aligned Gaussians (the mixture benchmark's among them); for other data it is an
approximation with `components` Gaussians (docs/eot_benchmarks.md measures both).

A persistent class (torch_utils.persistence): this module imports only torch and torch_utils.
"""

import math

import torch

from torch_utils import persistence

#----------------------------------------------------------------------------

@persistence.persistent_class
class LightPotential(torch.nn.Module):
    """v(y) = sum_k a_k N(y; mu_k, diag s_k), K = `components`, for vectors of dimension `dim` and entropy `eps`.

    Parameters: logits of a [K], means mu [K, dim], log variances log s [K, dim]. Call `init_from(y)` with
    target samples before training (means at K of them spread by k-means++, variances a tenth of the samples'
    mean variance).
    """

    def __init__(self, dim, components=20, eps=1.0):
        super().__init__()
        if not (int(components) == components and components >= 1):
            raise ValueError(f'components must be an int >= 1; got {components}')
        if not eps > 0:
            raise ValueError(f'eps must be > 0 (the entropy of EOT, train.py --gamma); got {eps}')
        self.dim, self.data_shape, self.eps = int(dim), (int(dim),), float(eps)
        self.logits = torch.nn.Parameter(torch.zeros(int(components)))
        self.means = torch.nn.Parameter(torch.zeros(int(components), self.dim))
        self.log_vars = torch.nn.Parameter(torch.zeros(int(components), self.dim))

    @torch.no_grad()
    def init_from(self, y, generator=None):
        """Means at K rows of y [>= K, dim] chosen by k-means++ seeding (Arthur & Vassilvitskii 2007: the first
        uniformly, each next with probability proportional to its squared distance to the nearest one chosen),
        so that they spread over the target's modes; every variance a tenth of y's mean variance (+ 1e-2).
        `generator`: a torch.Generator for the draws (the same on every rank gives the same potential).

        (Means at the first K rows left a mode of the D = 2, eps = 1 benchmark target without a component in 6
        of 8 batch orders, and V then stalled at 1.7 % cBW2-UVP; from k-means++ seeds 8 of 8 ended at 0.01-0.11 %:
        docs/eot_benchmarks.md.)
        """
        k = self.means.shape[0]
        if y.ndim != 2 or y.shape[0] < k or y.shape[1] != self.dim:
            raise ValueError(f'init_from needs at least {k} samples of dimension {self.dim}; got {list(y.shape)}')
        y = y.float()
        chosen = [int(torch.randint(y.shape[0], [1], generator=generator))]
        dist2 = (y - y[chosen[0]]).square().sum(1)
        for _ in range(k - 1):
            total = float(dist2.sum())
            weights = dist2 / total if total > 0 else torch.ones_like(dist2) # (All rows alike: any of them.)
            chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
            dist2 = torch.minimum(dist2, (y - y[chosen[-1]]).square().sum(1))
        self.means.copy_(y[chosen])
        self.log_vars.fill_(math.log(float(y.var(dim=0).mean()) * 0.1 + 1e-2))

    def _log_mixture(self, x, variances):
        """log sum_k a_k N(x; mu_k, diag variances_k) for x [N, dim] -> ([N, K] per component, [N])."""
        diff = x[:, None, :] - self.means[None]
        log_n = -0.5 * ((diff.square() / variances[None]).sum(-1) + variances.log().sum(-1)[None]
                        + self.dim * math.log(2 * math.pi))
        per_component = self.logits.log_softmax(0)[None] + log_n
        return per_component, per_component.logsumexp(1)

    def log_c(self, x):
        """log c_v(x) = log sum_k a_k N(x; mu_k, diag(s_k + eps)) for x [N, dim] -> [N]."""
        return self._log_mixture(x.float(), self.log_vars.exp() + self.eps)[1]

    def log_v(self, y):
        """log v(y) for y [N, dim] -> [N]."""
        return self._log_mixture(y.float(), self.log_vars.exp())[1]

    def forward(self, x0, x1):
        """The LightSB loss per sample, log c_v(x0_i) - log v(x1_i), for x0, x1 [N, dim] independent samples of
        the two marginals (its mean is KL(pi || p0 pi_v) up to a constant)."""
        return self.log_c(x0) - self.log_v(x1)

    @torch.no_grad()
    def sample(self, x, u, z):
        """One draw of y ~ pi_v(. | x_i) per row of x [N, dim]: the component from u [N] ~ U(0, 1) (inverse CDF
        of the weights w(x_i)), the Gaussian's noise z [N, dim] ~ N(0, I)."""
        x = x.float()
        variances = self.log_vars.exp()
        log_w = self._log_mixture(x, variances + self.eps)[0]
        cdf = log_w.softmax(1).cumsum(1)
        k = (u.float()[:, None] > cdf).sum(1).clamp(max=cdf.shape[1] - 1)
        cond_var = 1 / (1 / self.eps + 1 / variances[k])
        mean = cond_var * (self.means[k] / variances[k] + x / self.eps)
        return mean + cond_var.sqrt() * z.float()

#----------------------------------------------------------------------------
