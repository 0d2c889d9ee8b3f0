"""Train a one-step entropic OT model (default) or, with --kind=denoiser, a diffusion denoiser.

    torchrun --standalone --nproc_per_node=4 train.py --name=mnist --outdir=runs \\
        --data1train=datasets/2_train.zip --data2train=datasets/3_train.zip \\
        --data1test=datasets/2_test.zip --data2test=datasets/3_test.zip --batch=64 --gamma=1.0

Runs as a plain `python train.py ...` (one process) or under torchrun (gloo on CPUs, nccl on GPUs).
The script only parses options into a config (`setup_training_config`) and launches the loop.
"""

import json
import os
import re

import click
import torch

import dnnlib
from data.dataset import DatasetError
from models.diffusion_loss import LOSSES
from models.networks import denoiser_kwargs, eot_network_kwargs
from torch_utils import distributed as dist
from torch_utils.training_stats import wandb_module
from training.loop import find_latest_state, training_loop, write_options
from training.trainer import DivergenceError

#----------------------------------------------------------------------------

# --lr-rampup by --kind. EOT: none. Every measured EOT run (docs/gaussian_eot.md, docs/toy2d.md, the demo) used
# 0 and trained stably; the seed's 10 000 kimg left a 60-300 kimg run at 0.6-3 % of its learning rate.
# Denoisers keep EDM's 10 000 kimg (a 200 Mimg run ramps up over its first 5 %).
LR_RAMPUP_DEFAULT = dict(eot=0, denoiser=10000)


class AdamBetas(click.ParamType):
    """'B1,B2' with 0 <= B1, B2 < 1 -> (B1, B2)."""
    name = 'betas'

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            betas = tuple(float(v) for v in str(value).split(','))
        except ValueError:
            betas = ()
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            self.fail(f'{value!r} is not two numbers in [0, 1) separated by a comma, e.g. 0.5,0.9', param, ctx)
        return betas


class Config(dnnlib.EasyDict):
    """The resolved training options: exactly what goes to training_options.json and the loop."""


def _dataset_kwargs(path, cache, option):
    if path is None:
        return None
    if not os.path.exists(path):
        raise click.ClickException(f'{option}: no such file or directory: "{path}"')
    if path.lower().endswith('.npz'):
        return dnnlib.EasyDict(class_name='data.dataset.VectorDataset', path=path)
    return dnnlib.EasyDict(class_name='data.dataset.ImageFolderDataset', path=path, cache=cache)


def _inspect_dataset(kwargs, option):
    """Open a dataset once to check it (every image header, with progress) and read its shape and size. The
    training loop then opens it without the header scan (check_all=False): it ran here."""
    image = kwargs.class_name.endswith('ImageFolderDataset')
    try:
        ds = dnnlib.util.construct_class_by_name(**kwargs, **(dict(progress=True) if image else {}))
    except (DatasetError, OSError) as err:
        raise click.ClickException(f'{option}: {err}') from None
    shape, size = tuple(ds.item_shape), len(ds)
    close = getattr(ds, 'close', None)
    if close is not None:
        close()
    if image:
        kwargs.check_all = False # Images are still checked for their shape when they are loaded.
    return shape, size


def setup_training_config(opts):
    """Turn parsed command-line options into the loop's config; raises ClickException on bad input.

    Checks everything that can be checked (paths, shapes, batch sizes) before any output exists.
    """
    c = Config()
    c.name = opts.name
    world = dist.get_world_size()

    # Batch.
    if opts.batch % world != 0:
        raise click.ClickException(f'--batch={opts.batch} is not divisible by the number of processes ({world}); '
                                   f'use a multiple of {world}')
    per_rank = opts.batch // world
    if opts.batch_gpu is not None and opts.batch_gpu < per_rank and per_rank % opts.batch_gpu != 0:
        raise click.ClickException(f'--batch={opts.batch} over {world} process(es) gives {per_rank} per process, '
                                   f'which --batch-gpu={opts.batch_gpu} does not divide; choose a divisor of {per_rank}')
    c.batch_size, c.batch_gpu = opts.batch, opts.batch_gpu

    # Data.
    if opts.kind == 'denoiser':
        c.task_kwargs, c.data_paths = _denoiser_task_kwargs(opts)
        return _schedule_config(c, opts)
    for option, value in (('--data1train', opts.data1train), ('--data2train', opts.data2train)):
        if value is None:
            raise click.ClickException(f'{option} is required for --kind=eot')
    data = {}
    for key, option in (('data1', '--data1train'), ('data2', '--data2train'), ('test1', '--data1test'), ('test2', '--data2test')):
        path = opts[option[2:]]
        kwargs = _dataset_kwargs(path, opts.cache, option)
        if kwargs is not None:
            shape, size = _inspect_dataset(kwargs, option)
            data[key] = (kwargs, shape, size, option)
    shape1 = data['data1'][1]
    for key, (kwargs, shape, size, option) in data.items():
        if shape != shape1:
            raise click.ClickException(f'{option} holds items of shape {list(shape)} but --data1train holds '
                                       f'{list(shape1)}: both domains need the same resolution, channels or dimension '
                                       f'(rebuild one with dataset_tool.py --resolution / --colorize)')
    for option, path in (('--data1stats', opts.data1stats), ('--data2stats', opts.data2stats)):
        if path is not None and not dnnlib.util.is_url(path) and not os.path.isfile(path):
            raise click.ClickException(f'{option}: no such file: "{path}"')
    metrics = [m for m in (opts.metrics or '').split(',') if m and m != 'none']
    for m in metrics:
        if m not in ('fid_G', 'fid_SDE'):
            raise click.ClickException(f'--metrics: unknown metric "{m}"; choose from fid_G, fid_SDE or none')
    if metrics and opts.data2stats is None:
        raise click.ClickException(f'--metrics={opts.metrics} needs --data2stats (reference statistics of domain 2, '
                                   'from `fid.py ref`)')
    if metrics and 'test1' not in data:
        raise click.ClickException('--metrics needs --data1test (the images translated for FID)')

    # Networks, optimisers, task.
    try:
        net_opts = json.loads(opts.net_opts) if opts.net_opts else {}
        if not isinstance(net_opts, dict):
            raise ValueError('not a JSON object')
        drift = 'velocity' if opts.g_loss == 'kinetic' else 'end_point' # The kinetic G-step needs f = x + (1 - t) v.
        G_kwargs, f_kwargs, D_kwargs = eot_network_kwargs(shape1, model_channels=opts.model_channels, drift=drift,
                                                          **net_opts)
    except ValueError as err:
        raise click.ClickException(f'--net-opts={opts.net_opts!r}: {err}') from None
    adam = lambda lr: dnnlib.EasyDict(class_name='torch.optim.Adam', lr=lr, betas=list(opts.adam_betas), eps=1e-8)
    c.task_kwargs = dnnlib.EasyDict(
        class_name='training.eot_task.EOTTask',
        data1_kwargs=data['data1'][0], data2_kwargs=data['data2'][0],
        test1_kwargs=data['test1'][0] if 'test1' in data else None,
        loader_kwargs=dnnlib.EasyDict(num_workers=opts.workers, prefetch_factor=2 if opts.workers > 0 else None,
                                      pin_memory=False),
        G_kwargs=G_kwargs, f_kwargs=f_kwargs, D_kwargs=D_kwargs,
        G_opt_kwargs=adam(opts.lr_g), f_opt_kwargs=adam(opts.lr_f), D_opt_kwargs=adam(opts.lr_d),
        gamma=opts.gamma, G_loss=opts.g_loss, G_iters=opts.g_iters, f_iters=opts.f_iters, D_iters=opts.d_iters,
        D_gp=opts.d_gp, D_gp_every=opts.d_gp_every, sde_steps=opts.sde_steps,
        metrics=metrics, data2stats=opts.data2stats, detector=opts.detector,
        samples_dir_G=opts.samples_dir_g, samples_dir_SDE=opts.samples_dir_sde)
    c.data_paths = dnnlib.EasyDict(data1train=opts.data1train, data2train=opts.data2train, data1test=opts.data1test,
                                   data2test=opts.data2test, data1stats=opts.data1stats, data2stats=opts.data2stats)

    return _schedule_config(c, opts)


def _schedule_config(c, opts):
    """Schedule, precision and I/O options, shared by every --kind."""
    c.total_kimg = max(opts.duration * 1000, 1e-3)
    c.ema_halflife_kimg = opts.ema * 1000
    c.lr_rampup_kimg = opts.lr_rampup if opts.lr_rampup is not None else LR_RAMPUP_DEFAULT[opts.kind]
    c.grad_clip = opts.grad_clip
    c.precision = opts.precision
    c.compile_mode = None if opts.compile_mode == 'none' else opts.compile_mode
    c.nan_policy = opts.nan_policy
    c.kimg_per_tick, c.snapshot_ticks, c.state_dump_ticks = opts.tick, opts.snap, opts.dump
    c.cudnn_benchmark = opts.bench
    c.tensorboard = opts.tensorboard
    c.wandb_project = opts.wandb
    if opts.wandb:
        try:
            wandb_module()
        except ImportError as err:
            raise click.ClickException(str(err)) from None
    c.seed = opts.seed
    return c


def _denoiser_task_kwargs(opts):
    """(task_kwargs, data_paths) of --kind=denoiser: a preconditioned Denoiser trained with the loss of its
    preconditioning (edm: EDMLoss, vp: VPLoss, ve: VELoss) on --data."""
    if opts.data is None:
        raise click.ClickException('--data is required for --kind=denoiser (image zip/folder or vector .npz)')
    data_kwargs = _dataset_kwargs(opts.data, opts.cache, '--data')
    shape, _size = _inspect_dataset(data_kwargs, '--data')
    try:
        net_opts = json.loads(opts.net_opts) if opts.net_opts else {}
        if not isinstance(net_opts, dict):
            raise ValueError('not a JSON object')
        net_kwargs = denoiser_kwargs(shape, precond=opts.precond, model_channels=opts.model_channels, **net_opts)
    except ValueError as err:
        raise click.ClickException(f'--net-opts={opts.net_opts!r}: {err}') from None
    loss_kwargs = dnnlib.EasyDict(class_name=LOSSES[opts.precond])
    if opts.precond == 'edm':
        loss_kwargs.sigma_data = float(net_kwargs.get('sigma_data', 0.5))
    task_kwargs = dnnlib.EasyDict(
        class_name='training.denoiser_task.DenoiserTask', data_kwargs=data_kwargs, network_kwargs=net_kwargs,
        loss_kwargs=loss_kwargs,
        optimizer_kwargs=dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8),
        loader_kwargs=dnnlib.EasyDict(num_workers=opts.workers, prefetch_factor=2 if opts.workers > 0 else None,
                                      pin_memory=False))
    return task_kwargs, dnnlib.EasyDict(data=opts.data)


def _run_desc(opts, c):
    if opts.kind == 'denoiser':
        desc = f'{opts.name}-denoiser-gpus{dist.get_world_size()}-batch{c.batch_size}-{opts.precond}'
        return re.sub(r'[^0-9A-Za-z._-]', '_', desc + (f'-{opts.desc}' if opts.desc else ''))
    desc = f'{opts.name}-{opts.kind}-gpus{dist.get_world_size()}-batch{c.batch_size}-gamma{opts.gamma:g}'
    if opts.g_loss != 'stated':
        desc += f'-{opts.g_loss}'
    if opts.desc:
        desc += f'-{opts.desc}'
    return re.sub(r'[^0-9A-Za-z._-]', '_', desc)


def _pick_run_dir(opts, desc):
    """(run_dir, resume_state): a new NNNNN-<desc> directory, or for --resume=auto the newest matching one."""
    if opts.nosubdir:
        candidates = [opts.outdir]
    else:
        runs = os.listdir(opts.outdir) if os.path.isdir(opts.outdir) else []
        matching = sorted((r for r in runs if re.fullmatch(rf'\d{{5}}-{re.escape(desc)}', r)), reverse=True)
        candidates = [os.path.join(opts.outdir, r) for r in matching]
    if opts.resume == 'auto':
        for run_dir in candidates:
            state = find_latest_state(run_dir) if os.path.isdir(run_dir) else None
            if state is not None:
                return run_dir, state
    resume = None if opts.resume in (None, 'auto') else opts.resume
    if opts.nosubdir:
        return opts.outdir, resume
    ids = [int(m.group()) for r in (os.listdir(opts.outdir) if os.path.isdir(opts.outdir) else [])
           if (m := re.match(r'^\d+', r)) is not None]
    return os.path.join(opts.outdir, f'{max(ids, default=-1) + 1:05d}-{desc}'), resume

#----------------------------------------------------------------------------

@click.command(context_settings=dict(max_content_width=120))

# Main options.
@click.option('--name',            help='Run name (part of the run directory name)', metavar='STR', type=str, required=True)
@click.option('--outdir',          help='Where to make the run directory', metavar='DIR', type=str, required=True)
@click.option('--kind',            help='What to train: one-step EOT, or a diffusion denoiser for DPM-OT', type=click.Choice(['eot', 'denoiser']), default='eot', show_default=True)
@click.option('--data',            help='--kind=denoiser: the training data: image zip/folder or vector .npz', metavar='ZIP|DIR|NPZ', type=str)
@click.option('--precond',         help='--kind=denoiser: preconditioning and loss (Karras et al. 2022, Table 1)', type=click.Choice(['edm', 'vp', 've']), default='edm', show_default=True)
@click.option('--data1train',      help='Domain 1 (source) training data: image zip/folder or vector .npz', metavar='ZIP|DIR|NPZ', type=str)
@click.option('--data2train',      help='Domain 2 (target) training data', metavar='ZIP|DIR|NPZ', type=str)
@click.option('--data1test',       help='Domain 1 test data: translated for figures and FID  [default: --data1train]', metavar='ZIP|DIR|NPZ', type=str)
@click.option('--data2test',       help='Domain 2 test data (checked for shape; recorded with the run)', metavar='ZIP|DIR|NPZ', type=str)
@click.option('--data1stats',      help='FID reference statistics of domain 1 (fid.py ref); recorded only', metavar='NPZ|URL', type=str)
@click.option('--data2stats',      help='FID reference statistics of domain 2; needed by --metrics', metavar='NPZ|URL', type=str)
@click.option('--samples_dir_SDE', 'samples_dir_sde', help='Write the SDE translations of --data1test at each snapshot here (relative to the run directory)', metavar='DIR', type=str)
@click.option('--samples_dir_G',   'samples_dir_g', help='Write the one-step G translations of --data1test at each snapshot here (relative to the run directory)', metavar='DIR', type=str)
@click.option('--metrics',         help='Metrics at each snapshot: fid_G, fid_SDE (comma-separated) or none', metavar='LIST', type=str, default='none', show_default=True)
@click.option('--detector',        help='FID feature detector: path or URL  [default: $EOT_FID_DETECTOR or the Inception-v3 URL]', metavar='PATH|URL', type=str)

# Hyperparameters.
@click.option('--duration',        help='Training duration', metavar='MIMG', type=click.FloatRange(min=0, min_open=True), default=200, show_default=True)
@click.option('--batch',           help='Total batch size of one step, over all processes', metavar='INT', type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--batch-gpu',       help='Limit the batch per process and accumulation round (gradient accumulation)', metavar='INT', type=click.IntRange(min=1))
@click.option('--G-loss',          'g_loss', help='G-step transport term. stated: the original statement (docs/architecture.md), t ~ U(0,1) unweighted (its optimum is biased away from the EOT plan). kinetic: weighted 1/(1-t)^2 with t = 1-u^2 and f = x + (1-t) v (optimum: the EOT plan). See docs/gaussian_eot.md', type=click.Choice(['stated', 'kinetic']), default='stated', show_default=True)
@click.option('--G_iters',         'g_iters', help='G-steps per outer iteration (each after --f_iters f-steps)', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True)
@click.option('--D_iters',         'd_iters', help='Critic steps per outer iteration', metavar='INT', type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--f_iters',         'f_iters', help='f-steps before each G-step', metavar='INT', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--model_channels',  'model_channels', help='Base channels c of G and f (D uses (c//32+1)*32); MLP width is 8c for vectors', metavar='INT', type=click.IntRange(min=1), default=96, show_default=True)
@click.option('--net-opts',        help='Network overrides as a JSON object, e.g. \'{"num_blocks": 1, "attn_resolutions": []}\' for all, or \'{"D": {"model_channels": 32}}\' for one', metavar='JSON', type=str)
@click.option('--gamma',           help='Entropy: the bridge volatility is sqrt(gamma) (EOT with eps = gamma)', metavar='FLOAT', type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option('--lr_g',            'lr_g', help='Learning rate of G', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option('--D-gp',          'd_gp', help='Weight of a WGAN-GP gradient penalty on the critic (0: none, as in the stated method; 10 is the usual value; it steadies short image runs)', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--D-gp-every',    'd_gp_every', help='Lazy penalty: apply --D-gp on every Nth critic step only, weighted N x (StyleGAN2\'s lazy regularisation)', metavar='N', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--lr_D',            'lr_d', help='Learning rate of D', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option('--lr_f',            'lr_f', help='Learning rate of f', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1e-4, show_default=True)
@click.option('--adam-betas',      help='Adam\'s betas of G, f and D (0.5,0.9 or 0,0.9 are WGAN-GP\'s usual; they steadied the demo)', metavar='B1,B2', type=AdamBetas(), default='0.9,0.999', show_default=True)
@click.option('--lr',              help='--kind=denoiser: learning rate of the denoiser', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option('--lr-rampup',       help='Learning-rate ramp-up duration (linear from 0)  [default: 0 for --kind=eot (every measured run, docs/gaussian_eot.md; 10000 left short runs at a few % of the rate), 10000 for --kind=denoiser (EDM)]', metavar='KIMG', type=click.FloatRange(min=0))
@click.option('--ema',             help='EMA half-life of the trained networks (G, f and D, or the denoiser)', metavar='MIMG', type=click.FloatRange(min=0), default=0.5, show_default=True)
@click.option('--grad-clip',       help='Element-wise gradient clip (0 = off)', metavar='FLOAT', type=click.FloatRange(min=0), default=1.0, show_default=True)
@click.option('--nan-policy',      help='On a non-finite loss: skip the step (counted in the tick line) or stop with the last good snapshot named', type=click.Choice(['skip', 'stop']), default='skip', show_default=True)
@click.option('--sde-steps',       help='Euler-Maruyama steps of the SDE sampler (figures, metrics, snapshots)', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True)

# Performance-related.
@click.option('--device',          help='Device', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
@click.option('--precision',       help='Forward-pass precision (bf16 = autocast)', type=click.Choice(['fp32', 'bf16']), default='fp32', show_default=True)
@click.option('--compile',         'compile_mode', help='torch.compile the trained passes (falls back to eager if compiling fails); it pays off in long runs or with a warm cache: minutes to compile on a CPU. reduce-overhead adds CUDA graphs', type=click.Choice(['none', 'default', 'reduce-overhead', 'max-autotune']), default='none', show_default=True)
@click.option('--bench',           help='Enable cuDNN benchmarking', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--cache',           help='Cache decoded images in memory', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--threads',         help='CPU threads per process for torch; results differ with it in the last bits  [default: on the CPU the idle cores by the load average, shared by the local processes, at least 1; else torch\'s choice]', metavar='INT', type=click.IntRange(min=1))
@click.option('--workers',         help='DataLoader worker processes per process (0 = load in the main process)', metavar='INT', type=click.IntRange(min=0), default=1, show_default=True)

# I/O-related.
@click.option('--desc',            help='String to include in the run directory name', metavar='STR', type=str)
@click.option('--nosubdir',        help='Write into --outdir itself instead of a new NNNNN-<desc> subdirectory', is_flag=True)
@click.option('--tick',            help='How often to print progress', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=50, show_default=True)
@click.option('--snap',            help='How often to save snapshots and figures', metavar='TICKS', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--dump',            help='How often to save the training state', metavar='TICKS', type=click.IntRange(min=1), default=500, show_default=True)
@click.option('--seed',            help='Random seed  [default: random]', metavar='INT', type=int)
@click.option('--resume',          help='Resume from a training-state-*.pt, or "auto": the newest state of the newest matching run in --outdir (continues in that directory)', metavar='PT|auto', type=str)
@click.option('--tensorboard/--no-tensorboard', help='Also write TensorBoard logs (when the package is installed)', default=True, show_default=True)
@click.option('--wandb',           help='Also log the tick statistics to this Weights & Biases project (needs `pip install wandb`)', metavar='PROJECT', type=str)
@click.option('-n', '--dry-run',   help='Print the resolved training options and exit', is_flag=True)

def main(**kwargs):
    """Train a one-step entropic OT model, or (--kind=denoiser) a diffusion denoiser.

    \b
    Examples:
    # Coloured digits 2 -> 3 on 4 GPUs (data from dataset_tool.py)
    torchrun --standalone --nproc_per_node=4 train.py --name=mnist --outdir=runs \\
        --data1train=datasets/2_train.zip --data2train=datasets/3_train.zip \\
        --data1test=datasets/2_test.zip --data2test=datasets/3_test.zip \\
        --batch=64 --batch-gpu=16 --G_iters=10 --D_iters=1 --f_iters=2 --gamma=1.0 --model_channels=32

    \b
    # A diffusion denoiser for DPM-OT (EDM preconditioning and loss) on vectors, on the CPU
    python train.py --kind=denoiser --name=gmm --outdir=runs --data=gmm.npz --precond=edm \\
        --model_channels=32 --batch=512 --lr=1e-3 --lr-rampup=100 --duration=2 --ema=0.05

    \b
    # A toy task on the CPU (vectors in .npz; the measured settings of docs/recipes.md)
    python train.py --name=moons --outdir=runs --data1train=gauss.npz --data2train=moons.npz --gamma=0.1 \\
        --batch=256 --model_channels=16 --ema=0.01 --lr_g=3e-4 --lr_f=3e-4 --lr_D=3e-4 --duration=0.06 --device=cpu

    \b
    # Gaussians in 16-D with the G-step whose optimum is the EOT plan (docs/gaussian_eot.md)
    python train.py --name=gauss16 --outdir=runs --data1train=a.npz --data2train=b.npz --gamma=1 \\
        --G-loss=kinetic --batch=256 --model_channels=16 --ema=0.01 --lr_g=3e-4 --lr_f=3e-4 --lr_D=3e-4 \\
        --duration=0.3 --device=cpu
    """
    opts = dnnlib.EasyDict(kwargs)
    device = dist.init(opts.device)
    try:
        c = setup_training_config(opts)
        c.seed = dist.agree_on_seed(opts.seed)
        desc = _run_desc(opts, c)
        if opts.resume not in (None, 'auto') and not (os.path.isfile(opts.resume) and
                                                      re.fullmatch(r'training-state-\d+\.pt', os.path.basename(opts.resume))):
            raise click.ClickException(f'--resume="{opts.resume}" must be a training-state-*.pt file of an earlier run, or auto')
        run_dir, resume = _pick_run_dir(opts, desc) if dist.get_rank() == 0 else (None, None)
        run_dir, resume = dist.broadcast_object((run_dir, resume))
        c.run_dir, c.resume_state = run_dir, resume
        c.world_size = dist.get_world_size()

        dist.print0()
        dist.print0('Training options:')
        dist.print0(json.dumps(c, indent=2))
        dist.print0()
        dist.print0(f'Output directory:   {run_dir}')
        dist.print0(f'Processes:          {dist.get_world_size()} on {device.type}')
        dist.print0(f'Resume from:        {resume or "-"}')
        dist.print0()
        if opts.dry_run:
            dist.print0('Dry run; exiting.')
            return

        if dist.get_rank() == 0:
            os.makedirs(run_dir, exist_ok=True)
            write_options(run_dir, c)
            logger = dnnlib.util.Logger(os.path.join(run_dir, 'log.txt'), file_mode='a')
        dist.barrier()
        threads, why = (opts.threads, '--threads') if opts.threads else dist.default_threads(device)
        dist.print0(f'CPU threads: {threads or torch.get_num_threads()} ({why})')
        dist.setup_precision(cudnn_benchmark=c.cudnn_benchmark, threads=threads)
        try:
            training_loop(device=device, **c)
        except DivergenceError as err:
            raise click.ClickException(str(err)) from None
        finally:
            if dist.get_rank() == 0:
                logger.close()
    finally:
        dist.shutdown()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
