"""Per-sample random numbers, seeds from the command line and their split across ranks.

`StackedRandomGenerator`: one seeded torch.Generator per sample, so that a sample's noise depends only on
its own seed, never on the batch size, the number of ranks or the device.
"""

import re

import numpy as np
import torch

from sampling import GenerationError
from torch_utils import distributed as dist

#----------------------------------------------------------------------------
# Per-sample random numbers.

class StackedRandomGenerator:
    """A stack of per-sample generators: row i of every draw comes from generator i alone.

    The generators are CPU torch.Generators and draws are made in float32 on the CPU, then moved to
    `device` and cast: a seed gives the same noise whatever the batch, the rank or the device.

    Args:
        device: where drawn tensors are put.
        seeds: one int in [0, 2^63) per sample.
    """

    def __init__(self, device, seeds):
        self.device = torch.device(device)
        self.seeds = [int(s) for s in seeds]
        for s in self.seeds:
            if not 0 <= s < 2**63:
                raise GenerationError(f'seed {s} is out of range; seeds must be integers in [0, 2^63)')
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self):
        return len(self.generators)

    def _draw(self, fn, size, dtype):
        size = [int(s) for s in size]
        if not size or size[0] != len(self.generators):
            raise GenerationError(f'a draw of shape {size} does not match the {len(self.generators)} per-sample '
                                  'generators; the first dimension must be the number of samples')
        out = torch.stack([fn(size[1:], generator=g, dtype=torch.float32) for g in self.generators])
        return out.to(device=self.device, dtype=dtype)

    def randn(self, size, dtype=torch.float32):
        """Standard normal [N, ...]: row i from generator i."""
        return self._draw(torch.randn, size, dtype)

    def rand(self, size, dtype=torch.float32):
        """Uniform [0, 1) [N, ...]: row i from generator i."""
        return self._draw(torch.rand, size, dtype)

    def randn_like(self, x):
        """randn with the shape, dtype and device of `x` (the `randn_like` argument of samplers)."""
        return self._draw(torch.randn, x.shape, x.dtype).to(x.device)

#----------------------------------------------------------------------------
# Seeds and ranks.

def parse_int_list(text, what='--seeds'):
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11] (ranges inclusive, non-negative, in the given order)."""
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    out = []
    for part in str(text).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)(?:-(\d+))?', part)
        if m is None:
            raise GenerationError(f'{what}={text!r}: cannot read {part!r}; use non-negative integers and ranges, '
                                  'e.g. 0-99 or 1,5,10-19')
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise GenerationError(f'{what}={text!r}: the range {part!r} is empty; write it as {hi}-{lo}')
        out.extend(range(lo, hi + 1))
    return out

def repeat_seeds(seeds, repeats):
    """[N, R] int64 seeds of repeat r of input i: seeds[i] * R + r."""
    if len(seeds) and max(int(s) for s in seeds) >= (2**63 - 1) // int(repeats):
        raise GenerationError(f'seed {max(seeds)} times --repeats={repeats} does not fit in 63 bits; use smaller seeds')
    seeds = np.asarray(seeds, dtype=np.int64).reshape(-1, 1)
    return seeds * int(repeats) + np.arange(int(repeats), dtype=np.int64)[None, :]

def rank_batches(num, batch_size, rank=None, world_size=None):
    """This rank's batches of job indices 0..num-1: batches of `batch_size` in order, dealt round-robin.

    Every index belongs to exactly one batch of one rank. Returns a list of int64 arrays.
    """
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    if batch_size < 1:
        raise GenerationError(f'batch size must be >= 1; got {batch_size}')
    batches = [np.arange(i, min(i + batch_size, num), dtype=np.int64) for i in range(0, num, batch_size)]
    return batches[rank::world_size]
