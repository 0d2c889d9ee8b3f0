"""Loading networks: pickled snapshots (`network-snapshot-*.pkl`, EOT or denoiser, ours or NVlabs/edm's)
and safe exports (weights + a JSON architecture, no code), and writing safe exports.
"""

import json
import os
import pickle
import re

import torch

import dnnlib
from models import diffusion_loss, eot_loss, networks  # noqa: F401 (the classes that snapshots hold)
from sampling import GenerationError
from torch_utils import persistence

EOT_SAMPLERS = ('G', 'sde')
DENOISER_SAMPLERS = ('euler', 'heun', 'langevin')
SAMPLERS = dict(eot=EOT_SAMPLERS, denoiser=DENOISER_SAMPLERS)
DEFAULT_SAMPLER = dict(eot='G', denoiser='heun')

EXPORT_FORMAT = 'eot-toolkit-safe-export'
EXPORT_VERSION = 1
EXPORT_JSON = 'network.json'
EXPORT_WEIGHTS = 'weights.pt'
NETWORK_MODULES = ('models.networks', 'training.networks') # The first is written; both are read.

#----------------------------------------------------------------------------

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
    """class_name + init_args + init_kwargs of one network, checked to be rebuildable from models.networks."""
    cls = type(net)
    if not persistence.is_persistent(cls):
        raise GenerationError(f'{name} is a {cls.__module__}.{cls.__qualname__}, not a persistent network class; '
                              'only networks of models.networks can be exported')
    class_name = cls._orig_class_name
    if not _allowed_network_class(networks, class_name):
        raise GenerationError(f'{name} is a {class_name}, which models.networks does not define; only its '
                              'networks can be exported (rebuilt from the current code)')
    arch = dict(class_name=f'models.networks.{class_name}', init_args=_json_or_none(list(net.init_args)),
                init_kwargs=_json_or_none(dict(net.init_kwargs)))
    if arch['init_args'] is None or arch['init_kwargs'] is None:
        raise GenerationError(f'{name}: its constructor arguments ({net.init_args}, {net.init_kwargs}) are not '
                              'JSON-serialisable, so it cannot be described without code')
    return arch

def export_safe(model, out_dir):
    """Write a code-free export of a loaded model: out_dir/weights.pt (state_dicts) + out_dir/network.json.

    The JSON holds, per network, `class_name` (in models.networks), `init_args` and `init_kwargs`,
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
    return isinstance(cls, type) and issubclass(cls, torch.nn.Module) and persistence.is_persistent(cls)

def _build_network(name, arch, where):
    if not isinstance(arch, dict):
        raise GenerationError(f'{where}: networks.{name} must be an object with class_name, init_args, init_kwargs')
    class_name = arch.get('class_name')
    short = None
    for prefix in NETWORK_MODULES: # Exports written before the move from training/ name training.networks.
        if isinstance(class_name, str) and class_name.startswith(prefix + '.'):
            short = class_name[len(prefix) + 1:]
    if short is None or not _allowed_network_class(networks, short):
        valid = sorted(k for k in networks.__dict__ if _allowed_network_class(networks, k))
        raise GenerationError(f'{where}: refusing to build {class_name!r} for {name}: a safe export may only name '
                              f'network classes of models.networks ({", ".join(valid)})')
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

    The JSON is parsed as data; classes are looked up in the current models.networks only; the
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
# Denoisers (potential.py).

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
        try:
            model = load_network(path)
        except GenerationError as err:
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

