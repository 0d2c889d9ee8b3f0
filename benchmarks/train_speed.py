"""Training speed per kimg of the demo's configuration (demo.py), before and after issue 18's changes, with the
compute floor beside it.

Every arm is the real training code (train.py's config -> Trainer + EOTTask on the demo's data), built with the
same seed; the arms differ only in the settings named below. They run in turns (ABC, BCA, CAB, ...) in one
process, so machine load hits all alike; each arm's median over the rounds is printed, as wall time and as
CPU time per kimg (CPU time counts only what this process ran: on a shared machine it is the steadier one).

The compute floor of an arm: the FLOPs of its outer iterations (convolutions and matrix products, forward,
backward and double backward, counted by torch.utils.flop_counter) divided by the throughput of a large fp32
matrix product measured in the same rounds with the same threads: what the arithmetic alone would take.

    python -m benchmarks.train_speed                          # v1, same-math, demo; the demo's data built in /tmp
    python -m benchmarks.train_speed --arms=v1,penalty,same-math,lazy4,reuse,demo --rounds=5 --iters=16
    python -m benchmarks.train_speed --data=demo-run/data --rounds=9 --arms=v1,penalty,same-math,lazy4,no-gp
    python -m benchmarks.train_speed --device=cuda --arms=demo,compile,compile-cg --batch=1024
    python -m benchmarks.train_speed --device=cuda --precision=bf16 --arms=demo

`v1-threads` is `v1` with the thread count train.py used before issue 18, torch's own choice (every physical
core; run without OMP_NUM_THREADS for it to mean that): on a busy machine those threads wait on each other, and
that arm shows what the new default (the idle cores, at least 1) saves there. Its floor column uses the
--threads matrix product, so compare its times, not its floor.

Arms that change the batch (batch96, batch128) are compared per kimg: fewer, larger steps (the floor and the
time per kimg are per image; per iteration multiply by the batch).

The last line, `RESULT {...}`, holds the figures as JSON.
"""

import contextlib
import io
import json
import os
import statistics
import tempfile
import time

import click
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import demo
import dnnlib
import train
from models.eot_loss import EOTLoss
from torch_utils import distributed as dist
from training.trainer import Trainer

#----------------------------------------------------------------------------
# The arms.

class JointPenaltyEOTLoss(EOTLoss):
    """The critic's loss as it was before issue 18: the scores of xN, x1 and the interpolates in one pass of 3N
    rows, so the penalty's backward and double backward ran over all 3N rows (same values as EOTLoss.D_loss)."""

    def D_loss(self, D, xN, x1, gp_weight=0.0, alpha=None, D_penalty=None):
        n = xN.shape[0]
        if not gp_weight:
            scores = D(torch.cat([xN, x1])).float()
            return scores[:n] - scores[n:]
        alpha = alpha.reshape(-1, *([1] * (xN.ndim - 1)))
        x_hat = (alpha * xN + (1 - alpha) * x1).detach().requires_grad_(True)
        scores = D(torch.cat([xN, x1, x_hat])).float()
        grad, = torch.autograd.grad(scores[2 * n:].sum(), x_hat, create_graph=True)
        penalty = (grad.float().flatten(1).norm(dim=1) - 1).square()
        return scores[:n] - scores[n:2 * n] + gp_weight * penalty

def _net_opts(**D):
    """The demo's --net-opts with the critic's options updated by `D`."""
    opts = dict(demo.FULL['net_opts'])
    opts['D'] = dict(opts['D'], **D)
    return f'--net-opts={json.dumps(opts)}'

# Each arm: train.py options added to the demo's (demo.FULL), and how the code differs from today's:
# joint: the pre-issue-18 joint penalty pass; memory: the in-memory data stream; multi_tensor: foreach Adam;
# compile: Trainer(compile_mode=...). The arms before `demo` leave out its reuse of the G-step's outputs and its
# shared passes (OLD); every arm keeps the demo's two critic steps per iteration unless it names --d-iters.
OLD = ['--reuse-g-output=0', '--share-passes=0']
V1 = [*OLD, '--d-gp-every=1', '--adam-betas=0.9,0.999']
ARMS = {
    'v1':        dict(options=V1, joint=True, memory=False, multi_tensor=False), # the code before issue 18
    'v1-threads': dict(options=V1, joint=True, memory=False, multi_tensor=False,
                       threads='torch'), # the same with torch's thread count
    'v1-d1':     dict(options=[*V1, '--d-iters=1'], joint=True, memory=False,
                      multi_tensor=False), # the demo as it was before issue 18: one critic step per iteration
    'penalty':   dict(options=[*OLD, '--d-gp-every=1'], memory=False, multi_tensor=False), # + a penalty pass of its own
    'same-math': dict(options=[*OLD, '--d-gp-every=1']), # + the in-memory data stream, foreach Adam
    'lazy4':     dict(options=[*OLD, '--d-gp-every=4']), # + the penalty every 4th critic step, weight x 4
    'lazy16':    dict(options=[*OLD, '--d-gp-every=16']),
    'no-gp':     dict(options=[*OLD, '--d-gp=0']), # no penalty: the floor of any penalty schedule
    'lazy4-d8':  dict(options=[*OLD, '--d-gp-every=4', _net_opts(model_channels=8)]), # + a critic of width 8
    'reuse':     dict(options=['--share-passes=0']),       # + the f- and D-steps on the G-step's outputs
    'demo':      dict(options=[]),                         # demo.FULL as it is: + those steps share the G-step's passes
    'demo-d1':   dict(options=['--d-iters=1']),            # the demo with one critic step per iteration (it hops)
    'lazy8':     dict(options=['--d-gp-every=8']),         # the demo with the penalty every 8th critic step
    'lazy16r':   dict(options=['--d-gp-every=16']),        # ... every 16th
    'batch96':   dict(options=['--batch=96']),             # the demo with 96 images per step (fewer steps per kimg)
    'batch128':  dict(options=['--batch=128']),            # ... 128 images per step
    'compile':   dict(options=[], compile='default'),      # demo.FULL, trained passes through torch.compile
    'compile-cg': dict(options=[], compile='reduce-overhead'), # the same with CUDA graphs (GPU)
}

# torch's own thread count (all physical cores unless OMP_NUM_THREADS is set), read before main() sets --threads:
# what train.py used before issue 18 (train.py now picks the idle cores, torch_utils.distributed.default_threads).
TORCH_THREADS = torch.get_num_threads()

#----------------------------------------------------------------------------

def arm_threads(name, threads):
    """The thread count an arm runs with: --threads, or torch's own choice for the 'v1-threads' arm."""
    return TORCH_THREADS if ARMS[name].get('threads') == 'torch' else threads


def demo_config(data_dir, extra, device):
    """train.py's config of the demo (demo.FULL) on the data in `data_dir`, with `extra` options."""
    args = demo._train_args(demo.FULL, demo.data_paths(data_dir), os.path.join(data_dir, 'unused-run'), 1)
    args = [a for a in args[1:] if not a.startswith(('--device=', '--threads='))] + [f'--device={device.type}', *extra]
    opts = dnnlib.EasyDict(train.main.make_context('train.py', args).params)
    with contextlib.redirect_stdout(io.StringIO()): # The data checks' lines, once per arm.
        return train.setup_training_config(**opts)


def build_arm(name, data_dir, device, precision, batch=None):
    """(trainer, task) of one arm, seeded as the demo's run (seed 0)."""
    arm = ARMS[name]
    c = demo_config(data_dir, ([f'--batch={batch}'] if batch else []) + arm['options'], device) # An arm's own wins.
    tk = dnnlib.EasyDict(c.task_kwargs)
    if not arm.get('multi_tensor', True):
        for key in ('G_opt_kwargs', 'f_opt_kwargs', 'D_opt_kwargs'):
            tk[key] = dict(tk[key], foreach=False)
    torch.manual_seed(0)
    trainer = Trainer(device=device, batch_size=c.batch_size, batch_gpu=c.batch_gpu, precision=precision,
                      grad_clip=c.grad_clip, lr_rampup_kimg=c.lr_rampup_kimg, ema_halflife_kimg=c.ema_halflife_kimg,
                      seed=0, compile_mode=arm.get('compile'))
    task = dnnlib.util.construct_class_by_name(**tk)
    with contextlib.redirect_stdout(io.StringIO()): # Module summaries.
        task.setup(trainer, run_dir=None, seed=0)
    if arm.get('joint', False):
        task.loss = JointPenaltyEOTLoss(task.loss.gamma)
    task.data1.in_memory = task.data2.in_memory = arm.get('memory', True)
    return trainer, task


def run_iterations(trainer, task, iters):
    """`iters` outer iterations as the loop runs them (iteration, EMA, progress count)."""
    for _ in range(iters):
        task.iteration(trainer)
        trainer.update_ema()
        trainer.cur_nimg += trainer.batch_size


def matmul_gflops(device, n=1024, seconds=0.5):
    """Throughput of an n x n fp32 matrix product (GFLOP/s), over about `seconds`."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of every op that torch.utils.flop_counter has a formula for (convolutions and matrix
    products, their backward ops included). FlopCounterMode itself cannot watch autograd.grad (its module
    hooks fail there), hence this plain dispatch mode over the same formulas."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(trainer, task, iters):
    """FLOPs of `iters` outer iterations (forward, backward and double backward)."""
    with FlopCount() as counter:
        run_iterations(trainer, task, iters)
    return counter.total


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@click.command()
@click.option('--data',      'data_dir', help='Folder with the demo\'s 2_train.zip, 3_train.zip, 2_test.zip, 3_test.zip  [default: built in a temporary folder]', metavar='DIR', type=str)
@click.option('--arms',      help=f'Comma-separated arms, the first is the baseline: {", ".join(ARMS)}', metavar='LIST', type=str, default='v1,same-math,demo', show_default=True)
@click.option('--iters',     help='Outer iterations per timed run (a multiple of 4: lazy arms do the same work in every run)', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--rounds',    help='Timed runs of every arm, in rotating order', metavar='INT', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--threads',   help='CPU threads', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--device',    help='Device', type=click.Choice(['auto', 'cpu', 'cuda']), default='cpu', show_default=True)
@click.option('--precision', help='Forward-pass precision of every arm', type=click.Choice(['fp32', 'bf16']), default='fp32', show_default=True)
@click.option('--batch',     help='Batch size instead of the demo\'s 64 (e.g. larger on a GPU); the batch arms keep theirs', metavar='INT', type=click.IntRange(min=1))
def main(data_dir, arms, iters, rounds, threads, device, precision, batch):
    """Seconds per kimg of the demo's training, per arm, with the compute floor and the machine's load."""
    names = [a for a in arms.split(',') if a]
    bad = [a for a in names if a not in ARMS]
    if bad or not names:
        raise click.ClickException(f'--arms={arms}: unknown arm(s) {bad}; choose from {", ".join(ARMS)}')
    torch.set_num_threads(threads)
    device = dist.init(device)
    with tempfile.TemporaryDirectory() as tmp:
        if data_dir is None:
            data_dir = os.path.join(tmp, 'data')
            with contextlib.redirect_stdout(io.StringIO()):
                demo.build_data(tmp, demo.FULL)
        built = {name: build_arm(name, data_dir, device, precision, batch) for name in names}
        flops = {}
        for name in names: # FLOPs of eager twins (a dispatch mode and torch.compile do not mix).
            twin = build_arm(name, data_dir, device, precision, batch) if ARMS[name].get('compile') else built[name]
            flops[name] = count_flops(*twin, iters) / iters
        report(built, flops, names, device, iters, rounds, threads, precision)


def report(built, flops, names, device, iters, rounds, threads, precision):
    batches = {name: built[name][0].batch_size for name in names}
    batch = batches[names[0]]
    load0 = os.getloadavg()
    other = ', '.join(f'{n}: {b}' for n, b in batches.items() if b != batch)
    print(f'Demo configuration (demo.FULL): images [3, 16, 16], batch {batch}{f" ({other})" if other else ""}, '
          f'device {device}, {threads} thread(s), '
          f'{precision}; {iters} outer iterations per run, {rounds} rounds; load average {load0[0]:.2f} {load0[1]:.2f} '
          f'{load0[2]:.2f} on {os.cpu_count()} CPUs', flush=True)
    first = {}
    for name in names: # Warm-up (compilation for the compile arms).
        torch.set_num_threads(arm_threads(name, threads))
        sync(device)
        t0 = time.perf_counter()
        run_iterations(*built[name], iters)
        sync(device)
        first[name] = time.perf_counter() - t0
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    gflops = []
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            torch.set_num_threads(arm_threads(name, threads))
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            run_iterations(*built[name], iters)
            sync(device)
            wall[name].append((time.perf_counter() - t0) / (iters * batches[name]) * 1000)
            cpu[name].append((time.process_time() - c0) / (iters * batches[name]) * 1000)
        torch.set_num_threads(threads)
        gflops.append(matmul_gflops(device))
    throughput = statistics.median(gflops) * 1e9
    load1 = os.getloadavg()
    base = names[0]
    med = statistics.median
    print(f'{"arm":10s} {"wall s/kimg":>12s} {"CPU s/kimg":>11s} {"GFLOP/iter":>11s} {"floor s/kimg":>13s} '
          f'{"wall/floor":>11s} {"speed-up wall":>14s} {"speed-up CPU":>13s} {"first run s":>12s}')
    for name in names:
        floor = flops[name] / throughput * 1000 / batches[name]
        print(f'{name:10s} {med(wall[name]):12.3f} {med(cpu[name]):11.3f} {flops[name] / 1e9:11.2f} {floor:13.3f} '
              f'{med(wall[name]) / floor:11.2f} {med(wall[base]) / med(wall[name]):13.2f}x '
              f'{med(cpu[base]) / med(cpu[name]):12.2f}x {first[name]:12.1f}')
    print(f'fp32 matrix product (1024^3): {throughput / 1e9:.1f} GFLOP/s (median of {rounds}: '
          f'{", ".join(f"{g:.1f}" for g in gflops)})')
    for name in names:
        print(f'  {name:10s} wall runs (s/kimg): {", ".join(f"{t:.3f}" for t in wall[name])}')
    print(f'load average at the end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}')
    result = dict(device=str(device), precision=precision, threads=threads, batch=batches, matmul_gflops=throughput / 1e9,
                  load=[load0[0], load1[0]], arms={name: dict(wall_s_per_kimg=med(wall[name]), cpu_s_per_kimg=med(cpu[name]),
                                                               gflop_per_iter=flops[name] / 1e9, first_run_s=first[name])
                                                   for name in names})
    print('RESULT ' + json.dumps(result))


if __name__ == '__main__':
    main()
