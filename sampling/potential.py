"""DPM-OT potential files and their precompute: target latents, the solve with checkpoints, the file format.

A semi-discrete OT map from a simple source law (uniform on [0,1]^d or standard normal) to N target latents
y_i = x_i + sigma_(S-K) n_i replaces the first S - K steps of a diffusion sampler (sampling/dpmot.py).
potential.py computes one (`setup_potential` checks its inputs and options, `compute_potential` does the work);
`load_potential` reads and checks one.
"""

import dataclasses
import datetime
import json
import math
import os
import sys

import numpy as np
import torch
import tqdm

import dnnlib
from data.dataset import DatasetError, open_dataset
from sampling import GenerationError, diffusion, outputs, snapshots
from torch_utils import distributed as dist
from torch_utils.images import to_model_space
from torch_utils.misc import state_dict_sha256, tensor_sha256
from transport import power_cells
from transport.newton import NewtonSolver
from transport.semidiscrete import SemidiscreteProblem, SemidiscreteSolver, evaluate

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
                   indices=None, labels=None, class_label=None, solver=None, provenance=None):
    """Write a potential file atomically (loadable with torch.load(weights_only=True)).

    Args:
        h: [N] heights (uncentred: scores <u, y_i> + h_i).
        sigmas: the full sampler schedule [S + 1] (float64, ending with 0); the latents are at sigmas[S - K].
        back_steps: K, the sampler steps run after the OT map.
        source: 'uniform' or 'normal'.
        data_shape: shape of one latent.
        score_gap: mean top-1/top-2 score gap (the unit of the top-k temperature).
        targets: the latents [N, *data_shape] (float32); stored in the file, or in `targets_path` when given.
        targets_path: write the latents to this separate file instead, in the potential's folder (its file name
            is stored; load_potential reads nothing else).
        indices: [N] data set indices behind the latents.
        labels: [N] class index of each latent's item (int64), or None when the data set has no labels.
        class_label: the class the potential was made for (potential.py --class), or None for all items.
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
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        if labels.shape != (h.numel(),) or (labels < 0).any():
            raise ValueError(f'labels must be {h.numel()} non-negative class indices; got shape {list(labels.shape)}')
    if class_label is not None and labels is not None and not bool((labels == int(class_label)).all()):
        raise ValueError(f'class_label={class_label} needs labels that are all {class_label} (or none)')
    pot = dict(format=FORMAT, version=VERSION, h=h, sigmas=sigmas, num_steps=S, back_steps=K,
               sigma=float(sigmas[S - K]), source=source, data_shape=[int(s) for s in data_shape],
               score_gap=float(score_gap), targets=None, targets_path=None, targets_sha256=tensor_sha256(targets),
               indices=None if indices is None else torch.as_tensor(np.asarray(indices), dtype=torch.int64),
               labels=labels, class_label=None if class_label is None else int(class_label),
               solver=dict(solver or {}), provenance=dict(provenance or {}))
    _check_plain(pot['solver'], 'solver')
    _check_plain(pot['provenance'], 'provenance')
    path = os.fspath(path)
    if targets_path is not None:
        targets_path = os.fspath(targets_path)
        if os.path.dirname(os.path.abspath(targets_path)) != os.path.dirname(os.path.abspath(path)):
            raise ValueError(f'targets_path "{targets_path}" must lie beside the potential "{path}" (in its folder): '
                             'load_potential follows nothing else')
        with dnnlib.util.atomic_write(targets_path, 'wb') as f:
            torch.save(targets, f)
        pot['targets_path'] = os.path.basename(targets_path)
    else:
        pot['targets'] = targets
    with dnnlib.util.atomic_write(path, 'wb') as f:
        torch.save(pot, f)
    return path

def _targets_file(path, name):
    """The latents file `name` of the potential at `path`: only a file beside it (a plain file name in its
    folder, not a link out of it) is followed, whatever the potential file says."""
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    plain = isinstance(name, str) and name not in ('', '.', '..') and os.path.basename(name) == name \
        and '/' not in name and '\\' not in name
    tpath = os.path.join(folder, name) if plain else None
    if not plain or os.path.dirname(os.path.realpath(tpath)) != folder:
        raise PotentialError(f'"{path}" keeps its target latents at {name!r}, which is not a file beside the potential; '
                             'only a file in the potential\'s own folder is read: put targets.pt there (or recompute '
                             'with potential.py)')
    return tpath


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
        tpath = _targets_file(path, pot['targets_path'])
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
    pot.setdefault('labels', None)                  # files of the first version have neither
    pot.setdefault('class_label', None)
    labels = pot['labels']
    if labels is not None and (not torch.is_tensor(labels) or labels.dtype != torch.int64 or labels.shape != (N,)):
        raise PotentialError(f'"{path}": labels should be an int64 tensor [{N}], got {type(labels).__name__} '
                             f'{list(getattr(labels, "shape", []))}; recompute it with potential.py')
    if pot['class_label'] is not None and labels is not None and not bool((labels == pot['class_label']).all()):
        raise PotentialError(f'"{path}": class_label={pot["class_label"]} does not match its labels; recompute it')
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
        prob, solver: a transport.semidiscrete.SemidiscreteProblem, and a SemidiscreteSolver or a
            transport.newton.NewtonSolver.
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
        if (out.converged or out.num_iters >= solver.max_iters or stop[0] or not out.history
                or out.state.get('plateau') or out.state.get('failed')):
            return out, history

#----------------------------------------------------------------------------
# potential.py's work, split as set-up (every check, before any output) and run.

STATE_NAME = 'potential-state.pt'

SOLVERS = ('auto', 'exact', 'monte-carlo')
MONTE_CARLO_ONLY = dict(lr='--lr', precision='--precision', solver_step='--solver-step', solver_init='--solver-init',
                        samples_per_iter='--samples-per-iter', max_samples_per_iter='--max-samples-per-iter',
                        shard_targets='--shard-targets')
OPTION_DEFAULTS = dict(steps=None, back_steps=5, sigma=None, sigma_min=None, sigma_max=None, rho=7.0,
                       num_targets=None, class_label=None, source='uniform', seed=0, solver='auto', max_iters=2000,
                       tol=0.05,
                       lr=None, solver_step=None, solver_init=None, samples_per_iter=None,
                       max_samples_per_iter=None, eval_samples=None, precision=None, block_size=2048,
                       chunk_size=4096, shard_targets=False, checkpoint_every=200, resume=True,
                       accept_unconverged=False, separate_targets=False, progress=True, command=None)


class ComputeError(ValueError):
    """potential.py cannot go on: a bad option or input (found by setup_potential, before anything is
    written), a failed solve, or an unconverged result not accepted; the message says what to do."""


def schedule_for(net, steps=None, back_steps=5, sigma=None, sigma_min=None, sigma_max=None, rho=7.0):
    """(sigmas [S + 1], K) from steps / back_steps or sigma / back_steps, on diffusion.sigma_range (the options
    clamped to the network's range as NVlabs/edm's sampler clamps them) and rounded by the network's round_sigma."""
    try:
        sigma_min, sigma_max = diffusion.sigma_range(net, sigma_min, sigma_max)
    except ValueError as err:
        raise ComputeError(f'--sigma_min / --sigma_max: {err}') from None
    K = back_steps
    if sigma is None:
        S = 18 if steps is None else steps
        if K > S:
            raise ComputeError(f'--back-steps={K} exceeds --steps={S}: the OT map lands at sigma_(S-K), '
                               f'so K must be at most S')
        return diffusion.net_sigma_schedule(net, S, sigma_min, sigma_max, rho), K
    if steps is not None:
        raise ComputeError('--steps and --sigma exclude each other: give --steps S (the latents are then '
                           'at sigma_(S-K)) or --sigma (then K steps run from it)')
    if not sigma_min < sigma <= sigma_max:
        raise ComputeError(f'--sigma={sigma:g} must lie in ({sigma_min:g}, {sigma_max:g}] (the noise levels '
                           'of the schedule above --sigma_min)')
    return diffusion.net_sigma_schedule(net, K, sigma_min, sigma, rho), K


def open_inputs(network, data):
    """(net, snapshot, dataset) with every check that needs no computation (ComputeError otherwise); the data
    set gives its items' labels (dataset.json, or an .npz's "labels") when it has any."""
    if not os.path.exists(network) and not dnnlib.util.is_url(network):
        raise ComputeError(f'--network: no such file or folder: "{network}"')
    try:
        net, snapshot = snapshots.load_denoiser(network)
        shape = snapshots.data_shape_of(net)
    except ValueError as err:
        raise ComputeError(f'--network: {err}') from None
    if not os.path.exists(data):
        raise ComputeError(f'--data: no such file or directory: "{data}"')
    try:
        dataset = open_dataset(data, use_labels=True)
    except (DatasetError, OSError) as err:
        raise ComputeError(f'--data: {err}') from None
    dshape = tuple(dataset.item_shape)
    if dshape != shape:
        raise ComputeError(f'--data holds items of shape {list(dshape)} but the network works on {list(shape)}: '
                           'use the data set the denoiser was trained on')
    return net, snapshot, dataset


def item_labels(dataset):
    """int64 [len(dataset)] class index of every item, or None when the data set has no labels."""
    if not dataset.has_labels:
        return None
    return np.array([int(np.argmax(dataset.get_label(i))) for i in range(len(dataset))], dtype=np.int64)


def candidate_items(net, dataset, class_label=None):
    """(indices of the items a potential may use, their labels or None, a line saying which labels are used).

    With class_label c: the items of class c only. Refused (ComputeError): a class out of range, a class
    without labelled data or with an unconditional network, a conditional network without labelled data, and
    data whose classes the network does not take."""
    labels, net_classes = item_labels(dataset), int(getattr(net, 'label_dim', 0) or 0)
    data_classes = 0 if labels is None else int(labels.max()) + 1
    if class_label is not None:
        if labels is None:
            raise ComputeError(f'--class={class_label}: --data has no labels (dataset.json for images, an array '
                               '"labels" in an .npz); drop --class')
        if net_classes == 0:
            raise ComputeError(f'--class={class_label}: the network is unconditional (label_dim 0); a class potential '
                               'needs a class-conditional network: drop --class')
        if not 0 <= class_label < min(data_classes, net_classes):
            raise ComputeError(f'--class={class_label} is out of range: use 0 <= --class <= '
                               f'{min(data_classes, net_classes) - 1} (--data has classes 0..{data_classes - 1}, the '
                               f'network takes {net_classes} labels)')
    if net_classes > 0 and labels is None:
        raise ComputeError(f'the network is class-conditional ({net_classes} labels) but --data has no labels '
                           '(dataset.json for images, "labels" in an .npz): DPM-OT denoises each sample with its '
                           "cell's label; use the labelled data set the network was trained on")
    if net_classes > 0 and data_classes > net_classes:
        raise ComputeError(f'--data has classes 0..{data_classes - 1} but the network takes {net_classes} labels: use '
                           'the data set the network was trained on')
    pool = np.arange(len(dataset), dtype=np.int64)
    if class_label is not None:
        pool = pool[labels == class_label]
        note = f'Labels: class {class_label} only ({len(pool)} of {len(dataset)} items); samples are denoised with it'
    elif net_classes > 0:
        note = (f'Labels: the network is class-conditional ({net_classes} labels); every latent keeps its item\'s '
                f'label (classes 0..{data_classes - 1}), and samples are denoised with their cell\'s label')
    else:
        note = None if labels is None else ('Labels: the latents keep their items\' labels (the network is '
                                            'unconditional and ignores them)')
    return pool, None if labels is None else labels[pool], note


def target_latents(dataset, indices, sigma, seed, device):
    """Target latents y_i = x_i + sigma n_i (forward_diffuse) of the data items `indices`, on `device`."""
    x = to_model_space(torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in indices]))
    return forward_diffuse(x, sigma, seed).to(device)


def choose_solver(choice, dim, checkpoint_solver=None):
    """The solver potential.py runs: 'exact' (damped Newton on exact cells, transport/newton.py) or
    'monte-carlo' (transport.semidiscrete.SemidiscreteSolver). 'auto' continues a checkpoint's solver, else
    takes 'exact' for d <= 3 (where the Monte Carlo step rule can plateau on clustered targets) and
    'monte-carlo' above."""
    if choice not in SOLVERS:
        raise ComputeError(f'--solver={choice}: use one of {", ".join(SOLVERS)}')
    if choice == 'exact' and dim > power_cells.MAX_DIM:
        raise ComputeError(f'--solver=exact works for d <= {power_cells.MAX_DIM}, these latents have d = {dim}: use '
                           '--solver=monte-carlo (or auto)')
    if choice != 'auto':
        return choice
    if checkpoint_solver is not None:
        return checkpoint_solver
    return 'exact' if dim <= power_cells.MAX_DIM else 'monte-carlo'


def _make_solver(o, method, dim):
    if method == 'exact':
        given = [flag for key, flag in MONTE_CARLO_ONLY.items() if o[key] not in (None, False)]
        if given:
            how = 'you chose --solver=exact' if o.solver == 'exact' else f'--solver=auto picks exact for d = {dim}'
            raise ComputeError(f'{", ".join(given)} set(s) the Monte Carlo solver, but {how}: drop them, or add '
                               '--solver=monte-carlo')
        return NewtonSolver(max_iters=o.max_iters, tol=o.tol, block_size=o.block_size, chunk_size=o.chunk_size)
    extra = {k: v for k, v in (('step', o.solver_step), ('init', o.solver_init)) if v is not None}
    try:
        return SemidiscreteSolver(max_iters=o.max_iters, tol=o.tol, lr=o.lr or 0.5,
                                  samples_per_iter=o.samples_per_iter, max_samples_per_iter=o.max_samples_per_iter,
                                  block_size=o.block_size, chunk_size=o.chunk_size, shard_targets=o.shard_targets,
                                  dtype=torch.bfloat16 if o.precision == 'bf16' else torch.float32, **extra)
    except ValueError as err:
        raise ComputeError(f'Solver settings: {err}') from None


def _read_checkpoint(state_path):
    """The checkpoint dict (run_key, state, history) at state_path."""
    try:
        ckpt = torch.load(state_path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise ComputeError(f'Cannot read the checkpoint "{state_path}" ({type(err).__name__}: {err}); '
                           'delete it or pass --no-resume') from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('run_key'), dict) or 'state' not in ckpt:
        raise ComputeError(f'"{state_path}" is not a potential.py checkpoint; delete it or pass --no-resume')
    # Checkpoints of the first version ran the Monte Carlo solver on unlabelled items and did not record it.
    ckpt['run_key'].setdefault('solver', 'monte-carlo')
    ckpt['run_key'].setdefault('class_label', None)
    return ckpt


def _run_key(job):
    """What makes two runs the same run (a checkpoint of another run is never resumed)."""
    o = job.opts
    key = dict(data_sha256=job.data_hash, denoiser_sha256=job.net_hash, num_targets=job.N,
               data_shape=list(job.shape), sigma=float(job.sigmas[job.sigmas.numel() - 1 - job.K]),
               source=o.source, seed=o.seed, solver=job.method, class_label=o.class_label)
    if job.method == 'monte-carlo':
        key.update(lr=job.solver.lr, precision=o.precision or 'fp32', step=job.solver.step, init=job.solver.init,
                   samples_per_iter=o.samples_per_iter, max_samples_per_iter=o.max_samples_per_iter,
                   block_size=o.block_size, chunk_size=o.chunk_size, shard_targets=o.shard_targets)
    return key


def setup_potential(network, data, outdir, **options):
    """Check every input and option of potential.py and prepare the run; nothing is written.

    Args:
        network, data, outdir: as potential.py's options; **options: the others (OPTION_DEFAULTS).
    Returns:
        an EasyDict: opts, net, snapshot, dataset, sigmas, K, N, shape, indices, labels (of those items, or
        None), label_note, method ('exact' or 'monte-carlo'), solver, data_hash, net_hash, run_key,
        state_path, resume (a solver state or None) and history (the checkpoint's rows).
    Raises:
        ComputeError with a one-line message naming the option.
    """
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise TypeError(f'setup_potential: unknown options {", ".join(unknown)}')
    o = dnnlib.EasyDict(OPTION_DEFAULTS, network=network, data=data, outdir=outdir, **options)
    try:
        outputs.check_output_dir(o.outdir, '--outdir', empty=False)     # resuming writes into it again
    except GenerationError as err:
        raise ComputeError(str(err)) from None
    job = dnnlib.EasyDict(opts=o)
    job.net, job.snapshot, job.dataset = open_inputs(o.network, o.data)
    job.sigmas, job.K = schedule_for(job.net, o.steps, o.back_steps, o.sigma, o.sigma_min, o.sigma_max, o.rho)
    pool, pool_labels, job.label_note = candidate_items(job.net, job.dataset, o.class_label)
    if o.num_targets is not None and o.num_targets > len(pool):
        which = f'items of class {o.class_label} in --data' if o.class_label is not None else 'items of --data'
        raise ComputeError(f'--num-targets={o.num_targets} exceeds the {len(pool)} {which}; use --num-targets <= '
                           f'{len(pool)}')
    job.N = len(pool) if o.num_targets is None else o.num_targets
    job.shape = snapshots.data_shape_of(job.net)
    job.state_path = os.path.join(o.outdir, STATE_NAME)
    ckpt = _read_checkpoint(job.state_path) if o.resume and os.path.isfile(job.state_path) else None
    dim = math.prod(job.shape)
    job.method = choose_solver(o.solver, dim, ckpt['run_key']['solver'] if ckpt else None)
    job.solver = _make_solver(o, job.method, dim)
    job.data_hash = job.dataset.data_hash()
    job.net_hash = state_dict_sha256(job.net)
    chosen = select_indices(len(pool), job.N, o.seed)
    job.indices, job.labels = pool[chosen], None if pool_labels is None else pool_labels[chosen]
    job.run_key = _run_key(job)
    job.resume, job.history = None, []
    if ckpt is not None:
        old = ckpt['run_key']
        diff = sorted(k for k in set(job.run_key) | set(old) if old.get(k) != job.run_key.get(k))
        if diff:
            raise ComputeError(f'"{job.state_path}" is the checkpoint of another run (differs in {", ".join(diff)}); '
                               'use another --outdir, or --no-resume to start over')
        job.resume, job.history = ckpt['state'], list(ckpt.get('history', []))
    return job

#----------------------------------------------------------------------------

class _RunLog:
    """Rank 0's console and DIR/log.txt (appended); other ranks stay silent."""

    def __init__(self, outdir):
        self.rank0 = dist.get_rank() == 0
        self.file = open(os.path.join(outdir, 'log.txt'), 'a', encoding='utf-8') if self.rank0 else None

    def say(self, line):
        """Print a line (above a progress bar, if any) and append it to the log."""
        if self.rank0:
            tqdm.tqdm.write(line, file=sys.stdout)
            self.file.write(line + '\n')
            self.file.flush()

    def write(self, line):
        """Append a line to the log only."""
        if self.rank0:
            self.file.write(line + '\n')

    def show(self, line):
        """Print a line (above a progress bar, if any), not in the log (which holds the solver's rows)."""
        if self.rank0:
            tqdm.tqdm.write(line, file=sys.stdout)

    def close(self):
        if self.file is not None:
            self.file.close()


def format_bytes(n):
    return f'{n / 2**30:.2f} GiB' if n >= 2**28 else f'{n / 2**20:.1f} MiB'


def log_row(row):
    """One solver history row (either solver's) as a line of log.txt."""
    check = '' if row.get('check_rms') is None else \
        f'  check_rms {row["check_rms"]:.4f}  check_max {row["check_max_abs"]:.3f}  check_empty {row["check_empty"]}'
    if 'num_samples' not in row:                                  # the exact (Newton) solver
        step = '-' if row.get('step') is None else f'{row["step"]:.4g}'
        return (f'iter {row["iter"]:<6d} rms {row["rms"]:<10.4g} max_rel_err {row["max_rel_err"]:<10.4g} '
                f'empty {row["empty"]:<5d} step {step:<8s} evaluations {row["evaluations"]}{check}')
    return (f'iter {row["iter"]:<6d} samples {row["num_samples"]:<9d} rms {row["rms"]:<8.4f} '
            f'max_rel_err {row["max_rel_err"]:<8.3f} empty {row["empty"]:<5d} gap {row["gap"]:<10.4g} '
            f'averaging {int(row["averaging"])}{check}{"  plateau" if row.get("plateau") else ""}')


def _progress_line(job, row):
    """A console line for a notable iteration (every exact step, every check, a plateau), else None."""
    tol = job.opts.tol
    if row.get('check_rms') is not None:
        verdict = 'within' if row['check_rms'] <= tol and row['check_empty'] == 0 else 'above'
        line = (f'iter {row["iter"]}: check on fresh samples: rms relative cell-mass error {row["check_rms"]:.4f} '
                f'({verdict} --tol={tol:g}), {row["check_empty"]} empty cells')
        if row.get('plateau'):
            return line + '; the error has stopped improving (plateau): stopping'
        more = row.get('projected_iters')
        if more is not None and more > 0:
            left = job.opts.max_iters - row['iter']
            line += (f'; at this rate ~{more} more iterations to --tol' if math.isfinite(more) else '; not improving')
            line += f' (--max-iters leaves {left})' if not more <= left else ''
        return line
    if job.method == 'exact':
        return (f'iter {row["iter"]}: exact cell masses: max relative error {row["max_rel_err"]:.3g}, rms '
                f'{row["rms"]:.3g}, Newton step {row["step"]:.3g}')
    return None


def _header_lines(job, device):
    o, N, K = job.opts, job.N, job.K
    S = job.sigmas.numel() - 1
    d = math.prod(job.shape)
    world = dist.get_world_size()
    lines = [f'Potential: N = {N} latents of shape {list(job.shape)} (d = {d}) at sigma_{S - K} = '
             f'{float(job.sigmas[S - K]):.6g} (schedule of S = {S} steps, K = {K} back-steps), source {o.source}',
             f'Schedule: EDM, sigma from {float(job.sigmas[0]):.6g} to {float(job.sigmas[S - 1]):.6g}, rho {o.rho:g} '
             '(the options clamped to the network\'s range, as NVlabs/edm\'s sampler does)',
             f'Data: "{o.data}" ({len(job.dataset)} items, sha256 {job.data_hash[:12]}...); network: "{o.network}" '
             f'(weights sha256 {(job.net_hash or "-")[:12]}...)'] + ([job.label_note] if job.label_note else [])
    if job.method == 'exact':
        lines.append(f'Solver: exact (damped Newton on exact cell masses, d = {d} <= 3), up to --max-iters='
                     f'{o.max_iters} iterations, then a check on fresh samples against --tol={o.tol:g}')
    else:
        mem = estimate_peak_memory(N, d, o.block_size, o.chunk_size, o.precision == 'bf16', world, o.shard_targets)
        lines += [f'Solver: monte-carlo (step {job.solver.step}, init {job.solver.init}), up to --max-iters='
                  f'{o.max_iters} iterations, --tol={o.tol:g}',
                  f'Peak memory estimate per process on {device.type}: {format_bytes(mem["total"])} '
                  f'(set-up {format_bytes(mem["setup"])}, solving {format_bytes(mem["solve"])}), {world} process(es)']
    lines.append(f'Resume: {"from iteration " + str(job.resume["iter"]) if job.resume else "no (fresh start)"}')
    return lines


def compute_potential(job, device):
    """Run a job of setup_potential: latents, the solve with checkpoints, the final evaluation and the file.

    Writes DIR/log.txt and DIR/potential-state.pt, and DIR/potential.pt (rank 0) when the solver converged,
    or with --tol=0 or accept_unconverged; returns the potential's path.
    Raises:
        ComputeError when the solver fails, or does not converge and accept_unconverged is off.
    """
    o = job.opts
    try:
        if dist.get_rank() == 0:
            outputs.make_output_dir(o.outdir)
        dist.barrier()
        log = _RunLog(o.outdir)
    except (GenerationError, OSError) as err:
        raise ComputeError(str(err) if isinstance(err, GenerationError) else
                           f'--outdir="{o.outdir}": cannot write there ({err.strerror or err})') from None
    try:
        log.say(f'--- {datetime.datetime.now().isoformat(timespec="seconds")}: {o.command}')
        for line in _header_lines(job, device):
            log.say(line)
        sigma = float(job.sigmas[job.sigmas.numel() - 1 - job.K])
        targets = target_latents(job.dataset, job.indices, sigma, o.seed, device)
        prob = SemidiscreteProblem(targets=targets.reshape(job.N, -1), source=o.source)
        out, history = _solve(job, prob, log)
        converged = out.converged or bool(job.resume is not None and job.resume.get('converged'))
        path = _evaluate_and_save(job, prob, targets, out, history, converged, log)
        dist.barrier()
        return path
    finally:
        log.close()


def _solve(job, prob, log):
    """solve_potential with progress, per-iteration log rows and checkpoints; (output, all history rows)."""
    o, solver, resume = job.opts, job.solver, job.resume
    if resume is not None and resume.get('converged'):
        # Already certified: take the stored heights without iterating (a resumed solver continues iterating).
        solver = dataclasses.replace(solver, max_iters=int(resume['iter']))
    bar = None
    if log.rank0 and o.progress:
        bar = tqdm.tqdm(total=o.max_iters, initial=int(resume['iter']) if resume else 0, desc='Solving',
                        unit='it', file=sys.stderr, dynamic_ncols=True)

    def on_iter(it, row):
        log.write(log_row(row))
        line = _progress_line(job, row)
        if line is not None:
            log.show(line)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(rms=f'{row["rms"]:.3g}', empty=row['empty'],
                            check=('-' if row['check_rms'] is None else f'{row["check_rms"]:.3f}'))
        return False

    def checkpoint(state, rows):
        if log.rank0:
            with dnnlib.util.atomic_write(job.state_path, 'wb') as f:
                torch.save(dict(run_key=job.run_key, state=state, history=job.history + rows), f)
            log.file.flush()
        dist.barrier()

    try:
        out, rows = solve_potential(prob, solver, seed=o.seed, resume=resume, checkpoint=checkpoint,
                                    checkpoint_every=o.checkpoint_every, callback=on_iter)
    except (ValueError, RuntimeError) as err:
        saved = (f'"{job.state_path}" holds the last checkpoint' if os.path.isfile(job.state_path)
                 else 'no checkpoint was written')
        hint = ('--solver=monte-carlo' if job.method == 'exact' else
                'another --solver-step (e.g. adam) or a smaller --lr')
        raise ComputeError(f'The solver failed ({type(err).__name__}: {err}); {saved}. Try {hint}, with '
                           '--no-resume to start over') from None
    finally:
        if bar is not None:
            bar.close()
    return out, job.history + rows


def _advice(job, out):
    """Why the solver stopped unconverged, and what to try."""
    o, state = job.opts, out.state
    if job.method == 'exact':
        why = state.get('failed') or f'--max-iters={o.max_iters} reached'
        return why, 'try a larger --max-iters (re-running continues from the checkpoint), or --solver=monte-carlo'
    d = math.prod(job.shape)
    tries = []
    if d <= power_cells.MAX_DIM:
        tries.append(f'--solver=exact (exact cells for d = {d} <= 3)')
    if state.get('plateau'):
        why = 'the error stopped improving (plateau: three checks in a row none 10% better)'
        tries += [f'a larger --max-samples-per-iter (now {o.max_samples_per_iter or 32 * job.N})',
                  '--solver-step=adam', 'a larger --tol']
    else:
        why = f'--max-iters={o.max_iters} reached'
        more = next((r['projected_iters'] for r in reversed(out.history) if r.get('projected_iters') is not None),
                    None)
        if more is not None and math.isfinite(more):
            why += f' (at the rate of the last checks, ~{more} more iterations would be needed)'
        tries.append('a larger --max-iters (re-running continues from the checkpoint)')
    return why, 'try ' + ', or '.join(tries)


def _diagnostics(job, out, history, converged, stats):
    o = job.opts
    keep = ('iter', 'num_samples', 'rms', 'max_rel_err', 'empty', 'gap', 'check_rms', 'step', 'plateau')
    settings = dict(solver=job.method, block_size=o.block_size, chunk_size=o.chunk_size)
    if job.method == 'monte-carlo':
        settings.update(lr=job.solver.lr, precision=o.precision or 'fp32', step=job.solver.step,
                        init=job.solver.init)
    return dict(converged=converged, num_iters=out.num_iters, num_samples_used=out.num_samples_used, tol=o.tol,
                max_iters=o.max_iters, check=out.check, plateau=bool(out.state.get('plateau', False)),
                failed=out.state.get('failed'), eval={k: v for k, v in stats.items() if k != 'counts'},
                eval_counts=stats['counts'].cpu(), settings=settings,
                history=[{k: r.get(k) for k in keep} for r in history])


def _evaluate_and_save(job, prob, targets, out, history, converged, log):
    """The final evaluation on fresh samples, the potential file (when converged or accepted) and the
    closing lines; returns its path."""
    o = job.opts
    stats = evaluate(prob, out.h, num_samples=o.eval_samples, generator=torch.Generator().manual_seed(o.seed + 1))
    gap = mean_score_gap(prob, out.h, generator=torch.Generator().manual_seed(o.seed + 2))
    log.say(f'Evaluation on {stats["num_samples"]} fresh samples: rms relative cell-mass error {stats["rms"]:.4f} '
            f'(noise floor of max {stats["noise_floor"]:.3f}), max {stats["max_abs"]:.3f}, empty cells '
            f'{stats["empty"]}, mean score gap {gap:.4g}')
    path = os.path.join(o.outdir, 'potential.pt')
    if converged:
        used = f'{out.num_samples_used:,} samples' if job.method == 'monte-carlo' else \
            f'exact cell masses; {out.num_samples_used:,} samples in the check'
        log.say(f'Converged after {out.num_iters} iterations ({used}).')
    elif o.tol == 0:
        log.say(f'Ran {out.num_iters} iterations (--tol=0: no convergence check; the potential is recorded as '
                'unconverged).')
    else:
        why, advice = _advice(job, out)
        reached = f'rms {out.check["rms"]:.4f}, {out.check["empty"]} empty cells' if out.check else 'no check yet'
        log.say(f'NOT CONVERGED after {out.num_iters} iterations: {why}; last check {reached}, --tol={o.tol:g}; '
                f'{advice}.')
        if not o.accept_unconverged:
            raise ComputeError(f'the solver did not converge to --tol={o.tol:g} ({why}), so "{path}" was not '
                               f'written; {advice}; or pass --accept-unconverged to write it anyway (generate.py '
                               'then warns)')
        log.say('Writing it anyway (--accept-unconverged); it is recorded as unconverged.')
    provenance = dict(data=os.path.abspath(o.data), data_sha256=job.data_hash, data_size=len(job.dataset),
                      network=o.network if dnnlib.util.is_url(o.network) else os.path.abspath(o.network),
                      denoiser_sha256=job.net_hash, network_kimg=job.snapshot.get('kimg'), seed=o.seed,
                      noise='sampling.potential.forward_diffuse(x, sigma, seed)', world_size=dist.get_world_size(),
                      command=o.command, created=datetime.datetime.now().isoformat(timespec='seconds'),
                      torch=str(torch.__version__))
    if log.rank0:
        save_potential(path, h=out.h.cpu(), sigmas=job.sigmas, back_steps=job.K, source=o.source,
                       data_shape=list(job.shape), score_gap=gap, targets=targets.cpu(),
                       targets_path=os.path.join(o.outdir, 'targets.pt') if o.separate_targets else None,
                       indices=job.indices, labels=job.labels, class_label=o.class_label,
                       solver=_diagnostics(job, out, history, converged, stats), provenance=provenance)
    log.say(f'Wrote {path}')
    return path


def unconverged_warning(path):
    """A one-line warning when the potential file at `path` is recorded as unconverged, else None (also
    when it cannot be read: load_potential reports that). Reads the file memory-mapped (cheap)."""
    try:
        pot = torch.load(os.fspath(path), map_location='cpu', weights_only=True, mmap=True)
        solver = pot.get('solver', {}) if isinstance(pot, dict) else {}
    except Exception:
        return None
    if not isinstance(solver, dict) or solver.get('converged', True):
        return None
    check = solver.get('check') or {}
    reached = f'rms relative cell-mass error {check["rms"]:.3g}' if 'rms' in check else 'never checked'
    return (f'the potential "{path}" is recorded as NOT CONVERGED ({reached}, --tol={solver.get("tol")}): its cells '
            'hold unequal source mass, so its targets are drawn with unequal frequencies; recompute it with '
            'potential.py (for d <= 3, --solver=exact)')
