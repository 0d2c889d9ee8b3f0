"""DPM-OT precompute: target latents at sigma_(S-K) and the semi-discrete OT potential that maps a source law to them.

    python potential.py --network=runs/00000-gmm-denoiser/network-snapshot-000100.pkl --data=gmm.npz \\
        --steps=18 --back-steps=5 --num-targets=2000 --source=uniform --outdir=pot
    torchrun --standalone --nproc_per_node=4 potential.py ...      # the solver's work split across processes

Writes DIR/potential.pt (sampling.potential.load_potential), DIR/log.txt (options, memory estimate, the solver's
errors per iteration) and DIR/potential-state.pt (the solver's checkpoint; re-running the same command
resumes from it). The script only parses options; the work is in sampling.potential and transport.semidiscrete.
"""

import datetime
import json
import math
import os
import sys

import click
import torch

import dnnlib
from data.dataset import DatasetError, open_dataset
from sampling import diffusion
from sampling import snapshots
from sampling import potential as potential_lib
from torch_utils import distributed as dist
from torch_utils.images import to_model_space
from torch_utils.misc import state_dict_sha256
from transport.semidiscrete import SemidiscreteProblem, SemidiscreteSolver, evaluate

STATE_NAME = 'potential-state.pt'

#----------------------------------------------------------------------------

def _schedule(opts, net):
    """(sigmas [S + 1], K) from --steps/--back-steps or --sigma/--back-steps, within the network's range."""
    net_min, net_max = float(getattr(net, 'sigma_min', 0.002)), float(getattr(net, 'sigma_max', 80.0))
    sigma_min = net_min if opts.sigma_min is None else opts.sigma_min
    sigma_max = net_max if opts.sigma_max is None else opts.sigma_max
    if not net_min <= sigma_min <= sigma_max <= net_max:
        raise click.ClickException(f'--sigma-min={sigma_min:g} / --sigma-max={sigma_max:g} must satisfy '
                                   f'{net_min:g} <= sigma-min <= sigma-max <= {net_max:g} (the network\'s range)')
    K = opts.back_steps
    if opts.sigma is not None:
        if opts.steps is not None:
            raise click.ClickException('--steps and --sigma exclude each other: give --steps S (the latents are then '
                                       'at sigma_(S-K)) or --sigma (then K steps run from it)')
        if not sigma_min < opts.sigma <= sigma_max:
            raise click.ClickException(f'--sigma={opts.sigma:g} must lie in ({sigma_min:g}, {sigma_max:g}] (the '
                                       'network\'s noise levels above --sigma-min)')
        sigmas = diffusion.edm_sigma_schedule(K, sigma_min, opts.sigma, opts.rho)
    else:
        S = 18 if opts.steps is None else opts.steps
        if K > S:
            raise click.ClickException(f'--back-steps={K} exceeds --steps={S}: the OT map lands at sigma_(S-K), '
                                       f'so K must be at most S')
        sigmas = diffusion.edm_sigma_schedule(S, sigma_min, sigma_max, opts.rho)
    round_sigma = getattr(net, 'round_sigma', None)
    if round_sigma is not None:
        sigmas[:-1] = torch.as_tensor(round_sigma(sigmas[:-1]), dtype=torch.float64)
    return sigmas, K


def _open_inputs(opts):
    """(net, snapshot, dataset) with every check that needs no computation."""
    if not os.path.exists(opts.network) and not dnnlib.util.is_url(opts.network):
        raise click.ClickException(f'--network: no such file or folder: "{opts.network}"')
    try:
        net, snapshot = snapshots.load_denoiser(opts.network)
        shape = snapshots.data_shape_of(net)
    except ValueError as err:
        raise click.ClickException(f'--network: {err}') from None
    if not os.path.exists(opts.data):
        raise click.ClickException(f'--data: no such file or directory: "{opts.data}"')
    try:
        dataset = open_dataset(opts.data)
    except (DatasetError, OSError) as err:
        raise click.ClickException(f'--data: {err}') from None
    dshape = tuple(dataset.item_shape)
    if dshape != shape:
        raise click.ClickException(f'--data holds items of shape {list(dshape)} but the network works on {list(shape)}: '
                                   'use the data set the denoiser was trained on')
    if opts.num_targets is not None and opts.num_targets > len(dataset):
        raise click.ClickException(f'--num-targets={opts.num_targets} exceeds the {len(dataset)} items of --data; use '
                                   f'--num-targets <= {len(dataset)}')
    return net, snapshot, dataset


def _targets(dataset, indices, sigma, seed, device):
    """Target latents y_i = x_i + sigma n_i (sampling.potential.forward_diffuse) on `device`."""
    x = to_model_space(torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in indices]))
    return potential_lib.forward_diffuse(x, sigma, seed).to(device)


def _format_bytes(n):
    return f'{n / 2**30:.2f} GiB' if n >= 2**28 else f'{n / 2**20:.1f} MiB'


def _log_row(row):
    check = '' if row.get('check_rms') is None else \
        f'  check_rms {row["check_rms"]:.4f}  check_max {row["check_max_abs"]:.3f}  check_empty {row["check_empty"]}'
    return (f'iter {row["iter"]:<6d} samples {row["num_samples"]:<9d} rms {row["rms"]:<8.4f} '
            f'max_rel_err {row["max_rel_err"]:<8.3f} empty {row["empty"]:<5d} gap {row["gap"]:<10.4g} '
            f'averaging {int(row["averaging"])}{check}')

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
@click.option('--sigma',            help='Instead of --steps: the noise level of the latents; generation then runs K steps from it to --sigma-min', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma-min',        help='Smallest positive noise level of the schedule  [default: the network\'s]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma-max',        help='Largest noise level of the schedule  [default: the network\'s]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--rho',              help='Exponent of the EDM schedule', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7.0, show_default=True)
@click.option('--num-targets',      help='Number N of data items forward-diffused into target latents (a seeded random subset)  [default: all]', metavar='INT', type=click.IntRange(min=1))
@click.option('--source',           help='Source law of the OT map: uniform on [0,1]^d (the paper) or standard normal', type=click.Choice(['uniform', 'normal']), default='uniform', show_default=True)
@click.option('--seed',             help='Seed of the subset, the forward-diffusion noise and the solver\'s samples', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--max-iters',        help='Solver iterations in total (a resumed run counts the earlier ones)', metavar='INT', type=click.IntRange(min=1), default=2000, show_default=True)
@click.option('--tol',              help='Stop when the rms relative cell-mass error on fresh check samples is below this and no cell is empty (0: run --max-iters)', metavar='FLOAT', type=click.FloatRange(min=0), default=0.05, show_default=True)
@click.option('--lr',               help='Solver step relative to the mean top-1/top-2 score gap', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True)
@click.option('--solver-step',      help='Solver step rule (transport.semidiscrete.SemidiscreteSolver.step, e.g. newton, log, adam)  [default: the solver\'s]', metavar='STR', type=str)
@click.option('--solver-init',      help='Solver start (SemidiscreteSolver.init, e.g. auto, norm, voronoi, zero)  [default: the solver\'s]', metavar='STR', type=str)
@click.option('--samples-per-iter', help='Monte Carlo samples per iteration at the start  [default: 10 N]', metavar='INT', type=click.IntRange(min=2))
@click.option('--max-samples-per-iter', help='Cap of the samples per iteration as they grow  [default: 160 N]', metavar='INT', type=click.IntRange(min=2))
@click.option('--eval-samples',     help='Fresh samples of the final cell-mass evaluation  [default: 100 N]', metavar='INT', type=click.IntRange(min=2))
@click.option('--precision',        help='Scoring precision of the solver (bf16: shortlist, then exact re-scoring)', type=click.Choice(['fp32', 'bf16']), default='fp32', show_default=True)
@click.option('--block-size',       help='Source samples scored at a time (memory ~ block x chunk scores)', metavar='INT', type=click.IntRange(min=1), default=2048, show_default=True)
@click.option('--chunk-size',       help='Targets scored at a time', metavar='INT', type=click.IntRange(min=1), default=4096, show_default=True)
@click.option('--shard-targets',    help='Under torchrun, split the targets (instead of the samples) across processes', is_flag=True)
@click.option('--checkpoint-every', help='Save the solver state every this many iterations', metavar='INT', type=click.IntRange(min=1), default=200, show_default=True)
@click.option('--resume/--no-resume', help='Continue from DIR/potential-state.pt when it exists (same settings), or start over', default=True, show_default=True)
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
    device = dist.init(opts.device)
    try:
        _run(opts, device)
    finally:
        dist.shutdown()


def _run(opts, device):
    rank0 = dist.get_rank() == 0

    # Inputs and settings: every check before any output exists.
    net, snapshot, dataset = _open_inputs(opts)
    sigmas, K = _schedule(opts, net)
    S = sigmas.numel() - 1
    sigma = float(sigmas[S - K])
    N = len(dataset) if opts.num_targets is None else opts.num_targets
    shape = snapshots.data_shape_of(net)
    d = math.prod(shape)
    world = dist.get_world_size()
    extra = {k: v for k, v in (('step', opts.solver_step), ('init', opts.solver_init)) if v is not None}
    try:
        solver = SemidiscreteSolver(max_iters=opts.max_iters, tol=opts.tol, lr=opts.lr,
                                    samples_per_iter=opts.samples_per_iter,
                                    max_samples_per_iter=opts.max_samples_per_iter, block_size=opts.block_size,
                                    chunk_size=opts.chunk_size, shard_targets=opts.shard_targets,
                                    dtype=torch.bfloat16 if opts.precision == 'bf16' else torch.float32, **extra)
    except ValueError as err:
        raise click.ClickException(f'Solver settings: {err}') from None
    data_hash = dataset.data_hash()
    net_hash = state_dict_sha256(net)
    indices = potential_lib.select_indices(len(dataset), N, opts.seed)
    # What makes two runs the same run (a checkpoint of another run is never resumed).
    run_key = dict(data_sha256=data_hash, denoiser_sha256=net_hash, num_targets=N, data_shape=list(shape),
                   sigma=sigma, source=opts.source, seed=opts.seed, lr=opts.lr, precision=opts.precision,
                   step=solver.step, init=solver.init,
                   samples_per_iter=opts.samples_per_iter, max_samples_per_iter=opts.max_samples_per_iter,
                   block_size=opts.block_size, chunk_size=opts.chunk_size, shard_targets=opts.shard_targets)
    state_path = os.path.join(opts.outdir, STATE_NAME)
    resume, history = None, []
    if opts.resume and os.path.isfile(state_path):
        try:
            ckpt = torch.load(state_path, map_location='cpu', weights_only=True)
        except Exception as err:
            raise click.ClickException(f'Cannot read the checkpoint "{state_path}" ({type(err).__name__}: {err}); '
                                       'delete it or pass --no-resume') from None
        diff = sorted(k for k in set(run_key) | set(ckpt.get('run_key', {}))
                      if ckpt.get('run_key', {}).get(k) != run_key.get(k))
        if diff:
            raise click.ClickException(f'"{state_path}" is the checkpoint of another run (differs in '
                                       f'{", ".join(diff)}); use another --outdir, or --no-resume to start over')
        resume, history = ckpt['state'], list(ckpt.get('history', []))

    mem = potential_lib.estimate_peak_memory(N, d, opts.block_size, opts.chunk_size, opts.precision == 'bf16', world,
                                     opts.shard_targets)
    lines = [f'Potential: N = {N} latents of shape {list(shape)} (d = {d}) at sigma_{S - K} = {sigma:.6g} '
             f'(schedule of S = {S} steps, K = {K} back-steps), source {opts.source}',
             f'Data: "{opts.data}" ({len(dataset)} items, sha256 {data_hash[:12]}...); network: "{opts.network}" '
             f'(weights sha256 {(net_hash or "-")[:12]}...)',
             f'Peak memory estimate per process on {device.type}: {_format_bytes(mem["total"])} '
             f'(set-up {_format_bytes(mem["setup"])}, solving {_format_bytes(mem["solve"])}), {world} process(es)',
             f'Resume: {"from iteration " + str(resume["iter"]) if resume else "no (fresh start)"}']
    if rank0:
        os.makedirs(opts.outdir, exist_ok=True)
    dist.barrier()
    log = open(os.path.join(opts.outdir, 'log.txt'), 'a', encoding='utf-8') if rank0 else None

    def say(line):
        if rank0:
            print(line)
            log.write(line + '\n')
            log.flush()

    try:
        command = _command_line()
        say(f'--- {datetime.datetime.now().isoformat(timespec="seconds")}: {command}')
        for line in lines:
            say(line)

        targets = _targets(dataset, indices, sigma, opts.seed, device)
        prob = SemidiscreteProblem(targets=targets.reshape(N, -1), source=opts.source)
        if resume is not None and resume.get('converged'):
            # Already certified: take the stored heights without iterating (a resumed solver continues iterating).
            import dataclasses
            solver = dataclasses.replace(solver, max_iters=int(resume['iter']))

        bar = None
        if rank0 and opts.progress:
            import tqdm
            bar = tqdm.tqdm(total=opts.max_iters, initial=int(resume['iter']) if resume else 0, desc='Solving',
                            unit='it', file=sys.stderr, dynamic_ncols=True)

        def on_iter(it, row):
            if rank0:
                log.write(_log_row(row) + '\n')
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(rms=f'{row["rms"]:.3f}', empty=row['empty'],
                                    check=('-' if row['check_rms'] is None else f'{row["check_rms"]:.3f}'))
            return False

        def checkpoint(state, rows):
            if rank0:
                with dnnlib.util.atomic_write(state_path, 'wb') as f:
                    torch.save(dict(run_key=run_key, state=state, history=history + rows), f)
                log.flush()
            dist.barrier()

        try:
            out, rows = potential_lib.solve_potential(prob, solver, seed=opts.seed, resume=resume, checkpoint=checkpoint,
                                              checkpoint_every=opts.checkpoint_every, callback=on_iter)
        except (ValueError, RuntimeError) as err:
            saved = f'"{state_path}" holds the last checkpoint' if os.path.isfile(state_path) else 'no checkpoint was written'
            raise click.ClickException(f'The solver failed ({type(err).__name__}: {err}); {saved}. Try another '
                                       '--solver-step (e.g. adam) or a smaller --lr, with --no-resume to start over') from None
        finally:
            if bar is not None:
                bar.close()
        history += rows
        converged = out.converged or bool(resume is not None and resume.get('converged'))

        # Final diagnostics on fresh samples, never used for fitting.
        stats = evaluate(prob, out.h, num_samples=opts.eval_samples,
                         generator=torch.Generator().manual_seed(opts.seed + 1))
        gap = potential_lib.mean_score_gap(prob, out.h, generator=torch.Generator().manual_seed(opts.seed + 2))
        keep = ('iter', 'num_samples', 'rms', 'max_rel_err', 'empty', 'gap', 'check_rms')
        diagnostics = dict(converged=converged, num_iters=out.num_iters, num_samples_used=out.num_samples_used,
                           tol=opts.tol, max_iters=opts.max_iters, check=out.check,
                           eval={k: v for k, v in stats.items() if k != 'counts'},
                           eval_counts=stats['counts'].cpu(), settings=dict(lr=opts.lr, precision=opts.precision, step=solver.step,
                                                                            init=solver.init,
                                                                            block_size=opts.block_size,
                                                                            chunk_size=opts.chunk_size),
                           history=[{k: r.get(k) for k in keep} for r in history])
        provenance = dict(data=os.path.abspath(opts.data), data_sha256=data_hash, data_size=len(dataset),
                          network=opts.network if dnnlib.util.is_url(opts.network) else os.path.abspath(opts.network),
                          denoiser_sha256=net_hash, network_kimg=snapshot.get('kimg'), seed=opts.seed,
                          noise='sampling.potential.forward_diffuse(x, sigma, seed)', world_size=dist.get_world_size(),
                          command=command, created=datetime.datetime.now().isoformat(timespec='seconds'),
                          torch=str(torch.__version__))
        if rank0:
            path = potential_lib.save_potential(
                os.path.join(opts.outdir, 'potential.pt'), h=out.h.cpu(), sigmas=sigmas, back_steps=K,
                source=opts.source, data_shape=list(shape), score_gap=gap, targets=targets.cpu(),
                targets_path=os.path.join(opts.outdir, 'targets.pt') if opts.separate_targets else None,
                indices=indices, solver=diagnostics, provenance=provenance)
            say(f'Evaluation on {stats["num_samples"]} fresh samples: rms relative cell-mass error {stats["rms"]:.4f} '
                f'(noise floor of max {stats["noise_floor"]:.3f}), max {stats["max_abs"]:.3f}, empty cells '
                f'{stats["empty"]}, mean score gap {gap:.4g}')
            if converged:
                say(f'Converged after {out.num_iters} iterations ({out.num_samples_used:,} samples).')
            elif opts.tol == 0:
                say(f'Ran {out.num_iters} iterations (--tol=0: no convergence check).')
            else:
                say(f'Warning: not converged to --tol={opts.tol:g} within --max-iters={opts.max_iters} (last check: '
                    f'{json.dumps(out.check) if out.check else "none yet"}); re-run with a larger --max-iters to '
                    'continue from the checkpoint.')
            say(f'Wrote {path}')
        dist.barrier()
    finally:
        if log is not None:
            log.close()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
