"""Run by tests/transport/test_semidiscrete.py under torchrun: solve a small problem and save rank 0's result.

    python -m torch.distributed.run --standalone --nproc_per_node=2 _semidiscrete_dist_worker.py OUT

Every mode of CONFIGS runs in turn; OUT gets {mode: result}. The test calls the same `run(mode)` in a single
process and compares.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..')))

from torch_utils import distributed as dist_utils           # noqa: E402
from transport import semidiscrete as sd                       # noqa: E402

CONFIGS = {
    'samples': dict(source='uniform', settings=dict()),
    'targets': dict(source='normal', settings=dict(shard_targets=True)),
    'qmc': dict(source='uniform', settings=dict(qmc=True)),
    'bf16': dict(source='uniform', settings=dict(dtype=torch.bfloat16)),
    # Target shards compare exact leaders across ranks where one process uses reduced-precision runner-up
    # values: the gap statistics, and so h, agree only approximately.
    'bf16_targets': dict(source='uniform', settings=dict(dtype=torch.bfloat16, shard_targets=True)),
}
APPROXIMATE = ('bf16_targets',)


def make_problem(source):
    gen = torch.Generator().manual_seed(123)
    y = torch.randn(96, 24, generator=gen) * (0.5 + torch.rand(96, 1, generator=gen))
    return sd.SemidiscreteProblem(y, source)


def run(mode):
    """Solve CONFIGS[mode] (in whatever process group is active); returns a dict of plain results."""
    cfg = CONFIGS[mode]
    prob = make_problem(cfg['source'])
    # Small blocks and chunks so the 96 targets and every batch span several of each.
    solver = sd.SemidiscreteSolver(max_iters=12, tol=0.2, block_size=128, chunk_size=32, samples_per_iter=700,
                                   check_samples=1000, patience=2, **cfg['settings'])
    out = solver(prob, generator=torch.Generator().manual_seed(5))
    ev = sd.evaluate(prob, out.h, 3000, torch.Generator().manual_seed(6), block_size=256, chunk_size=32)
    return dict(h=out.h, history=out.history, num_samples_used=out.num_samples_used, converged=out.converged,
                eval_counts=ev['counts'])


def main():
    out_path = sys.argv[1]
    dist_utils.init('cpu')
    assert dist_utils.get_world_size() == 2, 'run me with --nproc_per_node=2'
    result = {mode: run(mode) for mode in CONFIGS}
    if dist_utils.get_rank() == 0:
        torch.save(result, out_path)
    dist_utils.barrier()
    dist_utils.shutdown()


if __name__ == '__main__':
    main()
