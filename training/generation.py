"""Generation library behind generate.py (and the metrics that translate or sample on the fly).

- `StackedRandomGenerator`: one seeded torch.Generator per sample, so that a sample's noise (G's z,
  every SDE step) depends only on its own seed, never on the batch size or the number of ranks.
- `parse_int_list`, `rank_batches`: seeds from the command line and their split across ranks.
- `load_network`: a pickled snapshot (`network-snapshot-*.pkl`; EOT or denoiser) or a safe export;
  `export_safe` writes such an export (weights + JSON architecture, no code).
- `iterate_translations`: translate a dataset with the one-step G or the SDE, batch by batch, this
  rank's share only; `iterate_samples`: the same for denoiser snapshots (DPM-OT / plain samplers,
  through training.dpmot).

Seeding scheme: input i of a translation (in dataset order) uses `seeds[i]`; with R repeats per
input, repeat r of input i uses the seed `seeds[i] * R + r` (so R = 1 gives `seeds[i]`). Every random
tensor of a sample (G's z, then the SDE's step noises in order) comes from that seed's generator.
"""

import collections
import json
import os
import pickle
import re

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist

EOT_SAMPLERS = ('G', 'sde')
DENOISER_SAMPLERS = ('euler', 'heun', 'langevin')
SAMPLERS = dict(eot=EOT_SAMPLERS, denoiser=DENOISER_SAMPLERS)
DEFAULT_SAMPLER = dict(eot='G', denoiser='heun')

EXPORT_FORMAT = 'eot-toolkit-safe-export'
EXPORT_VERSION = 1
EXPORT_JSON = 'network.json'
EXPORT_WEIGHTS = 'weights.pt'


class GenerationError(ValueError):
    """Bad input to generation (snapshot, export, data, options); the message says what to do."""

#----------------------------------------------------------------------------
# Per-sample random numbers.

class StackedRandomGenerator:
    """A stack of per-sample generators: row i of every draw comes from generator i alone.

    The generators are CPU torch.Generators and draws are made in float32 on the CPU, then moved to
    `device` and cast: a seed gives the same noise whatever the batch, the rank or the device.

    Args:
        device: where drawn tensors are put.
        seeds: one int in [0, 2^63) per sample.
    """

    def __init__(self, device, seeds):
        self.device = torch.device(device)
        self.seeds = [int(s) for s in seeds]
        for s in self.seeds:
            if not 0 <= s < 2**63:
                raise GenerationError(f'seed {s} is out of range; seeds must be integers in [0, 2^63)')
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self):
        return len(self.generators)

    def _draw(self, fn, size, dtype):
        size = [int(s) for s in size]
        if not size or size[0] != len(self.generators):
            raise GenerationError(f'a draw of shape {size} does not match the {len(self.generators)} per-sample '
                                  'generators; the first dimension must be the number of samples')
        out = torch.stack([fn(size[1:], generator=g, dtype=torch.float32) for g in self.generators])
        return out.to(device=self.device, dtype=dtype)

    def randn(self, size, dtype=torch.float32):
        """Standard normal [N, ...]: row i from generator i."""
        return self._draw(torch.randn, size, dtype)

    def rand(self, size, dtype=torch.float32):
        """Uniform [0, 1) [N, ...]: row i from generator i."""
        return self._draw(torch.rand, size, dtype)

    def randn_like(self, x):
        """randn with the shape, dtype and device of `x` (the `randn_like` argument of samplers)."""
        return self._draw(torch.randn, x.shape, x.dtype).to(x.device)

#----------------------------------------------------------------------------
# Seeds and ranks.

def parse_int_list(text, what='--seeds'):
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11] (ranges inclusive, non-negative, in the given order)."""
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    out = []
    for part in str(text).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)(?:-(\d+))?', part)
        if m is None:
            raise GenerationError(f'{what}={text!r}: cannot read {part!r}; use non-negative integers and ranges, '
                                  'e.g. 0-99 or 1,5,10-19')
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise GenerationError(f'{what}={text!r}: the range {part!r} is empty; write it as {hi}-{lo}')
        out.extend(range(lo, hi + 1))
    return out


def repeat_seeds(seeds, repeats):
    """[N, R] int64 seeds of repeat r of input i: seeds[i] * R + r."""
    if len(seeds) and max(int(s) for s in seeds) >= (2**63 - 1) // int(repeats):
        raise GenerationError(f'seed {max(seeds)} times --repeats={repeats} does not fit in 63 bits; use smaller seeds')
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1, 1)
    return seeds * int(repeats) + np.arange(int(repeats), dtype=np.int64)[None, :]


def rank_batches(num, batch_size, rank=None, world_size=None):
    """This rank's batches of job indices 0..num-1: batches of `batch_size` in order, dealt round-robin.

    Every index belongs to exactly one batch of one rank. Returns a list of int64 arrays.
    """
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    if batch_size < 1:
        raise GenerationError(f'batch size must be >= 1; got {batch_size}')
    batches = [np.arange(i, min(i + batch_size, num), dtype=np.int64) for i in range(0, num, batch_size)]
    return batches[rank::world_size]

#----------------------------------------------------------------------------
# Loading networks: pickled snapshots and safe exports.

def _snapshot_kind(data, where):
    if not isinstance(data, dict):
        raise GenerationError(f'{where}: holds a {type(data).__name__}, not a snapshot dict; pass a '
                              'network-snapshot-*.pkl written by train.py (or an EDM snapshot)')
    kind = data.get('kind')
    if kind is None:
        kind = 'denoiser' if 'ema' in data else ('eot' if 'G' in data and 'f' in data else None)
    if kind not in SAMPLERS:
        raise GenerationError(f'{where}: unknown snapshot kind {kind!r} (keys: {", ".join(map(str, data))}); '
                              'expected an EOT snapshot (G, f, D) or a denoiser snapshot (ema)')
    needed = ('G', 'f') if kind == 'eot' else ('ema',)
    missing = [k for k in needed if k not in data]
    if missing:
        raise GenerationError(f'{where}: a {kind} snapshot needs the key(s) {", ".join(needed)}; '
                              f'{", ".join(missing)} missing')
    return kind


def _data_shape_of(kind, data, nets):
    if data.get('data_shape') is not None:
        return tuple(int(s) for s in data['data_shape'])
    net = nets['G'] if kind == 'eot' else nets['ema']
    if getattr(net, 'data_shape', None) is not None:
        return tuple(int(s) for s in net.data_shape)
    if getattr(net, 'img_resolution', None) is not None: # An EDM denoiser.
        return (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
    raise GenerationError('the snapshot records no data shape and its network has none')


def _model(kind, nets, data, source, device):
    """The loaded model: an EasyDict with kind, nets (eval, on device), options and their source."""
    nets = {k: v.to(device).eval().requires_grad_(False) for k, v in nets.items()}
    model = dnnlib.EasyDict(kind=kind, nets=nets, source=source, data_shape=_data_shape_of(kind, data, nets),
                            kimg=data.get('kimg'))
    if kind == 'eot':
        model.update(G=nets['G'], f=nets['f'], D=nets.get('D'), gamma=float(data.get('gamma', 0.0)),
                     sde_steps=int(data.get('sde_steps', 10)))
    else:
        model.update(ema=nets['ema'])
    return model


def load_network(path, device=torch.device('cpu')):
    """Load a pickled snapshot (path or URL) or a safe export (its folder or its network.json).

    Pickles run code when loaded: load only snapshots you trust (docs/safe-loading.md).
    Returns an EasyDict: kind ('eot' or 'denoiser'), nets {name: module}, data_shape, source, kimg,
    and for EOT G, f, D, gamma, sde_steps; for denoisers ema.
    """
    path = os.fspath(path)
    if os.path.isdir(path) or path.lower().endswith('.json'):
        return load_safe_export(path, device)
    if not dnnlib.util.is_url(path) and not os.path.isfile(path):
        raise GenerationError(f'--network: no such file or folder: "{path}"')
    try:
        with dnnlib.util.open_url(path) as f:
            data = pickle.load(f)
    except (OSError, dnnlib.util.DownloadError) as err:
        raise GenerationError(f'--network: cannot read "{path}": {err}') from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as err:
        raise GenerationError(f'{path}: cannot unpickle ({type(err).__name__}: {err}); is it a network-snapshot-*.pkl '
                              'from train.py? (training-state-*.pt files are for --resume, not generation)') from None
    kind = _snapshot_kind(data, path)
    names = ('G', 'f', 'D') if kind == 'eot' else ('ema',)
    nets = {k: data[k] for k in names if data.get(k) is not None}
    for name, net in nets.items():
        if not isinstance(net, torch.nn.Module):
            raise GenerationError(f'{path}: snapshot[{name!r}] is a {type(net).__name__}, not a network')
    return _model(kind, nets, data, source=path, device=device)


def _json_or_none(value):
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return None


def _architecture(name, net):
    """class_name + init_args + init_kwargs of one network, checked to be rebuildable from training.networks."""
    from torch_utils import persistence
    from training import networks
    cls = type(net)
    if not persistence.is_persistent(cls):
        raise GenerationError(f'{name} is a {cls.__module__}.{cls.__qualname__}, not a persistent network class; '
                              'only networks of training.networks can be exported')
    class_name = cls._orig_class_name
    if not _allowed_network_class(networks, class_name):
        raise GenerationError(f'{name} is a {class_name}, which training.networks does not define; only its '
                              'networks can be exported (rebuilt from the current code)')
    arch = dict(class_name=f'training.networks.{class_name}', init_args=_json_or_none(list(net.init_args)),
                init_kwargs=_json_or_none(dict(net.init_kwargs)))
    if arch['init_args'] is None or arch['init_kwargs'] is None:
        raise GenerationError(f'{name}: its constructor arguments ({net.init_args}, {net.init_kwargs}) are not '
                              'JSON-serialisable, so it cannot be described without code')
    return arch


def export_safe(model, out_dir):
    """Write a code-free export of a loaded model: out_dir/weights.pt (state_dicts) + out_dir/network.json.

    The JSON holds, per network, `class_name` (in training.networks), `init_args` and `init_kwargs`,
    plus kind, gamma, sde_steps, data_shape. Checks that the export rebuilds to the same weights.
    Returns the JSON path.
    """
    arch = {name: _architecture(name, net) for name, net in model.nets.items()}
    desc = dict(format=EXPORT_FORMAT, version=EXPORT_VERSION, kind=model.kind, weights=EXPORT_WEIGHTS,
                networks=arch, data_shape=list(model.data_shape), kimg=model.kimg, source=str(model.source))
    if model.kind == 'eot':
        desc.update(gamma=model.gamma, sde_steps=model.sde_steps)
    os.makedirs(out_dir, exist_ok=True)
    weights = {name: {k: v.detach().cpu() for k, v in net.state_dict().items()} for name, net in model.nets.items()}
    with dnnlib.util.atomic_write(os.path.join(out_dir, EXPORT_WEIGHTS), 'wb') as f:
        torch.save(weights, f)
    json_path = os.path.join(out_dir, EXPORT_JSON)
    with dnnlib.util.atomic_write(json_path, 'w') as f:
        json.dump(desc, f, indent=2)
    # Round trip: the current code must rebuild every network with exactly these weights.
    rebuilt = load_safe_export(json_path)
    for name, net in rebuilt.nets.items():
        for key, value in net.state_dict().items():
            if not torch.equal(value, weights[name][key]):
                raise GenerationError(f'export check failed: {name}.{key} differs after rebuilding')
    return json_path


def _allowed_network_class(networks, class_name):
    if not re.fullmatch(r'[A-Za-z][A-Za-z0-9_]*', class_name):
        return False
    cls = networks.__dict__.get(class_name)
    from torch_utils import persistence
    return isinstance(cls, type) and issubclass(cls, torch.nn.Module) and persistence.is_persistent(cls)


def _build_network(name, arch, where):
    from training import networks
    if not isinstance(arch, dict):
        raise GenerationError(f'{where}: networks.{name} must be an object with class_name, init_args, init_kwargs')
    class_name = arch.get('class_name')
    prefix = 'training.networks.'
    short = class_name[len(prefix):] if isinstance(class_name, str) and class_name.startswith(prefix) else None
    if short is None or not _allowed_network_class(networks, short):
        valid = sorted(k for k in networks.__dict__ if _allowed_network_class(networks, k))
        raise GenerationError(f'{where}: refusing to build {class_name!r} for {name}: a safe export may only name '
                              f'network classes of training.networks ({", ".join(valid)})')
    args, kwargs = arch.get('init_args', []), arch.get('init_kwargs', {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise GenerationError(f'{where}: networks.{name}: init_args must be a list and init_kwargs an object')
    try:
        return getattr(networks, short)(*args, **kwargs)
    except (TypeError, ValueError) as err:
        raise GenerationError(f'{where}: cannot build {name} = {short}(**{kwargs}) with the current '
                              f'training/networks.py: {err}') from None


def load_safe_export(path, device=torch.device('cpu')):
    """Load an export written by `export_safe` without running any code from it.

    The JSON is parsed as data; classes are looked up in the current training.networks only; the
    weights load with torch.load(weights_only=True). Returns the same EasyDict as load_network.
    """
    json_path = os.path.join(path, EXPORT_JSON) if os.path.isdir(path) else path
    if not os.path.isfile(json_path):
        raise GenerationError(f'--network: no {EXPORT_JSON} in "{path}"; pass a folder written by '
                              'generate.py --export-safe, or its network.json')
    try:
        with open(json_path, 'r', encoding='utf-8') as f:
            desc = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise GenerationError(f'{json_path}: not a readable JSON file ({err})') from None
    if not isinstance(desc, dict) or desc.get('format') != EXPORT_FORMAT:
        raise GenerationError(f'{json_path}: not a safe export (expected "format": "{EXPORT_FORMAT}")')
    if desc.get('version') != EXPORT_VERSION:
        raise GenerationError(f'{json_path}: export version {desc.get("version")!r} is not the one this code reads '
                              f'({EXPORT_VERSION})')
    kind = desc.get('kind')
    if kind not in SAMPLERS:
        raise GenerationError(f'{json_path}: unknown kind {kind!r}; expected "eot" or "denoiser"')
    weights_name = desc.get('weights', EXPORT_WEIGHTS)
    if not isinstance(weights_name, str) or os.path.basename(weights_name) != weights_name or weights_name in ('', '.', '..'):
        raise GenerationError(f'{json_path}: "weights" must be a file name beside the JSON; got {weights_name!r}')
    arch = desc.get('networks')
    needed = ('G', 'f') if kind == 'eot' else ('ema',)
    if not isinstance(arch, dict) or any(k not in arch for k in needed):
        raise GenerationError(f'{json_path}: "networks" must describe {", ".join(needed)} for kind {kind!r}')
    nets = {name: _build_network(name, a, json_path) for name, a in arch.items()}
    weights_path = os.path.join(os.path.dirname(os.path.abspath(json_path)), weights_name)
    try:
        weights = torch.load(weights_path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise GenerationError(f'{json_path}: its weights file "{weights_path}" is missing') from None
    except Exception as err: # UnpicklingError for anything but tensors and containers, zip errors, ...
        raise GenerationError(f'{weights_path}: cannot load with weights_only=True ({type(err).__name__}: {err})') from None
    if not isinstance(weights, dict) or any(name not in weights for name in nets):
        raise GenerationError(f'{weights_path}: expected a dict of state_dicts for {", ".join(nets)}')
    for name, net in nets.items():
        try:
            net.load_state_dict(weights[name], strict=True)
        except RuntimeError as err:
            raise GenerationError(f'{weights_path}: the weights of {name} do not fit the network described in the '
                                  f'JSON: {err}') from None
    return _model(kind, nets, desc, source=json_path, device=device)

#----------------------------------------------------------------------------
# Data.

def open_inputs(path, model):
    """Open --data and check that its items have the shape the model was trained on."""
    from training.dataset import DatasetError, open_dataset
    try:
        dataset = open_dataset(path)
    except (DatasetError, OSError) as err:
        raise GenerationError(f'--data: {err}') from None
    shape = tuple(dataset.item_shape)
    if shape != tuple(model.data_shape):
        what = 'vectors of dimension' if len(model.data_shape) == 1 else 'images of shape [C, H, W] ='
        fix = ('rebuild it with dataset_tool.py --resolution / --colorize' if len(shape) == 3 else
               'use data of the dimension the model was trained on')
        raise GenerationError(f'--data="{path}" holds items of shape {list(shape)}, but the network was trained on '
                              f'{what} {list(model.data_shape)}; {fix}')
    return dataset


def load_items(dataset, indices, device):
    """Items `indices` of a dataset in model space (images in [-1, 1]) as float32 on `device`."""
    from training.training_loop import to_model_space
    batch = torch.as_tensor(np.stack([dataset[int(i)][0] for i in indices]))
    return to_model_space(batch, device)


def to_images(x):
    """Model-space images [-1, 1] -> uint8 with the canonical quantisation of metrics.fid."""
    from metrics.fid import quantize_images
    return quantize_images(x)

#----------------------------------------------------------------------------
# Translation (EOT).

@torch.no_grad()
def translate(model, x0, rnd, sampler='G', steps=None, gamma=None):
    """Translate x0 with an EOT model: 'G' (one step, z from `rnd`) or 'sde' (steps and gamma default to
    the snapshot's); all noise is drawn from the StackedRandomGenerator `rnd`, one row per sample."""
    from training.eot import sample_sde, translate_one_step
    if sampler == 'G':
        z = rnd.randn([x0.shape[0], *model.G.z_shape], dtype=x0.dtype)
        return translate_one_step(model.G, x0, z)
    if sampler == 'sde':
        steps = model.sde_steps if steps is None else int(steps)
        gamma = model.gamma if gamma is None else float(gamma)
        return sample_sde(model.f, x0, gamma, steps, randn_like=rnd.randn_like)
    raise GenerationError(f'sampler {sampler!r} does not apply to EOT snapshots; use one of {", ".join(EOT_SAMPLERS)}')


TranslationBatch = collections.namedtuple('TranslationBatch', ['index', 'repeat', 'seed', 'x', 'y'])
TranslationBatch.__doc__ = """One batch of translations: input indices [B], repeat numbers [B], seeds [B]
(int64 numpy), inputs x and outputs y (float32 tensors in model space, [B, *data_shape])."""


def iterate_translations(model, dataset, seeds=None, num=None, sampler='G', steps=None, gamma=None, repeats=1,
                         batch_size=64, device=torch.device('cpu'), rank=None, world_size=None, progress=False):
    """Translate the first `num` inputs of `dataset` (default all), `repeats` times each; this rank's share.

    Jobs are (input i, repeat r) in order i * repeats + r, with seed seeds[i] * repeats + r
    (seeds default to 0, 1, 2, ...). Batches of `batch_size` jobs are dealt round-robin across ranks, so
    outputs do not depend on the batch size or the number of ranks. Yields TranslationBatch.
    """
    if model.kind != 'eot':
        raise GenerationError(f'the network is of kind {model.kind}; translation needs an EOT snapshot (G, f, D)')
    if sampler not in EOT_SAMPLERS:
        raise GenerationError(f'sampler {sampler!r} does not apply to EOT snapshots; use one of {", ".join(EOT_SAMPLERS)}')
    num = len(dataset) if num is None else int(num)
    if not 1 <= num <= len(dataset):
        raise GenerationError(f'cannot translate {num} inputs: the data holds {len(dataset)}')
    seeds = list(range(num)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != num:
        raise GenerationError(f'{len(seeds)} seeds for {num} inputs: give one seed per input')
    job_seeds = repeat_seeds(seeds, repeats).reshape(-1)
    batches = rank_batches(num * repeats, batch_size, rank, world_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc=f'Translating ({sampler})', unit='batch', disable=dist.get_rank() != 0)
    for jobs in batches:
        index, repeat = jobs // repeats, jobs % repeats
        x = load_items(dataset, index, device)
        rnd = StackedRandomGenerator(device, job_seeds[jobs])
        y = translate(model, x, rnd, sampler, steps, gamma)
        yield TranslationBatch(index, repeat, job_seeds[jobs], x, y)

#----------------------------------------------------------------------------
# Sampling (denoisers: DPM-OT and plain samplers).

def iterate_samples(model, seeds, sampler='heun', steps=None, potential=None, topk=1, batch_size=64,
                    device=torch.device('cpu'), rank=None, world_size=None, progress=False, **dpmot_kwargs):
    """Sample a denoiser snapshot for `seeds`, this rank's share, through training.dpmot.generate_samples.

    `potential`: None (the plain sampler from noise) or a potential.pt path, loaded once here. `steps`:
    None for the default (18, or the potential's schedule). `dpmot_kwargs` (e.g. angle_threshold) go to
    training.dpmot.generate_samples. Batches of `batch_size` seeds are dealt
    round-robin across ranks; a sample depends only on its seed. Yields (seeds int64 [B], samples
    float32 [B, *data_shape] in model space, info dict with 'nfe').
    """
    if model.kind != 'denoiser':
        raise GenerationError(f'the network is of kind {model.kind}; sampler {sampler!r} needs a denoiser snapshot')
    if sampler not in DENOISER_SAMPLERS:
        raise GenerationError(f'sampler {sampler!r} does not apply to denoiser snapshots; use one of '
                              f'{", ".join(DENOISER_SAMPLERS)}')
    try:
        from training import dpmot
    except ModuleNotFoundError as err:
        if err.name != 'training.dpmot':
            raise
        raise GenerationError('sampling a denoiser needs training/dpmot.py (DPM-OT samplers), which this checkout '
                              'does not have') from None
    seeds = np.asarray(seeds, dtype=np.int64)
    try:
        if potential is not None:
            potential = dpmot.load_potential(potential)
            dpmot.check_potential(potential, model.ema, data_shape=model.data_shape)
    except ValueError as err: # dpmot.PotentialError
        raise GenerationError(f'--potential: {err}') from None
    batches = rank_batches(len(seeds), batch_size, rank, world_size)
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, desc=f'Sampling ({sampler})', unit='batch', disable=dist.get_rank() != 0)
    for jobs in batches:
        try:
            samples, info = dpmot.generate_samples(model.ema, [int(s) for s in seeds[jobs]], potential=potential,
                                                   sampler=sampler, steps=steps, topk=topk, device=device,
                                                   batch_size=len(jobs), **dpmot_kwargs)
        except ValueError as err: # Option errors of the samplers, with their own advice.
            raise GenerationError(str(err)) from None
        yield seeds[jobs], samples, info

#----------------------------------------------------------------------------
