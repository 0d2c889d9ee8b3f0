"""demo.py --quick end to end (a subprocess, as dev.py runs it), its figures recomputed independently,
and the output-directory rules."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_demo(*args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, os.path.join(REPO, 'demo.py'), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _read(path):
    return np.asarray(PIL.Image.open(path).convert('RGB')).astype(np.float64) / 127.5 - 1


def test_quick_demo_writes_everything_and_reports_true_figures(tmp_path):
    outdir = tmp_path / 'demo-run'
    res = _run_demo('--quick', f'--outdir={outdir}')
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for text in ('[1/5]', '[5/5]', 'untrained G (tick-0 snapshot)', 'trained G', 'read as a 3', 'transport cost',
                 str(outdir)):
        assert text in out, text
    report = json.loads((outdir / 'results.json').read_text())
    n = demo.QUICK['num_test']
    assert report['test_inputs'] == n
    for key in ('untrained', 'trained'):
        assert os.path.isfile(report[key]['snapshot'])
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
    # The tick-0 snapshot (one batch of images in) and the last one are two files (names count images).
    assert os.path.basename(report['untrained']['snapshot']) == f'network-snapshot-{demo.QUICK["batch"]:010d}.pkl'
    assert report['trained']['snapshot'] != report['untrained']['snapshot']
    figure = PIL.Image.open(outdir / 'demo.png')
    assert figure.size[1] == 3 * 4 * demo.QUICK['resolution'] # Three rows of 4x upscaled images.
    assert (outdir / 'classifier.pt').is_file() and (outdir / 'train' / 'log.txt').is_file()


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
    (earlier / 'train' / 'training-state-000004.pt').write_bytes(b'x')
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
