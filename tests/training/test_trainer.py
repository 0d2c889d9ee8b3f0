"""The trainer's pieces that do not need a task: the batch split; the data streams (the in-memory stream against
the DataLoader, batch for batch, also after a resume); the multi-tensor Adam against torch's per-parameter loop,
bit for bit; the compile fallback."""

import numpy as np
import pytest
import torch

from data.dataset import ImageFolderDataset, VectorDataset
from tests.conftest import write_image_zip
from training.trainer import DataStream, multi_tensor_kwargs, split_batch


@pytest.mark.parametrize('world', [1, 2, 3, 4])
def test_split_batch_matches_a_brute_force_search(world):
    for batch in range(1, 25):
        for batch_gpu in [None, *range(1, 27)]:
            # Brute force: the per-rank batch is batch / world; a round takes min(batch_gpu, per-rank) items and
            # the rounds must cover the per-rank batch exactly.
            per_rank = batch / world
            round_size = per_rank if batch_gpu is None else min(batch_gpu, per_rank)
            ok = per_rank == int(per_rank) and (per_rank / round_size) == int(per_rank / round_size)
            if not ok:
                with pytest.raises(ValueError, match='--batch=' + str(batch)):
                    split_batch(batch, batch_gpu, world)
                continue
            assert split_batch(batch, batch_gpu, world) == (batch, int(round_size), int(per_rank / round_size))


def test_split_batch_errors_name_the_fix():
    with pytest.raises(ValueError, match=r'--batch=10 is not divisible by the number of processes \(4\); use a multiple of 4'):
        split_batch(10, None, 4)
    with pytest.raises(ValueError, match=r'--batch-gpu=3 does not divide; choose a --batch-gpu dividing 8'):
        split_batch(16, 3, 2)


def _batches(stream, n):
    return [stream.next() for _ in range(n)]


@pytest.mark.parametrize('kind', ['images', 'images-xflip', 'vectors'])
def test_in_memory_stream_gives_the_loader_batches(tmp_path, kind):
    if kind == 'vectors':
        path = tmp_path / 'v.npz'
        np.savez(path, x=np.random.default_rng(0).normal(size=(13, 3)).astype(np.float32))
        make = lambda: VectorDataset(str(path))
    else:
        path = write_image_zip(tmp_path / 'a.zip', 11, resolution=4)
        make = lambda: ImageFolderDataset(path, xflip=kind.endswith('xflip'))
    loader = DataStream(make(), 5, torch.device('cpu'), seed=3, in_memory=False)
    memory = DataStream(make(), 5, torch.device('cpu'), seed=3, in_memory=True)
    want, got = _batches(loader, 7), _batches(memory, 7) # 35 items: over three epochs of the data.
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    # Resumed from a state, it continues with the same next batches.
    resumed = DataStream(make(), 5, torch.device('cpu'), seed=3, in_memory=True)
    resumed.load_state_dict(memory.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(_batches(loader, 3), _batches(resumed, 3)))


def test_in_memory_is_chosen_by_size(tmp_path, monkeypatch):
    ds = ImageFolderDataset(write_image_zip(tmp_path / 'a.zip', 6, resolution=4))
    assert DataStream(ds, 2, torch.device('cpu')).in_memory
    monkeypatch.setattr(DataStream, 'MEMORY_LIMIT', 6 * 3 * 4 * 4 - 1) # One byte short of the decoded set.
    assert not DataStream(ds, 2, torch.device('cpu')).in_memory


def test_multi_tensor_adam_steps_as_the_per_parameter_loop_bit_for_bit():
    adam = dict(class_name='torch.optim.Adam', lr=3e-4)
    assert multi_tensor_kwargs(adam, torch.device('cpu')) == dict(adam, foreach=True)
    assert multi_tensor_kwargs(adam, torch.device('cuda')) == dict(adam, fused=True)
    assert multi_tensor_kwargs(dict(adam, foreach=False), torch.device('cpu')) == dict(adam, foreach=False)
    assert multi_tensor_kwargs(dict(class_name='torch.optim.LBFGS', lr=1), torch.device('cpu')) == \
        dict(class_name='torch.optim.LBFGS', lr=1)
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 3, 3, 3), (8,), (16, 8, 3, 3), (1000, 37)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(10)]
    results = []
    for foreach in (False, True):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = torch.optim.Adam(params, lr=3e-4, foreach=foreach)
        for g in grads:
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            opt.step()
        results.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_compiled_call_falls_back_to_eager_once_with_one_line(capsys):
    from training.trainer import CompiledOrEager, Trainer
    net = torch.nn.Linear(3, 2)
    wrapper = CompiledOrEager(net, 'G')
    class Broken(torch.nn.Module):
        def forward(self, *args):
            raise RuntimeError('no C compiler here\nlong trace')
    wrapper.compiled = Broken()
    x = torch.randn(4, 3)
    assert torch.equal(wrapper(x), net(x)) and wrapper.compiled is None
    assert torch.equal(wrapper(x), net(x))
    assert capsys.readouterr().out == 'torch.compile of G failed, running it eagerly: RuntimeError: no C compiler here\n'
    with pytest.raises(ValueError, match='compile_mode'):
        Trainer(torch.device('cpu'), batch_size=2, compile_mode='fast')
