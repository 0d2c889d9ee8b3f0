"""Helpers for training loops: a resumable sharded sampler, DDP gradient-sync control, parameter
copying, module summaries, a cross-rank consistency check and content hashes of tensors and networks."""

import contextlib
import hashlib

import numpy as np
import torch

from . import distributed as dist_utils

#----------------------------------------------------------------------------

class InfiniteSampler(torch.utils.data.Sampler):
    """An endless stream of dataset indices, sharded across ranks, seeded and resumable.

    The stream of this rank is a pure function of (seed, rank, num_replicas, position): epoch e uses
    the permutation drawn from `seed + e`, and rank r takes every `num_replicas`-th index of it
    starting at r. `start` skips the first `start` indices of this rank's stream, so a resumed run
    that passes the number of samples it had consumed sees exactly the batches it would have seen.
    (With DataLoader workers the sampler runs ahead of consumption; count consumption in the loop.)
    """

    def __init__(self, dataset, rank=None, num_replicas=None, shuffle=True, seed=0, start=0):
        size = len(dataset)
        if size <= 0:
            raise ValueError('InfiniteSampler needs a non-empty dataset')
        self.size = size
        self.rank = dist_utils.get_rank() if rank is None else rank
        self.num_replicas = dist_utils.get_world_size() if num_replicas is None else num_replicas
        assert 0 <= self.rank < self.num_replicas
        self.shuffle = shuffle
        self.seed = int(seed)
        self.position = int(start)

    def _epoch_order(self, epoch):
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def index_at(self, k):
        """The dataset index at position `k` of this rank's stream."""
        g = k * self.num_replicas + self.rank # Position in the global stream.
        epoch, offset = divmod(g, self.size)
        return int(self._epoch_order(epoch)[offset])

    def __iter__(self):
        epoch, order = None, None
        while True:
            g = self.position * self.num_replicas + self.rank
            e, offset = divmod(g, self.size)
            if e != epoch:
                epoch, order = e, self._epoch_order(e)
            self.position += 1
            yield int(order[offset])

    def state_dict(self):
        return dict(position=self.position, seed=self.seed, num_replicas=self.num_replicas)

    def load_state_dict(self, state):
        self.position = int(state['position'])

#----------------------------------------------------------------------------

def ddp_sync(module, sync):
    """Context in which a DDP module averages gradients only when `sync` is true.

    Used for gradient accumulation: only the last accumulation round needs the all-reduce.
    Plain (non-DDP) modules are unaffected.
    """
    if isinstance(module, torch.nn.parallel.DistributedDataParallel) and not sync:
        return module.no_sync()
    return contextlib.nullcontext()


def named_params_and_buffers(module):
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy parameters and buffers from `src_module` into `dst_module` by name."""
    src = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        if name in src:
            tensor.copy_(src[name].detach())
        elif require_all:
            raise KeyError(f'copy_params_and_buffers: "{name}" missing in the source module')


def check_ddp_consistency(module, ignore_regex=None):
    """Raise if any parameter or buffer of `module` differs from rank 0's copy.

    A no-op in a single process. `ignore_regex` skips matching names (e.g. running statistics).
    """
    import re
    if not dist_utils.is_distributed():
        return
    for name, tensor in named_params_and_buffers(module):
        if ignore_regex is not None and re.fullmatch(ignore_regex, name):
            continue
        mine = tensor.detach()
        ref = mine.clone()
        torch.distributed.broadcast(ref, src=0)
        same = torch.equal(torch.nan_to_num(mine), torch.nan_to_num(ref)) and torch.equal(mine.isnan(), ref.isnan())
        flag = torch.tensor([0 if same else 1], device=mine.device)
        torch.distributed.all_reduce(flag)
        if flag.item() != 0:
            diff = (mine.float() - ref.float()).abs().max().item()
            raise RuntimeError(f'DDP consistency check failed: "{name}" differs across ranks '
                               f'(rank {dist_utils.get_rank()} max abs difference from rank 0: {diff:g})')


def print_module_summary(module, inputs, max_nesting=3, skip_redundant=True):
    """Run `module(*inputs)` once and print a table of submodules, parameters, buffers and output shapes.

    Returns the module's outputs.
    """
    assert isinstance(inputs, (tuple, list))
    entries = []
    nesting = [0]

    def pre_hook(_mod, _inputs):
        nesting[0] += 1

    def post_hook(mod, _inputs, outputs):
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            outs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            entries.append((mod, [t for t in outs if isinstance(t, torch.Tensor)]))

    hooks = [m.register_forward_pre_hook(pre_hook) for m in module.modules()]
    hooks += [m.register_forward_hook(post_hook) for m in module.modules()]
    try:
        with torch.no_grad():
            outputs = module(*inputs)
    finally:
        for h in hooks:
            h.remove()

    # Each tensor counted once, at the first (innermost) module that owns it.
    seen = set()
    rows = [['Module', 'Parameters', 'Buffers', 'Output shape', 'Datatype']]
    names = {mod: name for name, mod in module.named_modules()}
    for mod, outs in entries:
        params = [p for p in mod.parameters() if id(p) not in seen]
        buffers = [b for b in mod.buffers() if id(b) not in seen]
        seen.update(id(t) for t in params + buffers)
        if skip_redundant and mod is not module and not params and not buffers and len(outs) == 0:
            continue
        name = '<top-level>' if mod is module else names.get(mod, type(mod).__name__)
        shapes = [str(list(t.shape)) for t in outs] or ['-']
        dtypes = [str(t.dtype).split('.')[-1] for t in outs] or ['-']
        rows.append([name, str(sum(p.numel() for p in params)) if params else '-',
                     str(sum(b.numel() for b in buffers)) if buffers else '-', shapes[0], dtypes[0]])
        for shape, dtype in zip(shapes[1:], dtypes[1:]):
            rows.append(['', '', '', shape, dtype])
    total_params = sum(p.numel() for p in module.parameters())
    total_buffers = sum(b.numel() for b in module.buffers())
    rows.append(['Total', str(total_params), str(total_buffers), '', ''])
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print()
    for i, row in enumerate(rows):
        if i in (1, len(rows) - 1):
            print('  '.join('-' * w for w in widths))
        print('  '.join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print()
    return outputs

#----------------------------------------------------------------------------
# Names used by the source embedded in NVlabs/edm network pickles (see persistence.py).

def assert_shape(tensor, ref_shape):
    """Raise if `tensor` does not have `ref_shape` (None entries match any size)."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}')
    for idx, (size, ref) in enumerate(zip(tensor.shape, ref_shape)):
        if ref is not None and size != ref:
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref}')


def constant(value, shape=None, dtype=None, device=None):
    """A tensor holding `value` (optionally broadcast to `shape`)."""
    t = torch.as_tensor(np.asarray(value), dtype=dtype, device=device)
    return t.expand(shape).contiguous() if shape is not None else t

#----------------------------------------------------------------------------
# Hashes (provenance).

def tensor_sha256(t):
    """sha256 hex digest of a tensor's dtype, shape and bytes."""
    t = t.detach().to('cpu').contiguous()
    h = hashlib.sha256(f'{t.dtype}:{list(t.shape)}:'.encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return h.hexdigest()


def state_dict_sha256(net):
    """sha256 hex digest of a network's state_dict (names, dtypes, shapes and values, in name order), or None
    for a denoiser without a state_dict (e.g. a closed-form one)."""
    if not hasattr(net, 'state_dict'):
        return None
    h = hashlib.sha256()
    for name, value in sorted(net.state_dict().items()):
        h.update(name.encode() + b'\0')
        h.update(tensor_sha256(value).encode() if torch.is_tensor(value) else repr(value).encode())
    return h.hexdigest()
