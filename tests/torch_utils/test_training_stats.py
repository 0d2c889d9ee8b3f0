"""torch_utils.training_stats in one process (the 2-rank reduction is in test_distributed.py)."""

import json

import numpy as np
import torch

from torch_utils import training_stats


def test_collector_matches_numpy_and_counts_nonfinite():
    training_stats.reset()
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=10), rng.normal(size=(3, 4))
    training_stats.report('v', torch.from_numpy(a))
    training_stats.report('v', b)
    training_stats.report('v', float('nan'))
    training_stats.report('w', 3.0)
    stats = training_stats.Collector().update()
    ref = np.concatenate([a, b.ravel()])
    assert stats['v'].num == ref.size and stats['v'].nonfinite == 1
    assert abs(stats['v'].mean - ref.mean()) < 1e-12 and abs(stats['v'].std - ref.std()) < 1e-12
    assert stats['w'].mean == 3.0
    # Everything was consumed.
    assert training_stats.Collector().update() == {}


def test_collector_regex_and_writer(tmp_path):
    training_stats.reset()
    training_stats.report('Loss/G', 1.0)
    training_stats.report('Timing/tick', 2.0)
    c = training_stats.Collector(regex='Loss/.*')
    stats = c.update()
    assert list(stats) == ['Loss/G'] and c.mean('Loss/G') == 1.0 and c.num('Loss/missing') == 0
    writer = training_stats.StatsWriter(str(tmp_path), tensorboard=False)
    writer.write(c.as_dict(), step=5, timestamp=123.0)
    writer.write(c.as_dict(), step=6)
    lines = (tmp_path / 'stats.jsonl').read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])['Loss/G']['mean'] == 1.0 and json.loads(lines[0])['timestamp'] == 123.0
    training_stats.reset()
