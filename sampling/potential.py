"""DPM-OT potential files and their precompute: target latents, the solve with checkpoints, the file format.

A semi-discrete OT map from a simple source law (uniform on [0,1]^d or standard normal) to N target latents
y_i = x_i + sigma_(S-K) n_i replaces the first S - K steps of a diffusion sampler (sampling/dpmot.py).
potential.py computes one; `load_potential` reads and checks one.
"""

import math
import os

import numpy as np
import torch

import dnnlib
from sampling import diffusion
from torch_utils.misc import state_dict_sha256, tensor_sha256

FORMAT = 'dpmot-potential'
VERSION = 1
SOURCES = ('uniform', 'normal')


class PotentialError(ValueError):
    """A potential file is malformed, or does not belong to the network / data set it is used with."""

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
# Solving with checkpoints (potential.py).

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
        prob, solver: transport.semidiscrete SemidiscreteProblem and SemidiscreteSolver.
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
