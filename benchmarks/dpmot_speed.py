"""Sampling speed of DPM-OT against the plain sampler at equal network evaluations (NFE), and what the OT map and
the bookkeeping around the network cost.

    python -m benchmarks.dpmot_speed --device=cuda                        # EDM's CIFAR-10 U-Net (56 M parameters)
    python -m benchmarks.dpmot_speed --device=cpu --model-channels=16 --resolution=8 --samples=64 --batch=32

The denoiser is models.networks' EDM U-Net (`denoiser_kwargs`, default model_channels 128: the DDPM++ network of
EDM's CIFAR-10 recipe) with random weights, and the potential holds N random latents at sigma_(S-K) of an S-step
EDM schedule with zero heights: what is timed does not depend on what the weights, latents or heights are. Three
arms, alternated (ABCABC...) so that a load change hits them alike, each over the same seeds:

- DPM-OT: `sampling.dpmot.generate_samples` with the potential (source point, OT map, last K sampler steps);
- plain: `generate_samples` without a potential, with the step count that gives the same NFE (Heun: K steps);
- network: the denoiser alone, NFE calls per batch on a fixed input (the floor of both).

It prints images/s of each arm (median over --repeats), DPM-OT / plain, the share of DPM-OT's time spent outside
the network ((DPM-OT - network) / network: the OT map, random numbers, sampler arithmetic, copies) and, on a
GPU, the peak memory of each arm (torch.cuda.max_memory_allocated). The last line is `RESULT {json}`.
"""

import json
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

#----------------------------------------------------------------------------

def make_denoiser(resolution, model_channels, device, seed=0):
    """EDM's U-Net denoiser for 3 x resolution^2 images with random (non-zero) weights, in eval mode."""
    torch.manual_seed(seed)
    kwargs = networks.denoiser_kwargs((3, resolution, resolution), 'edm', model_channels, zero_init=False)
    return dnnlib.util.construct_class_by_name(**kwargs).eval().requires_grad_(False).to(device)


def make_potential(net, num_targets, steps, back_steps, path, seed=0):
    """A potential file of `num_targets` random latents at sigma_(S-K) with zero heights (written to `path` and
    read back through load_potential, so that it is a valid file)."""
    gen = torch.Generator().manual_seed(seed)
    sigmas = diffusion.net_sigma_schedule(net, steps)
    shape = list(net.data_shape)
    targets = torch.rand([num_targets, *shape], generator=gen) * 2 - 1
    targets += float(sigmas[steps - back_steps]) * torch.randn(targets.shape, generator=gen)
    potential_lib.save_potential(path, h=torch.zeros(num_targets), sigmas=sigmas, back_steps=back_steps,
                                 source='uniform', data_shape=shape, score_gap=1.0, targets=targets)
    return potential_lib.load_potential(path)


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_arms(arms, device, repeats):
    """{name: (median seconds, peak GPU bytes or None)} of each zero-argument callable, alternated per round
    (the order reversed every other round) after one untimed warm-up call each."""
    times, peaks = {name: [] for name in arms}, {name: None for name in arms}
    for fn in arms.values():
        fn()
    for r in range(repeats):
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            _sync(device)
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            arms[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if device.type == 'cuda':
                peaks[name] = max(peaks[name] or 0, torch.cuda.max_memory_allocated(device))
    return {name: (statistics.median(times[name]), peaks[name]) for name in arms}


@click.command()
@click.option('--device', help='auto, cpu, cuda or cuda:N', default='auto', show_default=True)
@click.option('--model-channels', help='U-Net base channels (128: EDM CIFAR-10, 56 M parameters)', type=click.IntRange(min=4), default=128, show_default=True)
@click.option('--resolution', help='Image side (3 channels)', type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--num-targets', help='N: latents of the potential', type=click.IntRange(min=2), default=10000, show_default=True)
@click.option('--steps', help='S: steps of the schedule', type=click.IntRange(min=2), default=18, show_default=True)
@click.option('--back-steps', help='K: steps after the OT map', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--sampler', help='Sampler of both arms', type=click.Choice(['euler', 'heun']), default='heun', show_default=True)
@click.option('--samples', help='Seeds per timed run', type=click.IntRange(min=1), default=2048, show_default=True)
@click.option('--batch', help='Samples per network call', type=click.IntRange(min=1), default=256, show_default=True)
@click.option('--repeats', help='Timed runs of each arm (alternating)', type=click.IntRange(min=1), default=3, show_default=True)
def main(device, model_channels, resolution, num_targets, steps, back_steps, sampler, samples, batch, repeats):
    """Images/s of DPM-OT and of the plain sampler at equal NFE, and the share spent outside the network."""
    if back_steps > steps:
        raise click.BadParameter(f'--back-steps={back_steps} must be at most --steps={steps}')
    device = dist_utils.init(device)
    dist_utils.setup_precision(verbose=False)
    net = make_denoiser(resolution, model_channels, device)
    params = sum(p.numel() for p in net.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        pot = make_potential(net, num_targets, steps, back_steps, f'{tmp}/potential.pt')
    seeds = list(range(samples))
    nfe = diffusion.expected_nfe(sampler, pot['sigmas'][steps - back_steps:])
    # The plain sampler with the same NFE: K steps of its own schedule from sigma_max.
    x_net = torch.randn([min(batch, samples), *net.data_shape], generator=torch.Generator().manual_seed(1)).to(device)
    sigma = torch.full([len(x_net)], float(pot['sigma']), device=device)

    def network_only():
        with torch.no_grad():
            for start in range(0, samples, batch):
                n = min(batch, samples - start)
                for _ in range(nfe):
                    net(x_net[:n], sigma[:n])

    arms = dict(dpmot=lambda: dpmot.generate_samples(net, seeds, potential=pot, sampler=sampler, batch_size=batch,
                                                      check_network=False),
                plain=lambda: dpmot.generate_samples(net, seeds, sampler=sampler, steps=back_steps, batch_size=batch),
                network=network_only)
    print(f'Device {device}; denoiser {params / 1e6:.1f} M parameters (model_channels {model_channels}, 3x{resolution}x'
          f'{resolution}); N = {num_targets} latents at sigma_{steps - back_steps} = {pot["sigma"]:.4g}; {sampler}, '
          f'K = {back_steps}: {nfe} NFE; {samples} samples in batches of {batch}; {repeats} alternating runs', flush=True)
    res = time_arms(arms, device, repeats)
    for name, (t, peak) in res.items():
        mem = '' if peak is None else f', peak GPU memory {peak / 2**30:.2f} GiB'
        print(f'{name:8s} {t:8.3f} s per run -> {samples / t:9.1f} images/s{mem}')
    overhead = (res['dpmot'][0] - res['network'][0]) / res['network'][0]
    print(f'DPM-OT / plain at {nfe} NFE: {res["plain"][0] / res["dpmot"][0]:.2f}x the images/s; outside the network: '
          f'{100 * overhead:.1f} % of the network time (DPM-OT), '
          f'{100 * (res["plain"][0] - res["network"][0]) / res["network"][0]:.1f} % (plain)')
    result = dict(device=str(device), parameters=params, nfe=nfe, samples=samples, batch=batch,
                  images_per_s={k: samples / v[0] for k, v in res.items()},
                  peak_gpu_bytes={k: v[1] for k, v in res.items()}, dpmot_outside_network_share=overhead)
    print('RESULT ' + json.dumps(result), flush=True)


if __name__ == '__main__':
    main()
