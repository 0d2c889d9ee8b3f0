"""Statistics reported from anywhere in the code and reduced across ranks once per tick.

    training_stats.report('Loss/f', loss)          # any number, array or tensor; call anywhere
    collector = training_stats.Collector()
    ...
    stats = collector.update()                     # on every rank, at the same moment
    stats['Loss/f'].mean, .std, .num, .nonfinite

Reports accumulate (count, sum, sum of squares, non-finite count) per name in float64 on the reporting tensor's device
(no host synchronisation per report). `Collector.update()`
merges the names seen by every rank and all-reduces the moments, so each rank gets the statistics of
all reports made since the previous update. `StatsWriter` appends one JSON line per tick to
`stats.jsonl` and mirrors it to TensorBoard when that package is installed.
"""

import json
import math
import os

import numpy as np
import torch

from dnnlib import EasyDict

from . import distributed as dist_utils

_moments = dict() # name -> torch.float64 tensor [count, sum, sum of squares]

#----------------------------------------------------------------------------

def report(name, value):
    """Record one or more scalar observations under `name`; returns `value` unchanged.

    Non-finite entries are left out of the mean and std and counted in the `nonfinite` field, so one
    NaN does not poison the tick's statistics unnoticed.
    """
    t = torch.as_tensor(value.detach() if isinstance(value, torch.Tensor) else np.asarray(value))
    t = t.reshape(-1).to(torch.float64)
    finite = torch.isfinite(t)
    num_bad = (~finite).sum(dtype=torch.float64)
    t = torch.where(finite, t, torch.zeros_like(t))
    _accumulate(name, torch.stack([finite.sum(dtype=torch.float64), t.sum(), t.square().sum(), num_bad]))
    return value


def _accumulate(name, moments):
    if name in _moments:
        _moments[name] = _moments[name] + moments.to(_moments[name].device)
    else:
        _moments[name] = moments


class Collector:
    """Collects everything reported since the previous `update()`, reduced across ranks."""

    def __init__(self, regex='.*'):
        import re
        self._regex = re.compile(regex)
        self._stats = dict()

    def update(self):
        """Reduce and return {name: EasyDict(num, mean, std, nonfinite)}; must be called on every rank."""
        names = sorted(n for n in _moments if self._regex.fullmatch(n))
        if dist_utils.is_distributed():
            names = sorted(set().union(*dist_utils.all_gather_object(names)))
        if names:
            # Collectives run on this process's device (gloo on the CPU, nccl on a GPU).
            dev = dist_utils.device()
            local = torch.stack([_moments.pop(n).to(dev) if n in _moments else torch.zeros(4, dtype=torch.float64, device=dev)
                                 for n in names])
            local = dist_utils.all_reduce_(local).cpu()
        self._stats = dict()
        for i, name in enumerate(names):
            num, total, total_sq, nonfinite = local[i].tolist()
            mean = total / num if num > 0 else float('nan')
            var = max(total_sq / num - mean * mean, 0.0) if num > 0 else float('nan')
            self._stats[name] = EasyDict(num=num, mean=mean, std=math.sqrt(var), nonfinite=nonfinite)
        return self._stats

    def mean(self, name, default=float('nan')):
        s = self._stats.get(name)
        return s.mean if s is not None and s.num > 0 else default

    def num(self, name):
        s = self._stats.get(name)
        return s.num if s is not None else 0

    def as_dict(self):
        return {name: dict(s) for name, s in self._stats.items()}


def reset():
    """Forget every report not yet collected (used by tests and at start-up)."""
    _moments.clear()

#----------------------------------------------------------------------------

class StatsWriter:
    """Appends one JSON object per line to `stats.jsonl`; mirrors the means to TensorBoard when that
    package is installed, and to Weights & Biases when a project is named (wandb must then be installed)."""

    def __init__(self, run_dir, tensorboard=True, wandb_project=None, run_name=None, config=None):
        self.path = os.path.join(run_dir, 'stats.jsonl')
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(run_dir)
            except ImportError: # TensorBoard is optional.
                self._tb = None
        if wandb_project:
            self._wandb = wandb_module()
            self._wandb.init(project=wandb_project, name=run_name, dir=run_dir, config=config)

    def write(self, stats, step, timestamp=None, **extra):
        record = dict(stats, **extra)
        if timestamp is not None:
            record['timestamp'] = timestamp
        with open(self.path, 'a', encoding='utf-8') as f:
            f.write(json.dumps(record, allow_nan=True) + '\n')
            f.flush()
        if self._tb is not None:
            for name, value in stats.items():
                if isinstance(value, dict) and 'mean' in value and value.get('num', 1) > 0:
                    self._tb.add_scalar(name, value['mean'], global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({name: value['mean'] for name, value in stats.items()
                             if isinstance(value, dict) and value.get('num', 1) > 0}, step=step)

    def close(self):
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def wandb_module():
    """The wandb package, or a clear error saying how to get it (it is never required otherwise)."""
    try:
        import wandb
    except ImportError:
        raise ImportError('--wandb needs the optional package wandb: `pip install wandb` (or drop --wandb)') from None
    return wandb
