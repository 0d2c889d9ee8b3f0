"""DPM-OT precompute: target latents at sigma_(S-K) and the semi-discrete OT potential that maps a source law to them.

    python potential.py --network=runs/00000-gmm-denoiser/network-snapshot-000100.pkl --data=gmm.npz \\
        --steps=18 --back-steps=5 --num-targets=2000 --source=uniform --outdir=pot
    torchrun --standalone --nproc_per_node=4 potential.py ...      # the solver's work split across processes

Writes DIR/potential.pt (sampling.potential.load_potential), DIR/log.txt (options, memory estimate, the solver's
errors per iteration) and DIR/potential-state.pt (the solver's checkpoint; re-running the same command
resumes from it). potential.py writes potential.pt only when the solver converged to --tol (or with
--accept-unconverged); otherwise it says why and what to try, and exits with an error. The script only parses options: sampling.potential.setup_potential checks them and
compute_potential does the work.
"""

import click

import dnnlib
from sampling import potential as potential_lib
from torch_utils import distributed as dist

STATE_NAME = potential_lib.STATE_NAME

#----------------------------------------------------------------------------

def _command_line():
    """The effective options of this call as a potential.py command line (from click's parsed values, so it is
    right also when main() is called in-process, where sys.argv is the caller's)."""
    ctx = click.get_current_context()
    parts = ['potential.py']
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or not param.opts:
            continue
        flag = max(param.opts, key=len)
        if isinstance(value, bool):
            flag = flag if value else max(param.secondary_opts, key=len, default=None)
            if flag:
                parts.append(flag)
        else:
            parts.append(f'{flag}={value}')
    return ' '.join(parts)


@click.command(context_settings=dict(max_content_width=120))
@click.option('--network',          help='Denoiser snapshot (train.py --kind=denoiser, or NVlabs/edm): the network under "ema"; or a code-free export of generate.py --export-safe (its folder or network.json)', metavar='PKL|URL|DIR', type=str, required=True)
@click.option('--data',             help='The data set the denoiser was trained on: image zip/folder or vector .npz', metavar='ZIP|DIR|NPZ', type=str, required=True)
@click.option('--outdir',           help='Where to write potential.pt, log.txt and the solver checkpoint', metavar='DIR', type=str, required=True)
@click.option('--steps',            help='Steps S of the sampler\'s EDM schedule (rho) the potential is made for  [default: 18]', metavar='INT', type=click.IntRange(min=1))
@click.option('--back-steps',       help='K: the OT map lands at sigma_(S-K) and generation runs the last K steps', metavar='INT', type=click.IntRange(min=1), default=5, show_default=True)
@click.option('--sigma',            help='Instead of --steps: the noise level of the latents; generation then runs K steps from it to --sigma_min', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_min', '--sigma-min', 'sigma_min', help='Smallest positive noise level of the schedule, raised to the network\'s sigma_min as NVlabs/edm does  [default: 0.002]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_max', '--sigma-max', 'sigma_max', help='Largest noise level of the schedule, lowered to the network\'s sigma_max as NVlabs/edm does  [default: 80]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--rho',              help='Exponent of the EDM schedule', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7.0, show_default=True)
@click.option('--num-targets',      help='Number N of data items forward-diffused into target latents (a seeded random subset)  [default: all]', metavar='INT', type=click.IntRange(min=1))
@click.option('--class', 'class_label', help='Make the potential over the items of this class only (labelled data, class-conditional network); without it every latent keeps its item\'s label', metavar='INT', type=click.IntRange(min=0))
@click.option('--source',           help='Source law of the OT map: uniform on [0,1]^d (the paper) or standard normal', type=click.Choice(['uniform', 'normal']), default='uniform', show_default=True)
@click.option('--seed',             help='Seed of the subset, the forward-diffusion noise and the solver\'s samples', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--solver',           help='exact: damped Newton on exact cell masses (d <= 3); monte-carlo: the stochastic solver (any d); auto: a checkpoint\'s solver, else exact for d <= 3', type=click.Choice(['auto', 'exact', 'monte-carlo']), default='auto', show_default=True)
@click.option('--max-iters',        help='Solver iterations in total (a resumed run counts the earlier ones)', metavar='INT', type=click.IntRange(min=1), default=2000, show_default=True)
@click.option('--tol',              help='Converged when the rms relative cell-mass error on fresh check samples is below this and no cell is empty (0: no check; run --max-iters)', metavar='FLOAT', type=click.FloatRange(min=0), default=0.05, show_default=True)
@click.option('--lr',               help='Monte Carlo solver: step relative to the mean top-1/top-2 score gap  [default: 0.5]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--solver-step',      help='Monte Carlo solver: step rule, log (gap-scaled Newton step on log cell masses) or adam  [default: log]', type=click.Choice(['log', 'adam']))
@click.option('--solver-init',      help='Monte Carlo solver: start, auto (the best of the others on a pilot batch), norm, voronoi or zero  [default: auto]', type=click.Choice(['auto', 'norm', 'voronoi', 'zero']))
@click.option('--samples-per-iter', help='Monte Carlo solver: samples per iteration at the start  [default: 10 N]', metavar='INT', type=click.IntRange(min=2))
@click.option('--max-samples-per-iter', help='Monte Carlo solver: cap of the samples per iteration as they grow  [default: 32 N]', metavar='INT', type=click.IntRange(min=2))
@click.option('--eval-samples',     help='Fresh samples of the final cell-mass evaluation  [default: 100 N]', metavar='INT', type=click.IntRange(min=2))
@click.option('--precision',        help='Monte Carlo solver: scoring precision (bf16: shortlist, then exact re-scoring)  [default: fp32]', type=click.Choice(['fp32', 'bf16']))
@click.option('--block-size',       help='Source samples scored at a time (memory ~ block x chunk scores)', metavar='INT', type=click.IntRange(min=1), default=2048, show_default=True)
@click.option('--chunk-size',       help='Targets scored at a time', metavar='INT', type=click.IntRange(min=1), default=4096, show_default=True)
@click.option('--shard-targets',    help='Monte Carlo solver under torchrun: split the targets (instead of the samples) across processes', is_flag=True)
@click.option('--checkpoint-every', help='Save the solver state every this many iterations', metavar='INT', type=click.IntRange(min=1), default=200, show_default=True)
@click.option('--resume/--no-resume', help='Continue from DIR/potential-state.pt when it exists (same settings), or start over', default=True, show_default=True)
@click.option('--accept-unconverged', help='Write potential.pt even when the solver did not converge to --tol (it is recorded as unconverged; generate.py warns)', is_flag=True)
@click.option('--separate-targets', help='Write the latents to DIR/targets.pt (potential.pt keeps their path) instead of into potential.pt', is_flag=True)
@click.option('--device',           help='Device', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
@click.option('--progress/--no-progress', help='Show a progress bar', default=True, show_default=True)
def main(**kwargs):
    """Compute a DPM-OT potential: forward-diffuse N data items to sigma_(S-K) and solve semi-discrete OT.

    \b
    Examples:
    # 2000 latents at sigma_13 of an 18-step schedule; generation then runs 5 steps (Heun: 9 NFE)
    python potential.py --network=runs/00000-gmm-denoiser-gpus1-batch512-edm/network-snapshot-000500.pkl \\
        --data=gmm.npz --steps=18 --back-steps=5 --num-targets=2000 --outdir=pot
    \b
    # Images, 4 processes, latents at sigma = 2 with 4 steps left
    torchrun --standalone --nproc_per_node=4 potential.py --network=denoiser.pkl --data=digits.zip \\
        --sigma=2 --back-steps=4 --num-targets=50000 --precision=bf16 --outdir=pot-digits
    """
    opts = dnnlib.EasyDict(kwargs)
    opts.command = _command_line()
    device_choice = opts.pop('device')
    device = dist.init(device_choice)
    try:
        job = potential_lib.setup_potential(**opts)
        potential_lib.compute_potential(job, device)
    except potential_lib.ComputeError as err:
        raise click.ClickException(str(err)) from None
    finally:
        dist.shutdown()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
