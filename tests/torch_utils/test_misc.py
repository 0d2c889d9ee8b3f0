"""torch_utils.misc: sampler, ddp_sync, parameter copy, module summary, shape helpers."""

import contextlib
import itertools

import numpy as np
import pytest
import torch

from torch_utils import misc


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_infinite_sampler_is_a_seeded_permutation_stream():
    s = misc.InfiniteSampler(range(7), rank=0, num_replicas=1, seed=1)
    idx = _take(s, 21)
    for e in range(3): # Each epoch is a permutation; epochs differ.
        assert sorted(idx[7 * e: 7 * e + 7]) == list(range(7))
    assert idx[:7] != idx[7:14]
    assert idx == _take(misc.InfiniteSampler(range(7), rank=0, num_replicas=1, seed=1), 21)
    assert idx != _take(misc.InfiniteSampler(range(7), rank=0, num_replicas=1, seed=2), 21)
    assert _take(misc.InfiniteSampler(range(5), rank=0, num_replicas=1, shuffle=False), 7) == [0, 1, 2, 3, 4, 0, 1]


def test_infinite_sampler_shards_and_resumes():
    ranks = [misc.InfiniteSampler(range(12), rank=r, num_replicas=3, seed=4) for r in range(3)]
    streams = [_take(s, 8) for s in ranks] # 2 epochs in total.
    single = _take(misc.InfiniteSampler(range(12), rank=0, num_replicas=1, seed=4), 24)
    # Interleaving the ranks' streams gives the single-process stream.
    assert [streams[k % 3][k // 3] for k in range(24)] == single
    # Resuming at a position continues the same stream, across an epoch boundary too.
    full = _take(misc.InfiniteSampler(range(12), rank=1, num_replicas=3, seed=4), 10)
    resumed = _take(misc.InfiniteSampler(range(12), rank=1, num_replicas=3, seed=4, start=3), 7)
    assert resumed == full[3:]
    s = misc.InfiniteSampler(range(12), rank=1, num_replicas=3, seed=4)
    _take(s, 5)
    s2 = misc.InfiniteSampler(range(12), rank=1, num_replicas=3, seed=4)
    s2.load_state_dict(s.state_dict())
    assert _take(s2, 5) == full[5:10]
    assert [s.index_at(k) for k in range(10)] == full
    with pytest.raises(ValueError, match='non-empty'):
        misc.InfiniteSampler([], rank=0, num_replicas=1)


def test_ddp_sync_is_a_no_op_for_plain_modules():
    net = torch.nn.Linear(2, 2)
    assert isinstance(misc.ddp_sync(net, False), contextlib.nullcontext)
    assert isinstance(misc.ddp_sync(net, True), contextlib.nullcontext)


def test_copy_params_and_buffers():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    b = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    a[1].running_mean.fill_(0.25)
    misc.copy_params_and_buffers(a, b, require_all=True)
    for (na, ta), (nb, tb) in zip(misc.named_params_and_buffers(a), misc.named_params_and_buffers(b)):
        assert na == nb and torch.equal(ta, tb)
    with pytest.raises(KeyError, match='extra'):
        c = torch.nn.Sequential(torch.nn.Linear(3, 4))
        c.register_buffer('extra', torch.zeros(1))
        misc.copy_params_and_buffers(a, c, require_all=True)


def test_print_module_summary_counts_parameters(capsys):
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.SiLU(), torch.nn.Linear(7, 2), torch.nn.BatchNorm1d(2))
    out = misc.print_module_summary(net, [torch.zeros(3, 5)])
    assert out.shape == (3, 2)
    text = capsys.readouterr().out
    total_line = [line for line in text.splitlines() if line.startswith('Total')][0]
    expect_params = 5 * 7 + 7 + 7 * 2 + 2 + 2 * 2
    expect_buffers = sum(b.numel() for b in net.buffers())
    assert total_line.split()[1:3] == [str(expect_params), str(expect_buffers)]
    assert '[3, 7]' in text and '[3, 2]' in text


def test_assert_shape_and_constant():
    misc.assert_shape(torch.zeros(2, 3), [2, None])
    with pytest.raises(AssertionError, match='dimension 1'):
        misc.assert_shape(torch.zeros(2, 3), [2, 4])
    c = misc.constant(np.float32(1.5), shape=[2, 2])
    assert c.shape == (2, 2) and torch.all(c == 1.5)
