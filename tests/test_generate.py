"""generate.py and sampling/ (rng, snapshots, translation): per-sample seeding, batch/rank invariance, outputs checked
against direct network calls, errors, loading from elsewhere with changed code, safe exports."""

import glob
import json
import os
import pickle
import re
import shlex
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
            a = rnd.randn([len(rnd), 4, 5])
            b = rnd.randn_like(torch.zeros(len(rnd), 20, dtype=torch.float64))
            c = rnd.rand([len(rnd), 17])
            d = rnd.randint(10, [len(rnd)])
            parts.append(torch.cat([a.double().flatten(1), b, c.double(), d.double()[:, None]], dim=1))
        return torch.cat(parts)
    reference = draw(1)
    for batch in (3, 8):
        assert torch.equal(draw(batch), reference), batch
    # Independently: sample i's numbers are exactly those of a lone generator seeded with seeds[i], float32
    # draws for randn / rand, draws in the argument's dtype (here float64) for randn_like, as edm makes them.
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(s)
        expect = torch.cat([torch.randn(20, generator=g).double(), torch.randn(20, generator=g, dtype=torch.float64),
                            torch.rand(17, generator=g).double(), torch.randint(10, [1], generator=g).double()])
        assert torch.equal(reference[i], expect), i
    assert torch.equal(reference[3], reference[4]) # Same seed, same noise.
    # float64 draws are another stream than float32 ones (>= 16 values take torch's vectorised path).
    g32, g64 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert not torch.equal(torch.randn(20, generator=g32).double(), torch.randn(20, generator=g64, dtype=torch.float64))


def test_one_seed_range_and_only_32_bits_of_a_seed_matter():
    # Every seed the two earlier generators took ([0, 2^63) and [-2^63, 2^64)) is taken, with the same draws:
    # torch's CPU generator keeps the low 32 bits, so s, s + 2^32, s - 2^64 and 2^64 - 1 + s + 1 draw alike.
    def first(seed):
        return rng.StackedRandomGenerator('cpu', [seed]).randn([1, 20])
    for s in (0, 7, 2**32 - 1):
        for alias in (s + 2**32, s + 2**40, s + 2**63 if s + 2**63 < 2**64 else s, s - 2**63 if s else -2**32):
            assert torch.equal(first(alias), first(s)), (s, alias)
    assert torch.equal(first(-1), first(2**64 - 1)) and torch.equal(first(-1), first(2**32 - 1))
    assert not torch.equal(first(1), first(2))
    for bad in (2**64, -2**63 - 1, 0.5, True, '3'):
        with pytest.raises(GenerationError, match=r'seeds are integers in \[-2\^63, 2\^64\)'):
            rng.StackedRandomGenerator('cpu', [bad])
    assert rng.check_seeds(np.arange(3)) == [0, 1, 2] and rng.check_seeds(range(2**64 - 2, 2**64)) == [2**64 - 2, 2**64 - 1]


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
    grid = np.asarray(PIL.Image.open(tmp_path / 'b3-grid.png'))            # beside the folder, not in it
    assert grid.shape == (2 * 8, 8 * 8, 3) # Inputs row + one output row, 8 columns of 8x8 images.
    assert np.array_equal(grid[8:16, 8:16], results[0]['000001.png'])


def test_image_repeats_and_max(image_setup, tmp_path):
    _generate(f'--network={image_setup["snap"]}', f'--data={image_setup["data"]}', f'--outdir={tmp_path / "out"}',
              '--max=3', '--repeats=2', '--grid', f'--npz={tmp_path / "batch.npz"}')
    pngs = _pngs(tmp_path / 'out')
    assert sorted(os.listdir(tmp_path / 'out')) == sorted(pngs)          # nothing but the outputs in --outdir
    batch = np.load(tmp_path / 'batch.npz')
    assert batch.files == ['arr_0'] and np.array_equal(batch['arr_0'], np.stack(list(pngs.values())))
    assert sorted(pngs) == [f'{i:06d}-{r:02d}.png' for i in range(3) for r in range(2)]
    # Default seeds 0, 1, 2: repeat r of input i uses seed 2 i + r.
    expected = _expected_images(image_setup['snap'], image_setup['data'], [1, 4, 5], 'G', indices=[0, 2, 2])
    for (i, r), exp in zip([(0, 1), (2, 0), (2, 1)], expected):
        assert np.abs(pngs[f'{i:06d}-{r:02d}.png'].astype(int) - exp.astype(int)).max() <= 1
    assert np.asarray(PIL.Image.open(tmp_path / 'out-grid.png')).shape == (3 * 8, 3 * 8, 3)

#----------------------------------------------------------------------------
# Vectors.

def test_vector_repeats_shape_and_values(vector_setup, tmp_path):
    _generate(f'--network={vector_setup["snap"]}', f'--data={vector_setup["data"]}', f'--outdir={tmp_path / "out"}',
              '--max=10', '--repeats=4', '--seeds=100-109', '--batch=7', f'--grid={tmp_path / "scatter.png"}')
    out = np.load(tmp_path / 'out' / 'samples.npz')
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
    assert (tmp_path / 'scatter.png').is_file()


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
    classifier = tmp_path / 'clf.pkl'
    classifier.write_bytes(pickle.dumps(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2))))
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
        ([f'--network={vec}', f'--data={vector_setup["data"]}', f'--npz={tmp_path / "b.npz"}'], '--npz writes images'),
        ([f'--network={classifier}'], 'is a classifier: it judges samples'),
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

#----------------------------------------------------------------------------
# One translation path: what training writes, generate.py reproduces.

def test_images_written_at_a_snapshot_are_reproduced_bit_for_bit_by_generate(tmp_path):
    data1 = write_image_zip(tmp_path / 'a.zip', 12, seed=1, offset=-0.1)
    data2 = write_image_zip(tmp_path / 'b.zip', 12, seed=2, offset=0.1)
    test1 = write_image_zip(tmp_path / 'a_test.zip', 7, seed=3, offset=-0.1)  # 7 = batches of 4 and 3
    args = [f'--outdir={tmp_path / "run"}', '--name=t', '--batch=4', '--model_channels=4', '--gamma=0.3',
            '--net-opts={"num_blocks": 1, "attn_resolutions": [], "dropout": 0}', '--G_iters=1', '--f_iters=1',
            '--D_iters=1', '--lr_g=0.01', '--lr_f=0.01', '--lr-rampup=0', '--workers=0', '--seed=1', '--device=cpu',
            '--no-tensorboard', '--duration=0.000012', '--tick=0.000008', '--nosubdir', '--sde-steps=3',
            f'--data1train={data1}', f'--data2train={data2}', f'--data1test={test1}',
            '--samples_dir_G=samples_G', '--samples_dir_SDE=samples_SDE']
    res = CliRunner().invoke(train.main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    run = tmp_path / 'run'
    snap = sorted(p for p in os.listdir(run) if p.startswith('network-snapshot-'))[-1]
    for sampler, folder in (('G', 'samples_G'), ('sde', 'samples_SDE')):
        written = _pngs(run / folder)
        assert list(written) == [f'{i:06d}.png' for i in range(7)]
        for seeds, outdir in (('0-6', f'gen-{sampler}'), ('10-16', f'other-{sampler}')):
            _generate(f'--network={run / snap}', f'--data={test1}', f'--outdir={tmp_path / outdir}', f'--seeds={seeds}',
                      '--batch=4', f'--sampler={sampler}')
        again, other = _pngs(tmp_path / f'gen-{sampler}'), _pngs(tmp_path / f'other-{sampler}')
        for name in written:
            assert (run / folder / name).read_bytes() == (tmp_path / f'gen-{sampler}' / name).read_bytes(), name
        assert sum(not np.array_equal(written[k], other[k]) for k in written) >= 5, sampler  # the seeds matter

#----------------------------------------------------------------------------
# NVlabs/edm pickles, sampled as edm samples them (the stand-in: tests/sampling/edm_standin.py).

def edm_reference(net, seed, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0, S_min=0.0,
                  S_max=float('inf'), S_noise=1.0, class_idx=None):
    """One image of seed `seed` as edm's generate.py makes it, re-derived from the EDM paper (Algorithm 2) and
    edm's documented per-seed streams: one generator per seed; its latent (float32), then for a conditional
    network a label randint(label_dim) (overridden by --class after the draw), then at every step one float64
    churn noise, multiplied by 0 outside [S_min, S_max]; the range clamped to the network's; float64 sampling;
    uint8 by (x * 127.5 + 128).clip(0, 255) truncated. Returns HWC uint8 and the label (or None)."""
    g = torch.Generator().manual_seed(seed % 2**32)
    latent = torch.randn([1, net.img_channels, net.img_resolution, net.img_resolution], generator=g)
    labels, label = None, None
    if net.label_dim:
        label = int(torch.randint(net.label_dim, size=[], generator=g))
        label = label if class_idx is None else class_idx
        labels = torch.nn.functional.one_hot(torch.tensor([label]), net.label_dim).float()
    lo, hi = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (hi ** (1 / rho) + i / (num_steps - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    t = torch.cat([net.round_sigma(t), torch.zeros(1, dtype=torch.float64)])
    x = latent.to(torch.float64) * t[0]
    for k in range(num_steps):
        t_cur, t_next = t[k], t[k + 1]
        gamma = min(S_churn / num_steps, 2 ** 0.5 - 1) if S_min <= t_cur <= S_max else 0
        t_hat = net.round_sigma(t_cur + gamma * t_cur)
        x_hat = x + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * torch.randn(x.shape, generator=g, dtype=torch.float64)
        d = (x_hat - net(x_hat, t_hat, labels).to(torch.float64)) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if k < num_steps - 1:
            d_next = (x - net(x, t_next, labels).to(torch.float64)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_next)
    image = (x * 127.5 + 128).clip(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    return image, label


EDM_CASES = {
    'plain': (dict(), [], {}),
    'churn': (dict(), ['--S_churn=40', '--S_min=0.05', '--S_max=10', '--S-noise=1.003', '--steps=12'],
              dict(S_churn=40, S_min=0.05, S_max=10, S_noise=1.003, num_steps=12)),
    'class': (dict(label_dim=5), ['--class=3', '--steps=8', '--sigma_max=40', '--sigma-min=0.01', '--rho=5'],
              dict(class_idx=3, num_steps=8, sigma_max=40, sigma_min=0.01, rho=5)),
    'random-labels': (dict(label_dim=5), ['--steps=8'], dict(num_steps=8)),
    'class-churn': (dict(label_dim=5), ['--class=1', '--S-churn=10', '--steps=6'],
                    dict(class_idx=1, S_churn=10, num_steps=6)),
}


@pytest.mark.parametrize('case', list(EDM_CASES))
def test_an_edm_pickle_samples_as_edm_samples_it(tmp_path, case):
    from tests.sampling.edm_standin import edm_snapshot
    net_kwargs, args, ref_kwargs = EDM_CASES[case]
    pkl = edm_snapshot(tmp_path / 'network-snapshot-000000.pkl', **net_kwargs)
    res = _generate(f'--network={pkl}', f'--outdir={tmp_path / "out"}', '--seeds=0-9,4294967301', '--batch=4',
                    f'--npz={tmp_path / "samples.npz"}', *args)
    with open(pkl, 'rb') as f:
        net = pickle.load(f)['ema']
    got, npz = _pngs(tmp_path / 'out'), np.load(tmp_path / 'samples.npz')
    seeds = list(range(10)) + [4294967301]
    want = [edm_reference(net, s, **ref_kwargs) for s in seeds]
    diff = np.stack([got[f'{s:06d}.png'].astype(int) - w.astype(int) for s, (w, _) in zip(seeds, want)])
    assert np.abs(diff).max() <= 1 and (diff == 0).mean() > 0.99, (np.abs(diff).max(), (diff != 0).mean())
    assert np.array_equal(npz['arr_0'], np.stack([got[f'{s:06d}.png'] for s in seeds]))      # ADM's layout, NHWC
    assert np.array_equal(got['000005.png'], got['4294967301.png'])        # only 32 bits of a seed matter (edm too)
    assert len({got[f'{s:06d}.png'].tobytes() for s in range(10)}) == 10
    if net.label_dim:
        assert npz['arr_1'].dtype == np.int64 and npz['arr_1'].tolist() == [label for _, label in want]
    else:
        assert sorted(npz.files) == ['arr_0']
    if case == 'random-labels':
        assert len({label for _, label in want}) >= 3 and 'draws its label from its own generator' in res.output


def test_class_options_and_potentials_of_other_labels_are_refused_before_any_output(tmp_path, vector_setup):
    from tests.sampling.edm_standin import edm_snapshot, potential_for
    uncond, cond = edm_snapshot(tmp_path / 'u.pkl'), edm_snapshot(tmp_path / 'c.pkl', label_dim=5)
    with open(cond, 'rb') as f:
        net = pickle.load(f)['ema']
    pots = dict(class3=potential_for(tmp_path / 'p3.pt', net, class_label=3),
                labels=potential_for(tmp_path / 'pl.pt', net, labels=torch.arange(8) % 5),
                other=potential_for(tmp_path / 'po.pt', net, labels=torch.arange(8)),
                none=potential_for(tmp_path / 'pn.pt', net))
    out = tmp_path / 'out'
    cases = [
        ([f'--network={uncond}', '--class=1'], '--class=1: this network is unconditional'),
        ([f'--network={cond}', '--class=5'], '--class=5 is out of range: this network has 5 classes, 0 to 4'),
        ([f'--network={cond}', f'--potential={pots["class3"]}', '--class=2'], 'the potential was made for class 3'),
        ([f'--network={cond}', f'--potential={pots["labels"]}', '--class=2'], 'covers every class'),
        ([f'--network={cond}', f'--potential={pots["other"]}'], 'made for other labels (0 to 7)'),
        ([f'--network={cond}', f'--potential={pots["none"]}'], 'records no labels'),
        ([f'--network={cond}', f'--potential={pots["labels"]}', '--sigma_max=10'], 'the potential fixes the schedule'),
        ([f'--network={cond}', '--sampler=langevin', '--S_churn=1'], 'apply to --sampler=euler|heun'),
        ([f'--network={vector_setup["snap"]}', f'--data={vector_setup["data"]}', '--class=1'],
         '--class does not apply to eot snapshots'),
        ([f'--network={uncond}', '--sigma_min=100'], 'no noise levels left'),
    ]
    for args, expect in cases:
        res = _generate(*args, f'--outdir={out}', expect_ok=False)
        assert res.exit_code != 0 and expect in res.output, (args, res.output)
        assert len(res.output.strip().splitlines()) == 1 and 'Traceback' not in res.output, res.output
        assert not out.exists(), args
    # Accepted: the potential's class with or without --class, and a potential over every class without it.
    for args in ([f'--potential={pots["class3"]}', '--class=3'], [f'--potential={pots["class3"]}'],
                 [f'--potential={pots["labels"]}']):
        res = _generate(f'--network={cond}', *args, '--seeds=0-9', f'--outdir={tmp_path / str(len(args))}-{args[0][-6:]}')
        assert 'Samples per class:' in res.output

#----------------------------------------------------------------------------
# Output folders: a bad --outdir is a one-line error; an existing one with files in it is refused.

def test_a_bad_or_used_outdir_is_a_one_line_error_before_any_work(tmp_path):
    from tests.sampling.edm_standin import edm_snapshot
    pkl = edm_snapshot(tmp_path / 'n.pkl')
    (tmp_path / 'file').write_text('x')
    used = tmp_path / 'used'
    used.mkdir()
    (used / '000000.png').write_bytes(b'old')
    cases = [(dict(outdir=tmp_path / 'file'), 'is a file'), (dict(outdir=tmp_path / 'file' / 'sub'), 'is a file'),
             (dict(outdir=used), 'already holds 1 file'), (dict(npz=tmp_path), 'is a folder'),
             (dict(npz=tmp_path / 'file' / 'b.npz'), 'is a file'), (dict(export_safe=tmp_path / 'file'), 'is a file'),
             (dict(grid=tmp_path / 'new' / 'g.png'), 'lies inside --outdir')]
    for opts, expect in cases:
        args = [f'--{k.replace("_", "-")}={v}' for k, v in opts.items()]
        if 'export_safe' not in opts:
            args += [f'--outdir={tmp_path / "new"}'] if 'outdir' not in opts else []
            args += ['--seeds=0-1', '--steps=2']
        res = _generate(f'--network={pkl}', *args, expect_ok=False)
        assert res.exit_code == 1 and expect in res.output, (opts, res.output)
        assert len(res.output.strip().splitlines()) == 1 and isinstance(res.exception, SystemExit), res.output
        assert not (tmp_path / 'new').exists() and os.listdir(used) == ['000000.png']
    assert 'new or empty folder' in CliRunner().invoke(generate.main, ['--help']).output


def test_what_a_command_line_or_a_file_may_ask_for_is_bounded(image_setup, tmp_path):
    # Each of these tried to allocate tens of GB to TB (MemoryError, or the machine swapping) before.
    res = _generate(f'--network={image_setup["snap"]}', f'--data={image_setup["data"]}', f'--outdir={tmp_path / "a"}',
                    '--seeds=0-99999999999', expect_ok=False)
    assert res.exit_code == 1 and 'at most 10,000,000 per call' in res.output, res.output
    res = _generate(f'--network={image_setup["snap"]}', f'--data={image_setup["data"]}', f'--outdir={tmp_path / "b"}',
                    '--repeats=1000000000', expect_ok=False)
    assert res.exit_code == 1 and 'at most 10,000,000 outputs per call' in res.output, res.output
    export = tmp_path / 'export'
    _generate(f'--network={image_setup["snap"]}', f'--export-safe={export}')
    desc = json.loads((export / 'network.json').read_text())
    desc['networks']['G']['init_kwargs']['model_channels'] = 100000        # ~ 10^5 GiB of weights
    (export / 'network.json').write_text(json.dumps(desc))
    res = _generate(f'--network={export}', f'--data={image_setup["data"]}', f'--outdir={tmp_path / "c"}', expect_ok=False)
    assert res.exit_code == 1 and 'more than its weights file holds' in res.output, res.output
    assert not any((tmp_path / d).exists() for d in 'abc')

#----------------------------------------------------------------------------
# The README's own pipeline, as written, on tiny data.

README_TINY = {                       # appended to each README command (click keeps an option's last value)
    'dataset_tool.py': ['--num=6', '--resolution=8x8'],
    'train.py': ['--batch=4', '--model_channels=4', '--duration=0.000008', '--tick=0.000004', '--workers=0',
                 '--device=cpu', '--no-tensorboard', '--G_iters=1', '--f_iters=1', '--D_iters=1',
                 '--net-opts={"num_blocks": 1, "attn_resolutions": [], "dropout": 0}'],
    'generate.py': ['--device=cpu', '--batch=4'],
    'fid.py': ['--detector=standin:0', '--workers=0', '--device=cpu', '--batch=8'],
}


def _readme_commands():
    """The `python ...` commands of the README's pipeline block, continuation lines joined."""
    text = open(os.path.join(REPO, 'README.md'), encoding='utf-8').read()
    block = text.split('## Train, generate, evaluate', 1)[1].split('```bash', 1)[1].split('```', 1)[0]
    return [c.strip() for c in block.replace('\\\n', ' ').splitlines() if c.strip().startswith('python ')]


def _shell_ls_last(command):
    """$(ls PATTERN | tail -1), as the shell would expand it here."""
    return re.sub(r'\$\(ls (\S+) \| tail -1\)', lambda m: sorted(glob.glob(m.group(1)))[-1], command)


@pytest.mark.filterwarnings('ignore:FID.*near-singular:RuntimeWarning')
def test_the_readmes_train_generate_fid_pipeline_runs_as_written(tmp_path, monkeypatch):
    import dataset_tool
    import fid
    monkeypatch.chdir(tmp_path)
    mains = {'dataset_tool.py': dataset_tool.main, 'train.py': train.main, 'generate.py': generate.main, 'fid.py': fid.main}
    commands = _readme_commands()
    assert [c.split()[1] for c in commands] == ['dataset_tool.py'] * 3 + ['train.py', 'generate.py', 'fid.py', 'fid.py']
    for command in commands:
        script, *args = shlex.split(_shell_ls_last(command))[1:]
        res = CliRunner().invoke(mains[script], [*args, *README_TINY[script]])
        assert res.exit_code == 0, (command, res.output, repr(res.exception))
    assert re.search(r'\bfid: [0-9.]+', res.output), res.output
    assert os.path.isfile(tmp_path / 'out' / '2to3-grid.png')


def test_a_pickle_over_plain_http_is_warned_about(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = {'EOT_CACHE_DIR': str(tmp_path / 'cache')}
    for url in (f'http://127.0.0.1:{port}/network-snapshot.pkl', f'https://127.0.0.1:{port}/network-snapshot.pkl'):
        res = CliRunner().invoke(generate.main, ['--device=cpu', f'--network={url}', f'--outdir={tmp_path / "o"}'],
                                 env=env)
        assert res.exit_code == 1 and 'cannot read' in res.output, res.output       # nothing listens there
        assert ('plain http' in res.output) == url.startswith('http:'), res.output
