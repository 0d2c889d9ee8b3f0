"""Diffusion losses (Karras et al. 2022, Table 1), per sample: the mean over the data dimensions (EDM sums
them; a constant factor that Adam ignores, and it keeps the element-wise gradient clip meaningful).

Persistent classes pickled into snapshots with this file's source: this module imports only torch and
torch_utils.
"""

import torch

from torch_utils import persistence

#----------------------------------------------------------------------------

def _per_sample_mean(x):
    return x.flatten(1).mean(dim=1)

def _sigma_shape(n, y):
    return [n] + [1] * (y.ndim - 1)

@persistence.persistent_class
class EDMLoss:
    """EDM loss: ln sigma ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
    loss = weight |D(y + sigma n; sigma) - y|^2."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        if not (P_std > 0 and sigma_data > 0):
            raise ValueError(f'EDMLoss needs P_std > 0 and sigma_data > 0; got P_std={P_std}, sigma_data={sigma_data}')
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)

    def __call__(self, net, y, rng):
        """Per-sample losses [N] of denoiser `net` on clean data y; `rng` has randn(shape) (the Trainer)."""
        sigma = (rng.randn(_sigma_shape(y.shape[0], y)) * self.P_std + self.P_mean).exp()
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        n = rng.randn(y.shape) * sigma
        D_yn = net(y + n, sigma.flatten()).float()
        return _per_sample_mean(weight * (D_yn - y).square())

@persistence.persistent_class
class VPLoss:
    """VP loss (Song et al. 2021): t ~ U(epsilon_t, 1), sigma = sigma_vp(t), weight 1 / sigma^2."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        if not 0 < epsilon_t < 1:
            raise ValueError(f'VPLoss needs 0 < epsilon_t < 1; got {epsilon_t}')
        self.beta_d, self.beta_min, self.epsilon_t = float(beta_d), float(beta_min), float(epsilon_t)

    def sigma(self, t):
        # sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t ** 2 + self.beta_min * t).exp() - 1).sqrt()

    def __call__(self, net, y, rng):
        t = 1 + rng.rand(_sigma_shape(y.shape[0], y)) * (self.epsilon_t - 1)
        sigma = self.sigma(t)
        n = rng.randn(y.shape) * sigma
        D_yn = net(y + n, sigma.flatten()).float()
        return _per_sample_mean((D_yn - y).square() / sigma ** 2)

@persistence.persistent_class
class VELoss:
    """VE loss (Song et al. 2021): ln sigma ~ U(ln sigma_min, ln sigma_max), weight 1 / sigma^2."""

    def __init__(self, sigma_min=0.02, sigma_max=100.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f'VELoss needs 0 < sigma_min < sigma_max; got {sigma_min}, {sigma_max}')
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def __call__(self, net, y, rng):
        u = rng.rand(_sigma_shape(y.shape[0], y))
        sigma = self.sigma_min * (self.sigma_max / self.sigma_min) ** u
        n = rng.randn(y.shape) * sigma
        D_yn = net(y + n, sigma.flatten()).float()
        return _per_sample_mean((D_yn - y).square() / sigma ** 2)

LOSSES = dict(edm='models.diffusion_loss.EDMLoss', vp='models.diffusion_loss.VPLoss', ve='models.diffusion_loss.VELoss')
