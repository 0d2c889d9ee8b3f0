"""The low-dimensional benchmarks' pieces at a tiny size (the benchmarks themselves take minutes; docs/dpmot.md)."""

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from benchmarks import dpmot_toy2d, semidiscrete_lowdim


def test_clustered_targets_sit_on_their_grids():
    for d, centres in ((2, 16), (3, 18)):
        y = semidiscrete_lowdim.clustered_targets(4000, d, std=0.01, seed=1)
        nearest = y.round()
        assert y.shape == (4000, d) and len(torch.unique(nearest, dim=0)) == centres
        assert float((y - nearest).std()) == pytest.approx(0.01, rel=0.05)


def test_lowdim_benchmark_runs_and_reaches_the_target_on_a_tiny_grid():
    res = CliRunner().invoke(semidiscrete_lowdim.main, ['--dims=2,3', '--sizes=60', '--clusters=tight',
                                                       '--sources=uniform', '--monte-carlo-seconds=1'])
    assert res.exit_code == 0, res.output
    rows = [line for line in res.output.splitlines() if line.startswith('| 2 ') or line.startswith('| 3 ')]
    assert len(rows) == 2 and all('not reached' not in r and r.split('|')[8].strip() == '0' for r in rows), res.output


def test_toy_data_and_figure(tmp_path):
    x = dpmot_toy2d.write_data(tmp_path / 'd.npz', 8000, seed=0)
    saved = np.load(tmp_path / 'd.npz')
    np.testing.assert_array_equal(saved['x'], x.astype(np.float32))
    np.testing.assert_allclose(x - dpmot_toy2d.CENTRES[saved['labels']], x - x.round(), atol=1e-12)
    assert abs(float((x - x.round()).std()) - 0.05) < 0.003 and np.bincount(saved['labels']).min() > 400
    dpmot_toy2d.save_figure(tmp_path / 'f.png', [('a', x), ('b', x[:10])])
    assert PIL.Image.open(tmp_path / 'f.png').size == (600, 318)
