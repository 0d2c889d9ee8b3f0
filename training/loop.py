"""The training loop shared by every kind of model.

A *task* says which networks exist, what one training iteration does and what a snapshot holds:
`training.eot_task.EOTTask` (one-step entropic OT: G, f and D) and `training.denoiser_task.DenoiserTask`
(a preconditioned denoiser for DPM-OT). The loop owns everything else: devices and ranks, DDP
wrappers, optimisers, EMAs, lr ramp-up, gradient accumulation, non-finite gradient counting and
clipping, progress ticks, statistics, snapshots, training states and resume.

Progress is counted in images (or vectors): one iteration advances `cur_nimg` by `batch_size`.
"""

import json
import math
import os
import pickle
import time

import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import training_stats
from training.progress import TickProgress
from training.runs import progress_tag
from training.trainer import Trainer, _rng_state, _set_rng_state

#----------------------------------------------------------------------------
# Files of a run.

def save_snapshot(run_dir, tag, data):
    """Write network-snapshot-<tag>.pkl atomically (rank 0); never replaces a file."""
    path = os.path.join(run_dir, f'network-snapshot-{tag}.pkl')
    with dnnlib.util.atomic_write(path, 'wb', overwrite=False) as f:
        pickle.dump(data, f)
    return path

def save_training_state(run_dir, tag, state):
    """Write training-state-<tag>.pt atomically (rank 0); never replaces a file."""
    path = os.path.join(run_dir, f'training-state-{tag}.pt')
    with dnnlib.util.atomic_write(path, 'wb', overwrite=False) as f:
        torch.save(state, f)
    return path

def write_options(run_dir, options):
    """training_options.json: everything needed to repeat the run."""
    with dnnlib.util.atomic_write(os.path.join(run_dir, 'training_options.json'), 'w') as f:
        json.dump(options, f, indent=2)

#----------------------------------------------------------------------------
# The schedule.

def training_loop(
    run_dir             = '.',      # Output directory (rank 0 writes; None on other ranks).
    task_kwargs         = None,     # The task: class_name plus its options (datasets, networks, losses).
    seed                = 0,        # Global random seed (agreed across ranks).
    batch_size          = 64,       # Total batch size of one optimisation step, over all ranks.
    batch_gpu           = None,     # Per-rank batch of one accumulation round; None = no limit.
    total_kimg          = 1000,     # Training duration in thousands of images.
    ema_halflife_kimg   = 500,      # EMA half-life.
    ema_rampup_ratio    = 0.05,     # EMA ramp-up coefficient; None = no ramp-up.
    lr_rampup_kimg      = 10000,    # Learning-rate ramp-up duration.
    lr_decay            = 0,        # Learning-rate decay to 0 over this share of total_kimg at its end.
    grad_clip           = 1.0,      # Element-wise gradient clip; 0 = none.
    precision           = 'fp32',   # 'fp32' or 'bf16' (autocast of forward passes).
    kimg_per_tick       = 50,       # Progress print interval.
    snapshot_ticks      = 50,       # Snapshot interval in ticks; None = only at the end.
    state_dump_ticks    = 500,      # Training-state interval in ticks; None = only at the end.
    resume_state        = None,     # training-state-*.pt to resume from.
    nan_policy          = 'skip',   # Non-finite loss: 'skip' the step (counted) or 'stop'.
    compile_mode        = None,     # torch.compile of the trained passes: None, 'default', 'reduce-overhead', ...
    device              = torch.device('cpu'),
    tensorboard         = True,     # Mirror stats to TensorBoard when installed.
    wandb_project       = None,     # Mirror stats to this Weights & Biases project (optional package).
    options             = None,     # The run's options (training_options.json), kept in training states.
    **_ignored,                     # Options recorded for reference only (e.g. the command line).
):
    """Train the task described by `task_kwargs`; see the module docstring. Returns `run_dir`.

    Ticks end at the first iteration that crosses a multiple of `kimg_per_tick` (tick 0 after the first
    iteration), so a run stopped within a tick and resumed keeps the same ticks. A SIGTERM or SIGINT ends the
    current iteration, writes a training state and raises TrainingStopped. Raises DivergenceError
    (training.trainer) on non-finite parameters, or on a non-finite loss with nan_policy='stop'.
    """
    trainer, task = _build(run_dir, task_kwargs, seed, device, batch_size=batch_size, batch_gpu=batch_gpu,
                           precision=precision, grad_clip=grad_clip, lr_rampup_kimg=lr_rampup_kimg,
                           lr_decay_kimg=lr_decay * total_kimg, total_kimg=total_kimg,
                           ema_halflife_kimg=ema_halflife_kimg, ema_rampup_ratio=ema_rampup_ratio,
                           nan_policy=nan_policy, compile_mode=compile_mode)
    cur_tick = _resume(trainer, task, resume_state, device) if resume_state is not None else 0
    ticks = _Ticks(run_dir, trainer, device, tensorboard=tensorboard, wandb_project=wandb_project)
    state_info = dict(batch_size=batch_size, seed=seed, options=options)
    # Whole images: 7.2e-5 Mimg is 72.00000000000001 images in floating point, which ran one iteration too many.
    schedule = dict(total_nimg=math.ceil(round(total_kimg * 1000, 6)), tick_nimg=max(1, round(kimg_per_tick * 1000)),
                    snapshot_ticks=snapshot_ticks, state_dump_ticks=state_dump_ticks)
    dist.print0(f'Training for {total_kimg} kimg from kimg {trainer.cur_nimg / 1000:.3f}...')
    dist.print0()

    done = trainer.cur_nimg >= schedule['total_nimg']
    saved = None # The training state written at the current image count, if any.
    progress = TickProgress(schedule['total_nimg'], schedule['tick_nimg'])
    progress.start_tick(trainer.cur_nimg)
    with dist.StopSignals() as stop:
        while not done:
            _iteration(trainer, task, batch_size)
            done = trainer.cur_nimg >= schedule['total_nimg']
            if done or cur_tick == 0 or ticks.due(schedule['tick_nimg']):
                progress.clear()
                saved = _tick(trainer, task, ticks, run_dir, cur_tick, done, schedule, state_info)
                cur_tick += 1
                progress.start_tick(trainer.cur_nimg)
            else:
                progress.update(trainer.cur_nimg)
            if not done and (signum := stop.requested(device)) is not None:
                tag = progress_tag(trainer.cur_nimg)
                if saved != trainer.cur_nimg: # (cur_tick - 1: the last completed tick, as in every state.)
                    _save_state(trainer, task, run_dir, tag, cur_tick - 1, state_info)
                raise TrainingStopped(signum, os.path.join(run_dir, f'training-state-{tag}.pt'))

    ticks.close()
    dist.print0()
    dist.print0('Exiting...')
    return run_dir


class TrainingStopped(Exception):
    """A SIGTERM or SIGINT stopped the run after writing the training state `state_path`."""

    def __init__(self, signum, state_path):
        super().__init__(f'stopped by signal {signum}; training state {state_path}')
        self.signum, self.state_path = signum, state_path


def _tick(trainer, task, ticks, run_dir, cur_tick, done, schedule, state_info):
    """The end of a tick: statistics, then the snapshot and the training state when due. Returns the image
    count of the state written, or None."""
    # Non-finite weights stop here, before anything is written, so a NaN snapshot never replaces a good one.
    trainer.check_finite()
    tag = progress_tag(trainer.cur_nimg)
    ticks.report(cur_tick, task)
    if done or _every(cur_tick, schedule['snapshot_ticks']):
        _snapshot(trainer, task, run_dir, tag)
    saved = None
    if done or (_every(cur_tick, schedule['state_dump_ticks']) and cur_tick != 0):
        _save_state(trainer, task, run_dir, tag, cur_tick, state_info)
        saved = trainer.cur_nimg
    ticks.start()
    return saved

def _every(cur_tick, interval):
    return interval is not None and cur_tick % interval == 0

#----------------------------------------------------------------------------
# The steps of the schedule.

def _build(run_dir, task_kwargs, seed, device, **trainer_kwargs):
    """(trainer, task): the Trainer and the task with its data and networks, seeded for exact resume."""
    torch.manual_seed(seed)  # Same initial weights on every rank (DDP also broadcasts them).
    trainer = Trainer(device=device, seed=seed, **trainer_kwargs)
    dist.print0(f'Batch: {trainer.batch_size} = {dist.get_world_size()} process(es) x {trainer.batch_gpu} x '
                f'{trainer.rounds} accumulation round(s)')
    task = dnnlib.util.construct_class_by_name(**task_kwargs)
    task.setup(trainer, run_dir=run_dir, seed=seed)
    torch.manual_seed(seed * dist.get_world_size() + dist.get_rank())  # Per-rank stream for dropout etc.
    return trainer, task

def _resume(trainer, task, resume_state, device):
    """Load a training state into the trainer and the task; returns the tick to continue with."""
    dist.print0(f'Resuming from "{resume_state}"')
    state = torch.load(resume_state, map_location=device, weights_only=True)
    trainer.load_state_dict(state['trainer'])
    task.load_state_dict(state['task'])
    if len(state['rng']) == dist.get_world_size():
        _set_rng_state(trainer, state['rng'][dist.get_rank()])
    else:
        dist.print0(f'Warning: the state was saved by {len(state["rng"])} process(es), not '
                    f'{dist.get_world_size()}; random streams restart from the seed')
    return int(state['cur_tick']) + 1

def _iteration(trainer, task, batch_size):
    """One training iteration: the task's optimisation steps, the EMAs, the image count."""
    task.iteration(trainer)
    trainer.update_ema()
    trainer.cur_nimg += batch_size

def _snapshot(trainer, task, run_dir, tag):
    """network-snapshot-<kimg>.pkl (rank 0), then the task's figures and metrics."""
    trainer.check_consistency()
    data = task.snapshot_data(trainer)
    if dist.get_rank() == 0:
        path = save_snapshot(run_dir, tag, data)
        dist.print0(f'Saved {os.path.basename(path)}')
    trainer.last_good = dict(snapshot=os.path.join(run_dir, f'network-snapshot-{tag}.pkl'),
                             state=(trainer.last_good or {}).get('state'))
    task.on_snapshot(trainer, run_dir, tag)

def _save_state(trainer, task, run_dir, tag, cur_tick, run_info):
    """training-state-<tag>.pt: everything an exact resume needs, every rank's random streams included, and
    `run_info` (batch_size, seed and the run's options, which resume checks against)."""
    rng = dist.all_gather_object({k: v.cpu() if torch.is_tensor(v) else v for k, v in _rng_state(trainer).items()})
    if dist.get_rank() == 0:
        state = dict(trainer=trainer.state_dict(), task=task.state_dict(), cur_tick=cur_tick, rng=rng,
                     world_size=dist.get_world_size(), **run_info)
        path = save_training_state(run_dir, tag, state)
        dist.print0(f'Saved {os.path.basename(path)}')
    dist.barrier()
    if trainer.last_good is not None:
        trainer.last_good['state'] = os.path.join(run_dir, f'training-state-{tag}.pt')

#----------------------------------------------------------------------------
# Ticks: timing, statistics, the progress line.

class _Ticks:
    """The statistics of each tick: timing and memory, the progress line, stats.jsonl (rank 0)."""

    def __init__(self, run_dir, trainer, device, tensorboard, wandb_project):
        self.trainer, self.device = trainer, device
        self.start_time = time.time()
        self.writer = None
        if dist.get_rank() == 0:
            self.writer = training_stats.StatsWriter(run_dir, tensorboard=tensorboard, wandb_project=wandb_project,
                                                     run_name=os.path.basename(run_dir))
        self.collector = training_stats.Collector()
        self.start()

    def start(self):
        self.tick_start_nimg = self.trainer.cur_nimg
        self.tick_start_time = time.time()
        dist.reset_peak_memory(self.device)

    def due(self, tick_nimg):
        """Whether the last iteration crossed a multiple of `tick_nimg` images (the end of this tick)."""
        return self.trainer.cur_nimg // tick_nimg > self.tick_start_nimg // tick_nimg

    def report(self, cur_tick, task):
        """Gather the tick's statistics (the task's own included), print the progress line, write stats.jsonl."""
        end_time = time.time()
        trainer = self.trainer
        task.report_tick_stats(trainer)
        mem = dist.memory_stats(self.device)
        for key, value in [('Progress/tick', cur_tick), ('Progress/kimg', trainer.cur_nimg / 1000),
                           ('Timing/total_sec', end_time - self.start_time),
                           ('Timing/sec_per_tick', end_time - self.tick_start_time),
                           ('Timing/sec_per_kimg', (end_time - self.tick_start_time) /
                            max(trainer.cur_nimg - self.tick_start_nimg, 1) * 1000),
                           ('Resources/cpu_mem_gb', mem['cpu_mem_gb']),
                           ('Resources/peak_gpu_mem_gb', mem['gpu_mem_gb'])]:
            training_stats.report(key, value)
        self.collector.update()
        dist.print0(self._line(cur_tick, end_time, mem))
        if self.writer is not None:
            self.writer.write(self.collector.as_dict(), step=trainer.cur_nimg, timestamp=time.time())

    def _line(self, cur_tick, end_time, mem):
        c, nets = self.collector, self.trainer.nets
        line = [f'tick {cur_tick:<4d}', f'kimg {self.trainer.cur_nimg / 1000:<9.3f}',
                f'time {dnnlib.util.format_time(end_time - self.start_time):<12s}',
                f'sec/tick {c.mean("Timing/sec_per_tick"):<7.2f}', f'sec/kimg {c.mean("Timing/sec_per_kimg"):<7.2f}']
        line += [f'loss_{name} {c.mean("Loss/" + name):<9.4f}' for name in nets if c.num('Loss/' + name)] # Trained ones.
        total = lambda prefix: int(sum(c.mean(f'{prefix}_{n}', 0) * c.num(f'{prefix}_{n}') for n in nets))
        if total('Grad/nonfinite'):
            line.append(f'nonfinite_grads {total("Grad/nonfinite")}')
        if total('Divergence/skipped'):
            line.append(f'skipped_steps {total("Divergence/skipped")}')
        line += [f'cpumem {mem["cpu_mem_gb"]:<5.2f}', f'gpumem {mem["gpu_mem_gb"]:<5.2f}']
        return '  '.join(line)

    def close(self):
        if self.writer is not None:
            self.writer.close()
