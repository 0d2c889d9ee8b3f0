"""DPM-OT generation: the OT map of a potential, then the last K steps of a diffusion sampler.

A semi-discrete OT map from a simple source law (uniform on [0,1]^d or standard normal) to N target latents
y_i = x_i + sigma_(S-K) n_i replaces the first S - K steps of a diffusion sampler; only the last K steps are run.

    pot = load_potential('potential.pt')                       # written by potential.py (save_potential)
    x, info = generate_samples(net, seeds=range(64), potential=pot, sampler='heun')
    x, info = generate_samples(net, seeds=range(64), sampler='heun', steps=18)   # the plain sampler (baseline)
    info['nfe']                                                # network evaluations per sample
    prepared = PreparedSampler(net, pot, sampler='heun')       # checked and prepared once (generate.py) ...
    x, info = prepared.sample(range(64))                       # ... then one call per batch

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

Class-conditional networks (label_dim > 0, e.g. edm's CIFAR-10 cond pickle) get one-hot labels: with a potential,
a sample drawn from cell i is denoised with label y_i, the label of target i (the potential's `labels`), so the
OT cell decides the class, or with all the potential's `class_label` when it was made for one class; without one,
each seed draws its label from its own generator right after its latent (edm's default) or takes `class_label`.

Every random number of sample i comes from its own generator seeded with seeds[i] (sampling.rng: source point
or initial noise, then the sampler's noises), so a seed gives the same sample whatever the batch size or the other seeds (bit for bit
with the same batch size; across batch sizes a network's batched matrix products may differ in the last bit).
"""

import math
import os
import time

import numpy as np
import torch
import tqdm

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
        if self.topk > 1: # |(y_i, -1)| once (float64), not on every batch
            self.normal_norms = (self.targets.to(torch.float64).square().sum(dim=1) + 1).sqrt()
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
        y = self.targets[idx].to(torch.float64)                                              # [M, k, d]: only these rows
        norms = self.normal_norms[idx]
        cos = ((y[:, :1] * y).sum(dim=-1) + 1) / (norms[:, :1] * norms)
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

def _device_of(net):
    param = next(iter(net.parameters()), None) if hasattr(net, 'parameters') else None
    return param.device if param is not None else torch.device('cpu')

class PreparedSampler:
    """A denoiser's sampler, prepared once and then run batch after batch: the plain sampler from noise, or DPM-OT.

    Preparing does what does not depend on the seeds: with a potential, load and check it against the network
    (its weights are hashed here, once) and build the OT map on the device; the noise schedule; the NFE formula.
    `sample(seeds)` then makes one batch. generate.py prepares one per call; generate_samples one per call.

    Args: those of generate_samples but seeds, batch_size, return_latents and progress.
    """

    def __init__(self, net, potential=None, sampler='heun', steps=None, topk=1, device=None, *, class_label=None,
                 sigma_min=None, sigma_max=None, rho=7.0, temperature=1.0, angle_threshold=0.7, angle_norm='minmax',
                 angle_ref_samples=1024, renoise=True, check_network=True, **opts):
        diffusion.get_sampler(sampler)
        self.device = _device_of(net) if device is None else torch.device(device)
        self.net = net.to(self.device) if isinstance(net, torch.nn.Module) else net
        self.shape = data_shape_of(net)
        self.dtype = diffusion.sampling_dtype(self.device)
        self.sampler, self.opts, self.ot_map, self.pot = sampler, dict(opts), None, None
        if potential is None:
            self.num_steps = 18 if steps is None else steps
            self.sigmas = diffusion.net_sigma_schedule(net, self.num_steps, sigma_min, sigma_max, rho)
            self.back_steps = self.num_steps
        else:
            self.pot = pot = _as_potential(potential)
            check_potential(pot, net if check_network else None, data_shape=self.shape)
            self.num_steps, self.back_steps = pot['num_steps'], pot['back_steps']
            if steps is not None and steps != self.num_steps:
                raise ValueError(f'steps={steps}, but the potential was computed for a schedule of {self.num_steps} '
                                 f'steps (its latents are at sigma_(S-K) = {pot["sigma"]:.4g}); omit steps or '
                                 f'recompute the potential with potential.py --steps={steps}')
            self.sigmas = pot['sigmas'][self.num_steps - self.back_steps:]
            self.ot_map = OTMap(pot, self.device, topk, temperature, angle_threshold, angle_norm, angle_ref_samples,
                                renoise)
        self.nfe_formula = diffusion.expected_nfe(sampler, self.sigmas, **opts)
        self.label_dim = int(getattr(net, 'label_dim', 0) or 0)
        self.labels_from = self._labels_from(class_label)

    def _labels_from(self, class_label):
        """Where the class labels of a conditional network come from: 'seed' (drawn from each seed's generator,
        edm's default), 'class' (all `self.class_label`) or 'cells' (the labels of the OT cells' targets); None
        for an unconditional network, which takes no labels."""
        self.class_label = None if class_label is None else int(class_label)
        if self.label_dim == 0:
            if class_label is not None:
                raise ValueError(f'--class={class_label}: this network is unconditional (label_dim = 0) and takes no '
                                 'class; drop --class')
            return None
        if class_label is not None and not 0 <= self.class_label < self.label_dim:
            raise ValueError(f'--class={class_label} is out of range: this network has {self.label_dim} classes, '
                             f'0 to {self.label_dim - 1}')
        if self.pot is None:
            return 'seed' if class_label is None else 'class'
        return self._potential_labels()

    def _potential_labels(self):
        pot_class, labels = self.pot.get('class_label'), self.pot.get('labels')
        if pot_class is not None:
            if self.class_label is not None and self.class_label != int(pot_class):
                raise PotentialError(f'--class={self.class_label}, but the potential was made for class {pot_class} '
                                     f'(potential.py --class={pot_class}); use --class={pot_class}, or a potential '
                                     f'made with --class={self.class_label}')
            if not 0 <= int(pot_class) < self.label_dim:
                raise PotentialError(f'the potential was made for class {pot_class}, which this network\'s '
                                     f'{self.label_dim} classes (0 to {self.label_dim - 1}) do not include')
            self.class_label = int(pot_class)
            return 'class'
        if labels is None:
            raise PotentialError(f'this network is class-conditional ({self.label_dim} classes) but the potential '
                                 'records no labels of its targets; recompute it with potential.py (which records '
                                 'them), or with potential.py --class=C for one class')
        if self.class_label is not None:
            raise PotentialError(f'--class={self.class_label}, but the potential covers every class (each cell '
                                 'carries its target\'s label); drop --class, or make a potential of that class '
                                 f'alone with potential.py --class={self.class_label}')
        labels = torch.as_tensor(labels)
        if labels.shape != (self.pot['h'].numel(),) or labels.dtype.is_floating_point or labels.is_complex():
            raise PotentialError(f'the potential\'s labels have shape {list(labels.shape)} and dtype {labels.dtype}; '
                                 f'expected int64 [{self.pot["h"].numel()}], one per target')
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < self.label_dim:
            raise PotentialError(f'the potential was made for other labels ({int(labels.min())} to '
                                 f'{int(labels.max())}) than this network\'s {self.label_dim} classes (0 to '
                                 f'{self.label_dim - 1}); use the network it was made for')
        self.cell_labels = labels.to(self.device, torch.int64)
        return 'cells'

    def _labels(self, rnd, map_info):
        """Class labels int64 [B] of a batch (None for an unconditional network). 'seed': one draw of each seed's
        generator right after its latent (edm: randint(label_dim)); with --class edm makes the same draw and then
        overrides it, and so do we, so that the streams stay edm's."""
        if self.labels_from is None:
            return None
        if self.labels_from == 'cells':
            return self.cell_labels[map_info['cells']]
        labels = rnd.randint(self.label_dim, [len(rnd)], device=self.device) if self.pot is None else None
        return torch.full([len(rnd)], self.class_label, dtype=torch.int64, device=self.device) \
            if self.labels_from == 'class' else labels

    def _start(self, rnd):
        """Starting points [B, *shape] in the sampling dtype, and the OT map's info (None without a potential)."""
        if self.ot_map is None:
            return rnd.randn([len(rnd), *self.shape], self.dtype, self.device) * float(self.sigmas[0]), None
        u = (rnd.rand if self.pot['source'] == 'uniform' else rnd.randn)([len(rnd), self.ot_map.targets.shape[1]],
                                                                         device=self.device)
        x, info = self.ot_map(u, noise=lambda: rnd.randn([len(rnd), *self.shape], device=self.device))
        return x.to(self.dtype), info

    @torch.no_grad()
    def sample(self, seeds, return_latents=False):
        """One batch: samples float32 [len(seeds), *shape] on the CPU in model space, and info: nfe (network
        calls per sample, counted) and, with a potential, cells [B] (each seed's best cell) and for top-k
        kept_pairs (the share of kept neighbour pairs); with return_latents, latents (the starting points)."""
        rnd = StackedRandomGenerator(self.device, seeds)
        x, map_info = self._start(rnd)
        labels = self._labels(rnd, map_info)
        info = {} if map_info is None else dict(cells=map_info['cells'].cpu())
        if map_info is not None and 'kept_pairs' in map_info:
            info['kept_pairs'] = map_info['kept_pairs']
        if labels is not None:
            info['labels'] = labels.cpu()
        if return_latents:
            info['latents'] = x.to(torch.float32).cpu()
        one_hot = None if labels is None else torch.nn.functional.one_hot(labels, self.label_dim).to(torch.float32)
        x, info['nfe'] = diffusion.run_sampler(self.sampler, self.net, x, self.sigmas, randn_like=rnd.randn_like,
                                               class_labels=one_hot, **self.opts)
        return x.to(torch.float32).cpu(), info

    def describe(self):
        """sampler, num_steps, back_steps, sigma_start and nfe_formula (the info of every generate_samples call)."""
        return dict(sampler=self.sampler, num_steps=int(self.num_steps), back_steps=int(self.back_steps),
                    sigma_start=float(self.sigmas[0]), nfe_formula=self.nfe_formula)

@torch.no_grad()
def generate_samples(net, seeds, potential=None, sampler='heun', steps=None, topk=1, device=None, batch_size=64,
                     *, return_latents=False, progress=False, **kwargs):
    """Samples of a denoiser, one per seed: the plain sampler from noise, or DPM-OT with a potential.

    Args:
        net: denoiser D(x; sigma) with EDM's interface (moved to `device`).
        seeds: ints in [-2^63, 2^64) (sampling.rng); sample i depends only on seeds[i].
        potential: None (plain sampler: x = sigma_0 n, all `steps` steps of the EDM schedule), or a potential
            (path or load_potential dict): the OT map gives latents at sigma_(S-K), then the last K steps run.
        sampler: 'euler', 'heun' or 'langevin'.
        steps: without a potential, the number of steps (default 18); with one, None or the potential's S.
        topk: 1 (the latent of the source point's cell) or k > 1 (interpolation, see the module docstring).
        device: torch device (default: the network's, else the CPU).
        batch_size: samples per network call.
        return_latents: also return the starting latents in info['latents'].
        progress: show a progress bar.
        **kwargs: the other arguments of PreparedSampler: class_label (a class-conditional network: None for
            one random label per seed, drawn from its generator right after the latent as edm does, or with a
            potential the labels of the cells' targets; an int for that class, checked against the potential's
            `class_label`); sigma_min, sigma_max, rho (the plain sampler's
            schedule: edm's 0.002, 80, 7 clamped to the network's range); temperature (top-k softmax
            temperature, in units of the potential's mean top-1/top-2 score gap); angle_threshold, angle_norm,
            angle_ref_samples (the dihedral-angle rule, module docstring); renoise (top-k: add back the noise
            lost by averaging latents); check_network (refuse a potential made with another denoiser); and
            the sampler's options (S_churn, S_min, S_max, S_noise; n_steps_each, step_scale, denoise).
    Returns:
        (samples float32 [len(seeds), *data_shape] on the CPU in model space, info) with info: nfe (network
        evaluations per sample, counted), nfe_formula, sampler, num_steps, back_steps, sigma_start, time_s,
        and with a potential: cells [N] (best cell per seed) and, for top-k, kept_pairs; for a class-conditional
        network, labels [N] (the class each sample was denoised with).
    """
    seeds = check_seeds(seeds)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f'batch_size must be an int >= 1; got {batch_size!r}')
    prepared = PreparedSampler(net, potential, sampler, steps, topk, device, **kwargs)
    t0 = time.time()
    batches = [seeds[i:i + batch_size] for i in range(0, len(seeds), batch_size)]
    parts = [prepared.sample(b, return_latents) for b in tqdm.tqdm(batches, desc='Generating', unit='batch',
                                                                    disable=not progress)]
    info = dict(prepared.describe(), nfe=parts[-1][1]['nfe'], time_s=time.time() - t0)
    for key in ('cells', 'labels', 'latents'):
        if key in parts[0][1]:
            info[key] = torch.cat([p[1][key] for p in parts])
    if 'kept_pairs' in parts[0][1]:
        info['kept_pairs'] = sum(p[1]['kept_pairs'] * len(b) for p, b in zip(parts, batches)) / len(seeds)
    return torch.cat([p[0] for p in parts]), info

#----------------------------------------------------------------------------
# Sampling a denoiser snapshot (generate.py).

def prepare(model, sampler='heun', steps=None, potential=None, topk=1, device=torch.device('cpu'), **kwargs):
    """The PreparedSampler of a denoiser snapshot (load_network's model) for generate.py: every check of the
    options and of the potential, with GenerationError for bad input. `potential`: None (the plain sampler from
    noise) or a potential.pt path; `steps`: None for the default (18, or the potential's schedule); `kwargs`
    (class_label, angle_threshold, S_churn, ...) go to PreparedSampler."""
    if model.kind != 'denoiser':
        raise GenerationError(f'the network is of kind {model.kind}; sampler {sampler!r} needs a denoiser snapshot')
    if sampler not in DENOISER_SAMPLERS:
        raise GenerationError(f'sampler {sampler!r} does not apply to denoiser snapshots; use one of '
                              f'{", ".join(DENOISER_SAMPLERS)}')
    try:
        return PreparedSampler(model.ema, potential, sampler, steps, topk, device, **kwargs)
    except PotentialError as err:
        raise GenerationError(f'--potential: {err}') from None
    except ValueError as err: # Option errors, with their own advice.
        raise GenerationError(str(err)) from None

def iterate_samples(prepared, seeds, batch_size=64, rank=None, world_size=None, progress=False):
    """Sample `seeds` with a PreparedSampler, this rank's share: batches of `batch_size` seeds dealt round-robin
    across ranks; a sample depends only on its seed. Yields (seeds int64 [B], samples float32 [B, *data_shape]
    in model space, info dict with 'nfe' and, for a class-conditional network, 'labels')."""
    seeds = np.asarray(check_seeds(seeds), dtype=np.int64)
    batches = rank_batches(len(seeds), batch_size, rank, world_size)
    for jobs in tqdm.tqdm(batches, desc=f'Sampling ({prepared.sampler})', unit='batch',
                          disable=not progress or dist.get_rank() != 0):
        try:
            samples, info = prepared.sample(seeds[jobs])
        except ValueError as err: # Option errors of the samplers, with their own advice.
            raise GenerationError(str(err)) from None
        yield seeds[jobs], samples, info
