"""Diffusion denoisers for DPM-OT: the EDM noise schedule, samplers, losses and `DenoiserTask`.

Samplers share one signature (k-diffusion style: the noise schedule is separate from the step rule):

    x = sample_<name>(net, x, sigmas, *, randn_like=torch.randn_like, callback=None, **opts)

`net(x, sigma)` is a denoiser D(x; sigma) with EDM's interface (training.networks.Denoiser or an NVlabs/edm
snapshot's `ema`); `x` starts at noise level sigmas[0]; `sigmas` is a decreasing schedule, usually
`edm_sigma_schedule(...)` ending with 0. `randn_like` draws the sampler's noise (pass a per-sample seeded one
for reproducibility) and `callback(dict(i, x, sigma, sigma_next, denoised))` is called after every step.
`run_sampler(name, ...)` returns (x, nfe) with nfe counted from the network calls; `expected_nfe` gives the
formula (Euler K, Heun 2K - 1 when the schedule ends at 0, Langevin K * n_steps_each + 1).

Persistent classes here (the losses) are pickled into snapshots with this file's source, so at import time
this module imports only torch, numpy and torch_utils; everything else is imported where it is used.
"""

import math

import numpy as np
import torch

from torch_utils import persistence

#----------------------------------------------------------------------------
# Noise schedule.

def edm_sigma_schedule(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's time steps (Karras et al. 2022, eq. 5) followed by 0.

    sigma_i = (sigma_max^(1/rho) + i / (num_steps - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for
    i = 0 .. num_steps - 1, and sigma_num_steps = 0. With num_steps = 1 the schedule is [sigma_max, 0].

    Returns a float64 tensor [num_steps + 1] on the CPU.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f'num_steps must be an int >= 1; got {num_steps!r}')
    if not (0 < sigma_min <= sigma_max < math.inf):
        raise ValueError(f'need 0 < sigma_min <= sigma_max < inf; got sigma_min={sigma_min}, sigma_max={sigma_max}')
    if not rho > 0:
        raise ValueError(f'rho must be > 0 (EDM uses 7); got {rho}')
    i = torch.arange(num_steps, dtype=torch.float64)
    frac = i / (num_steps - 1) if num_steps > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    sigmas = (hi + frac * (lo - hi)) ** rho
    sigmas[0], sigmas[-1] = float(sigma_max), (float(sigma_min) if num_steps > 1 else float(sigma_max))  # exact ends
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def net_sigma_schedule(net, num_steps, sigma_min=None, sigma_max=None, rho=7.0):
    """`edm_sigma_schedule` within the range the denoiser supports, rounded by `net.round_sigma` (as EDM does).

    sigma_min / sigma_max default to the network's (`net.sigma_min`, `net.sigma_max`; 0.002 / 80 without them)
    and are clamped to them.
    """
    net_min, net_max = float(getattr(net, 'sigma_min', 0.002)), float(getattr(net, 'sigma_max', 80.0))
    lo = net_min if sigma_min is None else max(float(sigma_min), net_min)
    hi = net_max if sigma_max is None else min(float(sigma_max), net_max)
    sigmas = edm_sigma_schedule(num_steps, lo, hi, rho)
    round_sigma = getattr(net, 'round_sigma', None)
    if round_sigma is not None:
        sigmas[:-1] = torch.as_tensor(round_sigma(sigmas[:-1]), dtype=torch.float64)
    return sigmas


def check_sigmas(sigmas):
    """`sigmas` as a float64 CPU tensor [K + 1], checked: K >= 1, finite, >= 0, non-increasing, only the last 0."""
    s = torch.as_tensor(sigmas).detach().to('cpu', torch.float64)
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f'sigmas must be a 1-D schedule of at least 2 noise levels (e.g. edm_sigma_schedule(K)); '
                         f'got shape {list(s.shape)}')
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError(f'sigmas must be finite and >= 0; got {s.tolist()}')
    if (s[1:] > s[:-1]).any():
        raise ValueError(f'sigmas must be non-increasing (from noise to data); got {s.tolist()}')
    if (s[:-1] == 0).any():
        raise ValueError(f'only the last noise level may be 0; got {s.tolist()}')
    return s

#----------------------------------------------------------------------------
# Samplers.

def sampling_dtype(device):
    """float64 for sampling where the device has it (as EDM), float32 on Apple's MPS."""
    return torch.float32 if torch.device(device).type == 'mps' else torch.float64


def _denoise(net, x, sigma):
    """D(x; sigma) in x's dtype, with sigma as one value per sample (EDM's networks accept [N] or scalars)."""
    sig = torch.full([x.shape[0]], float(sigma), dtype=x.dtype, device=x.device)
    return net(x, sig).to(x.dtype)


def _round(net, sigma):
    round_sigma = getattr(net, 'round_sigma', None)
    return float(round_sigma(torch.as_tensor(sigma, dtype=torch.float64))) if round_sigma is not None else float(sigma)


def _edm_sampler(net, x, sigmas, second_order, randn_like, callback, S_churn, S_min, S_max, S_noise):
    """Karras et al. 2022, Algorithm 2 (Heun, `second_order`) or its first-order version (Euler), with churn."""
    s = check_sigmas(sigmas).tolist()
    K = len(s) - 1
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f'S_churn and S_noise must be >= 0; got S_churn={S_churn}, S_noise={S_noise}')
    for i in range(K):
        sigma, sigma_next = s[i], s[i + 1]
        # Churn: raise the noise level to sigma_hat = (1 + gamma) sigma by adding fresh noise (EDM eq. in Alg. 2).
        gamma = min(S_churn / K, math.sqrt(2) - 1) if S_min <= sigma <= S_max else 0.0
        sigma_hat = _round(net, sigma + gamma * sigma) if gamma > 0 else sigma
        if sigma_hat > sigma:
            x = x + math.sqrt(sigma_hat ** 2 - sigma ** 2) * S_noise * randn_like(x)
        # Euler step of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma.
        denoised = _denoise(net, x, sigma_hat)
        d = (x - denoised) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        # Heun's correction (trapezoidal rule), skipped on a step to sigma = 0 as in EDM.
        if second_order and sigma_next > 0:
            d_next = (x_next - _denoise(net, x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_next)
        x = x_next
        if callback is not None:
            callback(dict(i=i, x=x, sigma=sigma, sigma_hat=sigma_hat, sigma_next=sigma_next, denoised=denoised))
    return x


@torch.no_grad()
def sample_euler(net, x, sigmas, *, randn_like=torch.randn_like, callback=None, S_churn=0.0, S_min=0.0,
                 S_max=math.inf, S_noise=1.0):
    """Euler steps of the probability-flow ODE along `sigmas`; K = len(sigmas) - 1 network calls.

    Optional stochastic churn as in EDM: at every level in [S_min, S_max] the noise is raised by a factor
    1 + min(S_churn / K, sqrt(2) - 1) with fresh noise scaled by S_noise before the step.
    Returns x at the last noise level (the data, when sigmas ends with 0).
    """
    return _edm_sampler(net, x, sigmas, False, randn_like, callback, S_churn, S_min, S_max, S_noise)


@torch.no_grad()
def sample_heun(net, x, sigmas, *, randn_like=torch.randn_like, callback=None, S_churn=0.0, S_min=0.0,
                S_max=math.inf, S_noise=1.0):
    """Heun's second-order method (EDM Algorithm 2): 2K - 1 network calls on a schedule ending at 0
    (no correction on the last step to sigma = 0), 2K otherwise. Churn options as in sample_euler."""
    return _edm_sampler(net, x, sigmas, True, randn_like, callback, S_churn, S_min, S_max, S_noise)


@torch.no_grad()
def sample_langevin(net, x, sigmas, *, randn_like=torch.randn_like, callback=None, n_steps_each=1, step_scale=0.5,
                    denoise=None):
    """Annealed Langevin dynamics (Song & Ermon 2019/2020, the sampler of the DPM-OT paper).

    For every positive level sigma_i of `sigmas`, `n_steps_each` steps
        x <- x + alpha_i s(x; sigma_i) + sqrt(2 alpha_i) z,   s(x; sigma) = (D(x; sigma) - x) / sigma^2,
    with alpha_i = step_scale * sigma_i^2: the paper's alpha_i = step_lr (sigma_i / sigma_L)^2 with
    step_lr = step_scale * sigma_L^2 (sigma_L the smallest level). Then, when `denoise` (default: the schedule
    ends with 0), the final denoising step x <- x + sigma_L^2 s(x; sigma_L) = D(x; sigma_L) (Tweedie).
    Network calls: n_steps_each * (number of positive levels) + denoise. The default step_scale = 0.5 suits
    schedules of 5-35 levels (the paper's NCSNv2 setting, ~0.06 with 5 steps per level, needs hundreds of levels).
    """
    s = check_sigmas(sigmas).tolist()
    levels = [v for v in s if v > 0]
    if int(n_steps_each) < 1:
        raise ValueError(f'n_steps_each must be >= 1; got {n_steps_each}')
    if not 0 < step_scale < 2:
        raise ValueError(f'step_scale must be in (0, 2) (alpha_i = step_scale * sigma_i^2; larger diverges); '
                         f'got {step_scale}')
    denoise = (s[-1] == 0) if denoise is None else bool(denoise)
    step = 0
    for i, sigma in enumerate(levels):
        alpha = step_scale * sigma ** 2
        for _ in range(int(n_steps_each)):
            denoised = _denoise(net, x, sigma)
            x = x + alpha * (denoised - x) / sigma ** 2 + math.sqrt(2 * alpha) * randn_like(x)
            if callback is not None:
                callback(dict(i=step, x=x, sigma=sigma, sigma_hat=sigma, sigma_next=sigma, denoised=denoised))
            step += 1
    if denoise:
        x = _denoise(net, x, levels[-1])
        if callback is not None:
            callback(dict(i=step, x=x, sigma=levels[-1], sigma_hat=levels[-1], sigma_next=0.0, denoised=x))
    return x


SAMPLERS = dict(euler=sample_euler, heun=sample_heun, langevin=sample_langevin)


def get_sampler(name):
    """The sampler function called `name` (a key of SAMPLERS)."""
    if name not in SAMPLERS:
        raise ValueError(f'Unknown sampler {name!r}; choose one of {", ".join(SAMPLERS)}')
    return SAMPLERS[name]


def expected_nfe(name, sigmas, **opts):
    """Network evaluations of sampler `name` on schedule `sigmas` (K = len(sigmas) - 1 steps):
    euler K; heun 2K - 1 when sigmas ends with 0, else 2K; langevin n_steps_each * #positive levels + denoise."""
    get_sampler(name)
    s = check_sigmas(sigmas)
    K = s.numel() - 1
    ends_at_zero = bool(s[-1] == 0)
    if name == 'euler':
        return K
    if name == 'heun':
        return 2 * K - 1 if ends_at_zero else 2 * K
    levels = int((s > 0).sum())
    denoise = opts.get('denoise')
    denoise = ends_at_zero if denoise is None else bool(denoise)
    return int(opts.get('n_steps_each', 1)) * levels + int(denoise)


class _CountingNet:
    """Wraps a denoiser and counts its calls (attribute access goes to the wrapped network)."""

    def __init__(self, net):
        self.net = net
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.net, name)


def run_sampler(name, net, x, sigmas, randn_like=torch.randn_like, callback=None, **opts):
    """Run sampler `name` ('euler', 'heun' or 'langevin'); returns (x, nfe), nfe = network calls made."""
    fn = get_sampler(name)
    counter = _CountingNet(net)
    x = fn(counter, x, sigmas, randn_like=randn_like, callback=callback, **opts)
    return x, counter.calls

#----------------------------------------------------------------------------
# Losses (Karras et al. 2022, Table 1), per sample: the mean over the data dimensions (EDM sums them; a
# constant factor that Adam ignores, and it keeps the element-wise gradient clip meaningful).

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


LOSSES = dict(edm='training.diffusion.EDMLoss', vp='training.diffusion.VPLoss', ve='training.diffusion.VELoss')

#----------------------------------------------------------------------------
# The denoiser as a task of the shared training loop.

class DenoiserTask:
    """A preconditioned denoiser trained with a diffusion loss in the shared loop (training/training_loop.py).

    One iteration: one optimisation step of the network 'denoiser' on a fresh batch. Snapshots hold the EMA
    network under `ema` (as EDM's), the loss under `loss_fn`, and the data set's kwargs, shape and sha256.

    Args:
        data_kwargs: the data set (class_name + options).
        loader_kwargs: DataLoader options.
        network_kwargs: the Denoiser (class_name + options), e.g. training.networks.denoiser_kwargs(...).
        loss_kwargs: the loss (class_name + options), e.g. dict(class_name='training.diffusion.EDMLoss').
        optimizer_kwargs: the optimiser (class_name + options).
        sample_steps: Heun steps of the figures made at each snapshot.
        num_figure_samples: samples in those figures (default 16 images or 1024 vectors).
    """

    def __init__(self, data_kwargs, network_kwargs, loss_kwargs, optimizer_kwargs, loader_kwargs=None,
                 sample_steps=18, num_figure_samples=None, provenance=None):
        self.data_kwargs = dict(data_kwargs)
        self.loader_kwargs = dict(loader_kwargs or {})
        self.network_kwargs = dict(network_kwargs)
        self.loss_kwargs = dict(loss_kwargs)
        self.optimizer_kwargs = dict(optimizer_kwargs)
        self.sample_steps = int(sample_steps)
        self.num_figure_samples = num_figure_samples
        self.provenance = dict(provenance or {})

    def setup(self, trainer, run_dir, seed):
        import dnnlib
        from torch_utils import distributed as dist
        from training.training_loop import DataStream
        self.run_dir = run_dir
        dist.print0('Loading dataset...')
        dataset = dnnlib.util.construct_class_by_name(**self.data_kwargs)
        self.data_shape = tuple(dataset.item_shape)
        self.dataset_size = len(dataset)
        self.provenance.setdefault('data_sha256', dataset.data_hash())
        self.data = DataStream(dataset, trainer.batch_gpu, trainer.device, seed=seed, loader_kwargs=self.loader_kwargs)
        dist.print0(f'Dataset: {len(dataset)} items of shape {list(self.data_shape)}')
        self.loss = dnnlib.util.construct_class_by_name(**self.loss_kwargs)
        dist.print0('Constructing network...')
        net = dnnlib.util.construct_class_by_name(**self.network_kwargs)
        if tuple(net.data_shape) != self.data_shape:
            raise ValueError(f'The network is built for data of shape {list(net.data_shape)} but the data set holds '
                             f'{list(self.data_shape)}; build it with data_shape={list(self.data_shape)}')
        trainer.add_network('denoiser', net, self.optimizer_kwargs)
        dist.print0(f'Denoiser: {type(net).__name__} ({getattr(net, "precond", "-")}), '
                    f'{sum(p.numel() for p in net.parameters()):,} parameters')
        n = self.num_figure_samples or (16 if len(self.data_shape) == 3 else 1024)
        gen = torch.Generator().manual_seed(seed)
        self.fixed_noise = torch.randn([n, *self.data_shape], generator=gen)
        self.fixed_data = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(min(n, len(dataset)))])

    def iteration(self, trainer):
        trainer.run_phase('denoiser', lambda ddp: self._step(trainer, ddp))

    def _step(self, trainer, ddp):
        y = self.data.next()
        with trainer.autocast():
            return self.loss(ddp, y, trainer)

    @torch.no_grad()
    def report_tick_stats(self, trainer):
        """Denoising error |D(y + sigma n; sigma) - y|^2 of the EMA network at a few fixed noise levels."""
        from torch_utils import distributed as dist
        from torch_utils import training_stats
        from training.dataset import to_model_space
        if dist.get_rank() != 0:
            return
        net = trainer.ema['denoiser']
        y = to_model_space(self.fixed_data, trainer.device)
        gen = torch.Generator().manual_seed(1)
        for sigma in (0.02, 0.2, 2.0):
            n = torch.randn(y.shape, generator=gen).to(trainer.device)
            err = _per_sample_mean((_denoise(net, y + sigma * n, sigma) - y).square())
            training_stats.report(f'Denoise/mse_sigma{sigma:g}', err)

    def sample(self, net, noise, num_steps=None):
        """Heun samples from `noise` (N(0, I), scaled here to the network's sigma_max)."""
        sigmas = net_sigma_schedule(net, num_steps or self.sample_steps)
        x = noise.to(sampling_dtype(noise.device)) * sigmas[0]
        return sample_heun(net, x, sigmas).to(torch.float32)

    def snapshot_data(self, trainer):
        from training.training_loop import cpu_copy
        return dict(kind='denoiser', ema=cpu_copy(trainer.ema['denoiser']), loss_fn=self.loss,
                    augment_pipe=None, data_shape=list(self.data_shape), dataset_kwargs=dict(self.data_kwargs),
                    provenance=dict(self.provenance), kimg=trainer.cur_nimg / 1000)

    def on_snapshot(self, trainer, run_dir, kimg_str):
        import os
        from torch_utils import distributed as dist
        from training import visualize
        from training.dataset import to_model_space
        if dist.get_rank() != 0:
            return
        net = trainer.ema['denoiser']
        samples = self.sample(net, self.fixed_noise.to(trainer.device)).cpu()
        data = to_model_space(self.fixed_data, 'cpu')
        path = os.path.join(run_dir, f'fakes-{kimg_str}.png')
        if len(self.data_shape) == 3:
            visualize.save_png(visualize.image_grid([data, samples]), path)
        else:
            visualize.save_png(visualize.scatter_plot(dict(data=data, samples=samples)), path)

    def state_dict(self):
        return dict(data=self.data.state_dict())

    def load_state_dict(self, state):
        self.data.load_state_dict(state['data'])

#----------------------------------------------------------------------------
