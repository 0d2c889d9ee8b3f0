"""Files written by earlier code still load and give the same outputs.

tests/fixtures/v1 holds small snapshots (EOT on images with the stated G-step, EOT on vectors with the
kinetic G-step, a vector denoiser), their training states, a safe export, a converged potential and an
unfinished potential.py state, all written by the commit named in expected.json, together with the outputs
that commit's generate.py gave and the EMA weights (sha256) that its train.py reached after resuming
each state for one more tick. How they were made: tests/fixtures/v1/README.md.

Only the command-line tools are used here, so the test holds whatever the library layout is.
"""

import hashlib
import json
import os
import pickle
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
import potential
import train

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'v1')
DATA = os.path.join(FIX, 'data')
EXPECTED = dict(np.load(os.path.join(FIX, 'expected.npz')))
with open(os.path.join(FIX, 'expected.json'), encoding='utf-8') as _f:
    EXPECTED_JSON = json.load(_f)

COMMON = ['--batch=4', '--G_iters=1', '--f_iters=1', '--D_iters=1', '--lr-rampup=0', '--workers=0', '--seed=1',
          '--device=cpu', '--no-tensorboard', '--nosubdir', '--sde-steps=3', '--tick=0.004', '--snap=1', '--dump=1']
TRAIN_ARGS = dict(
    img=COMMON + ['--model_channels=4', '--gamma=0.3',
                  '--net-opts={"num_blocks":1,"attn_resolutions":[],"dropout":0,"channel_mult":[1,2],'
                  '"D":{"model_channels":4}}',
                  f'--data1train={DATA}/a.zip', f'--data2train={DATA}/b.zip', f'--data1test={DATA}/a_test.zip',
                  '--duration=0.000008'],
    vec=COMMON + ['--model_channels=2', '--gamma=0.5', '--G-loss=kinetic', '--net-opts={"depth":2,"D":{"width":16}}',
                  f'--data1train={DATA}/va.npz', f'--data2train={DATA}/vb.npz', '--duration=0.000008'],
    den=['--kind=denoiser', '--batch=8', '--lr-rampup=0', '--workers=0', '--seed=1', '--device=cpu',
         '--no-tensorboard', '--nosubdir', '--tick=0.008', '--snap=1', '--dump=1', '--model_channels=2',
         f'--data={DATA}/den.npz', '--duration=0.000016'],
)


def _invoke(main, args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return res


def _pngs(outdir):
    names = sorted(n for n in os.listdir(outdir) if n.endswith('.png') and n != 'grid.png')
    return np.stack([np.asarray(PIL.Image.open(os.path.join(outdir, n))) for n in names])


def _state_dict_sha256(net):
    """sha256 of a network's state_dict (names, dtypes, shapes, bytes), computed here independently."""
    h = hashlib.sha256()
    for name, value in sorted(net.state_dict().items()):
        t = value.detach().cpu().contiguous()
        inner = hashlib.sha256(f'{t.dtype}:{list(t.shape)}:'.encode())
        inner.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b'')
        h.update(name.encode() + b'\0')
        h.update(inner.hexdigest().encode())
    return h.hexdigest()


@pytest.mark.parametrize('network', ['img-snapshot.pkl', 'img-safe'])
@pytest.mark.parametrize('sampler', ['G', 'sde'])
def test_image_snapshot_and_safe_export_translate_as_before(tmp_path, network, sampler):
    _invoke(generate.main, ['--device=cpu', f'--network={FIX}/{network}', f'--data={DATA}/a_test.zip',
                            f'--outdir={tmp_path}', f'--sampler={sampler}'])
    assert np.array_equal(_pngs(tmp_path), EXPECTED[f'img-{sampler}'])


@pytest.mark.parametrize('sampler,extra', [('G', ['--repeats=2', '--seeds=5-36']), ('sde', ['--repeats=2'])])
def test_kinetic_vector_snapshot_translates_as_before(tmp_path, sampler, extra):
    _invoke(generate.main, ['--device=cpu', f'--network={FIX}/vec-snapshot.pkl', f'--data={DATA}/va.npz',
                            f'--outdir={tmp_path}', f'--sampler={sampler}', *extra])
    out = np.load(tmp_path / 'samples.npz')
    np.testing.assert_array_equal(out['seeds'], EXPECTED[f'vec-{sampler}-seeds'])
    np.testing.assert_allclose(out['y'], EXPECTED[f'vec-{sampler}'], rtol=0, atol=1e-6)


@pytest.mark.parametrize('name,extra', [('heun', []), ('dpmot', ['--potential={pot}']),
                                        ('dpmot2', ['--potential={pot}', '--topk=2'])])
def test_denoiser_samples_as_before_with_and_without_the_potential(tmp_path, name, extra):
    pot = os.path.join(FIX, 'potential', 'potential.pt')
    _invoke(generate.main, ['--device=cpu', f'--network={FIX}/den-snapshot.pkl', f'--outdir={tmp_path}',
                            '--seeds=0-7', *[e.format(pot=pot) for e in extra]])
    out = np.load(tmp_path / 'samples.npz')
    np.testing.assert_array_equal(out['seeds'], EXPECTED[f'den-{name}-seeds'])
    np.testing.assert_allclose(out['y'], EXPECTED[f'den-{name}'], rtol=0, atol=1e-6)


@pytest.mark.parametrize('kind', ['img', 'vec', 'den'])
def test_training_states_resume_to_the_same_weights(tmp_path, kind):
    state = tmp_path / 'training-state-000000.pt'
    shutil.copy(os.path.join(FIX, f'{kind}-state.pt'), state)
    run = tmp_path / 'run'
    _invoke(train.main, [f'--name={kind}', f'--outdir={run}', *TRAIN_ARGS[kind], f'--resume={state}'])
    snaps = sorted(n for n in os.listdir(run) if n.startswith('network-snapshot-'))
    with open(run / snaps[-1], 'rb') as f:
        snap = pickle.load(f)
    want = EXPECTED_JSON['resumed_ema_sha256'][kind]
    assert {name: _state_dict_sha256(snap[name]) for name in want} == want


def test_unfinished_potential_state_resumes_to_a_converged_potential(tmp_path):
    out = tmp_path / 'pot'
    shutil.copytree(os.path.join(FIX, 'potential-unfinished'), out)
    res = _invoke(potential.main, ['--no-progress', '--device=cpu', f'--network={FIX}/den-snapshot.pkl',
                                   f'--data={DATA}/den.npz', '--steps=10', '--back-steps=3', '--num-targets=16',
                                   '--seed=4', f'--outdir={out}'])
    assert 'Resum' in res.output, res.output
    new = torch.load(out / 'potential.pt', weights_only=True)
    old = torch.load(os.path.join(FIX, 'potential', 'potential.pt'), weights_only=True)
    assert new['solver']['converged'] and new['targets_sha256'] == old['targets_sha256']
