"""DPM-OT's own cost beside the network's: the OT map and the bookkeeping of a prepared sampler, per batch.

    python -m benchmarks.dpmot_overhead                       # CPU, 56.5 M-parameter U-Net, batch 2, K = 5 Heun
    python -m benchmarks.dpmot_overhead --device=cuda --batch=64 --num-targets=50000

Builds a denoiser of NVlabs/edm's CIFAR-10 size (models.networks.Denoiser, DDPM++ U-Net, model_channels 128 on
3 x 32 x 32: 56.5 M parameters; random weights, which cost the same), a potential over N random latents
(d = 3072; heights at random: the map's cost does not depend on them) for an 18-step schedule with K = 5
back-steps, and runs `sampling.dpmot.PreparedSampler.sample` batch after batch with Heun (2K - 1 = 9 network
calls per sample). The network is wrapped in a timer, so every batch splits into network time and the rest:
the source draws, the OT map (top-1, or top-k with the angle rule), the per-seed generators and the copies.
Rows alternate between top-1 and top-k within each round, so load changes on a shared machine hit both.

Printed per row: the median over rounds of the network time and of the rest per batch, their ratio (the
issue's target: the rest <= 5 % of the network time) and the preparation (potential check with one hash of
the weights, the OT map on the device), paid once per generate.py call; then the hash alone (what the
earlier code paid on every batch).
"""

import os
import statistics
import tempfile
import time

import click
import torch

import dnnlib
from models import networks
from sampling import diffusion, dpmot
from sampling import potential as potential_lib
from torch_utils import distributed as dist_utils
from torch_utils.misc import state_dict_sha256

#----------------------------------------------------------------------------

class TimedNet:
    """A denoiser whose calls are timed (synchronised on CUDA); attribute access goes to the network."""

    def __init__(self, net, device):
        self.net, self.device, self.seconds = net, device, 0.0

    def _sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def __call__(self, *args, **kwargs):
        self._sync()
        t0 = time.perf_counter()
        out = self.net(*args, **kwargs)
        self._sync()
        self.seconds += time.perf_counter() - t0
        return out

    def __getattr__(self, name):
        return getattr(self.net, name)


def build(num_targets, device, model_channels, tmp):
    """(network on device, potential path): the edm-sized denoiser and a potential of random latents."""
    torch.manual_seed(0)
    kwargs = networks.denoiser_kwargs([3, 32, 32], 'edm', model_channels, zero_init=False)
    net = dnnlib.util.construct_class_by_name(**kwargs).eval().requires_grad_(False).to(device)
    gen = torch.Generator().manual_seed(1)
    targets = torch.randn([num_targets, 3, 32, 32], generator=gen) * 2
    h = torch.randn([num_targets], generator=gen, dtype=torch.float64)
    path = potential_lib.save_potential(os.path.join(tmp, 'potential.pt'), h=h, sigmas=diffusion.net_sigma_schedule(net, 18),
                                        back_steps=5, source='uniform', data_shape=[3, 32, 32], score_gap=1.0,
                                        targets=targets, provenance=dict(denoiser_sha256=state_dict_sha256(net)))
    return net, path


def run(net, path, device, batch, rounds, topk):
    """Rows (medians over `rounds`, alternating top-1 and top-k batches, and the preparation) and the hash time."""
    timed = TimedNet(net, device)
    prepared, prepare_s = {}, {}
    for k in (1, topk):
        t0 = time.perf_counter()
        prepared[k] = dpmot.PreparedSampler(timed, path, 'heun', topk=k, device=device)
        prepare_s[k] = time.perf_counter() - t0
    t0 = time.perf_counter()
    state_dict_sha256(net)
    hash_s = time.perf_counter() - t0
    times = {k: dict(net=[], rest=[]) for k in prepared}
    for r in range(rounds + 1):                     # round 0 warms up (allocator, caches) and is not counted
        for k, sampler in prepared.items():
            timed.seconds = 0.0
            t0 = time.perf_counter()
            _, info = sampler.sample(range(r * batch, (r + 1) * batch))
            total = time.perf_counter() - t0
            assert info['nfe'] == 9, info
            if r > 0:
                times[k]['net'].append(timed.seconds)
                times[k]['rest'].append(total - timed.seconds)
    rows = [dict(topk=k, net_s=statistics.median(t['net']), rest_s=statistics.median(t['rest']), prepare_s=prepare_s[k])
            for k, t in times.items()]
    return rows, hash_s

#----------------------------------------------------------------------------

@click.command()
@click.option('--device', help='Device', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
@click.option('--batch', help='Samples per batch', metavar='INT', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--num-targets', help='N, the latents of the potential', metavar='INT', type=click.IntRange(min=2), default=10000, show_default=True)
@click.option('--rounds', help='Timed rounds (after one warm-up round)', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--topk', help='k of the top-k row', metavar='INT', type=click.IntRange(min=2), default=3, show_default=True)
@click.option('--model-channels', help='U-Net width (128: edm\'s CIFAR-10 DDPM++, 56.5 M parameters)', metavar='INT', type=click.IntRange(min=1), default=128, show_default=True)
@click.option('--threads', help='CPU threads (default: torch\'s choice)', metavar='INT', type=click.IntRange(min=1))
def main(device, batch, num_targets, rounds, topk, model_channels, threads):
    """Print DPM-OT's OT map + bookkeeping time as a share of the network time (K = 5 Heun, 9 NFE)."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = dist_utils.init(device)
    with tempfile.TemporaryDirectory() as tmp:
        net, path = build(num_targets, device, model_channels, tmp)
        params = sum(p.numel() for p in net.parameters())
        rows, hash_s = run(net, path, device, batch, rounds, topk)
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    print(f'device {device}, {torch.get_num_threads()} thread(s), load {load:.2f}; denoiser {params / 1e6:.1f} M '
          f'parameters; N = {num_targets} latents of d = 3072; Heun, K = 5 (9 NFE); batch {batch}; {rounds} rounds')
    print(f'{"map":<8}{"network s/batch":>17}{"OT map + rest s/batch":>23}{"rest / network":>16}'
          f'{"preparation s (once per call)":>31}')
    for row in rows:
        name = 'top-1' if row['topk'] == 1 else f'top-{row["topk"]}'
        print(f'{name:<8}{row["net_s"]:>17.3f}{row["rest_s"]:>23.4f}{100 * row["rest_s"] / row["net_s"]:>15.2f}%'
              f'{row["prepare_s"]:>31.3f}')
    print(f'The preparation holds the potential check with one hash of the weights ({hash_s:.3f} s here), which the '
          f'earlier code paid on every batch ({100 * hash_s / rows[0]["net_s"]:.1f} % of a batch\'s network time here).')
    dist_utils.shutdown()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
