"""The training loop shared by every kind of model.

A *task* says which networks exist, what one training iteration does and what a snapshot holds:
`training.eot_task.EOTTask` (one-step entropic OT: G, f and D) and `training.denoiser_task.DenoiserTask`
(a preconditioned denoiser for DPM-OT). The loop owns everything else: devices and ranks, DDP
wrappers, optimisers, EMAs, lr ramp-up, gradient accumulation, non-finite gradient counting and
clipping, progress ticks, statistics, snapshots, training states and resume.

Progress is counted in images (or vectors): one iteration advances `cur_nimg` by `batch_size`.
"""

import glob
import json
import os
import pickle
import re
import time

import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import training_stats
from training.progress import TickProgress
from training.trainer import Trainer, _rng_state, _set_rng_state

#----------------------------------------------------------------------------
# Files of a run.

def find_latest_state(run_dir):
    """Path of the newest complete training-state-*.pt in `run_dir`, or None."""
    states = glob.glob(os.path.join(run_dir, 'training-state-*.pt'))
    states = [s for s in states if re.fullmatch(r'training-state-\d+\.pt', os.path.basename(s))]
    return max(states, key=lambda s: int(re.findall(r'\d+', os.path.basename(s))[0]), default=None)

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
    compile_mode        = None,     # torch.compile of the trained passes: None, 'default', 'reduce-overhead', ...
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
                      ema_rampup_ratio=ema_rampup_ratio, seed=seed, nan_policy=nan_policy, compile_mode=compile_mode)
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
    progress = TickProgress(total_kimg, kimg_per_tick)
    progress.start_tick(trainer.cur_nimg)
    while not done:
        task.iteration(trainer)
        trainer.update_ema()
        trainer.cur_nimg += batch_size
        done = trainer.cur_nimg >= total_kimg * 1000
        if not done and cur_tick != 0 and trainer.cur_nimg < tick_start_nimg + kimg_per_tick * 1000:
            progress.update(trainer.cur_nimg)
            continue
        progress.clear()

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
        progress.start_tick(trainer.cur_nimg)
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
