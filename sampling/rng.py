"""Per-sample random numbers, seeds from the command line and their split across ranks.

`StackedRandomGenerator` is the one per-sample random number generator of the project: one seeded CPU
torch.Generator per sample, so that a sample's numbers depend only on its own seed and the order of its
draws, never on the batch size, the number of ranks or the device. EOT translation, the diffusion samplers
and DPM-OT all draw from it.

Seeds are integers in [-2^63, 2^64) (`SEED_MIN`, `SEED_MAX`): what torch.Generator.manual_seed accepts.
A sample's stream depends on its seed modulo 2^32 alone (torch's CPU generator, an mt19937, keeps the low
32 bits of a seed), exactly as NVlabs/edm's `seed % (1 << 32)`: seeds that differ by a multiple of 2^32
give the same sample, and for every seed the streams are edm's on the CPU. Files that store seeds
(samples.npz) hold them as int64, so generate.py takes --seeds in [0, 2^63), at most `MAX_SEEDS` per call.
"""

import re

import numpy as np
import torch

from sampling import GenerationError
from torch_utils import distributed as dist

SEED_MIN, SEED_MAX = -2**63, 2**64    # [SEED_MIN, SEED_MAX): what torch.Generator.manual_seed accepts
MAX_SEEDS = 10_000_000                # samples per generate.py call (each needs its own generator)

#----------------------------------------------------------------------------
# Per-sample random numbers.

def check_seeds(seeds, what='seeds'):
    """`seeds` (ints, a range, a numpy array) as a non-empty list of Python ints in [SEED_MIN, SEED_MAX)."""
    seeds = list(seeds)
    if not seeds:
        raise GenerationError(f'no {what} given; pass e.g. range(64)')
    out = []
    for s in seeds:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) or not SEED_MIN <= int(s) < SEED_MAX:
            raise GenerationError(f'{what}: {s!r} is not a seed; seeds are integers in [-2^63, 2^64)')
        out.append(int(s))
    return out

class StackedRandomGenerator:
    """A stack of per-sample generators: row i of every draw comes from generator i alone.

    The generators are CPU torch.Generators: draws are made on the CPU, then moved to the device, so a
    seed gives the same numbers whatever the batch, the rank or the device.

    Args:
        device: where drawn tensors are put.
        seeds: one int in [-2^63, 2^64) per sample (check_seeds).
    """

    def __init__(self, device, seeds):
        self.device = torch.device(device)
        self.seeds = check_seeds(seeds)
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def __len__(self):
        return len(self.generators)

    def _per_sample(self, size):
        size = [int(s) for s in size]
        if not size or size[0] != len(self.generators):
            raise GenerationError(f'a draw of shape {size} does not match the {len(self.generators)} per-sample '
                                  'generators; the first dimension must be the number of samples')
        return size[1:]

    def _draw(self, fn, size, draw_dtype, dtype, device):
        rest = self._per_sample(size)
        out = torch.stack([fn(rest, generator=g, dtype=draw_dtype) for g in self.generators])
        return out.to(device=self.device if device is None else device, dtype=dtype)

    def randn(self, size, dtype=torch.float32, device=None):
        """Standard normal [N, ...], drawn in float32 (then cast to `dtype`): row i from generator i."""
        return self._draw(torch.randn, size, torch.float32, dtype, device)

    def rand(self, size, dtype=torch.float32, device=None):
        """Uniform [0, 1) [N, ...], drawn in float32 (then cast to `dtype`): row i from generator i."""
        return self._draw(torch.rand, size, torch.float32, dtype, device)

    def randn_like(self, x):
        """Standard normal with the shape, dtype and device of `x`, drawn in x's dtype (float64 draws for a
        float64 x, as NVlabs/edm's samplers make them): the `randn_like` argument of samplers."""
        return self._draw(torch.randn, x.shape, x.dtype, x.dtype, x.device)

    def randint(self, high, size, device=None):
        """Integers in [0, high) [N, ...] (int64), one torch.randint per sample, as edm draws class labels."""
        rest = self._per_sample(size)
        out = torch.stack([torch.randint(int(high), rest, generator=g) for g in self.generators])
        return out.to(self.device if device is None else device)

#----------------------------------------------------------------------------
# Seeds and ranks.

def parse_int_list(text, what='--seeds', limit=MAX_SEEDS):
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11] (ranges inclusive, in the given order).

    Values are non-negative and below 2^63 (they are stored as int64); at most `limit` of them in all,
    checked before any list is built.
    """
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    parts = []
    for part in str(text).split(','):
        part = part.strip()
        m = re.fullmatch(r'(\d+)(?:-(\d+))?', part)
        if m is None:
            raise GenerationError(f'{what}={text!r}: cannot read {part!r}; use non-negative integers and ranges, '
                                  'e.g. 0-99 or 1,5,10-19')
        lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if hi < lo:
            raise GenerationError(f'{what}={text!r}: the range {part!r} is empty; write it as {hi}-{lo}')
        if hi >= 2**63:
            raise GenerationError(f'{what}={text!r}: {hi} does not fit in 63 bits; values must be below 2^63')
        parts.append((lo, hi))
    total = sum(hi - lo + 1 for lo, hi in parts)
    if total > limit:
        raise GenerationError(f'{what}={text!r} asks for {total:,} values; at most {limit:,} per call (split the '
                              'work into several calls with disjoint ranges)')
    return [v for lo, hi in parts for v in range(lo, hi + 1)]

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
