"""Forward + backward throughput of the EOT / denoiser networks, and which speed options help.

For each model_channels value, builds the network once per option set (same seed, same weights) and
times one training-style step (forward, mean-square loss, backward) at the given resolution. The
option sets are timed round-robin, one step each per round, so a load change on a shared machine hits
them all alike; the median step time gives images/s, printed with its ratio to plain fp32 from the
same run. On a shared CPU, wall-clock times swing with other people's load; the process CPU time
per step (cpu_ms, img/cpu-s) does not, and with --threads=1 it is a clean measure of the work done
(with more threads it also counts OpenMP spin-waiting). `max_rel_err` is max |out - out_fp32| / max |out_fp32| in eval mode (the cost of reduced
precision). Options, combined with '+':

    fp32           the baseline (always measured)
    channels_last  network and input in NHWC memory format
    bf16           torch.autocast(dtype=bfloat16) around the forward pass
    compile        torch.compile(net) (first call compiles; its time is printed as first_s)
    tf32           TF32 matmuls and convolutions (CUDA only)

Examples:
    python -m benchmarks.network_speed                          # auto device, c = 32, 64; fp32, channels_last, bf16, both
    python -m benchmarks.network_speed --threads=1              # shared CPU: one thread, no OpenMP spin-waiting
    python -m benchmarks.network_speed --options=compile,compile+bf16 --channels=32 --rounds=3
    python -m benchmarks.network_speed --device=cuda --batch=256 --options=channels_last,bf16,channels_last+bf16,tf32,compile
"""

import os
import statistics
import time

import click
import torch

import dnnlib
from models import networks
from torch_utils import distributed as dist_utils

KNOWN_OPTIONS = ('fp32', 'channels_last', 'bf16', 'compile', 'tf32')

#----------------------------------------------------------------------------

def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _net_kwargs(net, data_shape, c):
    # zero_init=False: same cost, but a non-zero output, so that max_rel_err means something.
    if net == 'denoiser':
        return networks.denoiser_kwargs(data_shape, 'edm', c, zero_init=False)
    G, f, D = networks.eot_network_kwargs(data_shape, c, zero_init=False)
    return dict(G=G, f=f, D=D)[net]


def _inputs(net, data_shape, batch, device):
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand([batch, *data_shape], generator=gen) * 2 - 1).to(device)
    if net == 'f':
        return [x, torch.rand([batch], generator=gen).to(device)]
    if net == 'G':
        return [x, torch.randn([batch, 1, *data_shape[1:]], generator=gen).to(device)]
    if net == 'denoiser':
        return [x, (torch.randn([batch], generator=gen) * 1.2 - 1.2).exp().to(device)]
    return [x]


class Config:
    """One option set: its network, inputs and timings."""

    def __init__(self, name, kwargs, inputs, device):
        self.name, self.device = name, device
        self.flags = set(name.split('+'))
        bad = self.flags - set(KNOWN_OPTIONS)
        if bad:
            raise click.BadParameter(f'unknown option(s) {sorted(bad)} in {name!r}; known: {", ".join(KNOWN_OPTIONS)}')
        if 'tf32' in self.flags and device.type != 'cuda':
            raise click.BadParameter(f'{name!r}: tf32 is a CUDA option; drop it on {device.type}')
        torch.manual_seed(0)
        self.net = dnnlib.util.construct_class_by_name(**kwargs).to(device).train()
        self.inputs = list(inputs)
        if 'channels_last' in self.flags:
            self.net = self.net.to(memory_format=torch.channels_last)
            self.inputs = [t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t for t in self.inputs]
        self.call = torch.compile(self.net) if 'compile' in self.flags else self.net
        self.times, self.cpu_times, self.first_s = [], [], None

    def _context(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled='bf16' in self.flags)

    def _set_tf32(self, on):
        if self.device.type == 'cuda':
            torch.backends.cuda.matmul.allow_tf32 = on
            torch.backends.cudnn.allow_tf32 = on

    def step(self, record=True):
        """One forward + backward; returns seconds."""
        self._set_tf32('tf32' in self.flags)
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        with self._context():
            out = self.call(*self.inputs)
        out.float().square().mean().backward()
        _sync(self.device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        self._set_tf32(False)
        self.net.zero_grad(set_to_none=True)
        if record:
            self.times.append(dt)
            self.cpu_times.append(dc)
        return dt

    @torch.no_grad()
    def eval_output(self):
        """Eval-mode output (uncompiled module, this option's precision and layout), as float32."""
        self._set_tf32('tf32' in self.flags)
        self.net.eval()
        with self._context():
            out = self.net(*self.inputs).float()
        self.net.train()
        self._set_tf32(False)
        return out


def run_channels(net, data_shape, c, option_names, batch, device, warmup, rounds, min_seconds):
    """Time every option set for one model_channels value; returns rows for the table."""
    kwargs = _net_kwargs(net, data_shape, c)
    inputs = _inputs(net, data_shape, batch, device)
    configs = [Config(name, kwargs, inputs, device) for name in option_names]
    ref = configs[0].eval_output()
    errors = [float((cfg.eval_output() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) for cfg in configs]
    for cfg in configs:
        cfg.first_s = cfg.step(record=False) # Includes compilation for 'compile'.
        for _ in range(warmup - 1):
            cfg.step(record=False)
    start = time.perf_counter()
    done = 0
    while done < rounds or time.perf_counter() - start < min_seconds:
        for cfg in configs:
            cfg.step()
        done += 1
    params = sum(p.numel() for p in configs[0].net.parameters())
    base = batch / statistics.median(configs[0].times)
    base_cpu = batch / statistics.median(configs[0].cpu_times)
    rows = []
    for cfg, err in zip(configs, errors):
        ips, ips_cpu = batch / statistics.median(cfg.times), batch / statistics.median(cfg.cpu_times)
        rows.append(dict(net=net, c=c, params=params, option=cfg.name, ips=ips, ratio=ips / base,
                         ips_cpu=ips_cpu, ratio_cpu=ips_cpu / base_cpu, ms=1e3 * statistics.median(cfg.times),
                         first_s=cfg.first_s, err=err, n=len(cfg.times)))
    return rows


def _print_rows(rows):
    print(f'{"net":<9}{"c":>4}{"params":>11}  {"option":<26}{"img/s":>9}{"vs fp32":>9}{"img/cpu-s":>11}'
          f'{"vs fp32":>9}{"ms/step":>10}{"first_s":>9}{"max_rel_err":>13}{"steps":>7}')
    for r in rows:
        print(f'{r["net"]:<9}{r["c"]:>4}{r["params"]:>11,}  {r["option"]:<26}{r["ips"]:>9.2f}{r["ratio"]:>8.2f}x'
              f'{r["ips_cpu"]:>11.2f}{r["ratio_cpu"]:>8.2f}x{r["ms"]:>10.0f}{r["first_s"]:>9.1f}{r["err"]:>13.1e}'
              f'{r["n"]:>7}', flush=True)

#----------------------------------------------------------------------------

@click.command()
@click.option('--device', default='auto', show_default=True, help='auto, cpu, cuda or cuda:N')
@click.option('--net', type=click.Choice(['f', 'G', 'D', 'denoiser']), default='f', show_default=True,
              help='Which network: EOT drift f (time input), generator G, critic D, or the EDM denoiser')
@click.option('--channels', default='32,64', show_default=True, help='Comma-separated model_channels values')
@click.option('--resolution', type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--img-channels', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--batch', type=click.IntRange(min=1), default=None, help='Batch size  [default: 8 on CPU, 128 on GPU]')
@click.option('--options', 'options', default='channels_last,bf16,channels_last+bf16', show_default=True,
              help=f'Comma-separated option sets to compare with fp32 ({", ".join(KNOWN_OPTIONS)}; combine with +)')
@click.option('--warmup', type=click.IntRange(min=1), default=1, show_default=True, help='Untimed steps per option set')
@click.option('--rounds', type=click.IntRange(min=1), default=3, show_default=True, help='Timed steps per option set (at least)')
@click.option('--min-seconds', type=float, default=0.0, show_default=True, help='Keep timing rounds for at least this long')
@click.option('--threads', type=int, default=None, help='torch.set_num_threads (CPU)')
def main(device, net, channels, resolution, img_channels, batch, options, warmup, rounds, min_seconds, threads):
    """Forward+backward images/s of the networks, with ratios of speed options against fp32."""
    dev = dist_utils.resolve_device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    batch = batch or (128 if dev.type == 'cuda' else 8)
    option_names = ['fp32'] + [o.strip() for o in options.split(',') if o.strip() and o.strip() != 'fp32']
    data_shape = (img_channels, resolution, resolution)
    name = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    print(f'torch {torch.__version__}, device {dev} ({name}), {net} at {list(data_shape)}, batch {batch}, '
          f'{rounds} timed rounds (interleaved), warmup {warmup}; load average {load:.1f} on {os.cpu_count()} CPUs')
    if dev.type == 'cpu' and torch.get_num_threads() > 1 and load > os.cpu_count():
        print('Note: the CPU is oversubscribed; OpenMP threads then mostly spin-wait. --threads=1 gives steadier figures.')
    rows = []
    for c in [int(s) for s in channels.split(',') if s.strip()]:
        new = run_channels(net, data_shape, c, option_names, batch, dev, warmup, rounds, min_seconds)
        _print_rows(new)
        rows += new
    return rows

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
