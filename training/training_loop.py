"""The training loop shared by every kind of model.

A *task* says which networks exist, what one training iteration does and what a snapshot holds:
`training.eot.EOTTask` (one-step entropic OT: G, f and D) and `training.diffusion.DenoiserTask`
(a preconditioned denoiser for DPM-OT). The loop owns everything else: devices and ranks, DDP
wrappers, optimisers, EMAs, lr ramp-up, gradient accumulation, non-finite gradient counting and
clipping, progress ticks, statistics, snapshots, training states and resume.

Progress is counted in images (or vectors): one iteration advances `cur_nimg` by `batch_size`.
"""

import copy
import glob
import json
import os
import pickle
import re
import time

import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats
from training.dataset import to_model_space

#----------------------------------------------------------------------------
# Data streams.

class DataStream:
    """Endless batches from a dataset for this rank, resumable at the exact sample.

    Counts the samples handed to the loop (not those prefetched by workers), so `state_dict()` and a
    new stream built with that state continue with exactly the next batch.
    """

    def __init__(self, dataset, batch_size, device, seed=0, loader_kwargs=None, start=0):
        self.dataset = dataset
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.loader_kwargs = dict(loader_kwargs or {})
        self.consumed = int(start)
        self._iterator = None

    def _make_iterator(self):
        sampler = misc.InfiniteSampler(self.dataset, seed=self.seed, start=self.consumed)
        kwargs = dict(self.loader_kwargs)
        if kwargs.get('num_workers', 0) == 0:
            kwargs.pop('prefetch_factor', None)
            kwargs.pop('persistent_workers', None)
        # An own generator: creating the loader's iterator must not draw from the global RNG, whose
        # state is part of an exact resume.
        generator = torch.Generator().manual_seed(self.seed)
        loader = torch.utils.data.DataLoader(self.dataset, sampler=sampler, batch_size=self.batch_size,
                                             generator=generator, **kwargs)
        return iter(loader)

    def next(self):
        """The next batch, in model space, on the device."""
        if self._iterator is None:
            self._iterator = self._make_iterator()
        items, _labels = next(self._iterator)
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
                 lr_rampup_kimg=0, ema_halflife_kimg=500, ema_rampup_ratio=0.05, seed=0, nan_policy='skip'):
        if nan_policy not in ('skip', 'stop'):
            raise ValueError(f'nan_policy must be "skip" or "stop", not {nan_policy!r}')
        self.device = device
        self.nan_policy = nan_policy
        self.last_good = None  # Set by the loop: the newest snapshot / state written, for error messages.
        self.batch_size, self.batch_gpu, self.rounds = split_batch(batch_size, batch_gpu)
        self.precision = precision
        self.grad_clip = grad_clip
        self.lr_rampup_kimg = lr_rampup_kimg
        self.ema_halflife_kimg = ema_halflife_kimg
        self.ema_rampup_ratio = ema_rampup_ratio
        self.cur_nimg = 0
        self.nets, self.ddp, self.opt, self.ema, self.base_lr = {}, {}, {}, {}, {}
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
        self.opt[name] = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
        self.base_lr[name] = optimizer_kwargs['lr']
        self.ema[name] = copy.deepcopy(net).eval().requires_grad_(False)

    # Random numbers from the loop's generator.
    def randn(self, shape):
        return torch.randn(shape, device=self.device, generator=self.generator)

    def rand(self, shape):
        return torch.rand(shape, device=self.device, generator=self.generator)

    def autocast(self):
        """Mixed precision context for forward passes (bf16 when --precision=bf16)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == 'bf16')

    def lr_scale(self):
        if self.lr_rampup_kimg <= 0:
            return 1.0
        return min(self.cur_nimg / (self.lr_rampup_kimg * 1000), 1.0)

    def run_phase(self, name, loss_fn):
        """One optimisation step of network `name`.

        `loss_fn(net)` draws its own batch of `batch_gpu` samples and returns per-sample losses; `net`
        is the DDP wrapper, so gradients are averaged across ranks. The step accumulates over
        `rounds` (syncing only on the last), reports the loss, counts and zeroes non-finite gradient
        entries, clips element-wise to [-grad_clip, grad_clip], sets the ramped lr and steps.
        A non-finite loss on any rank skips the step on every rank (counted as Divergence/skipped_<name>)
        or, with nan_policy='stop', raises DivergenceError.
        """
        net, ddp, opt = self.nets[name], self.ddp[name], self.opt[name]
        opt.zero_grad(set_to_none=True)
        loss_ok = torch.ones([], device=self.device)
        for r in range(self.rounds):
            with misc.ddp_sync(ddp, sync=(r == self.rounds - 1)):
                loss = loss_fn(ddp)
                training_stats.report(f'Loss/{name}', loss)
                loss_ok = loss_ok * torch.isfinite(loss).all()
                loss.float().mean().mul(1 / self.rounds).backward()
        # One small collective so every rank takes the same decision.
        if not bool(dist.all_reduce_(loss_ok, op='min')):
            training_stats.report(f'Divergence/skipped_{name}', 1)
            if self.nan_policy == 'stop':
                raise DivergenceError(f'Non-finite loss of {name} at kimg {self.cur_nimg / 1000:.3f} '
                                      f'(--nan-policy=stop). {self.last_good_message()}')
            opt.zero_grad(set_to_none=True)
            return
        training_stats.report(f'Divergence/skipped_{name}', 0)
        grads = [p.grad for p in net.parameters() if p.grad is not None]
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
        for name, net in self.nets.items():
            ema = self.ema[name]
            for p_ema, p_net in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p_net.detach(), 1 - beta)
            for b_ema, b_net in zip(ema.buffers(), net.buffers()):
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


def split_batch(batch_size, batch_gpu=None):
    """(batch_size, per-round batch per rank, accumulation rounds), with clear errors."""
    world = dist.get_world_size()
    if batch_size % world != 0:
        raise ValueError(f'--batch={batch_size} is not divisible by the number of processes ({world}); '
                         f'use a multiple of {world}')
    per_rank = batch_size // world
    if batch_gpu is None or batch_gpu > per_rank:
        batch_gpu = per_rank
    if per_rank % batch_gpu != 0:
        raise ValueError(f'--batch={batch_size} over {world} process(es) gives {per_rank} per process, which is not '
                         f'divisible by --batch-gpu={batch_gpu}; choose --batch-gpu dividing {per_rank}')
    return batch_size, batch_gpu, per_rank // batch_gpu

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

#----------------------------------------------------------------------------
# Files of a run.

def find_latest_state(run_dir):
    """Path of the newest complete training-state-*.pt in `run_dir`, or None."""
    states = glob.glob(os.path.join(run_dir, 'training-state-*.pt'))
    states = [s for s in states if re.fullmatch(r'training-state-\d+\.pt', os.path.basename(s))]
    return max(states, key=lambda s: int(re.findall(r'\d+', os.path.basename(s))[0]), default=None)


def cpu_copy(module):
    """A detached CPU copy of `module` in eval mode, for snapshots."""
    return copy.deepcopy(module).cpu().eval().requires_grad_(False)


def save_snapshot(run_dir, kimg_str, data):
    """Write network-snapshot-<kimg>.pkl atomically (rank 0)."""
    path = os.path.join(run_dir, f'network-snapshot-{kimg_str}.pkl')
    with dnnlib.util.atomic_write(path, 'wb') as f:
        pickle.dump(data, f)
    return path


def save_training_state(run_dir, kimg_str, state):
    path = os.path.join(run_dir, f'training-state-{kimg_str}.pt')
    with dnnlib.util.atomic_write(path, 'wb') as f:
        torch.save(state, f)
    return path

#----------------------------------------------------------------------------

def training_loop(
    run_dir             = '.',      # Output directory (rank 0 writes; None on other ranks).
    task_kwargs         = {},       # The task: class_name plus its options (datasets, networks, losses).
    seed                = 0,        # Global random seed (agreed across ranks).
    batch_size          = 64,       # Total batch size of one optimisation step, over all ranks.
    batch_gpu           = None,     # Per-rank batch of one accumulation round; None = no limit.
    total_kimg          = 1000,     # Training duration in thousands of images.
    ema_halflife_kimg   = 500,      # EMA half-life.
    ema_rampup_ratio    = 0.05,     # EMA ramp-up coefficient; None = no ramp-up.
    lr_rampup_kimg      = 10000,    # Learning-rate ramp-up duration.
    grad_clip           = 1.0,      # Element-wise gradient clip; 0 = none.
    precision           = 'fp32',   # 'fp32' or 'bf16' (autocast of forward passes).
    kimg_per_tick       = 50,       # Progress print interval.
    snapshot_ticks      = 50,       # Snapshot interval in ticks; None = only at the end.
    state_dump_ticks    = 500,      # Training-state interval in ticks; None = only at the end.
    resume_state        = None,     # training-state-*.pt to resume from.
    nan_policy          = 'skip',   # Non-finite loss: 'skip' the step (counted) or 'stop'.
    device              = torch.device('cpu'),
    tensorboard         = True,     # Mirror stats to TensorBoard when installed.
    wandb_project       = None,     # Mirror stats to this Weights & Biases project (optional package).
    **_ignored,                     # Options recorded for reference only (e.g. the command line).
):
    """Train the task described by `task_kwargs`; see the module docstring."""
    start_time = time.time()
    rank = dist.get_rank()
    torch.manual_seed(seed)  # Same initial weights on every rank (DDP also broadcasts them).

    trainer = Trainer(device=device, batch_size=batch_size, batch_gpu=batch_gpu, precision=precision,
                      grad_clip=grad_clip, lr_rampup_kimg=lr_rampup_kimg, ema_halflife_kimg=ema_halflife_kimg,
                      ema_rampup_ratio=ema_rampup_ratio, seed=seed, nan_policy=nan_policy)
    dist.print0(f'Batch: {batch_size} = {dist.get_world_size()} process(es) x {trainer.batch_gpu} x '
                f'{trainer.rounds} accumulation round(s)')
    task = dnnlib.util.construct_class_by_name(**task_kwargs)
    task.setup(trainer, run_dir=run_dir, seed=seed)
    torch.manual_seed(seed * dist.get_world_size() + rank)  # Per-rank stream for dropout etc.

    cur_tick = 0
    if resume_state is not None:
        dist.print0(f'Resuming from "{resume_state}"')
        state = torch.load(resume_state, map_location=device, weights_only=True)
        trainer.load_state_dict(state['trainer'])
        task.load_state_dict(state['task'])
        cur_tick = int(state['cur_tick']) + 1
        if len(state['rng']) == dist.get_world_size():
            _set_rng_state(trainer, state['rng'][rank])
        else:
            dist.print0(f'Warning: the state was saved by {len(state["rng"])} process(es), not '
                        f'{dist.get_world_size()}; random streams restart from the seed')
        del state

    writer = None
    if rank == 0:
        writer = training_stats.StatsWriter(run_dir, tensorboard=tensorboard, wandb_project=wandb_project,
                                            run_name=os.path.basename(run_dir))
    collector = training_stats.Collector()
    tick_start_nimg = trainer.cur_nimg
    tick_start_time = time.time()
    dist.reset_peak_memory(device)
    dist.print0(f'Training for {total_kimg} kimg from kimg {trainer.cur_nimg / 1000:.3f}...')
    dist.print0()

    done = trainer.cur_nimg >= total_kimg * 1000
    while not done:
        task.iteration(trainer)
        trainer.update_ema()
        trainer.cur_nimg += batch_size
        done = trainer.cur_nimg >= total_kimg * 1000
        if not done and cur_tick != 0 and trainer.cur_nimg < tick_start_nimg + kimg_per_tick * 1000:
            continue

        # A tick: statistics, progress line, snapshot and state. Non-finite weights stop here, before
        # anything is written, so a NaN snapshot never replaces a good one.
        trainer.check_finite()
        tick_end_time = time.time()
        kimg_str = f'{trainer.cur_nimg // 1000:06d}'
        task.report_tick_stats(trainer)
        mem = dist.memory_stats(device)
        for key, value in [('Progress/tick', cur_tick), ('Progress/kimg', trainer.cur_nimg / 1000),
                           ('Timing/total_sec', tick_end_time - start_time),
                           ('Timing/sec_per_tick', tick_end_time - tick_start_time),
                           ('Timing/sec_per_kimg', (tick_end_time - tick_start_time) /
                            max(trainer.cur_nimg - tick_start_nimg, 1) * 1000),
                           ('Resources/cpu_mem_gb', mem['cpu_mem_gb']),
                           ('Resources/peak_gpu_mem_gb', mem['gpu_mem_gb'])]:
            training_stats.report(key, value)
        stats = collector.update()
        line = [f'tick {cur_tick:<4d}', f'kimg {trainer.cur_nimg / 1000:<9.3f}',
                f'time {dnnlib.util.format_time(tick_end_time - start_time):<12s}',
                f'sec/tick {collector.mean("Timing/sec_per_tick"):<7.2f}',
                f'sec/kimg {collector.mean("Timing/sec_per_kimg"):<7.2f}']
        line += [f'loss_{name} {collector.mean("Loss/" + name):<9.4f}' for name in trainer.nets]
        total = lambda prefix: int(sum(collector.mean(f'{prefix}_{n}', 0) * collector.num(f'{prefix}_{n}') for n in trainer.nets))
        if total('Grad/nonfinite'):
            line.append(f'nonfinite_grads {total("Grad/nonfinite")}')
        if total('Divergence/skipped'):
            line.append(f'skipped_steps {total("Divergence/skipped")}')
        line += [f'cpumem {mem["cpu_mem_gb"]:<5.2f}', f'gpumem {mem["gpu_mem_gb"]:<5.2f}']
        dist.print0('  '.join(line))
        if writer is not None:
            writer.write(collector.as_dict(), step=trainer.cur_nimg, timestamp=time.time())

        if done or (snapshot_ticks is not None and cur_tick % snapshot_ticks == 0):
            trainer.check_consistency()
            data = task.snapshot_data(trainer)
            if rank == 0:
                path = save_snapshot(run_dir, kimg_str, data)
                dist.print0(f'Saved {os.path.basename(path)}')
            trainer.last_good = dict(snapshot=os.path.join(run_dir, f'network-snapshot-{kimg_str}.pkl'),
                                     state=(trainer.last_good or {}).get('state'))
            task.on_snapshot(trainer, run_dir, kimg_str)
        if done or (state_dump_ticks is not None and cur_tick % state_dump_ticks == 0 and cur_tick != 0):
            rng = dist.all_gather_object({k: v.cpu() if torch.is_tensor(v) else v for k, v in _rng_state(trainer).items()})
            if rank == 0:
                state = dict(trainer=trainer.state_dict(), task=task.state_dict(), cur_tick=cur_tick, rng=rng,
                             batch_size=batch_size, world_size=dist.get_world_size(), seed=seed)
                path = save_training_state(run_dir, kimg_str, state)
                dist.print0(f'Saved {os.path.basename(path)}')
            dist.barrier()
            if trainer.last_good is not None:
                trainer.last_good['state'] = os.path.join(run_dir, f'training-state-{kimg_str}.pt')

        cur_tick += 1
        tick_start_nimg = trainer.cur_nimg
        tick_start_time = time.time()
        dist.reset_peak_memory(device)

    if writer is not None:
        writer.close()
    dist.print0()
    dist.print0('Exiting...')
    return run_dir


def write_options(run_dir, options):
    """training_options.json: everything needed to repeat the run."""
    with dnnlib.util.atomic_write(os.path.join(run_dir, 'training_options.json'), 'w') as f:
        json.dump(options, f, indent=2)
