"""DPM-OT generation: the OT map of a potential, then the last K steps of a diffusion sampler.

A semi-discrete OT map from a simple source law (uniform on [0,1]^d or standard normal) to N target latents
y_i = x_i + sigma_(S-K) n_i replaces the first S - K steps of a diffusion sampler; only the last K steps are run.

    pot = load_potential('potential.pt')                       # written by potential.py (save_potential)
    x, info = generate_samples(net, seeds=range(64), potential=pot, sampler='heun')
    x, info = generate_samples(net, seeds=range(64), sampler='heun', steps=18)   # the plain sampler (baseline)
    info['nfe']                                                # network evaluations per sample

Generation with a potential: per seed, draw a source point u; top-1 takes the latent of its cell,
i* = argmax_i <u, y_i> + h_i. Top-k > 1 interpolates between the latents of the k best cells with the
weights softmax(score_j / T) (the gradient of the smoothed Brenier potential), T = temperature * the mean
top-1/top-2 score gap recorded in the potential, but only between the best cell and cells whose supporting
hyperplanes meet it at a small angle: the angle between the normals (y_i, -1) and (y_j, -1) (AE-OT's rule; a
large angle marks the singular set of the Brenier map, where interpolation would mix two modes). The angles
are min-max normalised and pairs under `angle_threshold` (0.7) are kept, as in the reference code; there the
min and max are taken over the current batch, which makes a sample depend on its batch-mates, so by default
('minmax') they are taken over a fixed reference batch of source points instead; 'batch' reproduces the
reference exactly, 'none' compares raw angles (radians) with the threshold. An interpolated latent carries
less noise than sigma (sum_j w_j n_j has std sqrt(sum w_j^2) sigma), so by default (renoise) fresh noise of
std sigma sqrt(1 - sum w_j^2) is added back.

Every random number of sample i comes from its own generator seeded with seeds[i] (source point, initial
noise, sampler noise), so a seed gives the same sample whatever the batch size or the other seeds (bit for bit
with the same batch size; across batch sizes a network's batched matrix products may differ in the last bit).
"""

import math
import os
import time

import numpy as np
import torch

from sampling import GenerationError
from sampling import diffusion
from sampling.potential import FORMAT, PotentialError, check_potential, load_potential
from sampling.rng import StackedRandomGenerator, check_seeds, rank_batches
from sampling.snapshots import DENOISER_SAMPLERS, data_shape_of
from torch_utils import distributed as dist
from transport.semidiscrete import SemidiscreteProblem

ANGLE_NORMS = ('minmax', 'batch', 'none')
_ANGLE_REF_SEED = 0x0A7E5EED  # seed of the fixed reference batch of the 'minmax' angle normalisation

#----------------------------------------------------------------------------
# The OT map: source points -> latents.

class OTMap:
    """The DPM-OT map of a potential on a device: source points -> starting latents (top-1 or top-k)."""

    def __init__(self, pot, device, topk=1, temperature=1.0, angle_threshold=0.7, angle_norm='minmax',
                 angle_ref_samples=1024, renoise=True):
        N = pot['h'].numel()
        if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or not 1 <= topk <= N:
            raise ValueError(f'topk={topk!r} must be an int between 1 and the number of targets ({N})')
        if angle_norm not in ANGLE_NORMS:
            raise ValueError(f'angle_norm must be one of {ANGLE_NORMS}; got {angle_norm!r}')
        if not temperature > 0:
            raise ValueError(f'temperature must be > 0 (in units of the mean top-1/top-2 score gap); got {temperature}')
        self.pot, self.device, self.topk = pot, torch.device(device), int(topk)
        self.shape = tuple(pot['data_shape'])
        self.targets = pot['targets'].to(self.device, torch.float32).reshape(N, -1)
        self.h = pot['h'].to(self.device, torch.float64)
        self.prob = SemidiscreteProblem(targets=self.targets, source=pot['source'])
        self.sigma = float(pot['sigma'])
        self.T = float(temperature) * float(pot['score_gap'])
        if not self.T > 0:
            raise PotentialError(f'The potential records a score gap of {pot["score_gap"]}; top-k needs a positive one')
        self.angle_threshold, self.angle_norm, self.renoise = float(angle_threshold), angle_norm, bool(renoise)
        self.angle_range = None
        if self.topk > 1 and angle_norm == 'minmax':
            if int(angle_ref_samples) < 1:
                raise ValueError(f'angle_ref_samples must be >= 1; got {angle_ref_samples}')
            gen = torch.Generator().manual_seed(_ANGLE_REF_SEED)
            fn = torch.rand if pot['source'] == 'uniform' else torch.randn
            u = fn([int(angle_ref_samples), self.targets.shape[1]], generator=gen).to(self.device)
            theta = self._angles(self.prob.assign(u, self.h, topk=self.topk))[:, 1:]
            self.angle_range = (float(theta.min()), float(theta.max()))

    def _angles(self, idx):
        """Angles [M, k] between the normals (y_i, -1) of each sample's best cell and of its k best cells."""
        y = self.targets.to(torch.float64)
        norms = (y.square().sum(dim=1) + 1).sqrt()
        best = idx[:, :1]
        cos = ((y[best] * y[idx]).sum(dim=-1) + 1) / (norms[best] * norms[idx])
        return torch.arccos(cos.clamp(-1, 1))

    def __call__(self, u, noise=None):
        """Latents [M, *shape] (float32) for source points u [M, d]; `noise()` draws [M, *shape] N(0, I) for
        renoising (top-k only). Returns (latents, info) with info cells [M] (best cell) and, for top-k, the
        cells [M, k], weights [M, k] and the share of kept neighbour pairs."""
        if self.topk == 1:
            idx = self.prob.assign(u, self.h)
            return self.targets[idx].reshape(-1, *self.shape), dict(cells=idx)
        idx = self.prob.assign(u, self.h, topk=self.topk)                                    # [M, k], best first
        y = self.targets[idx].to(torch.float64)                                              # [M, k, d]
        scores = (y @ u.to(torch.float64)[:, :, None])[..., 0] + self.h[idx]                 # <u, y_j> + h_j
        theta = self._angles(idx)
        if self.angle_norm == 'none':
            t = theta
        else:
            lo, hi = self.angle_range if self.angle_norm == 'minmax' else (float(theta[:, 1:].min()), float(theta[:, 1:].max()))
            t = (theta - lo) / (hi - lo) if hi > lo else torch.zeros_like(theta)
        keep = t <= self.angle_threshold
        keep[:, 0] = True
        # Softmax of the kept top-k scores: the gradient of the smoothed Brenier potential.
        logits = ((scores - scores[:, :1]) / self.T).masked_fill(~keep, -math.inf)
        w = torch.softmax(logits, dim=1)
        latents = (w[:, :, None] * y).sum(dim=1)
        if self.renoise and noise is not None:
            missing = (1 - w.square().sum(dim=1)).clamp(min=0).sqrt()                       # std lost to averaging
            latents = latents + self.sigma * missing[:, None] * noise().reshape(latents.shape).to(torch.float64)
        info = dict(cells=idx[:, 0], topk_cells=idx, weights=w.to(torch.float32),
                    kept_pairs=float(keep[:, 1:].float().mean()))
        return latents.to(torch.float32).reshape(-1, *self.shape), info

#----------------------------------------------------------------------------
# Generation.

def _as_potential(potential):
    if isinstance(potential, (str, os.PathLike)):
        return load_potential(potential)
    if not isinstance(potential, dict) or potential.get('format') != FORMAT:
        raise PotentialError('potential must be a path or a dict returned by load_potential')
    return potential

@torch.no_grad()
def generate_samples(net, seeds, potential=None, sampler='heun', steps=None, topk=1, device=None, batch_size=64,
                     *, sigma_min=None, sigma_max=None, rho=7.0, temperature=1.0, angle_threshold=0.7,
                     angle_norm='minmax', angle_ref_samples=1024, renoise=True, check_network=True,
                     return_latents=False, progress=False, **opts):
    """Samples of a denoiser, one per seed: the plain sampler from noise, or DPM-OT with a potential.

    Args:
        net: denoiser D(x; sigma) with EDM's interface (moved to `device`).
        seeds: ints; sample i depends only on seeds[i].
        potential: None (plain sampler: x = sigma_0 n, all `steps` steps of the EDM schedule), or a potential
            (path or load_potential dict): the OT map gives latents at sigma_(S-K), then the last K steps run.
        sampler: 'euler', 'heun' or 'langevin'.
        steps: without a potential, the number of steps (default 18); with one, None or the potential's S.
        topk: 1 (the latent of the source point's cell) or k > 1 (interpolation, see the module docstring).
        device: torch device (default: the network's, else the CPU).
        batch_size: samples per network call.
        sigma_min, sigma_max, rho: the plain sampler's schedule (defaults: the network's range, rho = 7).
        temperature: top-k softmax temperature, in units of the potential's mean top-1/top-2 score gap.
        angle_threshold, angle_norm, angle_ref_samples: the dihedral-angle rule (module docstring).
        renoise: top-k: add back the noise lost by averaging latents.
        check_network: refuse a potential made with another denoiser (weights hash).
        return_latents: also return the starting latents in info['latents'].
        progress: show a progress bar.
        **opts: sampler options (S_churn, S_min, S_max, S_noise; n_steps_each, step_scale, denoise).
    Returns:
        (samples float32 [len(seeds), *data_shape] on the CPU in model space, info) with info: nfe (network
        evaluations per sample, counted), nfe_formula, sampler, num_steps, back_steps, sigma_start, time_s,
        and with a potential: cells [N] (best cell per seed) and, for top-k, kept_pairs.
    """
    seeds = check_seeds(seeds)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f'batch_size must be an int >= 1; got {batch_size!r}')
    diffusion.get_sampler(sampler)
    if device is None:
        param = next(iter(net.parameters()), None) if hasattr(net, 'parameters') else None
        device = param.device if param is not None else torch.device('cpu')
    device = torch.device(device)
    if isinstance(net, torch.nn.Module):
        net = net.to(device)
    shape = data_shape_of(net)
    dtype = diffusion.sampling_dtype(device)

    ot_map = None
    if potential is None:
        num_steps = 18 if steps is None else steps
        sigmas = diffusion.net_sigma_schedule(net, num_steps, sigma_min, sigma_max, rho)
        back_steps = num_steps
    else:
        pot = _as_potential(potential)
        check_potential(pot, net if check_network else None, data_shape=shape)
        num_steps, back_steps = pot['num_steps'], pot['back_steps']
        if steps is not None and steps != num_steps:
            raise ValueError(f'steps={steps}, but the potential was computed for a schedule of {num_steps} steps '
                             f'(its latents are at sigma_(S-K) = {pot["sigma"]:.4g}); omit steps or recompute the '
                             f'potential with potential.py --steps={steps}')
        sigmas = pot['sigmas'][num_steps - back_steps:]
        # The prepared map (centred targets, the angle range) is kept in the potential dict, so callers that
        # generate batch by batch with the same dict pay for it once.
        key = (str(device), int(topk), float(temperature), float(angle_threshold), angle_norm, int(angle_ref_samples),
               bool(renoise))
        cache = pot.setdefault('_ot_maps', {})
        if key not in cache:
            cache.clear()   # one prepared map at a time (each holds a copy of the targets)
            cache[key] = OTMap(pot, device, topk, temperature, angle_threshold, angle_norm, angle_ref_samples,
                               renoise)
        ot_map = cache[key]
    nfe_formula = diffusion.expected_nfe(sampler, sigmas, **opts)

    samples, latents_all, cells, kept, nfe = [], [], [], [], None
    t0 = time.time()
    batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    if progress:
        import tqdm
        batches = tqdm.tqdm(batches, desc='Generating', unit='batch')
    for batch_seeds in batches:
        rnd = StackedRandomGenerator(device, batch_seeds)
        if ot_map is None:
            x = rnd.randn([len(rnd), *shape], dtype) * float(sigmas[0])
        else:
            u = (rnd.rand if pot['source'] == 'uniform' else rnd.randn)([len(rnd), ot_map.targets.shape[1]])
            x, map_info = ot_map(u, noise=lambda: rnd.randn([len(rnd), *shape]))
            x = x.to(dtype)
            cells.append(map_info['cells'].cpu())
            if 'kept_pairs' in map_info:
                kept.append(map_info['kept_pairs'] * len(batch_seeds))
        if return_latents:
            latents_all.append(x.to(torch.float32).cpu())
        x, nfe = diffusion.run_sampler(sampler, net, x, sigmas, randn_like=rnd.randn_like, **opts)
        samples.append(x.to(torch.float32).cpu())

    info = dict(nfe=nfe, nfe_formula=nfe_formula, sampler=sampler, num_steps=int(num_steps),
                back_steps=int(back_steps), sigma_start=float(sigmas[0]), time_s=time.time() - t0)
    if ot_map is not None:
        info['cells'] = torch.cat(cells)
        if kept:
            info['kept_pairs'] = sum(kept) / len(seeds)
    if return_latents:
        info['latents'] = torch.cat(latents_all)
    return torch.cat(samples), info

#----------------------------------------------------------------------------
# Sampling a denoiser snapshot (generate.py).

def iterate_samples(model, seeds, sampler='heun', steps=None, potential=None, topk=1, batch_size=64,
                    device=torch.device('cpu'), rank=None, world_size=None, progress=False, **dpmot_kwargs):
    """Sample a denoiser snapshot for `seeds`, this rank's share, through generate_samples.

    `potential`: None (the plain sampler from noise) or a potential.pt path, loaded once here. `steps`:
    None for the default (18, or the potential's schedule). `dpmot_kwargs` (e.g. angle_threshold) go to
    generate_samples. Batches of `batch_size` seeds are dealt
    round-robin across ranks; a sample depends only on its seed. Yields (seeds int64 [B], samples
    float32 [B, *data_shape] in model space, info dict with 'nfe').
    """
    if model.kind != 'denoiser':
        raise GenerationError(f'the network is of kind {model.kind}; sampler {sampler!r} needs a denoiser snapshot')
    if sampler not in DENOISER_SAMPLERS:
        raise GenerationError(f'sampler {sampler!r} does not apply to denoiser snapshots; use one of '
                              f'{", ".join(DENOISER_SAMPLERS)}')
    seeds = np.asarray(seeds, dtype=np.int64)
    seeds = np.asarray(check_seeds(seeds), dtype=np.int64)
    try:
        if potential is not None:
            potential = load_potential(potential)
            check_potential(potential, model.ema, data_shape=model.data_shape)
    except ValueError as err: # PotentialError
        raise GenerationError(f'--potential: {err}') from None
    batches = rank_batches(len(seeds), batch_size, rank, world_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc=f'Sampling ({sampler})', unit='batch', disable=dist.get_rank() != 0)
    for jobs in batches:
        try:
            samples, info = generate_samples(model.ema, [int(s) for s in seeds[jobs]], potential=potential,
                                                   sampler=sampler, steps=steps, topk=topk, device=device,
                                                   batch_size=len(jobs), **dpmot_kwargs)
        except ValueError as err: # Option errors of the samplers, with their own advice.
            raise GenerationError(str(err)) from None
        yield seeds[jobs], samples, info
