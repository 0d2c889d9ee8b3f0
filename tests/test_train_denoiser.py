"""train.py --kind=denoiser end to end on tiny data: files, snapshot layout (EDM's `ema`), resume, torchrun, errors."""

import json
import os
import pickle

import pytest
import torch
from click.testing import CliRunner

import train
from tests.conftest import write_image_zip, write_vector_npz
from tests.launch import torchrun

TINY_UNET = '{"num_blocks": 1, "attn_resolutions": [], "dropout": 0, "channel_mult": [1, 2]}'


def _args(outdir, data, *extra, batch=8, iters=1):
    tiny = '{"depth": 2}' if data.endswith('.npz') else TINY_UNET
    args = ['--kind=denoiser', f'--outdir={outdir}', '--name=test', f'--data={data}', f'--batch={batch}',
            '--model_channels=4', f'--net-opts={tiny}', '--lr-rampup=0', '--workers=0', '--seed=1', '--device=cpu',
            '--no-tensorboard', f'--duration={batch * iters / 1e6}']
    return args + list(extra)


def _run(args):
    return CliRunner().invoke(train.main, args, catch_exceptions=False)


def _only_run_dir(outdir):
    runs = sorted(os.listdir(outdir))
    assert len(runs) == 1, runs
    return os.path.join(outdir, runs[0])


@pytest.fixture
def vectors(tmp_path):
    return write_vector_npz(tmp_path / 'gauss.npz', 128, dim=2, seed=0, mean=1.0, scale=0.5)


def test_vector_run_writes_an_edm_style_snapshot(tmp_path, vectors):
    res = _run(_args(tmp_path / 'runs', vectors, iters=2))
    assert res.exit_code == 0, res.output
    run_dir = _only_run_dir(tmp_path / 'runs')
    assert os.path.basename(run_dir) == '00000-test-denoiser-gpus1-batch8-edm'
    for name in ('training_options.json', 'log.txt', 'stats.jsonl', 'fakes-0000000016.png',
                 'network-snapshot-0000000016.pkl', 'training-state-0000000016.pt'):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    options = json.load(open(os.path.join(run_dir, 'training_options.json')))
    assert options['task_kwargs']['class_name'] == 'training.denoiser_task.DenoiserTask'
    assert options['task_kwargs']['loss_kwargs'] == dict(class_name='models.diffusion_loss.EDMLoss', sigma_data=0.5)
    assert options['task_kwargs']['network_kwargs']['data_shape'] == [2]
    stats = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    for key in ('Loss/denoiser', 'Denoise/mse_sigma0.2', 'Grad/nonfinite_denoiser'):
        assert key in stats[0], key
    with open(os.path.join(run_dir, 'network-snapshot-0000000016.pkl'), 'rb') as f:
        snap = pickle.load(f)
    net = snap['ema']
    assert snap['kind'] == 'denoiser' and type(net).__name__ == 'Denoiser' and net.precond == 'edm'
    assert type(snap['loss_fn']).__name__ == 'EDMLoss' and snap['data_shape'] == [2]
    from data.dataset import VectorDataset
    assert snap['provenance']['data_sha256'] == VectorDataset(vectors).data_hash()
    assert net(torch.zeros(3, 2), torch.ones(3)).shape == (3, 2)
    state = torch.load(os.path.join(run_dir, 'training-state-0000000016.pt'), weights_only=True)
    assert set(state['trainer']['nets']) == {'denoiser'} and state['trainer']['cur_nimg'] == 16
    # The snapshot drives the samplers (the plain baseline of DPM-OT).
    from sampling.dpmot import generate_samples
    x, info = generate_samples(net, [0, 1, 2], sampler='heun', steps=4)
    assert x.shape == (3, 2) and info['nfe'] == 7 and torch.isfinite(x).all()


def test_image_run_uses_a_unet(tmp_path):
    data = write_image_zip(tmp_path / 'img.zip', 12, resolution=8)
    res = _run(_args(tmp_path / 'runs', data, '--precond=vp', batch=4))
    assert res.exit_code == 0, res.output
    run_dir = _only_run_dir(tmp_path / 'runs')
    with open(os.path.join(run_dir, 'network-snapshot-0000000004.pkl'), 'rb') as f:
        snap = pickle.load(f)
    assert type(snap['ema'].model).__name__ == 'UNet' and snap['ema'].precond == 'vp'
    assert type(snap['loss_fn']).__name__ == 'VPLoss' and snap['data_shape'] == [3, 8, 8]
    import PIL.Image
    assert PIL.Image.open(os.path.join(run_dir, 'fakes-0000000004.png')).size == (16 * 8, 2 * 8)


def _tick_losses(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    return {int(r['Progress/tick']['mean']): r['Loss/denoiser']['mean'] for r in rows}


def test_stop_and_resume_gives_the_same_losses(tmp_path, vectors):
    common = ['--tick=0.008', '--snap=100', '--dump=1', '--net-opts={"depth": 2, "dropout": 0.2}', '--precond=ve']
    assert _run(_args(tmp_path / 'full', vectors, *common, iters=4)).exit_code == 0
    full = _tick_losses(_only_run_dir(tmp_path / 'full'))
    assert _run(_args(tmp_path / 'part', vectors, *common, iters=2)).exit_code == 0
    res = _run(_args(tmp_path / 'part', vectors, *common, '--resume=auto', iters=4))
    assert res.exit_code == 0, res.output
    resumed = _tick_losses(_only_run_dir(tmp_path / 'part'))
    assert sorted(full) == sorted(resumed) == [0, 1, 2, 3]
    for tick in range(4):
        assert resumed[tick] == pytest.approx(full[tick], rel=1e-5, abs=1e-7), tick


@pytest.mark.parametrize('precond, loss', [('edm', 'EDMLoss'), ('vp', 'VPLoss'), ('ve', 'VELoss')])
def test_dry_run_picks_the_loss_of_the_preconditioning(tmp_path, vectors, precond, loss):
    res = _run(_args(tmp_path / 'runs', vectors, f'--precond={precond}', '--lr=0.002', '--dry-run'))
    assert res.exit_code == 0 and 'Dry run; exiting.' in res.output
    assert f'"models.diffusion_loss.{loss}"' in res.output and '"lr": 0.002' in res.output
    assert not os.path.exists(tmp_path / 'runs')


@pytest.mark.parametrize('case', ['no-data', 'missing', 'net-opts', 'bad-data'])
def test_bad_input_fails_before_any_output(tmp_path, vectors, case):
    args = _args(tmp_path / 'runs', vectors)
    if case == 'no-data':
        args = [a for a in args if not a.startswith('--data=')]
        expect = '--data is required'
    elif case == 'missing':
        args = _args(tmp_path / 'runs', str(tmp_path / 'nope.npz'))
        expect = 'no such file'
    elif case == 'net-opts':
        args.append('--net-opts={"widthh": 3}')
        expect = 'widthh'
    else:
        bad = tmp_path / 'bad.npz'
        bad.write_bytes(b'not a zip')
        args = _args(tmp_path / 'runs', str(bad))
        expect = '--data'
    res = CliRunner().invoke(train.main, args)
    assert res.exit_code != 0 and expect in res.output, res.output
    assert not os.path.exists(tmp_path / 'runs')


def test_two_gloo_processes_train_a_denoiser(tmp_path, vectors):
    args = _args(tmp_path / 'runs', vectors, '--batch-gpu=2', batch=8, iters=2)
    res = torchrun(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'train.py'), *args, nproc=2)
    run_dir = _only_run_dir(tmp_path / 'runs')
    assert 'gpus2' in run_dir and 'Batch: 8 = 2 process(es) x 2 x 2' in res.stdout
    state = torch.load(os.path.join(run_dir, 'training-state-0000000016.pt'), weights_only=True)
    assert len(state['rng']) == 2 and set(state['trainer']['nets']) == {'denoiser'}
