"""demo.py --quick end to end (a subprocess, as dev.py runs it), its figures recomputed independently,
and the output-directory rules."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import psutil
import pytest

import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_demo(*args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, os.path.join(REPO, 'demo.py'), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _read(path):
    return np.asarray(PIL.Image.open(path).convert('RGB')).astype(np.float64) / 127.5 - 1


@pytest.fixture(scope='module')
def quick_runs(tmp_path_factory):
    """Two `demo.py --quick` runs of the same command into two folders: [(outdir, completed process)] x 2."""
    runs = []
    for k in range(2):
        outdir = tmp_path_factory.mktemp(f'quick{k}') / 'demo-run'
        runs.append((outdir, _run_demo('--quick', f'--outdir={outdir}')))
    return runs


def test_quick_demo_writes_everything_and_reports_true_figures(quick_runs):
    outdir, res = quick_runs[0]
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for text in ('[1/5]', '[5/5]', 'untrained G (tick-0 snapshot)', 'trained G', 'read as a 3', 'transport cost',
                 str(outdir), '1.0/1 kimg'):
        assert text in out, text
    assert 'UNDERTRAINED' not in out
    report = json.loads((outdir / 'results.json').read_text())
    n = demo.QUICK['num_test']
    assert report['test_inputs'] == n and report['kimg'] == report['planned_kimg'] == demo.QUICK['kimg']
    assert report['undertrained'] is False
    for key in ('untrained', 'trained'):
        assert os.path.isfile(outdir / report[key]['snapshot'])
        pngs = sorted(p for p in os.listdir(outdir / 'generated' / key) if p != 'grid.png')
        assert pngs == [f'{i:06d}.png' for i in range(n)]
        assert 0 <= report[key]['read_as_3'] <= 1
        # The transport cost, recomputed from the files: inputs from the zip, outputs from the PNGs.
        from data.dataset import open_dataset
        ds = open_dataset(str(outdir / 'data' / '2_test.zip'))
        x = np.stack([ds[i][0].transpose(1, 2, 0) for i in range(n)]).astype(np.float64) / 127.5 - 1
        y = np.stack([_read(outdir / 'generated' / key / p) for p in pngs])
        assert report[key]['transport_cost'] == pytest.approx(((x - y) ** 2).mean(), rel=1e-5, abs=1e-9)
        # The printed row shows the same numbers.
        assert f'{report[key]["transport_cost"]:.4f}' in out and f'{100 * report[key]["read_as_3"]:.1f}%' in out
    # The first snapshot is the tick-0 one (one iteration in), the last the end of training.
    assert demo.snapshot_kimg(outdir / report['untrained']['snapshot']) == demo.QUICK['batch'] / 1000
    assert demo.snapshot_kimg(outdir / report['trained']['snapshot']) >= demo.QUICK['kimg']
    figure = PIL.Image.open(outdir / 'demo.png')
    assert figure.size[1] == 3 * 4 * demo.QUICK['resolution'] # Three rows of 4x upscaled images.
    assert (outdir / 'classifier.pt').is_file() and (outdir / 'train' / 'log.txt').is_file()
    command = (outdir / 'train-console.txt').read_text().splitlines()[0] # The training command line comes first.
    assert command.startswith('$ ') and '--nproc_per_node=2 train.py --name=demo' in command
    # train.py ran the demo's step settings (two critic steps per iteration, shared passes: docs/recipes.md).
    options = json.loads((outdir / 'train' / 'training_options.json').read_text())
    assert options['world_size'] == demo.QUICK['procs'] == 2 # Two processes under torchrun, one per core.
    assert (options['ema_halflife_kimg'], options['ema_rampup_ratio']) == (1000 * demo.QUICK['ema'], demo.QUICK['ema_rampup'])
    task = options['task_kwargs']
    for key in ('G_iters', 'f_iters', 'D_iters', 'D_gp', 'D_gp_every', 'reuse_G_output', 'share_passes'):
        assert task[key] == demo.QUICK[key], key


def test_the_same_command_writes_the_same_results(quick_runs):
    """A fixed, seeded amount of work: two runs (at whatever machine load) agree to the last digit, and so do
    their outputs and final weights."""
    (dir1, res1), (dir2, res2) = quick_runs
    assert res1.returncode == 0 and res2.returncode == 0, res1.stdout + res2.stdout
    assert (dir1 / 'results.json').read_text() == (dir2 / 'results.json').read_text()
    for key in ('untrained', 'trained'):
        pngs = sorted(os.listdir(dir1 / 'generated' / key))
        assert all((dir1 / 'generated' / key / p).read_bytes() == (dir2 / 'generated' / key / p).read_bytes()
                   for p in pngs)
    import torch
    states = [sorted((d / 'train').glob('training-state-*.pt')) for d in (dir1, dir2)]
    assert [p.name for p in states[0]] == [p.name for p in states[1]] and states[0]
    s1, s2 = (torch.load(s[-1], weights_only=True) for s in states)
    for name in ('G', 'f', 'D'):
        assert all(torch.equal(a, s2['trainer']['ema'][name][k]) for k, a in s1['trainer']['ema'][name].items())


def test_time_limit_stops_training_and_says_undertrained(tmp_path, capsys):
    """At the deadline train.py is stopped (train() returns False) with its torchrun workers, the snapshots written
    so far kept; the report then says UNDERTRAINED."""
    paths = demo.build_data(str(tmp_path), demo.QUICK)
    run_dir = tmp_path / 'train'
    t0 = time.time()
    assert demo.train(dict(demo.QUICK, kimg=1000), paths, str(run_dir), 1, deadline=t0 + 15) is False
    assert time.time() - t0 < 60
    assert all(demo.snapshot_kimg(path) >= 0 for path in demo.snapshots(str(run_dir))) # Whole pickles, if any.
    workers = [p for p in psutil.process_iter(['cmdline']) if str(run_dir) in ' '.join(p.info['cmdline'] or [])]
    assert not workers, workers
    report = dict(test_inputs=2, judge='a judge', classifier_accuracy=0.5, kimg=5, planned_kimg=50, undertrained=True,
                  reference=dict(real_3s_read_as_3=1, input_2s_read_as_3=0, cost_2s_to_random_3s=0.1),
                  untrained=dict(transport_cost=0, read_as_3=0), trained=dict(transport_cost=0.1, read_as_3=0.5))
    demo.print_report(report, str(tmp_path))
    out = capsys.readouterr().out
    assert 'UNDERTRAINED' in out and '5 of 50 kimg' in out


def test_progress_bar_follows_the_tick_lines():
    progress = demo.TrainingProgress(40, interval=1000)
    progress.feed('tick 3     kimg 12.032     time 1m 00s        sec/tick 20.1')
    assert progress.kimg == 12.032
    progress.feed('Saved network-snapshot-0000012032.pkl')
    assert progress.kimg == 12.032


def test_a_process_count_that_does_not_divide_the_batch_is_refused(tmp_path):
    res = _run_demo('--quick', '--procs=3', f'--outdir={tmp_path / "run"}')
    assert res.returncode == 2 and '--procs: 3: the batch of 128 images is not divisible by 3' in res.stderr, res.stderr
    assert not (tmp_path / 'run').exists() # Refused before anything was written.


def test_outdir_rules(tmp_path):
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'keep.txt').write_text('mine')
    with pytest.raises(Exception, match='was not made by demo.py'):
        demo._prepare_outdir(str(foreign))
    assert os.listdir(foreign) == ['keep.txt']
    # An earlier demo run is replaced (train/ would otherwise be resumed), other files are left alone.
    earlier = tmp_path / 'earlier'
    (earlier / 'train').mkdir(parents=True)
    (earlier / 'train' / 'training-state-0000004096.pt').write_bytes(b'x')
    (earlier / demo.MARKER).write_text('')
    (earlier / 'notes.txt').write_text('mine')
    demo._prepare_outdir(str(earlier))
    assert sorted(os.listdir(earlier)) == sorted([demo.MARKER, 'notes.txt'])


def test_judge_digits_are_coloured_like_the_data():
    """render_coloured_digits tints grey digits with one saturated colour per image, as --colorize does."""
    images, labels = demo.render_coloured_digits(20, seed=3, resolution=16)
    assert images.shape == (20, 3, 16, 16) and labels.min() >= 0 and labels.max() <= 9
    u = ((images.numpy() + 1) * 127.5).round()
    for img in u:
        peak = img.reshape(3, -1)[:, img.reshape(3, -1).sum(0).argmax()]
        assert peak.max() > 150 and peak.min() < 0.05 * peak.max() + 1 # Saturated: one channel near zero.
