"""Run under torchrun by test_distributed.py: checks collectives and the DDP consistency check.

    python -m torch.distributed.run --standalone --nproc_per_node=N _dist_worker.py N [cpu|cuda]

cpu (the default) runs on gloo, cuda on nccl with one GPU per process; tensors live on the process's device.
"""

import os
import sys

import torch

from torch_utils import distributed as dist
from torch_utils import misc, training_stats


def main():
    want = sys.argv[2] if len(sys.argv) > 2 else 'cpu'
    dev = dist.init(want)
    rank, world = dist.get_rank(), dist.get_world_size()
    assert dev.type == want and dist.is_distributed() and world == int(sys.argv[1])
    backend = torch.distributed.get_backend()
    assert backend == ('nccl' if want == 'cuda' else 'gloo'), backend
    if dev.type == 'cuda':
        assert dev.index == int(os.environ['LOCAL_RANK']) % torch.cuda.device_count(), dev

    # All-reduce: sum of (rank + 1) over ranks.
    t = torch.tensor([float(rank + 1)], device=dev)
    dist.all_reduce_(t)
    assert t.item() == world * (world + 1) / 2, t

    # Seeds agree across ranks.
    seed = dist.agree_on_seed(None)
    assert len(set(dist.all_gather_object(seed))) == 1

    # Statistics reduced across ranks: rank r reports r+1 values equal to r.
    training_stats.report('x', [float(rank)] * (rank + 1))
    if rank == 0:
        training_stats.report('only_rank0', 5.0)
    stats = training_stats.Collector().update()
    values = [float(r) for r in range(world) for _ in range(r + 1)]
    expect = sum(values) / len(values)
    assert abs(stats['x'].mean - expect) < 1e-12 and stats['x'].num == len(values), stats
    assert stats['only_rank0'].num == 1

    # Sharded sampler: ranks see disjoint indices covering the dataset in the first epoch.
    sampler = misc.InfiniteSampler(range(10), seed=3)
    it = iter(sampler)
    mine = [next(it) for _ in range(10 // world)]
    all_idx = sum(dist.all_gather_object(mine), [])
    assert sorted(all_idx) == list(range(10)), all_idx

    # Consistency check: identical modules pass; a planted difference on the last rank is caught (with two
    # ranks or more; one rank has nothing to differ from).
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).to(dev)
    misc.check_ddp_consistency(net)
    if world == 1:
        dist.print0(f'ALL OK ({backend}, {dev})')
        dist.shutdown()
        return
    if rank == world - 1:
        with torch.no_grad():
            net[0].bias[1] += 1e-3
    try:
        misc.check_ddp_consistency(net)
    except RuntimeError as err:
        assert '0.bias' in str(err), err
        print(f'rank {rank}: caught: {err}')
    else:
        raise AssertionError('planted difference was not detected')
    dist.print0(f'ALL OK ({backend}, {dev})')
    dist.shutdown()


if __name__ == '__main__':
    main()
