"""Loading networks: pickled snapshots (`network-snapshot-*.pkl`, EOT or denoiser, ours or NVlabs/edm's)
and safe exports (weights + a JSON architecture, no code), and writing safe exports.
"""

import json
import math
import os
import pickle
import re
import urllib.parse

import torch

import dnnlib
from models import diffusion_loss, eot_loss, networks  # noqa: F401 (the classes that snapshots hold)
from sampling import GenerationError, outputs
from torch_utils import persistence

EOT_SAMPLERS = ('G', 'sde')
DENOISER_SAMPLERS = ('euler', 'heun', 'langevin')
SAMPLERS = dict(eot=EOT_SAMPLERS, denoiser=DENOISER_SAMPLERS, classifier=()) # Classifiers judge (fid.py), not sample.
DEFAULT_SAMPLER = dict(eot='G', denoiser='heun')
NETWORK_KEYS = dict(eot=('G', 'f', 'D'), denoiser=('ema',), classifier=('classifier',))
NEEDED_KEYS = dict(eot=('G', 'f'), denoiser=('ema',), classifier=('classifier',))

# The torch.nn layers a classifier's safe export may name (as a torch.nn.Sequential), with the attributes that
# rebuild each: plain data, no code.
SEQUENTIAL_LAYERS = dict(
    Conv2d=('in_channels', 'out_channels', 'kernel_size', 'stride', 'padding', 'dilation', 'groups', 'bias',
            'padding_mode'),
    Linear=('in_features', 'out_features', 'bias'), Flatten=('start_dim', 'end_dim'), Dropout=('p',),
    ReLU=(), SiLU=(), Tanh=(), Sigmoid=(), Identity=(), LeakyReLU=('negative_slope',), GELU=('approximate',),
    MaxPool2d=('kernel_size', 'stride', 'padding', 'dilation', 'ceil_mode'),
    AvgPool2d=('kernel_size', 'stride', 'padding', 'ceil_mode', 'count_include_pad'),
    AdaptiveAvgPool2d=('output_size',), BatchNorm2d=('num_features', 'eps', 'momentum', 'affine', 'track_running_stats'),
    GroupNorm=('num_groups', 'num_channels', 'eps', 'affine'))

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
        kind = ('denoiser' if 'ema' in data else 'eot' if 'G' in data and 'f' in data else
                'classifier' if 'classifier' in data else None)
    if kind not in SAMPLERS:
        raise GenerationError(f'{where}: unknown snapshot kind {kind!r} (keys: {", ".join(map(str, data))}); '
                              'expected an EOT snapshot (G, f, D), a denoiser snapshot (ema) or a classifier')
    needed = NEEDED_KEYS[kind]
    missing = [k for k in needed if k not in data]
    if missing:
        raise GenerationError(f'{where}: a {kind} snapshot needs the key(s) {", ".join(needed)}; '
                              f'{", ".join(missing)} missing')
    return kind

def data_shape_of(net, snapshot=None):
    """(C, H, W) or (D,) of the data a network works on: the snapshot's `data_shape` when it records one, else
    `net.data_shape`, else NVlabs/edm's `img_channels` and `img_resolution`. The one data-shape lookup."""
    if snapshot is not None and snapshot.get('data_shape') is not None:
        return tuple(int(s) for s in snapshot['data_shape'])
    if getattr(net, 'data_shape', None) is not None:
        return tuple(int(s) for s in net.data_shape)
    if getattr(net, 'img_resolution', None) is not None and getattr(net, 'img_channels', None) is not None:
        return (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
    raise GenerationError(f'cannot tell the data shape of {type(net).__name__}: the snapshot records no data_shape '
                          'and the network has neither `data_shape` nor edm\'s `img_channels` and `img_resolution`')

def as_model(data, source='<memory>', device=None):
    """The loaded model of a snapshot dict (what a network-snapshot-*.pkl holds; the networks may be live ones,
    as in training-time evaluation): an EasyDict with kind, nets {name: module} (eval, no gradients, on
    `device`; left where they are when None), data_shape, source, kimg, and for EOT G, f, D, gamma, sde_steps;
    for denoisers ema and label_dim (0: unconditional)."""
    kind = _snapshot_kind(data, source)
    nets = {k: data[k] for k in NETWORK_KEYS[kind] if data.get(k) is not None}
    for name, net in nets.items():
        if not isinstance(net, torch.nn.Module):
            raise GenerationError(f'{source}: snapshot[{name!r}] is a {type(net).__name__}, not a network')
    nets = {k: (v if device is None else v.to(device)).eval().requires_grad_(False) for k, v in nets.items()}
    main = nets[NEEDED_KEYS[kind][0]]
    shape = data.get('data_shape') if kind == 'classifier' else data_shape_of(main, data) # A classifier's is optional.
    model = dnnlib.EasyDict(kind=kind, nets=nets, source=source, data_shape=shape, kimg=data.get('kimg'))
    if kind == 'eot':
        model.update(G=nets['G'], f=nets['f'], D=nets.get('D'), gamma=float(data.get('gamma', 0.0)),
                     sde_steps=int(data.get('sde_steps', 10)))
    elif kind == 'denoiser':
        model.update(ema=nets['ema'], label_dim=int(getattr(nets['ema'], 'label_dim', 0) or 0))
    else:
        model.update(classifier=nets['classifier'])
    return model

def load_network(path, device=torch.device('cpu'), kind=None):
    """Load a pickled snapshot (path or URL) or a safe export (its folder or its network.json): the one
    snapshot loader of generate.py, potential.py (load_denoiser) and the benchmarks.

    Pickles run code when loaded: load only snapshots you trust (docs/safe-loading.md).
    `kind`: None, or 'eot' / 'denoiser' / 'classifier' to refuse a snapshot of another kind. A classifier (for
    fid.py's mode-mixture ratio) is a pickled torch.nn.Module, a pickled dict(kind='classifier', classifier=...)
    or the safe export of a torch.nn.Sequential of common layers (SEQUENTIAL_LAYERS).
    Returns as_model's EasyDict: kind, nets {name: module}, data_shape, source, kimg, and for EOT G, f, D,
    gamma, sde_steps; for denoisers ema and label_dim; for classifiers classifier.
    """
    path = os.fspath(path)
    if os.path.isdir(path) or path.lower().endswith('.json'):
        data, source = read_safe_export(path), os.path.join(path, EXPORT_JSON) if os.path.isdir(path) else path
    else:
        data, source = _read_pickle(path), path
        if isinstance(data, torch.nn.Module): # A bare pickled network: a classifier.
            data = dict(kind='classifier', classifier=data)
    found = _snapshot_kind(data, source)
    if kind is not None and found != kind:
        what = dict(eot='an EOT snapshot (G, f, D) of train.py', classifier='a classifier (a pickled network)',
                    denoiser='a denoiser under the key "ema" (train.py --kind=denoiser, or NVlabs/edm)')
        raise GenerationError(f'"{path}" holds {what[found]}; pass {what[kind]}')
    return as_model(data, source=source, device=device)

def plain_http_warning(spec, option):
    """A one-line warning when `spec` is a pickle to fetch over plain http (None otherwise): a pickle runs code when
    loaded, and anyone on the network path can replace what plain http carries. The scripts print it."""
    if not isinstance(spec, str) or urllib.parse.urlparse(spec).scheme != 'http':
        return None
    return (f'Warning: {option}={spec} is a pickle fetched over plain http: loading it runs its code, and anyone on '
            'the network path can replace it; use https or a local copy you trust (docs/safe-loading.md)')

def _read_pickle(path):
    if not dnnlib.util.is_url(path) and not os.path.isfile(path):
        raise GenerationError(f'--network: no such file or folder: "{path}"')
    try:
        with dnnlib.util.open_url(path) as f:
            return pickle.load(f)
    except (OSError, dnnlib.util.DownloadError) as err:
        raise GenerationError(f'--network: cannot read "{path}": {err}') from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as err:
        raise GenerationError(f'"{path}" is not a readable network snapshot (cannot unpickle: {type(err).__name__}: '
                              f'{err}); pass a network-snapshot-*.pkl of train.py or NVlabs/edm (training-state-*.pt '
                              'files are for --resume, not generation)') from None

def _json_or_none(value):
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return None

def _plain(value):
    """A layer attribute as JSON data: bias parameters become True / False, tuples lists."""
    if isinstance(value, torch.nn.Parameter) or value is None:
        return value is not None
    return list(value) if isinstance(value, tuple) else value

def _sequential_architecture(name, net):
    layers = []
    for i, layer in enumerate(net):
        kind = type(layer)
        if kind.__module__.split('.')[:2] != ['torch', 'nn'] or kind.__name__ not in SEQUENTIAL_LAYERS:
            raise GenerationError(f'{name}[{i}] is a {kind.__module__}.{kind.__qualname__}; a classifier\'s safe export '
                                  f'may hold only torch.nn.{", ".join(SEQUENTIAL_LAYERS)}')
        layers.append(dict(class_name=f'torch.nn.{kind.__name__}',
                           init_kwargs={k: _plain(getattr(layer, k)) for k in SEQUENTIAL_LAYERS[kind.__name__]}))
    return dict(class_name='torch.nn.Sequential', layers=layers)

def _architecture(name, net):
    """class_name + init_args + init_kwargs of one network, checked to be rebuildable from models.networks (or,
    for a classifier, the layers of a torch.nn.Sequential)."""
    cls = type(net)
    if cls is torch.nn.Sequential:
        return _sequential_architecture(name, net)
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
                networks=arch, data_shape=None if model.data_shape is None else list(model.data_shape),
                kimg=model.kimg, source=str(model.source))
    if model.kind == 'eot':
        desc.update(gamma=model.gamma, sde_steps=model.sde_steps)
    outputs.make_output_dir(out_dir, '--export-safe')
    weights = {name: {k: v.detach().cpu() for k, v in net.state_dict().items()} for name, net in model.nets.items()}
    with dnnlib.util.atomic_write(os.path.join(out_dir, EXPORT_WEIGHTS), 'wb') as f:
        torch.save(weights, f)
    json_path = os.path.join(out_dir, EXPORT_JSON)
    with dnnlib.util.atomic_write(json_path, 'w') as f:
        json.dump(desc, f, indent=2)
    # Round trip: the current code must rebuild every network with exactly these weights.
    rebuilt = load_network(json_path)
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

def _build_sequential(name, arch, where):
    layers = arch.get('layers')
    if not isinstance(layers, list):
        raise GenerationError(f'{where}: networks.{name}: a torch.nn.Sequential needs a list of "layers"')
    built = []
    for i, layer in enumerate(layers):
        class_name = layer.get('class_name') if isinstance(layer, dict) else None
        short = class_name[len('torch.nn.'):] if isinstance(class_name, str) and class_name.startswith('torch.nn.') else None
        kwargs = layer.get('init_kwargs', {}) if isinstance(layer, dict) else None
        if short not in SEQUENTIAL_LAYERS or not isinstance(kwargs, dict) or set(kwargs) - set(SEQUENTIAL_LAYERS[short]):
            raise GenerationError(f'{where}: refusing to build {class_name!r} as layer {i} of {name}: a classifier may '
                                  f'hold only torch.nn.{", ".join(SEQUENTIAL_LAYERS)}, with their own arguments')
        try:
            built.append(getattr(torch.nn, short)(**kwargs))
        except (TypeError, ValueError, RuntimeError) as err:
            raise GenerationError(f'{where}: cannot build layer {i} of {name} = {short}(**{kwargs}): {err}') from None
    return torch.nn.Sequential(*built)

class _BigTensorsOnMeta(torch.overrides.TorchFunctionMode):
    """Tensor factories (empty, zeros, randn, ...) of more than 4096 elements make meta tensors, which take no
    memory; small ones stay real, so that constructors computing with scalars still run. Builds a network's
    skeleton to read its size before anything is allocated."""

    FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.randn, torch.rand, torch.full}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get('device') is None and args:
            size = args[0] if isinstance(args[0], (tuple, list, torch.Size)) else args
            if all(isinstance(s, int) for s in size) and math.prod(size) > 4096:
                kwargs['device'] = 'meta'
        return func(*args, **kwargs)

def _check_size(nets_arch, weights, where):
    """Refuse a description whose networks need more bytes than the weights it comes with (an edited network.json
    asking for 720 GB must fail here, not in the allocator): each network is first built as a skeleton."""
    limit = sum(t.numel() * t.element_size() for sd in weights.values() if isinstance(sd, dict)
                for t in sd.values() if torch.is_tensor(t))
    total = 0
    for name, arch in nets_arch.items():
        try:
            with _BigTensorsOnMeta():
                skeleton = _build_network(name, arch, where)
        except (RuntimeError, NotImplementedError) as err:
            raise GenerationError(f'{where}: cannot size {name} before building it ({err})') from None
        total += sum(t.numel() * t.element_size() for t in skeleton.state_dict().values())
    if total > limit:
        raise GenerationError(f'{where}: its networks would take {total / 2**30:,.1f} GiB, more than its weights file '
                              f'holds ({limit / 2**20:,.1f} MiB); a description may ask for no more than the weights it '
                              'comes with (the JSON was edited or does not belong to this weights.pt)')

def _build_network(name, arch, where):
    if not isinstance(arch, dict):
        raise GenerationError(f'{where}: networks.{name} must be an object with class_name, init_args, init_kwargs')
    if arch.get('class_name') == 'torch.nn.Sequential' and name == 'classifier':
        return _build_sequential(name, arch, where)
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
                              f'models/networks.py: {err}') from None

def read_safe_export(path):
    """The snapshot dict of an export written by `export_safe` (its folder or network.json), read without
    running any code from it: the JSON is parsed as data, classes are looked up in the current
    models.networks only, the weights load with torch.load(weights_only=True). load_network reads exports
    with this."""
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
        raise GenerationError(f'{json_path}: unknown kind {kind!r}; expected "eot", "denoiser" or "classifier"')
    weights_name = desc.get('weights', EXPORT_WEIGHTS)
    if not isinstance(weights_name, str) or os.path.basename(weights_name) != weights_name or weights_name in ('', '.', '..'):
        raise GenerationError(f'{json_path}: "weights" must be a file name beside the JSON; got {weights_name!r}')
    arch = desc.get('networks')
    needed = NEEDED_KEYS[kind]
    if not isinstance(arch, dict) or any(k not in arch for k in needed) or set(arch) - set(NETWORK_KEYS[kind]):
        raise GenerationError(f'{json_path}: "networks" must describe {", ".join(needed)} for kind {kind!r}')
    weights_path = os.path.join(os.path.dirname(os.path.abspath(json_path)), weights_name)
    try:
        weights = torch.load(weights_path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise GenerationError(f'{json_path}: its weights file "{weights_path}" is missing') from None
    except Exception as err: # UnpicklingError for anything but tensors and containers, zip errors, ...
        raise GenerationError(f'{weights_path}: cannot load with weights_only=True ({type(err).__name__}: {err})') from None
    if not isinstance(weights, dict) or any(not isinstance(weights.get(name), dict) for name in arch):
        raise GenerationError(f'{weights_path}: expected a dict of state_dicts for {", ".join(arch)}')
    _check_size(arch, weights, json_path)
    nets = {name: _build_network(name, a, json_path) for name, a in arch.items()}
    for name, net in nets.items():
        try:
            net.load_state_dict(weights[name], strict=True)
        except RuntimeError as err:
            raise GenerationError(f'{weights_path}: the weights of {name} do not fit the network described in the '
                                  f'JSON: {err}') from None
    return dict(desc, **nets)

#----------------------------------------------------------------------------
# Denoisers (potential.py).

def load_denoiser(path, device=torch.device('cpu')):
    """(net, model) of a denoiser snapshot (ours or NVlabs/edm's) or of its safe export: `load_network` and a
    check of the kind. `model` is load_network's EasyDict (kimg, data_shape, label_dim, ...)."""
    model = load_network(path, device, kind='denoiser')
    return model.ema, model
