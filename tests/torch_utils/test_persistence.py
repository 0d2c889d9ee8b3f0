"""torch_utils.persistence: pickles carry their source and load in a fresh process without it."""

import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import torch

from torch_utils import persistence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NET_SRC = textwrap.dedent('''
    import torch
    from torch_utils import persistence

    def helper(x):
        return torch.tanh(x) * 2

    @persistence.persistent_class
    class Inner(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.lin = torch.nn.Linear(n, n)
        def forward(self, x):
            return helper(self.lin(x))

    @persistence.persistent_class
    class Net(torch.nn.Module):
        def __init__(self, n, scale=1.0):
            super().__init__()
            self.inner = Inner(n)
            self.scale = scale
            self.register_buffer('offset', torch.arange(n, dtype=torch.float32))
            self.meta = {'kind': 'toy', 'n': n}
        def forward(self, x):
            return self.inner(x) * self.scale + self.offset
''')

LOAD_CODE = textwrap.dedent('''
    import pickle, sys, torch
    with open(sys.argv[1], 'rb') as f:
        data = pickle.load(f)
    net = data['net']
    out = net(data['x'])
    assert torch.equal(out, data['expected']), (out, data['expected'])
    assert net.meta == {'kind': 'toy', 'n': 3} and net.init_kwargs == {'scale': 0.5}
    assert type(net).__module__.startswith('_persistent_module_'), type(net).__module__
    print('LOADED', type(net).__name__)
''')


def _run(code, *args, cwd, pythonpath):
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.run([sys.executable, '-c', code, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_pickle_loads_in_fresh_process_after_source_is_changed_and_deleted(tmp_path):
    # Only torch_utils (and dnnlib) are importable in the loading process: a copy outside the repo.
    libs = tmp_path / 'libs'
    shutil.copytree(os.path.join(REPO, 'torch_utils'), libs / 'torch_utils', ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copytree(os.path.join(REPO, 'dnnlib'), libs / 'dnnlib', ignore=shutil.ignore_patterns('__pycache__'))
    src_dir = tmp_path / 'src'
    src_dir.mkdir()
    (src_dir / 'toy_net.py').write_text(NET_SRC)
    pkl = tmp_path / 'snapshot.pkl'
    make = textwrap.dedent('''
        import pickle, sys, torch, toy_net
        torch.manual_seed(0)
        net = toy_net.Net(3, scale=0.5)
        x = torch.randn(4, 3)
        with open(sys.argv[1], 'wb') as f:
            pickle.dump(dict(net=net, x=x, expected=net(x).detach()), f)
    ''')
    res = _run(make, pkl, cwd=src_dir, pythonpath=f'{src_dir}{os.pathsep}{libs}')
    assert res.returncode == 0, res.stderr

    # Changed source: the pickle still runs the code it was written with.
    (src_dir / 'toy_net.py').write_text(NET_SRC.replace('* 2', '* 1000'))
    res = _run(LOAD_CODE, pkl, cwd=tmp_path, pythonpath=f'{src_dir}{os.pathsep}{libs}')
    assert res.returncode == 0 and 'LOADED Net' in res.stdout, res.stderr
    # Deleted source, other working directory, only torch_utils importable.
    shutil.rmtree(src_dir)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    res = _run(LOAD_CODE, pkl, cwd=elsewhere, pythonpath=str(libs))
    assert res.returncode == 0 and 'LOADED Net' in res.stdout, res.stderr


def _import_file(directory, name, src):
    """Write `src` to directory/name.py and import it as a regular module."""
    import importlib.util
    path = directory / f'{name}.py'
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_state_round_trips_exactly_and_repickles(tmp_path):
    mod = _import_file(tmp_path, 'toy_net_roundtrip', NET_SRC)
    try:
        torch.manual_seed(1)
        net = mod.Net(3, scale=2.0)
        assert persistence.is_persistent(net) and persistence.is_persistent(mod.Net)
        blob = pickle.dumps(net)
        net2 = pickle.loads(blob)
        # Same source as a live module: the live class is used.
        assert type(net2) is type(net)
        for (n1, t1), (n2, t2) in zip(net.state_dict().items(), net2.state_dict().items()):
            assert n1 == n2 and torch.equal(t1, t2)
        assert net2.scale == 2.0 and net2.init_args == (3,) and net2.init_kwargs == {'scale': 2.0}
        # A re-pickled loaded object keeps its embedded source.
        assert pickle.loads(pickle.dumps(net2)).meta == net.meta
        # Another copy of the source (as from an older snapshot) loads into a private module.
        meta = dict(type='class', version=6, module_src=NET_SRC.replace('* self.scale', '* self.scale * 3'), class_name='Net',
                    state=dict(net.__getstate__()))
        old = persistence._reconstruct_persistent_obj(meta)
        assert type(old) is not type(net) and type(old).__module__.startswith('_persistent_module_')
        x = torch.randn(2, 3)
        assert torch.allclose(old(x) - net.offset, (net(x) - net.offset) * 3, atol=1e-6)
    finally:
        sys.modules.pop('toy_net_roundtrip', None)


EDM_STYLE_SRC = textwrap.dedent('''
    import numpy as np
    import torch
    from torch_utils import persistence
    from torch_utils import misc

    @persistence.persistent_class
    class EDMPrecondLike(torch.nn.Module):
        def __init__(self, img_resolution, img_channels, sigma_data=0.5):
            super().__init__()
            self.img_resolution = img_resolution
            self.img_channels = img_channels
            self.sigma_data = sigma_data
            self.model = torch.nn.Conv2d(img_channels, img_channels, 3, padding=1)
        def forward(self, x, sigma):
            misc.assert_shape(x, [None, self.img_channels, self.img_resolution, self.img_resolution])
            sigma = sigma.reshape(-1, 1, 1, 1)
            c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
            return c_skip * x + self.model(x)
''')


class _EDMFormatPickler:
    """Writes an object the way an NVlabs/edm snapshot does: a raw meta dict, version 6."""

    def __init__(self, state, class_name):
        self.state = state
        self.class_name = class_name

    def __reduce__(self):
        meta = dict(type='class', version=6, module_src=EDM_STYLE_SRC, class_name=self.class_name, state=self.state)
        return (persistence._reconstruct_persistent_obj, (meta,))


def test_loads_pickles_in_the_edm_snapshot_format(tmp_path):
    # Build the state the way the original code would: run the source, instantiate, take __dict__.
    mod = _import_file(tmp_path, 'edm_style_builder', EDM_STYLE_SRC)
    torch.manual_seed(0)
    net = mod.EDMPrecondLike(8, 3)
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 2.0])
    expected = net(x, sigma).detach()
    pkl = tmp_path / 'network-snapshot-000000.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump(dict(ema=_EDMFormatPickler(dict(net.__dict__), 'EDMPrecondLike'),
                         dataset_kwargs={'class_name': 'data.dataset.ImageFolderDataset'}), f)
    code = textwrap.dedent('''
        import pickle, sys, torch
        with open(sys.argv[1], 'rb') as f:
            net = pickle.load(f)['ema']
        x, sigma, expected = torch.load(sys.argv[2])
        assert torch.equal(net(x, sigma), expected)
        assert (net.img_resolution, net.img_channels, net.sigma_data) == (8, 3, 0.5)
        print('EDM OK')
    ''')
    torch.save((x, sigma, expected), tmp_path / 'io.pt')
    res = _run(code, pkl, tmp_path / 'io.pt', cwd=tmp_path, pythonpath=REPO)
    assert res.returncode == 0 and 'EDM OK' in res.stdout, res.stderr
