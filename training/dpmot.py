"""DPM-OT: potential files and generation (ARCHITECTURE.md, "DPM-OT").

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

import hashlib
import math
import os
import pickle
import time

import numpy as np
import torch

import dnnlib
from training import diffusion

FORMAT = 'dpmot-potential'
VERSION = 1
SOURCES = ('uniform', 'normal')
ANGLE_NORMS = ('minmax', 'batch', 'none')
_ANGLE_REF_SEED = 0x0A7E5EED  # seed of the fixed reference batch of the 'minmax' angle normalisation


class PotentialError(ValueError):
    """A potential file is malformed, or does not belong to the network / data set it is used with."""

#----------------------------------------------------------------------------
# Hashes (provenance).

def tensor_sha256(t):
    """sha256 hex digest of a tensor's dtype, shape and bytes."""
    t = t.detach().to('cpu').contiguous()
    h = hashlib.sha256(f'{t.dtype}:{list(t.shape)}:'.encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()


def state_dict_sha256(net):
    """sha256 hex digest of a network's state_dict (names, dtypes, shapes and values, in name order), or None
    for a denoiser without a state_dict (e.g. a closed-form one)."""
    if not hasattr(net, 'state_dict'):
        return None
    h = hashlib.sha256()
    for name, value in sorted(net.state_dict().items()):
        h.update(name.encode() + b'\0')
        h.update(tensor_sha256(value).encode() if torch.is_tensor(value) else repr(value).encode())
    return h.hexdigest()

#----------------------------------------------------------------------------
# Networks.

def data_shape_of(net):
    """(C, H, W) or (D,) of the data a denoiser works on: `net.data_shape`, else EDM's img_channels/img_resolution."""
    shape = getattr(net, 'data_shape', None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    if getattr(net, 'img_resolution', None) is not None and getattr(net, 'img_channels', None) is not None:
        return (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
    raise ValueError(f'Cannot tell the data shape of {type(net).__name__}: it needs `data_shape` or EDM\'s '
                     '`img_channels` and `img_resolution` attributes')


def load_denoiser(path):
    """(net, snapshot dict) from a denoiser snapshot (ours or NVlabs/edm's): the network is under `ema`.

    A safe export of `generate.py --export-safe` (its folder or network.json) loads without running
    code from the file (torch.load(weights_only=True), networks rebuilt from training.networks).
    """
    if os.path.isdir(os.fspath(path)) or os.fspath(path).lower().endswith('.json'):
        from training import generation
        try:
            model = generation.load_network(path)
        except generation.GenerationError as err:
            raise ValueError(str(err)) from None
        if model.kind != 'denoiser':
            raise ValueError(f'"{path}" is a safe export of a {model.kind} snapshot, not of a denoiser')
        return model.nets['ema'], dict(model)
    try:
        with dnnlib.util.open_url(path, verbose=False) as f:
            data = pickle.load(f)
    except (OSError, dnnlib.util.DownloadError) as err:
        raise ValueError(f'Cannot read the network "{path}": {err}') from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError) as err:
        raise ValueError(f'"{path}" is not a readable network snapshot ({type(err).__name__}: {err}); pass a '
                         'network-snapshot-*.pkl of `train.py --kind=denoiser` or of NVlabs/edm') from None
    if not isinstance(data, dict) or 'ema' not in data:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        hint = ' (an EOT snapshot: G, f, D)' if isinstance(data, dict) and 'G' in data else ''
        raise ValueError(f'"{path}" holds no denoiser under the key "ema" (found {keys}{hint}); pass a snapshot '
                         'of `train.py --kind=denoiser` or of NVlabs/edm')
    return data['ema'], data

#----------------------------------------------------------------------------
# Target latents.

def select_indices(dataset_size, num_targets, seed):
    """Sorted indices of `num_targets` distinct data items, a seeded random subset (all items when equal)."""
    if not 1 <= num_targets <= dataset_size:
        raise ValueError(f'num_targets={num_targets} must be between 1 and the data set size {dataset_size}')
    if num_targets == dataset_size:
        return np.arange(dataset_size, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).permutation(dataset_size)[:num_targets]).astype(np.int64)


def forward_diffuse(x, sigma, seed):
    """Target latents y = x + sigma n with n ~ N(0, I) from torch.Generator().manual_seed(seed) (float32, CPU,
    drawn as one [N, *shape] tensor); x: float32 [N, *shape] in model space."""
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float32)
    return x.to(torch.float32).cpu() + float(sigma) * n

#----------------------------------------------------------------------------
# Potential files.

_REQUIRED = dict(h=torch.Tensor, sigmas=torch.Tensor, num_steps=int, back_steps=int, source=str, data_shape=list,
                 score_gap=float, targets_sha256=str, solver=dict, provenance=dict)


def _check_plain(obj, where):
    """Refuse values that torch.load(weights_only=True) would not read back (anything but plain containers,
    str, int, float, bool, None and tensors)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f'{where}: key {k!r} is not a str or int')
            _check_plain(v, f'{where}[{k!r}]')
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f'{where}[{i}]')
    elif not (obj is None or type(obj) in (str, int, float, bool) or torch.is_tensor(obj)):
        raise TypeError(f'{where} is a {type(obj).__name__}, which a weights_only load refuses; store it as a '
                        'str, int, float, bool, list, dict or tensor')


def save_potential(path, *, h, sigmas, back_steps, source, data_shape, score_gap, targets=None, targets_path=None,
                   indices=None, solver=None, provenance=None):
    """Write a potential file atomically (loadable with torch.load(weights_only=True)).

    Args:
        h: [N] heights (uncentred: scores <u, y_i> + h_i).
        sigmas: the full sampler schedule [S + 1] (float64, ending with 0); the latents are at sigmas[S - K].
        back_steps: K, the sampler steps run after the OT map.
        source: 'uniform' or 'normal'.
        data_shape: shape of one latent.
        score_gap: mean top-1/top-2 score gap (the unit of the top-k temperature).
        targets: the latents [N, *data_shape] (float32); stored in the file, or in `targets_path` when given.
        targets_path: write the latents to this separate file instead (stored relative to the potential).
        indices: [N] data set indices behind the latents.
        solver: diagnostics (converged, iterations, errors, settings, history).
        provenance: data_sha256, denoiser_sha256, paths, seed, ...
    """
    h = torch.as_tensor(h).detach().to('cpu', torch.float64)
    sigmas = diffusion.check_sigmas(sigmas)
    S, K = sigmas.numel() - 1, int(back_steps)
    if not 1 <= K <= S:
        raise ValueError(f'back_steps={back_steps} must be between 1 and the schedule\'s {S} steps')
    if source not in SOURCES:
        raise ValueError(f'source must be one of {SOURCES}; got {source!r}')
    if targets is None:
        raise ValueError('save_potential needs the targets (they are hashed, and written to targets_path if given)')
    targets = targets.detach().to('cpu', torch.float32).contiguous()
    if targets.shape[0] != h.numel() or list(targets.shape[1:]) != list(data_shape):
        raise ValueError(f'targets of shape {list(targets.shape)} do not match h [{h.numel()}] and data_shape '
                         f'{list(data_shape)}')
    pot = dict(format=FORMAT, version=VERSION, h=h, sigmas=sigmas, num_steps=S, back_steps=K,
               sigma=float(sigmas[S - K]), source=source, data_shape=[int(s) for s in data_shape],
               score_gap=float(score_gap), targets=None, targets_path=None, targets_sha256=tensor_sha256(targets),
               indices=None if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.int64),
               solver=dict(solver or {}), provenance=dict(provenance or {}))
    _check_plain(pot['solver'], 'solver')
    _check_plain(pot['provenance'], 'provenance')
    path = os.fspath(path)
    if targets_path is not None:
        targets_path = os.fspath(targets_path)
        with dnnlib.util.atomic_write(targets_path, 'wb') as f:
            torch.save(targets, f)
        pot['targets_path'] = os.path.relpath(os.path.abspath(targets_path), os.path.dirname(os.path.abspath(path)))
    else:
        pot['targets'] = targets
    with dnnlib.util.atomic_write(path, 'wb') as f:
        torch.save(pot, f)
    return path


def load_potential(path, map_location='cpu'):
    """Read and check a potential file (torch.load with weights_only=True); the latents are loaded into
    'targets' (from 'targets_path', relative to the file, when stored separately) and their hash verified."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PotentialError(f'No such potential file: "{path}" (make one with potential.py)')
    try:
        pot = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err: # pickle errors, zip errors, weights_only refusals...
        raise PotentialError(f'"{path}" is not a readable potential file ({type(err).__name__}: {err}); make one '
                             'with potential.py') from None
    if not isinstance(pot, dict) or pot.get('format') != FORMAT:
        raise PotentialError(f'"{path}" is not a DPM-OT potential (format {pot.get("format") if isinstance(pot, dict) else type(pot).__name__!r}, '
                             f'expected {FORMAT!r}); make one with potential.py')
    if pot.get('version', 0) > VERSION:
        raise PotentialError(f'"{path}" has format version {pot["version"]}, newer than this code ({VERSION}); '
                             'update the code')
    for key, kind in _REQUIRED.items():
        if not isinstance(pot.get(key), kind):
            raise PotentialError(f'"{path}" is damaged: "{key}" should be a {kind.__name__}, got '
                                 f'{type(pot.get(key)).__name__}; recompute it with potential.py')
    if pot['targets'] is None:
        if not pot.get('targets_path'):
            raise PotentialError(f'"{path}" holds neither the target latents nor their path')
        tpath = os.path.join(os.path.dirname(os.path.abspath(path)), pot['targets_path'])
        if not os.path.isfile(tpath):
            raise PotentialError(f'"{path}" keeps its target latents in "{tpath}", which does not exist; keep the '
                                 'two files together')
        pot['targets'] = torch.load(tpath, map_location=map_location, weights_only=True)
    targets = pot['targets']
    N = pot['h'].numel()
    if not torch.is_tensor(targets) or targets.shape[0] != N or list(targets.shape[1:]) != pot['data_shape']:
        raise PotentialError(f'"{path}": target latents of shape {list(getattr(targets, "shape", []))} do not match '
                             f'h [{N}] and data_shape {pot["data_shape"]}')
    if tensor_sha256(targets) != pot['targets_sha256']:
        raise PotentialError(f'"{path}": the target latents do not match the hash recorded with the heights (the '
                             'latents file was changed or replaced); recompute the potential with potential.py')
    diffusion.check_sigmas(pot['sigmas'])
    if not 1 <= pot['back_steps'] <= pot['num_steps'] == pot['sigmas'].numel() - 1:
        raise PotentialError(f'"{path}": back_steps={pot["back_steps"]} and num_steps={pot["num_steps"]} do not fit '
                             f'a schedule of {pot["sigmas"].numel()} levels')
    return pot


def check_potential(pot, net=None, data_hash=None, data_shape=None):
    """Raise PotentialError when `pot` was computed for another denoiser (state_dict hash), data set (sha256 of
    the data files) or data shape. Arguments left as None are not checked."""
    prov = pot.get('provenance', {})
    if data_shape is not None and list(data_shape) != list(pot['data_shape']):
        raise PotentialError(f'The potential holds latents of shape {pot["data_shape"]} but the network works on '
                             f'{list(data_shape)}; use the potential made for this network')
    if net is not None:
        want, got = prov.get('denoiser_sha256'), state_dict_sha256(net)
        if want is not None and got is not None and want != got:
            raise PotentialError(f'The potential was computed for another denoiser (weights sha256 {want[:12]}..., '
                                 f'from "{prov.get("network", "?")}") but this network\'s weights hash to '
                                 f'{got[:12]}...; use the network it was made with, or recompute it with '
                                 'potential.py --network=<this network>')
    if data_hash is not None:
        want = prov.get('data_sha256')
        if want is not None and want != data_hash:
            raise PotentialError(f'The potential was computed from another data set (sha256 {want[:12]}..., '
                                 f'"{prov.get("data", "?")}") than this one ({data_hash[:12]}...); use the same '
                                 'data, or recompute it with potential.py --data=<this data set>')

#----------------------------------------------------------------------------
# Per-seed random numbers.

class SeededRandom:
    """One CPU torch.Generator per seed: sample i's numbers depend only on seeds[i] and on the order of draws,
    never on the batch (drawn in float32 on the CPU, then moved, so also the same on every device)."""

    def __init__(self, seeds):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def _draw(self, fn, shape, device, dtype):
        out = torch.stack([fn(list(shape), generator=g, dtype=torch.float32) for g in self.generators])
        return out.to(device=device, dtype=dtype)

    def randn(self, shape, device='cpu', dtype=torch.float32):
        return self._draw(torch.randn, shape, device, dtype)

    def rand(self, shape, device='cpu', dtype=torch.float32):
        return self._draw(torch.rand, shape, device, dtype)

    def randn_like(self, x):
        return self.randn(x.shape[1:], x.device, x.dtype)

    def source(self, law, dim, device='cpu'):
        """Source points [N, dim]: uniform on [0, 1]^dim or standard normal."""
        return self.rand([dim], device) if law == 'uniform' else self.randn([dim], device)


def check_seeds(seeds):
    """The seeds as a list of ints (accepts ranges, lists, numpy arrays)."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError('No seeds given; pass e.g. seeds=range(64)')
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not -2**63 <= int(s) < 2**64:
            raise ValueError(f'Seeds must be ints in [-2^63, 2^64); got {s!r}')
        out.append(int(s))
    return out

#----------------------------------------------------------------------------
# The OT map: source points -> latents.

class OTMap:
    """The DPM-OT map of a potential on a device: source points -> starting latents (top-1 or top-k)."""

    def __init__(self, pot, device, topk=1, temperature=1.0, angle_threshold=0.7, angle_norm='minmax',
                 angle_ref_samples=1024, renoise=True):
        from training.semidiscrete import SemidiscreteProblem
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

def mean_score_gap(prob, h, num_samples=4096, generator=None):
    """Mean gap between the best and second-best score <u, y_i> + h_i over fresh source points (0 for N = 1):
    the natural unit of the top-k temperature."""
    if prob.num_targets < 2:
        return 0.0
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    fn = torch.rand if prob.source == 'uniform' else torch.randn
    u = fn([int(num_samples), prob.dim], generator=gen).to(prob.device)
    idx = prob.assign(u, h, topk=2)
    y = prob.targets.to(torch.float64)[idx]                                                  # [M, 2, d]
    scores = (y @ u.to(torch.float64)[:, :, None])[..., 0] + h.to(prob.device, torch.float64)[idx]
    return float((scores[:, 0] - scores[:, 1]).mean())

#----------------------------------------------------------------------------
# Solving with checkpoints (potential.py).

def estimate_peak_memory(num_targets, dim, block_size=2048, chunk_size=4096, reduced_precision=False,
                         world_size=1, shard_targets=False):
    """Rough peak memory (bytes) of computing a potential, per process: dict(setup, solve, total).

    setup: the data, noise and latents (3 x 4 N d) and, while the problem is centred in float64, 24 N d in all.
    solve: the latents and their centred copy (8 N d, + 2 N d in bfloat16), a block of scores and top-k
    temporaries (3 x 4 block x chunk, the chunk capped by the targets per process), and the source samples.
    """
    N, d = int(num_targets), int(dim)
    local = math.ceil(N / world_size) if shard_targets and world_size > 1 else N
    setup = 24 * N * d
    solve = 8 * N * d + (2 * local * d if reduced_precision else 0) + 12 * block_size * min(chunk_size, local) \
        + 8 * block_size * d
    return dict(setup=setup, solve=solve, total=max(setup, solve))


def solve_potential(prob, solver, seed=0, resume=None, checkpoint=None, checkpoint_every=200, callback=None):
    """Run `solver` on `prob`, saving its state every `checkpoint_every` iterations and at the end.

    Args:
        prob, solver: training.semidiscrete SemidiscreteProblem and SemidiscreteSolver.
        seed: seed of the solver's sample streams (ignored when resuming).
        resume: a solver state to continue from (SemidiscreteOutput.state), or None.
        checkpoint: None, or save(state, history) called at every checkpoint (rank 0 writes, the caller decides).
        checkpoint_every: iterations between checkpoints.
        callback: callback(iter, row) after every iteration (progress, logs); True stops the run (resumable).
    Returns:
        (SemidiscreteOutput of the last call, the history rows of every call made here).
    """
    if int(checkpoint_every) < 1:
        raise ValueError(f'checkpoint_every must be >= 1; got {checkpoint_every}')
    history, state, stop = [], resume, [False]

    def on_iter(it, row):
        history.append(row)
        if callback is not None and callback(it, row):
            stop[0] = True
        return stop[0] or it % int(checkpoint_every) == 0

    while True:
        out = solver(prob, generator=torch.Generator().manual_seed(int(seed)), resume=state, callback=on_iter)
        state = out.state
        if checkpoint is not None:
            checkpoint(state, history)
        if out.converged or out.num_iters >= solver.max_iters or stop[0] or not out.history:
            return out, history

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
        rnd = SeededRandom(batch_seeds)
        if ot_map is None:
            x = rnd.randn(shape, device, dtype) * float(sigmas[0])
        else:
            u = rnd.source(pot['source'], ot_map.targets.shape[1], device)
            x, map_info = ot_map(u, noise=lambda: rnd.randn(shape, device))
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
