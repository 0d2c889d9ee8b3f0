"""generate.py and sampling/ (rng, snapshots, translation): per-sample seeding, batch/rank invariance, outputs checked
against direct network calls, errors, loading from elsewhere with changed code, safe exports."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
import train
from tests.conftest import write_image_zip, write_vector_npz
from tests.launch import torchrun
from sampling import GenerationError
from sampling import rng

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One intra-op thread: on a shared, loaded CPU, torch's thread pool is slower than one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

#----------------------------------------------------------------------------
# Tiny snapshots, made once per module by train.py (one tick), then given large random weights so that
# outputs depend visibly on the inputs and the noise.

def _train_one_tick(tmp, data1, data2, net_opts, *extra):
    args = [*extra, f'--outdir={tmp / "runs"}', '--name=t', '--batch=4', '--model_channels=4', f'--net-opts={net_opts}',
            '--G_iters=1', '--f_iters=1', '--D_iters=1', '--gamma=0.3', '--lr-rampup=0', '--workers=0', '--seed=1',
            '--device=cpu', '--no-tensorboard', '--duration=0.000004', '--nosubdir', '--sde-steps=3',
            f'--data1train={data1}', f'--data2train={data2}']
    res = CliRunner().invoke(train.main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    path = tmp / 'runs' / 'network-snapshot-0000000004.pkl'
    with open(path, 'rb') as f:
        snap = pickle.load(f)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ('G', 'f', 'D'):
            for p in snap[name].parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    out = tmp / 'snapshot.pkl'
    with open(out, 'wb') as f:
        pickle.dump(snap, f)
    return str(out)


@pytest.fixture(scope='module')
def image_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('gen_images')
    data1 = write_image_zip(tmp / 'a.zip', 12, seed=1, offset=-0.1)
    data2 = write_image_zip(tmp / 'b.zip', 12, seed=2, offset=0.1)
    test1 = write_image_zip(tmp / 'a_test.zip', 8, seed=3, offset=-0.1)
    snap = _train_one_tick(tmp, data1, data2, '{"num_blocks": 1, "attn_resolutions": [], "dropout": 0}')
    return dict(tmp=tmp, snap=snap, data=test1)


@pytest.fixture(scope='module')
def vector_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('gen_vectors')
    data1 = write_vector_npz(tmp / 'a.npz', 64, dim=3, seed=1, mean=-1.0)
    data2 = write_vector_npz(tmp / 'b.npz', 64, dim=3, seed=2, mean=1.0)
    snap = _train_one_tick(tmp, data1, data2, '{"depth": 2}')
    return dict(tmp=tmp, snap=snap, data=data1)


def _generate(*args, expect_ok=True):
    res = CliRunner().invoke(generate.main, ['--device=cpu', *map(str, args)])
    if expect_ok:
        assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def _pngs(outdir):
    names = sorted(n for n in os.listdir(outdir) if n.endswith('.png') and n != 'grid.png')
    return {n: np.asarray(PIL.Image.open(os.path.join(outdir, n))) for n in names}

#----------------------------------------------------------------------------
# Per-sample random numbers.

def test_stacked_generator_is_independent_of_the_batch_size():
    seeds = [5, 0, 17, 3, 3, 99, 1234567, 2**62]
    def draw(batch):
        parts = []
        for i in range(0, len(seeds), batch):
            rnd = rng.StackedRandomGenerator('cpu', seeds[i:i + batch])
            a = rnd.randn([len(rnd), 2, 3])
            b = rnd.randn_like(torch.zeros(len(rnd), 4, dtype=torch.float64))
            c = rnd.rand([len(rnd), 5])
            parts.append(torch.cat([a.flatten(1), b.float().flatten(1), c], dim=1))
        return torch.cat(parts)
    reference = draw(1)
    for batch in (3, 8):
        assert torch.equal(draw(batch), reference), batch
    # Independently: sample i's numbers are exactly those of a lone generator seeded with seeds[i].
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        expect = torch.cat([torch.randn(6, generator=g), torch.randn(4, generator=g).double().float(),
                            torch.rand(5, generator=g)])
        assert torch.equal(reference[i], expect), i
    assert torch.equal(reference[3], reference[4]) # Same seed, same noise.


def test_parse_int_list_and_rank_batches():
    assert rng.parse_int_list('0-3,7,10-11') == [0, 1, 2, 3, 7, 10, 11]
    for bad in ('3-1', 'a', '-1', '1,,2'):
        with pytest.raises(GenerationError, match='--seeds'):
            rng.parse_int_list(bad)
    for world in (1, 2, 3):
        got = np.concatenate([b for r in range(world) for b in rng.rank_batches(10, 3, r, world)])
        assert sorted(got.tolist()) == list(range(10))
    assert rng.repeat_seeds([4, 7], 3).tolist() == [[12, 13, 14], [21, 22, 23]]

#----------------------------------------------------------------------------
# Images.

def _expected_images(snap_path, data, seeds, sampler, steps=None, indices=None):
    """Outputs computed directly from the snapshot's networks, one sample at a time (input indices[k], seeds[k])."""
    from torch_utils.images import to_uint8
    from data.dataset import open_dataset
    from sampling.translation import sample_sde
    with open(snap_path, 'rb') as f:
        snap = pickle.load(f)
    ds = open_dataset(data)
    out = []
    for i, seed in zip(range(len(seeds)) if indices is None else indices, seeds):
        x = torch.as_tensor(ds[i][0])[None].float() / 127.5 - 1
        g = torch.Generator().manual_seed(seed)
        if sampler == 'G':
            y = snap['G'](x, torch.randn([1, *snap['G'].z_shape], generator=g))
        else:
            y = sample_sde(snap['f'], x, snap['gamma'], steps or snap['sde_steps'],
                           randn_like=lambda t: torch.randn(t.shape, generator=g))
        out.append(to_uint8(y)[0].permute(1, 2, 0).numpy())
    return out


@pytest.mark.parametrize('sampler', ['G', 'sde'])
def test_images_match_direct_calls_for_every_batch_size(image_setup, sampler, tmp_path):
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    results = []
    for batch in (1, 3, 8):
        outdir = tmp_path / f'b{batch}'
        _generate(f'--network={image_setup["snap"]}', f'--data={image_setup["data"]}', f'--outdir={outdir}',
                  f'--sampler={sampler}', f'--batch={batch}', '--seeds=11-18', *(['--grid'] if batch == 3 else []))
        results.append(_pngs(outdir))
    assert list(results[0]) == [f'{i:06d}.png' for i in range(8)]
    for other in results[1:]:
        assert all(np.array_equal(results[0][k], other[k]) for k in results[0])
    expected = _expected_images(image_setup['snap'], image_setup['data'], seeds, sampler)
    for k, exp in enumerate(expected):
        got = results[0][f'{k:06d}.png']
        assert np.abs(got.astype(int) - exp.astype(int)).max() <= 1, k # Batched vs lone conv: float ulps.
    assert np.mean([np.array_equal(results[0][f'{k:06d}.png'], e) for k, e in enumerate(expected)]) >= 0.75
    assert len({results[0][k].tobytes() for k in results[0]}) == 8 # Non-trivial outputs.
    grid = np.asarray(PIL.Image.open(tmp_path / 'b3' / 'grid.png'))
    assert grid.shape == (2 * 8, 8 * 8, 3) # Inputs row + one output row, 8 columns of 8x8 images.
    assert np.array_equal(grid[8:16, 8:16], results[0]['000001.png'])


def test_image_repeats_and_max(image_setup, tmp_path):
    _generate(f'--network={image_setup["snap"]}', f'--data={image_setup["data"]}', f'--outdir={tmp_path}',
              '--max=3', '--repeats=2', '--grid')
    pngs = _pngs(tmp_path)
    assert sorted(pngs) == [f'{i:06d}-{r:02d}.png' for i in range(3) for r in range(2)]
    # Default seeds 0, 1, 2: repeat r of input i uses seed 2 i + r.
    expected = _expected_images(image_setup['snap'], image_setup['data'], [1, 4, 5], 'G', indices=[0, 2, 2])
    for (i, r), exp in zip([(0, 1), (2, 0), (2, 1)], expected):
        assert np.abs(pngs[f'{i:06d}-{r:02d}.png'].astype(int) - exp.astype(int)).max() <= 1
    assert np.asarray(PIL.Image.open(tmp_path / 'grid.png')).shape == (3 * 8, 3 * 8, 3)

#----------------------------------------------------------------------------
# Vectors.

def test_vector_repeats_shape_and_values(vector_setup, tmp_path):
    _generate(f'--network={vector_setup["snap"]}', f'--data={vector_setup["data"]}', f'--outdir={tmp_path}',
              '--max=10', '--repeats=4', '--seeds=100-109', '--batch=7', '--grid')
    out = np.load(tmp_path / 'samples.npz')
    assert out['x'].shape == (10, 3) and out['y'].shape == (10, 4, 3) and out['seeds'].shape == (10, 4)
    data = np.load(vector_setup['data'])['x']
    assert np.array_equal(out['x'], data[:10])
    assert out['seeds'][2, 3] == 102 * 4 + 3
    with open(vector_setup['snap'], 'rb') as f:
        G = pickle.load(f)['G']
    for i, r in [(0, 0), (2, 3), (9, 1)]:
        z = torch.randn([1, *G.z_shape], generator=torch.Generator().manual_seed(int(out['seeds'][i, r])))
        expect = G(torch.as_tensor(data[i:i + 1]), z)[0].detach().numpy()
        np.testing.assert_allclose(out['y'][i, r], expect, rtol=1e-5, atol=1e-6)
    assert np.std(out['y'][0], axis=0).min() > 1e-3 # The repeats differ: G uses its noise.
    assert (tmp_path / 'grid.png').is_file()


def test_kinetic_snapshot_samples_the_sde_with_its_velocity_drift(tmp_path):
    data1 = write_vector_npz(tmp_path / 'a.npz', 64, dim=3, seed=1, mean=-1.0)
    data2 = write_vector_npz(tmp_path / 'b.npz', 64, dim=3, seed=2, mean=1.0)
    snap_path = _train_one_tick(tmp_path, data1, data2, '{"depth": 2}', '--G-loss=kinetic')
    with open(snap_path, 'rb') as f:
        snap = pickle.load(f)
    assert snap['G_loss'] == 'kinetic' and type(snap['f']).__name__ == 'VelocityDrift'
    export = tmp_path / 'export'
    _generate(f'--network={snap_path}', f'--export-safe={export}')
    assert json.loads((export / 'network.json').read_text())['networks']['f']['class_name'] == \
        'models.networks.VelocityDrift'
    outs = []
    for network in (snap_path, export):
        outdir = tmp_path / f'out{len(outs)}'
        _generate(f'--network={network}', f'--data={data1}', f'--outdir={outdir}', '--max=6', '--seeds=20-25',
                  '--sampler=sde', '--batch=4')
        outs.append(np.load(outdir / 'samples.npz'))
    assert np.array_equal(outs[0]['y'], outs[1]['y'])
    # Against the SDE run by hand with the snapshot's f and each input's own seeded noise.
    from sampling.translation import sample_sde
    x = torch.as_tensor(np.load(data1)['x'][:6])
    for i in range(6):
        g = torch.Generator().manual_seed(20 + i)
        expect = sample_sde(snap['f'], x[i:i + 1], snap['gamma'], snap['sde_steps'],
                            randn_like=lambda a: torch.randn(a.shape, generator=g))
        np.testing.assert_allclose(outs[0]['y'][i, 0], expect[0].numpy(), rtol=1e-5, atol=1e-6)
    assert np.std(outs[0]['y'], axis=0).min() > 1e-3


def test_two_processes_give_the_single_process_result(vector_setup, tmp_path):
    args = [f'--network={vector_setup["snap"]}', f'--data={vector_setup["data"]}', '--count=9', '--repeats=2',
            '--batch=2', '--sampler=sde', '--device=cpu']
    _generate(*args, f'--outdir={tmp_path / "one"}')
    torchrun(os.path.join(REPO, 'generate.py'), *args, f'--outdir={tmp_path / "two"}', nproc=2)
    one, two = np.load(tmp_path / 'one' / 'samples.npz'), np.load(tmp_path / 'two' / 'samples.npz')
    for key in ('x', 'y', 'seeds'):
        assert np.array_equal(one[key], two[key]), key

#----------------------------------------------------------------------------
# Errors.

def _denoiser_snapshot(path):
    import dnnlib
    from models.networks import denoiser_kwargs
    net = dnnlib.util.construct_class_by_name(**denoiser_kwargs([3], model_channels=2, depth=1)).eval()
    with open(path, 'wb') as f:
        pickle.dump(dict(kind='denoiser', ema=net), f)
    return str(path)


def test_wrong_kind_wrong_shape_and_bad_options_fail_before_any_output(image_setup, vector_setup, tmp_path):
    out = tmp_path / 'out'
    den = _denoiser_snapshot(tmp_path / 'den.pkl')
    other = tmp_path / 'list.pkl'
    other.write_bytes(pickle.dumps([1, 2]))
    small = write_image_zip(tmp_path / 'small.zip', 2, resolution=4)
    img, vec = image_setup['snap'], vector_setup['snap']
    cases = [
        ([f'--network={den}', '--sampler=G', f'--data={vector_setup["data"]}'], '--sampler=G applies to snapshots of kind eot'),
        ([f'--network={img}', '--sampler=heun', f'--data={image_setup["data"]}'], 'use --sampler=G|sde'),
        ([f'--network={den}', f'--data={vector_setup["data"]}'], '--data does not apply to denoiser'),
        ([f'--network={img}', f'--data={small}'], 'holds items of shape [3, 4, 4]'),
        ([f'--network={img}', f'--data={vector_setup["data"]}'], 'trained on images of shape'),
        ([f'--network={vec}', f'--data={image_setup["data"]}'], 'trained on vectors of dimension [3]'),
        ([f'--network={img}'], '--data is required'),
        ([f'--network={img}', f'--data={image_setup["data"]}', '--seeds=0-3'], 'gives 4 seeds for 8 inputs'),
        ([f'--network={img}', f'--data={image_setup["data"]}', '--seeds=5-2'], 'is empty'),
        ([f'--network={img}', f'--data={image_setup["data"]}', '--gamma=1'], 'apply to --sampler=sde only'),
        ([f'--network={other}', f'--data={image_setup["data"]}'], 'not a snapshot dict'),
        ([f'--network={tmp_path / "nope.pkl"}', f'--data={image_setup["data"]}'], 'no such file'),
    ]
    for args, expect in cases:
        res = _generate(*args, f'--outdir={out}', expect_ok=False)
        assert res.exit_code != 0 and expect in res.output, (args, res.output)
        assert not out.exists(), args


def test_denoiser_snapshot_samples_through_dpmot(tmp_path):
    pytest.importorskip('sampling.dpmot')
    den = _denoiser_snapshot(tmp_path / 'den.pkl')
    for batch in (1, 3):
        _generate(f'--network={den}', f'--outdir={tmp_path / str(batch)}', '--seeds=3-7', '--sampler=euler',
                  '--steps=2', f'--batch={batch}')
    a, b = np.load(tmp_path / '1' / 'samples.npz'), np.load(tmp_path / '3' / 'samples.npz')
    assert a['y'].shape == (5, 3) and a['seeds'].tolist() == [3, 4, 5, 6, 7] and 'x' not in a
    assert np.array_equal(a['y'], b['y'])

#----------------------------------------------------------------------------
# Loading from elsewhere, after the code changed.

def test_snapshot_loads_from_another_directory_after_the_code_changed(image_setup, tmp_path):
    _generate(f'--network={image_setup["snap"]}', f'--data={image_setup["data"]}', f'--outdir={tmp_path / "here"}',
              '--max=4', '--sampler=sde')
    # A copy of the code whose networks.py has changed: its G and f now fail if called.
    copy = tmp_path / 'code'
    for name in ('dnnlib', 'torch_utils', 'data', 'models', 'transport', 'metrics', 'sampling', 'training'):
        shutil.copytree(os.path.join(REPO, name), copy / name, ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copy(os.path.join(REPO, 'generate.py'), copy / 'generate.py')
    src = (copy / 'models' / 'networks.py').read_text()
    src = src.replace("_check_input(x, self.data_shape, 'f')", "raise RuntimeError('changed code ran')")
    src = src.replace("_check_input(x, self.data_shape, 'G')", "raise RuntimeError('changed code ran')")
    assert src.count('changed code ran') == 4
    (copy / 'models' / 'networks.py').write_text(src)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['OMP_NUM_THREADS'] = '1'
    res = subprocess.run([sys.executable, str(copy / 'generate.py'), f'--network={image_setup["snap"]}',
                          f'--data={image_setup["data"]}', '--outdir=there', '--max=4', '--sampler=sde',
                          '--device=cpu'], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    here, there = _pngs(tmp_path / 'here'), _pngs(elsewhere / 'there')
    assert list(here) == list(there) and all(np.array_equal(here[k], there[k]) for k in here)

#----------------------------------------------------------------------------
# Safe exports.

@pytest.mark.parametrize('which', ['image', 'vector'])
def test_safe_export_gives_bit_identical_outputs(image_setup, vector_setup, which, tmp_path):
    setup = image_setup if which == 'image' else vector_setup
    export = tmp_path / 'export'
    res = _generate(f'--network={setup["snap"]}', f'--export-safe={export}')
    assert 'safe export' in res.output
    desc = json.loads((export / 'network.json').read_text())
    assert desc['kind'] == 'eot' and desc['gamma'] == pytest.approx(0.3) and desc['sde_steps'] == 3
    assert set(desc['networks']) == {'G', 'f', 'D'}
    assert all(a['class_name'].startswith('models.networks.') for a in desc['networks'].values())
    weights = torch.load(export / 'weights.pt', weights_only=True)
    assert set(weights) == {'G', 'f', 'D'}
    for sampler in ('G', 'sde'):
        outs = []
        for network in (setup['snap'], export, export / 'network.json'):
            outdir = tmp_path / f'{sampler}-{len(outs)}'
            _generate(f'--network={network}', f'--data={setup["data"]}', f'--outdir={outdir}', '--max=5',
                      f'--sampler={sampler}', '--repeats=2')
            outs.append(_pngs(outdir) if which == 'image' else dict(np.load(outdir / 'samples.npz')))
        for other in outs[1:]:
            assert list(other) == list(outs[0]) and all(np.array_equal(outs[0][k], other[k]) for k in outs[0])


def test_safe_export_refuses_classes_outside_training_networks(image_setup, tmp_path):
    export = tmp_path / 'export'
    _generate(f'--network={image_setup["snap"]}', f'--export-safe={export}')
    desc = json.loads((export / 'network.json').read_text())
    marker = tmp_path / 'pwned'
    for class_name in ('os.system', 'torch.nn.Linear', 'models.networks.torch', 'models.networks._zero_',
                       'models.networks.per_sample', 'models.networks.__class__'):
        bad = json.loads(json.dumps(desc))
        bad['networks']['G'] = dict(class_name=class_name, init_args=[f'touch {marker}'], init_kwargs={})
        (export / 'network.json').write_text(json.dumps(bad))
        res = _generate(f'--network={export}', f'--data={image_setup["data"]}', f'--outdir={tmp_path / "o"}',
                        expect_ok=False)
        assert res.exit_code != 0 and 'refusing to build' in res.output and class_name in res.output, res.output
    assert not marker.exists() and not (tmp_path / 'o').exists()
    # A weights file that holds code (a pickled object) is refused by weights_only loading.
    (export / 'network.json').write_text(json.dumps(desc))
    torch.save(dict(G=GenerationError('x')), export / 'weights.pt')
    res = _generate(f'--network={export}', f'--data={image_setup["data"]}', f'--outdir={tmp_path / "o"}',
                    expect_ok=False)
    assert res.exit_code != 0 and 'weights_only=True' in res.output, res.output
