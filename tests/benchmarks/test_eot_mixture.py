"""benchmarks/eot_mixture.py's pieces: the data it writes (read back through the project's data set class, with
the pair's laws), its measures (against transport.mixture directly and against a wrong model), the published
table lookup, and one whole cell on a tiny budget through train.py and generate.py."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from benchmarks import eot_mixture as em
from data.dataset import open_dataset
from transport import mixture as mx


def test_written_data_are_vector_data_sets_with_the_pairs_laws(tmp_path):
    pair = mx.benchmark_pair(2, 1.0, seed=3)
    paths = em.write_data(pair, str(tmp_path), 20000, 500, seed=3)
    data = {name: open_dataset(path) for name, path in paths.items()}
    assert len(data['source']) == 20000 and len(data['target']) == 20000 and len(data['test']) == 500
    x = np.load(paths['source'])['x']
    assert x.dtype == np.float32 and x.shape == (20000, 2)
    y = np.load(paths['target'])['x'].astype(np.float64)
    # Moments against the laws (standard errors of a mean: sqrt(var / n); 5 of them).
    for sample, mean, cov in ((x, pair.source.mean(), pair.source.cov()), (y, *pair.target_moments())):
        assert np.all(np.abs(sample.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / len(sample)))
        assert np.allclose(np.cov(sample.T), cov, atol=0.05 * np.abs(cov).max())
    # Source and target are independent draws (not a coupling): their cross-covariance vanishes to sampling error.
    cross = np.mean((x - x.mean(0))[:, 0] * (y - y.mean(0))[:, 0])
    assert abs(cross) < 5 * np.sqrt(np.var(x[:, 0]) * np.var(y[:, 0]) / len(x))
    # The held-out inputs are not training inputs, and the same seed writes the same files.
    test = np.load(paths['test'])['x']
    assert not np.isin(test[:, 0], x[:, 0]).any()
    again = em.write_data(pair, str(tmp_path / 'again'), 20000, 500, seed=3)
    assert np.array_equal(np.load(again['test'])['x'], test)


def test_measures_are_the_mixture_estimators_and_see_a_wrong_model():
    pair = mx.benchmark_pair(2, 1.0, seed=0)
    rng = np.random.default_rng(0)
    x = pair.source.sample(50, rng)
    exact = pair.sample_conditional(x, 400, rng)
    m = em.measures(pair, x, exact, seed=1)
    assert m['cbw2_uvp'] == pytest.approx(mx.cbw2_uvp(x, exact, pair))
    # Exact samples score like the floor (both are the estimator's own error), a shifted model far above it.
    assert m['cbw2_uvp'] < 3 * m['floor_cbw2_uvp'] + 0.5 and m['floor_cbw2_uvp'] < 2
    assert m['bw2_uvp'] < 3 * m['floor_bw2_uvp'] + 0.5
    wrong = em.measures(pair, x, exact + 0.5, seed=1)
    shift = 100 * 0.25 * 2 / pair.target_variance()          # |0.5 (1, 1)|^2 over Var(y), in %
    assert wrong['cbw2_uvp'] == pytest.approx(m['cbw2_uvp'] + shift, rel=0.1)
    assert wrong['floor_cbw2_uvp'] == m['floor_cbw2_uvp']
    assert em.independent_coupling(pair, x, 400, seed=1) > 20 * m['floor_cbw2_uvp']


def test_published_table_lookup():
    assert em.published(16, 1.0) == {'LightSB': 0.09, 'LightSB-M': 0.18, 'ASBM': 1.6, 'DSBM': 1.1, 'SF2M-Sink': 1.1,
                                     'best-2023': 9.08}
    assert 'ASBM' not in em.published(2, 0.1) and em.published(128, 10)['DSBM'] == 15000
    assert em.published(3, 1.0) == {}
    assert all(len(col) == len(em.PUBLISHED_DIMS) for table in em.PUBLISHED.values() for col in table.values())


@pytest.mark.parametrize('pair_name', ['mixture', 'laplace'])
def test_one_cell_on_a_tiny_budget_through_train_and_generate(tmp_path, pair_name):
    out = tmp_path / 'bench'
    res = CliRunner().invoke(em.main, ['--dims=2', '--eps=10', '--kimg=0.5', '--num=1000', '--eval-inputs=6',
                                       '--repeats=8', '--train-opts=--batch=64 --model-channels=4',
                                       f'--pair={pair_name}', f'--outdir={out}'])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in open(out / 'results.jsonl')]
    assert [r['sampler'] for r in rows] == ['G', 'sde'] and all(r['dim'] == 2 and r['eps'] == 10 for r in rows)
    assert ('SF2M-Sink 0.31' in res.output) == (pair_name == 'mixture') and 'Hardware:' in res.output
    assert all(r['pair'] == pair_name and r['loss'] == 'light' for r in rows)
    # The printed score is the one of the samples generate.py wrote (recomputed here).
    pair = em.PAIRS[pair_name](2, 10.0, 0)
    folder = 'D2-eps10' + ('' if pair_name == 'mixture' else '-laplace')
    for row in rows:
        with np.load(out / folder / f'samples-{row["sampler"]}' / 'samples.npz') as f:
            x, y = f['x'].astype(np.float64), f['y'].astype(np.float64)
        assert y.shape == (6, 8, 2)
        assert row['cbw2_uvp'] == pytest.approx(mx.cbw2_uvp(x, y, pair), rel=1e-9)
        assert row['train_s'] > 0 and row['kimg'] == 0.5


def test_refuses_an_eps_the_benchmark_does_not_have(tmp_path):
    res = CliRunner().invoke(em.main, ['--dims=2', '--eps=0.5', f'--outdir={tmp_path}'])
    assert res.exit_code != 0 and 'every eps one of [0.1, 1, 10]' in res.output
    assert not (tmp_path / 'results.jsonl').exists()
