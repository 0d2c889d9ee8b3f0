"""The trainer: networks with their DDP wrappers, optimisers and EMAs, one optimisation phase, and the
resumable data streams.

A *task* (training/task.py) registers its networks with `Trainer.add_network` and runs optimisation steps
with `Trainer.run_phase`; the loop (training/loop.py) owns everything else.
"""

import contextlib
import copy
import inspect

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats
from torch_utils.images import to_model_space

#----------------------------------------------------------------------------
# Data streams.

class DataStream:
    """Endless batches from a dataset for this rank, resumable at the exact sample.

    Counts the samples handed to the loop (not those prefetched by workers), so `state_dict()` and a
    new stream built with that state continue with exactly the next batch.

    `in_memory`: decode every item once into one array and draw batches from it by index (no DataLoader,
    no per-item decoding); True, False, or 'auto' (when the decoded items take at most MEMORY_LIMIT bytes).
    Either way a batch holds the same items in the same order (the same sampler draws the indices).
    """

    MEMORY_LIMIT = 1 << 28 # 256 MiB of decoded items per stream.

    def __init__(self, dataset, batch_size, device, seed=0, loader_kwargs=None, start=0, in_memory='auto'):
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.loader_kwargs = dict(loader_kwargs or {})
        self.consumed = int(start)
        self._iterator = None
        if in_memory == 'auto':
            item = np.asarray(dataset[0][0])
            in_memory = len(dataset) * item.nbytes <= self.MEMORY_LIMIT
        self.in_memory = bool(in_memory)
        self._items = None

    def _make_iterator(self):
        sampler = misc.InfiniteSampler(self.dataset, seed=self.seed, start=self.consumed)
        if self.in_memory:
            return self._memory_batches(sampler)
        kwargs = dict(self.loader_kwargs)
        if kwargs.get('num_workers', 0) == 0:
            kwargs.pop('prefetch_factor', None)
            kwargs.pop('persistent_workers', None)
        # An own generator: creating the loader's iterator must not draw from the global RNG, whose
        # state is part of an exact resume.
        generator = torch.Generator().manual_seed(self.seed)
        if kwargs.get('num_workers', 0) > 0: # A Ctrl-C or SIGTERM stops the run, not its data workers mid-iteration.
            kwargs.setdefault('worker_init_fn', dist.ignore_stop_signals)
        loader = torch.utils.data.DataLoader(self.dataset, sampler=sampler, batch_size=self.batch_size,
                                             generator=generator, **kwargs)
        return (items for items, _labels in loader)

    def _memory_batches(self, sampler):
        if self._items is None:
            line = dnnlib.util.ProgressLine()
            items = []
            for i in range(len(self.dataset)):
                line.update(f'Loading {getattr(self.dataset, "name", "the data")} into memory: {i}/{len(self.dataset)}')
                items.append(self.dataset[i][0])
            line.clear()
            self._items = torch.as_tensor(np.stack(items))
        indices = iter(sampler)
        while True:
            yield self._items[torch.as_tensor([next(indices) for _ in range(self.batch_size)])]

    def next(self):
        """The next batch, in model space, on the device."""
        if self._iterator is None:
            self._iterator = self._make_iterator()
        items = next(self._iterator)
        self.consumed += items.shape[0]
        return to_model_space(items, self.device)

    def state_dict(self):
        return dict(consumed=self.consumed)

    def load_state_dict(self, state):
        self.consumed = int(state['consumed'])
        self._iterator = None

#----------------------------------------------------------------------------

class DivergenceError(RuntimeError):
    """Training produced non-finite losses (policy 'stop') or non-finite parameters."""

class Trainer:
    """Networks with their DDP wrappers, optimisers and EMAs, and the optimisation-phase helper.

    Tasks register networks with `add_network` and run optimisation steps with `run_phase`.
    """

    def __init__(self, device, batch_size, batch_gpu=None, precision='fp32', grad_clip=1.0,
                 lr_rampup_kimg=0, ema_halflife_kimg=500, ema_rampup_ratio=0.05, seed=0, nan_policy='skip',
                 compile_mode=None, lr_decay_kimg=0, total_kimg=None):
        if nan_policy not in ('skip', 'stop'):
            raise ValueError(f'nan_policy must be "skip" or "stop", not {nan_policy!r}')
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f'compile_mode must be one of {COMPILE_MODES}, not {compile_mode!r}')
        self.compile_mode = compile_mode
        self.device = device
        self.nan_policy = nan_policy
        self.last_good = None  # Set by the loop: the newest snapshot / state written, for error messages.
        self.batch_size, self.batch_gpu, self.rounds = split_batch(batch_size, batch_gpu)
        self.precision = precision
        self.grad_clip = grad_clip
        self.lr_rampup_kimg = lr_rampup_kimg
        if lr_decay_kimg > 0 and total_kimg is None:
            raise ValueError(f'lr_decay_kimg={lr_decay_kimg} needs total_kimg (the decay ends there)')
        self.lr_decay_kimg, self.total_kimg = lr_decay_kimg, total_kimg
        self.ema_halflife_kimg = ema_halflife_kimg
        self.ema_rampup_ratio = ema_rampup_ratio
        self.cur_nimg = 0
        self.nets, self.ddp, self.train_call, self.opt, self.ema, self.base_lr = {}, {}, {}, {}, {}, {}
        self.params, self.ema_pairs = {}, {}
        # The loop's own noise (bridge times, noise inputs): one explicit stream per rank.
        self.generator = torch.Generator(device).manual_seed(seed * dist.get_world_size() + dist.get_rank())

    def add_network(self, name, net, optimizer_kwargs):
        """Move `net` to the device, wrap it in DDP when distributed, and create its optimiser and EMA."""
        net.train().requires_grad_(True).to(self.device)
        if dist.is_distributed():
            ids = [self.device] if self.device.type == 'cuda' else None
            ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=ids, broadcast_buffers=False)
        else:
            ddp = net
        self.nets[name] = net
        self.ddp[name] = ddp
        # What run_phase hands to the loss: with compile_mode only the trained passes are compiled (frozen calls
        # and the penalty's double backward use the plain module).
        self.train_call[name] = ddp if self.compile_mode is None else CompiledOrEager(ddp, name, self.compile_mode)
        self.opt[name] = dnnlib.util.construct_class_by_name(params=net.parameters(),
                                                             **multi_tensor_kwargs(optimizer_kwargs, self.device))
        self.base_lr[name] = optimizer_kwargs['lr']
        self.ema[name] = copy.deepcopy(net).eval().requires_grad_(False)
        # The parameter and buffer lists, walked once: every step and EMA update uses them (walking the module tree
        # of these small networks on every call was a few % of a CPU step).
        self.params[name] = list(net.parameters())
        self.ema_pairs[name] = (list(self.ema[name].parameters()), self.params[name],
                                list(zip(self.ema[name].buffers(), net.buffers())))

    # Random numbers from the loop's generator.
    def randn(self, shape):
        return torch.randn(shape, device=self.device, generator=self.generator)

    def rand(self, shape):
        return torch.rand(shape, device=self.device, generator=self.generator)

    def autocast(self):
        """Mixed precision context for forward passes (bf16 when --precision=bf16)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == 'bf16')

    def lr_scale(self):
        """The factor of every base learning rate at cur_nimg: a linear ramp-up from 0 over lr_rampup_kimg, and a
        linear decay to 0 over the last lr_decay_kimg before total_kimg (CycleGAN's schedule for its second half)."""
        scale = 1.0
        if self.lr_rampup_kimg > 0:
            scale = min(self.cur_nimg / (self.lr_rampup_kimg * 1000), 1.0)
        if self.lr_decay_kimg > 0:
            scale *= min(max((self.total_kimg * 1000 - self.cur_nimg) / (self.lr_decay_kimg * 1000), 0.0), 1.0)
        return scale

    def run_phase(self, name, loss_fn):
        """One optimisation step of network `name`.

        `loss_fn(net)` draws its own batch of `batch_gpu` samples and returns per-sample losses; `net`
        is the DDP wrapper (compiled with `compile_mode`), so gradients are averaged across ranks. The step accumulates over
        `rounds` (syncing only on the last), reports the loss, counts and zeroes non-finite gradient
        entries, clips element-wise to [-grad_clip, grad_clip], sets the ramped lr and steps.
        A non-finite loss on any rank skips the step on every rank (counted as Divergence/skipped_<name>)
        or, with nan_policy='stop', raises DivergenceError.
        """
        self.run_phases([name], lambda calls: {name: loss_fn(calls[name])})

    def run_phases(self, names, loss_fn):
        """One optimisation step of each network in `names` from shared forward passes: `loss_fn({name: net})`
        returns {name: per-sample losses}, and each network's loss is backpropagated into that network's
        parameters alone (another network's loss may depend on them: the G-step's loss on f's and D's weights).
        Otherwise each step is run_phase's: accumulation over `rounds`, the same checks, clipping and lr.
        """
        for name in names:
            self.opt[name].zero_grad(set_to_none=True)
        loss_ok = torch.ones([len(names)], device=self.device)
        calls = {name: self.train_call[name] for name in names}
        for r in range(self.rounds):
            with contextlib.ExitStack() as syncs:
                for name in names:
                    syncs.enter_context(misc.ddp_sync(self.ddp[name], sync=(r == self.rounds - 1)))
                losses = loss_fn(calls)
                for i, name in enumerate(names):
                    training_stats.report(f'Loss/{name}', losses[name])
                    loss_ok[i] = loss_ok[i] * torch.isfinite(losses[name]).all()
                    scaled = losses[name].float().mean().mul(1 / self.rounds)
                    if len(names) == 1:
                        scaled.backward()
                    else: # Keep the shared graph for the losses still to come.
                        torch.autograd.backward(scaled, inputs=self.params[name], retain_graph=i < len(names) - 1)
        loss_ok = dist.all_reduce_(loss_ok, op='min') # One small collective so every rank takes the same decisions.
        for name, ok in zip(names, loss_ok.tolist()):
            self._step(name, bool(ok))

    def _step(self, name, loss_ok):
        """Skip (non-finite loss) or clean, clip and apply the accumulated gradients of network `name`."""
        opt = self.opt[name]
        if not loss_ok:
            training_stats.report(f'Divergence/skipped_{name}', 1)
            if self.nan_policy == 'stop':
                raise DivergenceError(f'Non-finite loss of {name} at kimg {self.cur_nimg / 1000:.3f} '
                                      f'(--nan-policy=stop). {self.last_good_message()}')
            opt.zero_grad(set_to_none=True)
            return
        training_stats.report(f'Divergence/skipped_{name}', 0)
        grads = [p.grad for p in self.params[name] if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            bad = ~torch.isfinite(flat)
            training_stats.report(f'Grad/nonfinite_{name}', bad.sum())
            flat = flat.masked_fill(bad, 0)
            if self.grad_clip is not None and self.grad_clip > 0:
                flat = flat.clamp(-self.grad_clip, self.grad_clip)
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
        for group in opt.param_groups:
            group['lr'] = self.base_lr[name] * self.lr_scale()
        opt.step()

    @torch.no_grad()
    def update_ema(self):
        """EMA of every network, half-life `ema_halflife_kimg` ramped up as `cur_nimg * ema_rampup_ratio`."""
        halflife_nimg = self.ema_halflife_kimg * 1000
        if self.ema_rampup_ratio is not None:
            halflife_nimg = min(halflife_nimg, self.cur_nimg * self.ema_rampup_ratio)
        beta = 0.5 ** (self.batch_size / max(halflife_nimg, 1e-8))
        for ema_params, params, buffers in self.ema_pairs.values():
            # One multi-tensor lerp over all parameters (the same bits as a per-parameter lerp_).
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - beta)
            for b_ema, b_net in buffers:
                b_ema.copy_(b_net)

    def last_good_message(self):
        if self.last_good is None:
            return 'No snapshot has been written yet.'
        return (f'The last good snapshot is {self.last_good["snapshot"]}' +
                (f'; resume with --resume={self.last_good["state"]}' if self.last_good.get('state') else '') +
                ' (try a lower learning rate or --grad-clip).')

    @torch.no_grad()
    def check_finite(self):
        """Raise DivergenceError if a parameter of any network or EMA is not finite (same on every rank)."""
        bad = [f'{kind} {name}' for kind, nets in (('network', self.nets), ('EMA of', self.ema))
               for name, net in nets.items() if not all(torch.isfinite(p).all() for p in net.parameters())]
        flag = dist.all_reduce_(torch.tensor([float(len(bad))], device=self.device), op='max')
        if flag.item() > 0:
            raise DivergenceError(f'Non-finite parameters in {", ".join(bad) or "another rank"} at kimg '
                                  f'{self.cur_nimg / 1000:.3f}; nothing more was saved. {self.last_good_message()}')

    def check_consistency(self):
        """Fail loudly if any network or EMA differs across ranks."""
        for name in self.nets:
            misc.check_ddp_consistency(self.nets[name])
            misc.check_ddp_consistency(self.ema[name])

    def state_dict(self):
        return dict(cur_nimg=self.cur_nimg,
                    nets={k: v.state_dict() for k, v in self.nets.items()},
                    ema={k: v.state_dict() for k, v in self.ema.items()},
                    opt={k: v.state_dict() for k, v in self.opt.items()})

    def load_state_dict(self, state):
        self.cur_nimg = int(state['cur_nimg'])
        for k in self.nets:
            self.nets[k].load_state_dict(state['nets'][k])
            self.ema[k].load_state_dict(state['ema'][k])
            self.opt[k].load_state_dict(state['opt'][k])

COMPILE_MODES = (None, 'default', 'reduce-overhead', 'max-autotune')

class CompiledOrEager(torch.nn.Module):
    """`torch.compile(module, mode=mode)`, falling back to `module` itself for good (with one line saying why) if
    compiling fails: no C compiler, an unsupported op, a backend error. Compilation happens at the first call
    (tens of seconds to minutes on a CPU; it pays off in long runs or with a warm cache, see docs/recipes.md).
    """

    def __init__(self, module, name, mode='default'):
        super().__init__()
        self.eager = module
        self.compiled = torch.compile(module, mode=mode)
        self.name = name

    def forward(self, *args, **kwargs):
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err: # pylint: disable=broad-except # Any compiler failure: run eagerly.
                dist.print0(f'torch.compile of {self.name} failed, running it eagerly: '
                            f'{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ""}')
                self.compiled = None
        return self.eager(*args, **kwargs)

def split_batch(batch_size, batch_gpu=None, world_size=None):
    """Split a total batch over ranks and accumulation rounds: the one check of batch divisibility.

    Args:
        batch_size: total batch of one optimisation step, over all ranks.
        batch_gpu: largest per-rank batch of one accumulation round; None (or more than the per-rank
            batch) means the whole per-rank batch in one round.
        world_size: number of ranks (default: the current process group's).
    Returns:
        (batch_size, per-round batch per rank, accumulation rounds).
    Raises:
        ValueError naming --batch / --batch-gpu and a value that works.
    """
    world = dist.get_world_size() if world_size is None else int(world_size)
    if batch_size % world != 0:
        raise ValueError(f'--batch={batch_size} is not divisible by the number of processes ({world}); '
                         f'use a multiple of {world}')
    per_rank = batch_size // world
    if batch_gpu is None or batch_gpu > per_rank:
        batch_gpu = per_rank
    if per_rank % batch_gpu != 0:
        raise ValueError(f'--batch={batch_size} over {world} process(es) gives {per_rank} per process, which '
                         f'--batch-gpu={batch_gpu} does not divide; choose a --batch-gpu dividing {per_rank}')
    return batch_size, batch_gpu, per_rank // batch_gpu

def multi_tensor_kwargs(optimizer_kwargs, device):
    """`optimizer_kwargs` with the optimiser's multi-tensor implementation chosen where none is: fused kernels on
    CUDA, `foreach` on the CPU (torch's CPU default is a loop over the parameters; foreach gives the same bits,
    CPU fused kernels round differently). Optimisers without these options are left alone."""
    kwargs = dict(optimizer_kwargs)
    if 'fused' in kwargs or 'foreach' in kwargs:
        return kwargs
    params = inspect.signature(dnnlib.util.get_obj_by_name(kwargs['class_name'])).parameters
    if device.type == 'cuda' and 'fused' in params:
        kwargs['fused'] = True
    elif 'foreach' in params:
        kwargs['foreach'] = True
    return kwargs

def cpu_copy(module):
    """A detached CPU copy of `module` in eval mode, for snapshots."""
    return copy.deepcopy(module).cpu().eval().requires_grad_(False)

#----------------------------------------------------------------------------
# Random-number state of every rank, for exact resume.

def _rng_state(trainer):
    state = dict(torch=torch.get_rng_state(), loop=trainer.generator.get_state())
    if trainer.device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state(trainer.device)
    return state

def _set_rng_state(trainer, state):
    torch.set_rng_state(state['torch'])
    trainer.generator.set_state(state['loop'])
    if trainer.device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state(state['cuda'], trainer.device)
