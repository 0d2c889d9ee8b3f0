"""Training throughput of our EOT loop against a straightforward port of the reference loop structure.

Both run the same networks, batch, data and schedule (G_iters x (f_iters f-steps + one G-step), then
D_iters D-steps). The reference structure keeps G's graph in the f- and D-steps (back-propagating
through G for nothing), calls D twice in the D-step, and trains f and D's weights' gradients in the
G-step; ours runs G under no_grad there, freezes f and D in the G-step and scores D once. The two
alternate (ABAB...) so that machine load hits both alike; the ratio of median times is printed.

    python -m benchmarks.train_speed                       # 32x32 RGB, c=32, batch 16, the seed's 10/2/1 schedule
    python -m benchmarks.train_speed --channels=64 --repeats=5 --device=cuda --precision=bf16
"""

import statistics
import time

import click
import torch

import dnnlib
from models.eot_loss import EOTLoss
from models.networks import eot_network_kwargs
from torch_utils import distributed as dist
from training.eot_task import EOTTask
from training.trainer import Trainer


class TensorStream:
    """Endless random batches already on the device (data loading is not what is measured)."""

    def __init__(self, shape, batch, device, seed):
        g = torch.Generator().manual_seed(seed)
        self.pool = (torch.rand([8 * batch, *shape], generator=g) * 2 - 1).to(device)
        self.batch, self.pos = batch, 0

    def next(self):
        if self.pos + self.batch > len(self.pool):
            self.pos = 0
        self.pos += self.batch
        return self.pool[self.pos - self.batch:self.pos]


def reference_iteration(nets, opts, data1, data2, gamma, G_iters, f_iters, D_iters, lr):
    """One outer iteration in the reference structure (no DDP here: one process)."""
    G, f, D = nets['G'], nets['f'], nets['D']

    def step(net, opt):
        opt.param_groups[0]['lr'] = lr
        for p in net.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
                p.grad = torch.clip(p.grad, -1.0, 1.0)
        opt.step()

    def bridge(x0, xN):
        t = torch.rand(x0.shape[0], device=x0.device)
        tt = t.reshape(-1, *([1] * (x0.ndim - 1)))
        return x0 + (xN - x0) * tt + torch.randn_like(x0) * torch.sqrt(tt * (1 - tt) * gamma), t

    for _ in range(G_iters):
        for _ in range(f_iters):
            opts['f'].zero_grad(set_to_none=True)
            x0 = data1.next()
            xN = G(x0)                                   # Graph kept: the backward runs through G too.
            xt, t = bridge(x0, xN)
            ((f(xt, t) - xN) ** 2).mean().backward()
            step(f, opts['f'])
        opts['G'].zero_grad(set_to_none=True)
        x0 = data1.next()
        xN = G(x0)
        xt, t = bridge(x0, xN)
        drift = f(xt, t) - xt                            # f and D weights receive gradients for nothing.
        (((drift * (xN - xt)).mean() - (drift * drift).mean() / 2) * 2 - D(xN).mean()).backward()
        step(G, opts['G'])
    for _ in range(D_iters):
        opts['D'].zero_grad(set_to_none=True)
        x0, x1 = data1.next(), data2.next()
        xN = G(x0)                                       # Graph kept here as well.
        (-D(x1) + D(xN)).mean().backward()
        step(D, opts['D'])


def build(shape, channels, batch, device, net_opts, precision='fp32'):
    """A Trainer and an EOTTask wired to in-memory data, and the same networks for the reference."""
    trainer = Trainer(device, batch_size=batch, lr_rampup_kimg=0, precision=precision)
    task = EOTTask.__new__(EOTTask)    # Bypass dataset loading: the streams below replace it.
    task.loss = EOTLoss(1.0)
    task.G_iters, task.f_iters, task.D_iters = 10, 2, 1
    task.D_gp = 0.0                    # No critic penalty: the stated method, as the reference.
    task.data1, task.data2 = TensorStream(shape, batch, device, 1), TensorStream(shape, batch, device, 2)
    torch.manual_seed(0)
    kwargs = eot_network_kwargs(shape, model_channels=channels, **net_opts)
    for name, kw in zip(('G', 'f', 'D'), kwargs):
        trainer.add_network(name, dnnlib.util.construct_class_by_name(**kw),
                            dict(class_name='torch.optim.Adam', lr=1e-4, betas=[0.9, 0.999], eps=1e-8))
    return trainer, task


@click.command()
@click.option('--resolution', type=int, default=32, show_default=True, help='Image resolution')
@click.option('--channels', 'model_channels', type=int, default=32, show_default=True, help='model_channels c')
@click.option('--batch', type=int, default=16, show_default=True, help='Batch size')
@click.option('--iters', 'schedule', type=str, default='10,2,1', show_default=True, help='G_iters,f_iters,D_iters')
@click.option('--outer', type=int, default=1, show_default=True, help='Outer iterations per timed run')
@click.option('--repeats', type=int, default=3, show_default=True, help='Timed runs of each loop (alternating)')
@click.option('--net-opts', type=str, default='{"num_blocks": 2}', show_default=True, help='JSON network overrides')
@click.option('--device', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
@click.option('--precision', type=click.Choice(['fp32', 'bf16']), default='fp32', show_default=True,
              help='Forward passes of both loops (bf16 = autocast, as train.py --precision)')
def main(resolution, model_channels, batch, schedule, outer, repeats, net_opts, device, precision):
    """Print images/s of both loops and their ratio."""
    import json
    device = dist.init(device)
    G_iters, f_iters, D_iters = (int(v) for v in schedule.split(','))
    shape = (3, resolution, resolution)
    trainer, task = build(shape, model_channels, batch, device, json.loads(net_opts), precision)
    task.G_iters, task.f_iters, task.D_iters = G_iters, f_iters, D_iters
    ref_nets = {k: v for k, v in trainer.nets.items()}
    ref_opts = {k: torch.optim.Adam(v.parameters(), lr=1e-4) for k, v in ref_nets.items()}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)

    def ours():
        for _ in range(outer):
            task.iteration(trainer)

    def reference():
        # The same autocast as ours (its backward passes run inside it too: they follow the forward dtypes anyway).
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
            for _ in range(outer):
                reference_iteration(ref_nets, ref_opts, task.data1, task.data2, 1.0, G_iters, f_iters, D_iters, 1e-4)

    print(f'Device {device} ({precision}), {torch.get_num_threads()} threads; images {list(shape)}, c={model_channels}, batch {batch}, '
          f'schedule G/f/D = {G_iters}/{f_iters}/{D_iters}, {outer} outer iteration(s) per run')
    ours(); reference(); sync() # Warm-up.
    times = dict(ours=[], reference=[])
    for r in range(repeats):
        for name, fn in (('ours', ours), ('reference', reference)) if r % 2 == 0 else (('reference', reference), ('ours', ours)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    images = outer * batch # Progress counted as in training: one outer iteration = one batch.
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in ('reference', 'ours'):
        print(f'{name:10s} median {med[name]:8.3f} s per run  ->  {images / med[name]:8.2f} images/s  '
              f'(runs: {", ".join(f"{t:.2f}" for t in times[name])})')
    print(f'speed-up (reference time / our time): {med["reference"] / med["ours"]:.2f}x')


if __name__ == '__main__':
    main()
