"""Diffusion denoisers for DPM-OT: the EDM noise schedule, samplers, losses and `DenoiserTask`.

Samplers share one signature (k-diffusion style: the noise schedule is separate from the step rule):

    x = sample_<name>(net, x, sigmas, *, randn_like=torch.randn_like, callback=None, **opts)

`net(x, sigma)` is a denoiser D(x; sigma) with EDM's interface (models.networks.Denoiser or an NVlabs/edm
snapshot's `ema`); `x` starts at noise level sigmas[0]; `sigmas` is a decreasing schedule, usually
`edm_sigma_schedule(...)` ending with 0. `randn_like` draws the sampler's noise (pass a per-sample seeded one
for reproducibility) and `callback(dict(i, x, sigma, sigma_next, denoised))` is called after every step.
`run_sampler(name, ...)` returns (x, nfe) with nfe counted from the network calls; `expected_nfe` gives the
formula (Euler K, Heun 2K - 1 when the schedule ends at 0, Langevin K * n_steps_each + 1).

"""

import math

import numpy as np
import torch

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

EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0   # NVlabs/edm's sampler defaults

def sigma_range(net, sigma_min=None, sigma_max=None):
    """(sigma_min, sigma_max) of a sampler's schedule for `net`, as NVlabs/edm's sampler sets them: the requested
    values (default 0.002 and 80) clamped to the range the network supports, max(sigma_min, net.sigma_min) and
    min(sigma_max, net.sigma_max) (edm's EDMPrecond says 0 and inf, so its pickles sample on 0.002 .. 80)."""
    net_min, net_max = float(getattr(net, 'sigma_min', 0.0)), float(getattr(net, 'sigma_max', math.inf))
    lo = max(EDM_SIGMA_MIN if sigma_min is None else float(sigma_min), net_min)
    hi = min(EDM_SIGMA_MAX if sigma_max is None else float(sigma_max), net_max)
    if not 0 < lo <= hi < math.inf:
        raise ValueError(f'no noise levels left: sigma_min={lo:g}, sigma_max={hi:g} after clamping the requested '
                         f'range ({sigma_min}, {sigma_max}; defaults 0.002, 80) to the network\'s [{net_min:g}, '
                         f'{net_max:g}]; choose a range inside the network\'s')
    return lo, hi

def net_sigma_schedule(net, num_steps, sigma_min=None, sigma_max=None, rho=7.0):
    """`edm_sigma_schedule` on `sigma_range(net, sigma_min, sigma_max)`, rounded by `net.round_sigma` (as edm)."""
    lo, hi = sigma_range(net, sigma_min, sigma_max)
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
    """Karras et al. 2022, Algorithm 2 (Heun, `second_order`) or its first-order version (Euler), with churn.

    With S_churn > 0 the churn noise is drawn at every step, multiplied by 0 outside [S_min, S_max], as NVlabs/edm
    draws it, so that the per-seed streams stay edm's (with S_churn = 0 nothing is drawn: no later draw exists).
    """
    s = check_sigmas(sigmas).tolist()
    K = len(s) - 1
    if S_churn < 0 or S_noise < 0:
        raise ValueError(f'S_churn and S_noise must be >= 0; got S_churn={S_churn}, S_noise={S_noise}')
    for i in range(K):
        sigma, sigma_next = s[i], s[i + 1]
        # Churn: raise the noise level to sigma_hat = (1 + gamma) sigma by adding fresh noise (EDM eq. in Alg. 2).
        gamma = min(S_churn / K, math.sqrt(2) - 1) if S_min <= sigma <= S_max else 0.0
        sigma_hat = _round(net, sigma + gamma * sigma)
        if S_churn > 0:
            x = x + math.sqrt(max(sigma_hat ** 2 - sigma ** 2, 0.0)) * S_noise * randn_like(x)
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
            # The noise is drawn in float32 (and cast): cheaper, and the per-seed stream of earlier versions.
            noise = randn_like(x.to(torch.float32)).to(x.dtype)
            x = x + alpha * (denoised - x) / sigma ** 2 + math.sqrt(2 * alpha) * noise
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
    """Wraps a denoiser: counts its calls and passes `class_labels` (one-hot [N, label_dim]) as edm's samplers do,
    net(x, sigma, class_labels), when given (attribute access goes to the wrapped network)."""

    def __init__(self, net, class_labels=None):
        self.net, self.class_labels = net, class_labels
        self.calls = 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.net(x, sigma) if self.class_labels is None else self.net(x, sigma, self.class_labels)

    def __getattr__(self, name):
        return getattr(self.net, name)

def run_sampler(name, net, x, sigmas, randn_like=torch.randn_like, callback=None, class_labels=None, **opts):
    """Run sampler `name` ('euler', 'heun' or 'langevin'); returns (x, nfe), nfe = network calls made.
    `class_labels`: None, or one-hot labels [N, label_dim] passed to a class-conditional network."""
    fn = get_sampler(name)
    counter = _CountingNet(net, class_labels)
    x = fn(counter, x, sigmas, randn_like=randn_like, callback=callback, **opts)
    return x, counter.calls
