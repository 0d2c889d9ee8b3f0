"""Train a one-step entropic OT model (default) or, with --kind=denoiser, a diffusion denoiser.

    torchrun --standalone --nproc_per_node=4 train.py --name=mnist --outdir=runs \\
        --data1train=datasets/2_train.zip --data2train=datasets/3_train.zip \\
        --data1test=datasets/2_test.zip --data2test=datasets/3_test.zip --batch=64 --gamma=1.0

Runs as a plain `python train.py ...` (one process) or under torchrun (gloo on CPUs, nccl on GPUs).
The script only parses options into a config (`setup_training_config`) and launches the loop.
"""

import json
import math
import os
import re
import time

import click
import tqdm

import dnnlib
from data.dataset import DatasetError
from models.diffusion_loss import LOSSES
from models.networks import denoiser_kwargs, eot_network_kwargs
from torch_utils import distributed as dist
from torch_utils.training_stats import wandb_module
from training.launch import CHANGEABLE, LaunchError, check_outdir, launch_training, parse_allowed_changes
from training.loop import TrainingStopped
from training.resume import records_no_options
from training.eot_task import check_step_options
from training.trainer import DivergenceError, split_batch

#----------------------------------------------------------------------------

# --lr-rampup by --kind. EOT: none. Every measured EOT run (docs/eot_benchmarks.md, docs/toy2d.md, the demo) used
# 0 and trained stably; the seed's 10 000 kimg left a 60-300 kimg run at 0.6-3 % of its learning rate.
# Denoisers keep EDM's 10 000 kimg (a 200 Mimg run ramps up over its first 5 %).
LR_RAMPUP_DEFAULT = dict(eot=0, denoiser=10000)

# Network size, learning rates, EMA and batch by what is trained. EOT on vectors (.npz): the settings of every
# measured vector run (docs/eot_benchmarks.md, docs/toy2d.md): MLP width 128, lr 3e-4, a 10-kimg EMA half-life,
# batch 256; the image defaults (width 768 for an MLP, 164 MB training states for a 3-D toy) cost 36x the FLOPs
# per layer and trained no better there. Images, and denoisers on any data: the seed's settings.
# The light G-step (the vector default when --gamma > 0) trains G and f on its potential's plan, one step each per
# iteration, with lr 1e-3 decaying to 0 over the last 30 % of the run and a 200-kimg EMA (docs/eot_benchmarks.md: G at
# 0.14 / 0.44 / 0.94 % cBW2-UVP at D = 16, eps = 0.1 / 1 / 10, in 8000 kimg; without the decay G's plateau at
# eps = 10 was 1.1-1.3 %).
LIGHT_DECAY = 0.3
SIZE_DEFAULTS = dict(
    images=dict(batch=512, model_channels=96, lr_g=1e-4, lr_f=1e-4, lr_d=1e-4, ema=0.5, g_loss='stated', g_iters=10,
                f_iters=2, lr_decay=0),
    vectors=dict(batch=256, model_channels=16, lr_g=3e-4, lr_f=3e-4, lr_d=3e-4, ema=0.01, g_loss='light', g_iters=10,
                 f_iters=2, lr_decay=0),
    light=dict(lr_g=1e-3, lr_f=1e-3, ema=0.2, g_iters=1, f_iters=1, lr_decay=LIGHT_DECAY),
)


def resolve_size_defaults(opts, legacy=False):
    """`opts` with SIZE_DEFAULTS filled in where an option was not given (None): 'vectors' for --kind=eot on .npz
    data, 'images' otherwise, or with `legacy` 'images' for every kind of data (the defaults of every run made
    before the vector defaults existed)."""
    vectors = opts.get('kind', 'eot') == 'eot' and str(opts.get('data1train') or '').lower().endswith('.npz')
    defaults = dict(SIZE_DEFAULTS['vectors' if vectors and not legacy else 'images'])
    if not opts.get('gamma', 0) > 0: # The light G-step's potential needs an entropy: unregularised OT as stated.
        defaults['g_loss'] = 'stated'
    if (opts.get('g_loss') or defaults['g_loss']) == 'light':
        defaults.update(SIZE_DEFAULTS['light'])
    return dnnlib.EasyDict(opts, **{k: v for k, v in defaults.items() if opts.get(k) is None})


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


def _inspect_dataset(kwargs, option, verify=False):
    """Open a data set to check it (every image header, with progress) and read its item shape and size; with
    `verify`, decode every image now, so that a corrupt or truncated file stops the run before it starts rather
    than mid-training. The training loop then opens image data without a second header scan."""
    ds = None
    image = kwargs.class_name.endswith('ImageFolderDataset')
    try:
        ds = dnnlib.util.construct_class_by_name(**kwargs, **(dict(progress=True) if image else {}))
        for what, names in (('files that are not PNG/JPEG images', getattr(ds, 'ignored_files', [])),
                            ('symlinked folders (not followed)', getattr(ds, 'skipped_links', []))):
            if names:
                dist.print0(f'Note: {option}: ignoring {len(names)} {what}, e.g. {names[0]!r}')
        if verify and hasattr(ds, 'verify'):
            _verify_images(ds, option)
        if image:
            kwargs.check_all = False # The header scan ran here; the loop's loads still check each image's shape.
        return tuple(ds.item_shape), len(ds)
    except (DatasetError, OSError) as err:
        raise click.ClickException(f'{option}: {err}') from None
    finally:
        if ds is not None and hasattr(ds, 'close'):
            ds.close()


def _verify_images(ds, option):
    """Decode every image of `ds`, with a progress bar on a terminal and a line before and after."""
    dist.print0(f'{option}: checking every image of {ds.path} ...', flush=True)
    bar = tqdm.tqdm(unit='img', desc=option, leave=False, disable=None if dist.get_rank() == 0 else True)
    start = time.time()
    counted = []

    def progress(done, total):
        bar.total = total
        bar.update(1)
        counted[:] = [total]
    try:
        ds.verify(progress=progress)
    finally:
        bar.close()
    dist.print0(f'{option}: all {counted[0] if counted else 0} images decode ({time.time() - start:.1f} s)')


def setup_training_config(world_size=1, legacy_defaults=False, **opts):
    """The loop's config from parsed command-line options (a pure function: it reads data headers, writes nothing).

    Checks everything that can be checked before any output exists (paths, shapes, batch split, option
    combinations) and raises click.ClickException naming the option and the fix. Options left None take
    SIZE_DEFAULTS (`legacy_defaults`: the image ones whatever the data; see training.resume.records_no_options).
    """
    opts = resolve_size_defaults(dnnlib.EasyDict(opts), legacy=legacy_defaults)
    c = Config(name=opts.name)
    try:
        split_batch(opts.batch, opts.batch_gpu, world_size)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    c.batch_size, c.batch_gpu = opts.batch, opts.batch_gpu
    if opts.kind == 'denoiser':
        c.task_kwargs, c.data_paths = _denoiser_task_kwargs(opts)
    else:
        c.task_kwargs, c.data_paths = _eot_task_kwargs(opts)
    return _schedule_config(c, opts)


def _net_opts(opts):
    """--net-opts as a dict."""
    try:
        net_opts = json.loads(opts.net_opts, parse_constant=_no_json_constant) if opts.net_opts else {}
    except ValueError as err:
        raise click.ClickException(f'--net-opts={opts.net_opts!r}: {err}') from None
    if not isinstance(net_opts, dict):
        raise click.ClickException(f'--net-opts={opts.net_opts!r}: not a JSON object')
    _check_net_opt_bounds(net_opts)
    return net_opts


def _no_json_constant(name):
    raise ValueError(f'{name} is not a finite number')


def _eot_data(opts):
    """{key: (dataset kwargs, item shape, option, number of items)} of the EOT data sets given, all checked to share
    one shape."""
    for option, value in (('--data1train', opts.data1train), ('--data2train', opts.data2train)):
        if value is None:
            raise click.ClickException(f'{option} is required for --kind=eot')
    data = {}
    for key, option in (('data1', '--data1train'), ('data2', '--data2train'), ('test1', '--data1test'),
                        ('test2', '--data2test')):
        kwargs = _dataset_kwargs(opts[option[2:]], opts.cache, option)
        if kwargs is not None:
            shape, num = _inspect_dataset(kwargs, option, verify=not opts.dry_run)
            data[key] = (kwargs, shape, option, num)
    shape1 = data['data1'][1]
    for kwargs, shape, option, _num in data.values():
        if shape != shape1:
            raise click.ClickException(f'{option} holds items of shape {list(shape)} but --data1train holds '
                                       f'{list(shape1)}: both domains need the same resolution, channels or dimension '
                                       f'(rebuild one with dataset_tool.py --resolution / --colorize)')
    for option, path in (('--data1stats', opts.data1stats), ('--data2stats', opts.data2stats)):
        if path is not None and not dnnlib.util.is_url(path) and not os.path.isfile(path):
            raise click.ClickException(f'{option}: no such file: "{path}"')
    return data


def _eot_metrics(opts, data):
    metrics = [m for m in (opts.metrics or '').split(',') if m and m != 'none']
    for m in metrics:
        if m not in ('fid_G', 'fid_SDE'):
            raise click.ClickException(f'--metrics: unknown metric "{m}"; choose from fid_G, fid_SDE or none')
    if metrics and opts.data2stats is None:
        raise click.ClickException(f'--metrics={opts.metrics} needs --data2stats (reference statistics of domain 2, '
                                   'from `fid.py ref`)')
    if metrics and 'test1' not in data:
        raise click.ClickException('--metrics needs --data1test (the images translated for FID)')
    return metrics


def _eot_task_kwargs(opts):
    """(task_kwargs, data_paths) of --kind=eot: G, f and D trained by EOTTask on two domains."""
    data = _eot_data(opts)
    metrics = _eot_metrics(opts, data)
    try:
        check_step_options(opts.g_loss, opts.reuse_g_output, opts.share_passes)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    # The kinetic and light G-steps need f = x + (1 - t) v.
    drift = 'end_point' if opts.g_loss == 'stated' else 'velocity'
    net_opts = _net_opts(opts)
    V_kwargs = _light_potential_kwargs(opts, data['data1'][1], net_opts.pop('V', None), data['data2'][3])
    if V_kwargs is not None: # G = x + MLP(x, z) + s * z for the light G-step (the measured setting), unless set.
        G_opts, dim = net_opts.get('G', {}), data['data1'][1][0]
        noise_skip = G_opts.get('noise_dim', dim) == dim # (It needs noise_dim = dim.)
        net_opts['G'] = dict(G_opts, residual=G_opts.get('residual', True),
                             noise_skip=G_opts.get('noise_skip', noise_skip))
    try:
        G_kwargs, f_kwargs, D_kwargs = eot_network_kwargs(data['data1'][1], model_channels=opts.model_channels,
                                                          drift=drift, **net_opts)
    except ValueError as err:
        raise click.ClickException(f'--net-opts={opts.net_opts!r}: {err}') from None
    task_kwargs = dnnlib.EasyDict(
        class_name='training.eot_task.EOTTask',
        data1_kwargs=data['data1'][0], data2_kwargs=data['data2'][0],
        test1_kwargs=data['test1'][0] if 'test1' in data else None, loader_kwargs=_loader_kwargs(opts),
        G_kwargs=G_kwargs, f_kwargs=f_kwargs, D_kwargs=D_kwargs,
        G_opt_kwargs=_adam(opts.lr_g, opts.adam_betas), f_opt_kwargs=_adam(opts.lr_f, opts.adam_betas),
        D_opt_kwargs=_adam(opts.lr_d, opts.adam_betas),
        **(dict(V_kwargs=V_kwargs, V_opt_kwargs=_adam(LIGHT_LR, opts.adam_betas)) if V_kwargs else {}),
        gamma=opts.gamma, G_loss=opts.g_loss, G_iters=opts.g_iters, f_iters=opts.f_iters, D_iters=opts.d_iters,
        D_gp=opts.d_gp, D_gp_every=opts.d_gp_every, reuse_G_output=opts.reuse_g_output, share_passes=opts.share_passes,
        sde_steps=opts.sde_steps,
        metrics=metrics, data2stats=opts.data2stats, detector=opts.detector,
        samples_dir_G=opts.samples_dir_g, samples_dir_SDE=opts.samples_dir_sde)
    data_paths = dnnlib.EasyDict(data1train=opts.data1train, data2train=opts.data2train, data1test=opts.data1test,
                                 data2test=opts.data2test, data1stats=opts.data1stats, data2stats=opts.data2stats)
    return task_kwargs, data_paths


# The light G-step's potential (models.light_sb.LightPotential): its number of Gaussians (--net-opts '{"V":
# {"components": K}}') and learning rate. Measured on the mixture benchmark (docs/eot_benchmarks.md).
LIGHT_COMPONENTS = 20
LIGHT_LR = 1e-2


def _light_potential_kwargs(opts, shape, V_opts, num_targets):
    """The potential network V of --g-loss=light (None for the other G-steps), with --net-opts' "V" object; its means
    start at `components` of the `num_targets` items of --data2train (k-means++ seeds), so there must be that many."""
    if opts.g_loss != 'light':
        if V_opts is not None:
            raise click.ClickException(f'--net-opts={opts.net_opts!r}: "V" configures the potential of '
                                       f'--g-loss=light; this run uses --g-loss={opts.g_loss}')
        return None
    if len(shape) != 1:
        raise click.ClickException(f'--g-loss=light is for vector data (.npz); {opts.data1train} holds images of '
                                   f'shape {list(shape)}: use --g-loss=stated or kinetic')
    if not opts.gamma > 0:
        raise click.ClickException('--g-loss=light needs --gamma > 0 (its potential\'s plan has entropy gamma); '
                                   'got --gamma=0')
    V_opts = dict(V_opts or {})
    bad = sorted(set(V_opts) - {'components'})
    if bad or not isinstance(V_opts.get('components', 1), int) or V_opts.get('components', 1) < 1:
        raise click.ClickException(f'--net-opts={opts.net_opts!r}: "V" takes only "components", an int >= 1 '
                                   '(the potential\'s Gaussians)')
    components = V_opts.get('components', LIGHT_COMPONENTS)
    if num_targets < components:
        raise click.ClickException(f'--g-loss=light: --data2train has {num_targets} items, fewer than the potential\'s '
                                   f'{components} Gaussians; add data or set --net-opts=\'{{"V": {{"components": '
                                   f'{max(num_targets, 1)}}}}}\'')
    return dnnlib.EasyDict(class_name='models.light_sb.LightPotential', dim=shape[0], components=components,
                           eps=opts.gamma)


def _adam(lr, betas=(0.9, 0.999)):
    return dnnlib.EasyDict(class_name='torch.optim.Adam', lr=lr, betas=list(betas), eps=1e-8)


def _loader_kwargs(opts):
    return dnnlib.EasyDict(num_workers=opts.workers, prefetch_factor=2 if opts.workers > 0 else None, pin_memory=False)


def _schedule_config(c, opts):
    """Schedule, precision and I/O options, shared by every --kind."""
    c.total_kimg = max(opts.duration * 1000, 1e-3)
    c.ema_halflife_kimg = opts.ema * 1000
    c.ema_rampup_ratio = opts.ema_rampup or None
    c.lr_rampup_kimg = opts.lr_rampup if opts.lr_rampup is not None else LR_RAMPUP_DEFAULT[opts.kind]
    c.lr_decay = opts.lr_decay
    c.grad_clip = opts.grad_clip
    c.precision = opts.precision
    c.compile_mode = None if opts.compile_mode == 'none' else opts.compile_mode
    c.nan_policy = opts.nan_policy
    c.kimg_per_tick, c.snapshot_ticks = opts.tick, opts.snap
    c.state_dump_ticks = opts.dump if opts.dump is not None else opts.snap # A state at least as often as a snapshot.
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
    shape, _size = _inspect_dataset(data_kwargs, '--data', verify=not opts.dry_run)
    try:
        net_kwargs = denoiser_kwargs(shape, precond=opts.precond, model_channels=opts.model_channels, **_net_opts(opts))
    except ValueError as err:
        raise click.ClickException(f'--net-opts={opts.net_opts!r}: {err}') from None
    loss_kwargs = dnnlib.EasyDict(class_name=LOSSES[opts.precond])
    if opts.precond == 'edm':
        loss_kwargs.sigma_data = float(net_kwargs.get('sigma_data', 0.5))
    task_kwargs = dnnlib.EasyDict(
        class_name='training.denoiser_task.DenoiserTask', data_kwargs=data_kwargs, network_kwargs=net_kwargs,
        loss_kwargs=loss_kwargs,
        optimizer_kwargs=_adam(opts.lr),
        loader_kwargs=_loader_kwargs(opts))
    return task_kwargs, dnnlib.EasyDict(data=opts.data)


def _run_desc(opts, c):
    if opts.kind == 'denoiser':
        desc = f'{opts.name}-denoiser-gpus{dist.get_world_size()}-batch{c.batch_size}-{opts.precond}'
        return re.sub(r'[^0-9A-Za-z._-]', '_', desc + (f'-{opts.desc}' if opts.desc else ''))
    desc = f'{opts.name}-{opts.kind}-gpus{dist.get_world_size()}-batch{c.batch_size}-gamma{opts.gamma:g}'
    g_loss = c.task_kwargs.G_loss
    if g_loss not in ('stated', 'light'): # Each the default of its data.
        desc += f'-{g_loss}'
    if opts.desc:
        desc += f'-{opts.desc}'
    return re.sub(r'[^0-9A-Za-z._-]', '_', desc)


#----------------------------------------------------------------------------

# Bounds of what an option may ask for (each far above any measured or published setting; past them a run would
# only fail to allocate). --net-opts obeys the same bounds for the keys that size a network.
MAX_BATCH = 1 << 20
MAX_ITERS = 1000
MAX_STEPS = 10000
MAX_CHANNELS = 1024                     # base channels (edm2's largest U-Net uses 448)
NET_OPT_BOUNDS = dict(model_channels=MAX_CHANNELS, width=8 * MAX_CHANNELS, num_blocks=64, depth=64)


def _check_net_opt_bounds(value, where='--net-opts'):
    """Refuse --net-opts values over NET_OPT_BOUNDS, in any network's section."""
    if isinstance(value, dict):
        for key, item in value.items():
            bound = NET_OPT_BOUNDS.get(key)
            if bound is not None and isinstance(item, (int, float)) and item > bound:
                raise click.ClickException(f'{where}: {key}={item} is over the bound of {bound}')
            _check_net_opt_bounds(item, where)


class FiniteFloat(click.FloatRange):
    """A float option within a range that must be a finite number (click's FloatRange lets nan and inf through:
    --duration=nan trained forever, --gamma=inf trained nothing)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f'{value} is not a finite number', param, ctx)
        return value


def option_name(name):
    """The one spelling of an option name: lower case with hyphens (click applies it to the options given and
    declared alike, so --G_iters, --lr_D and --model_channels stay accepted as --g-iters, --lr-d, --model-channels)."""
    return name.lower().replace('_', '-')


# The options that only one --kind reads (parameter names); given with the other kind they are refused.
KIND_OPTIONS = dict(
    eot=('data1train', 'data2train', 'data1test', 'data2test', 'data1stats', 'data2stats', 'samples_dir_sde',
         'samples_dir_g', 'metrics', 'detector', 'g_loss', 'g_iters', 'd_iters', 'f_iters', 'gamma', 'lr_g', 'lr_d',
         'lr_f', 'd_gp', 'd_gp_every', 'reuse_g_output', 'share_passes', 'sde_steps'),
    denoiser=('data', 'precond', 'lr'),
)


def _refuse_options_of_the_other_kind(ctx, kind):
    given = [p for p in ctx.command.params if ctx.get_parameter_source(p.name) in
             (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)]
    other = [p.opts[0] for p in given for k, names in KIND_OPTIONS.items() if k != kind and p.name in names]
    if other:
        raise click.UsageError(f'--kind={kind} does not use {", ".join(other)} (options of --kind='
                               f'{"denoiser" if kind == "eot" else "eot"}); remove them')


@click.command(context_settings=dict(max_content_width=120, token_normalize_func=option_name))

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
@click.option('--samples-dir-sde', 'samples_dir_sde', help='Write the SDE translations of --data1test at each snapshot here (relative to the run directory)', metavar='DIR', type=str)
@click.option('--samples-dir-g',   'samples_dir_g', help='Write the one-step G translations of --data1test at each snapshot here (relative to the run directory)', metavar='DIR', type=str)
@click.option('--metrics',         help='Metrics at each snapshot: fid_G, fid_SDE (comma-separated) or none', metavar='LIST', type=str, default='none', show_default=True)
@click.option('--detector',        help='FID feature detector: path or URL  [default: $EOT_FID_DETECTOR or the Inception-v3 URL]', metavar='PATH|URL', type=str)

# Hyperparameters.
@click.option('--duration',        help='Training duration', metavar='MIMG', type=FiniteFloat(min=0, min_open=True), default=200, show_default=True)
@click.option('--batch',           help='Total batch size of one step, over all processes  [default: 256 for --kind=eot on vectors (.npz), else 512]', metavar='INT', type=click.IntRange(min=1, max=MAX_BATCH), default=None)
@click.option('--batch-gpu',       help='Limit the batch per process and accumulation round (gradient accumulation)', metavar='INT', type=click.IntRange(min=1, max=MAX_BATCH))
@click.option('--g-loss',          'g_loss', help='The G-step. stated: the original statement (docs/architecture.md), t ~ U(0,1) unweighted (its optimum is biased away from the EOT plan). kinetic: weighted 1/(1-t)^2 with t = 1-u^2 and f = x + (1-t) v (optimum: the EOT plan). light (vectors only): G fitted by the energy score to the plan of a Gaussian-mixture Schrodinger potential V learned from the two data sets; no critic. See docs/eot_benchmarks.md  [default: light for vectors (.npz) with --gamma > 0, else stated]', type=click.Choice(['stated', 'kinetic', 'light']), default=None)
@click.option('--g-iters',         'g_iters', help='G-steps per outer iteration (each after --f-iters f-steps)  [default: 1 for --g-loss=light, else 10]', metavar='INT', type=click.IntRange(min=1, max=MAX_ITERS), default=None)
@click.option('--d-iters',         'd_iters', help='Critic steps per outer iteration (--g-loss=light trains no critic)', metavar='INT', type=click.IntRange(min=0, max=MAX_ITERS), default=1, show_default=True)
@click.option('--f-iters',         'f_iters', help='f-steps before each G-step  [default: 1 for --g-loss=light, else 2]', metavar='INT', type=click.IntRange(min=1, max=MAX_ITERS), default=None)
@click.option('--model-channels',  'model_channels', help='Base channels c of G and f (D uses (c//32+1)*32); MLP width is 8c for vectors  [default: 16 for --kind=eot on vectors (.npz; width 128), else 96]', metavar='INT', type=click.IntRange(min=1, max=MAX_CHANNELS), default=None)
@click.option('--net-opts',        help='Network overrides as a JSON object, e.g. \'{"num_blocks": 1, "attn_resolutions": []}\' for all, or \'{"D": {"model_channels": 32}}\' for one', metavar='JSON', type=str)
@click.option('--gamma',           help='Entropy: the bridge volatility is sqrt(gamma) (EOT with eps = gamma)', metavar='FLOAT', type=FiniteFloat(min=0), default=0.0, show_default=True)
@click.option('--lr-g',            'lr_g', help='Learning rate of G  [default: 1e-3 with --g-loss=light, 3e-4 for other G-steps on vectors (.npz), else 1e-4]', metavar='FLOAT', type=FiniteFloat(min=0, min_open=True), default=None)
@click.option('--d-gp',            'd_gp', help='Weight of a WGAN-GP gradient penalty on the critic (0: none, as in the stated method; 10 is the usual value; it steadies short image runs)', metavar='FLOAT', type=FiniteFloat(min=0), default=0, show_default=True)
@click.option('--d-gp-every',      'd_gp_every', help='Lazy penalty: apply --d-gp on every Nth critic step only, weighted N x (StyleGAN2\'s lazy regularisation)', metavar='N', type=click.IntRange(min=1, max=MAX_ITERS), default=1, show_default=True)
@click.option('--reuse-g-output',  'reuse_g_output', help='The f- and D-steps train on the latest G-step\'s inputs and outputs instead of a batch and a G pass of their own (one G pass per G-step; each G-step then comes before its f-steps)', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--share-passes',    'share_passes', help='With --reuse-g-output=1: the G-step\'s passes through f and D also serve the first f-step (at the G-step\'s bridge point) and the first D-step, G, f and D stepping together (the demo\'s setting, about 1.1x per kimg; it changes the random stream: docs/recipes.md)', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--lr-d',            'lr_d', help='Learning rate of D  [default: 3e-4 for --kind=eot on vectors (.npz), else 1e-4]', metavar='FLOAT', type=FiniteFloat(min=0, min_open=True), default=None)
@click.option('--lr-f',            'lr_f', help='Learning rate of f  [default: 1e-3 with --g-loss=light, 3e-4 for other G-steps on vectors (.npz), else 1e-4]', metavar='FLOAT', type=FiniteFloat(min=0, min_open=True), default=None)
@click.option('--adam-betas',      help='Adam\'s betas of G, f and D (0.5,0.9 or 0,0.9 are WGAN-GP\'s usual; they steadied the demo)', metavar='B1,B2', type=AdamBetas(), default='0.9,0.999', show_default=True)
@click.option('--lr',              help='--kind=denoiser: learning rate of the denoiser', metavar='FLOAT', type=FiniteFloat(min=0, min_open=True), default=1e-3, show_default=True)
@click.option('--lr-rampup',       help='Learning-rate ramp-up duration (linear from 0)  [default: 0 for --kind=eot (every measured run, docs/eot_benchmarks.md; 10000 left short runs at a few % of the rate), 10000 for --kind=denoiser (EDM)]', metavar='KIMG', type=FiniteFloat(min=0))
@click.option('--lr-decay',        'lr_decay', help=f'Share of --duration at its end over which every learning rate falls linearly to 0 (a resumed run with another --duration moves it)  [default: {LIGHT_DECAY:g} with --g-loss=light, else 0]', metavar='FRACTION', type=FiniteFloat(min=0, max=1), default=None)
@click.option('--ema',             help='EMA half-life of the trained networks (G, f and D, or the denoiser)  [default: 0.2 with --g-loss=light, 0.01 for other G-steps on vectors (.npz), else 0.5]', metavar='MIMG', type=FiniteFloat(min=0), default=None)
@click.option('--ema-rampup',      'ema_rampup', help='EMA ramp-up: the half-life is at most this share of the images seen so far, so early weights are forgotten (EDM\'s 0.05; 0 = the --ema half-life from the start)', metavar='RATIO', type=FiniteFloat(min=0), default=0.05, show_default=True)
@click.option('--grad-clip',       help='Element-wise gradient clip (0 = off)', metavar='FLOAT', type=FiniteFloat(min=0), default=1.0, show_default=True)
@click.option('--nan-policy',      help='On a non-finite loss: skip the step (counted in the tick line) or stop with the last good snapshot named', type=click.Choice(['skip', 'stop']), default='skip', show_default=True)
@click.option('--sde-steps',       help='Euler-Maruyama steps of the SDE sampler (figures, metrics, snapshots)', metavar='INT', type=click.IntRange(min=1, max=MAX_STEPS), default=10, show_default=True)

# Performance-related.
@click.option('--device',          help='Device', type=click.Choice(['auto', 'cpu', 'cuda']), default='auto', show_default=True)
@click.option('--precision',       help='Forward-pass precision (bf16 = autocast)', type=click.Choice(['fp32', 'bf16']), default='fp32', show_default=True)
@click.option('--compile',         'compile_mode', help='torch.compile the trained passes (falls back to eager if compiling fails); it pays off in long runs or with a warm cache: minutes to compile on a CPU. reduce-overhead adds CUDA graphs', type=click.Choice(['none', 'default', 'reduce-overhead', 'max-autotune']), default='none', show_default=True)
@click.option('--bench',           help='Enable cuDNN benchmarking', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--cache',           help='Cache decoded images in memory', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--threads',         help='CPU threads per process for torch; results differ with it in the last bits  [default: on the CPU the idle cores by the load average, shared by the local processes, at least 1; else torch\'s choice]', metavar='INT', type=click.IntRange(min=1, max=1024))
@click.option('--workers',         help='DataLoader worker processes per process (0 = load in the main process)', metavar='INT', type=click.IntRange(min=0, max=128), default=1, show_default=True)

# I/O-related.
@click.option('--desc',            help='String to include in the run directory name', metavar='STR', type=str)
@click.option('--nosubdir',        help='Write into --outdir itself instead of a new NNNNN-<desc> subdirectory', is_flag=True)
@click.option('--tick',            help='How often to print progress', metavar='KIMG', type=FiniteFloat(min=0, min_open=True), default=50, show_default=True)
@click.option('--snap',            help='How often to save snapshots and figures', metavar='TICKS', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--dump',            help='How often to save the training state (also saved at the end, and on SIGTERM / Ctrl-C)  [default: --snap]', metavar='TICKS', type=click.IntRange(min=1))
@click.option('--seed',            help='Random seed  [default: the resumed state\'s, else random]', metavar='INT', type=click.IntRange(min=0, max=2**31 - 1))
@click.option('--resume',          help='Resume from a training-state-*.pt, or "auto": the newest state of the newest run in --outdir with this --name and --kind (continued in its directory). The state\'s seed and options are kept: options that change its meaning are refused (see --allow-change)', metavar='PT|auto', type=str)
@click.option('--allow-change',    help=f'On resume: options that may differ from the state\'s, comma-separated, from {", ".join(CHANGEABLE)}. --kind, --precond, --g-loss and the networks never change; duration, intervals, evaluation, performance and output options always may', metavar='LIST', type=str)
@click.option('--tensorboard/--no-tensorboard', help='Also write TensorBoard logs (when the package is installed)', default=True, show_default=True)
@click.option('--wandb',           help='Also log the tick statistics to this Weights & Biases project (needs `pip install wandb`)', metavar='PROJECT', type=str)
@click.option('-n', '--dry-run',   help='Print the resolved training options and exit', is_flag=True)

def main(**kwargs):
    """Train a one-step entropic OT model, or (--kind=denoiser) a diffusion denoiser.

    Options are written in lower case with hyphens; case and '_' versus '-' do not matter, so the
    earlier spellings (--G_iters, --lr_D, --model_channels, --samples_dir_G, --G-loss) still work.

    \b
    Examples:
    # Coloured digits 2 -> 3 on 4 GPUs (data from dataset_tool.py)
    torchrun --standalone --nproc_per_node=4 train.py --name=mnist --outdir=runs \\
        --data1train=datasets/2_train.zip --data2train=datasets/3_train.zip \\
        --data1test=datasets/2_test.zip --data2test=datasets/3_test.zip \\
        --batch=64 --batch-gpu=16 --g-iters=10 --d-iters=1 --f-iters=2 --gamma=1.0 --model-channels=32

    \b
    # A diffusion denoiser for DPM-OT (EDM preconditioning and loss) on vectors, on the CPU
    python train.py --kind=denoiser --name=gmm --outdir=runs --data=gmm.npz --precond=edm \\
        --model-channels=32 --batch=512 --lr=1e-3 --lr-rampup=100 --duration=2 --ema=0.05

    \b
    # A toy task on the CPU (vectors in .npz: the vector defaults are the measured settings of docs/recipes.md)
    python train.py --name=moons --outdir=runs --data1train=gauss.npz --data2train=moons.npz --gamma=0.1 \\
        --duration=0.06 --device=cpu

    \b
    # Gaussians in 16-D with the G-step whose optimum is the EOT plan (docs/eot_benchmarks.md)
    python train.py --name=gauss16 --outdir=runs --data1train=a.npz --data2train=b.npz --gamma=1 \\
        --g-loss=kinetic --duration=0.3 --device=cpu
    """
    opts = dnnlib.EasyDict(kwargs)
    _refuse_options_of_the_other_kind(click.get_current_context(), opts.kind)
    device = dist.init(opts.device)
    try:
        check_outdir(opts.outdir) # (These two before the data are checked, which may take a while.)
        allow_change = parse_allowed_changes(opts.allow_change)
        legacy = records_no_options(opts.resume)
        if legacy:
            dist.print0(f'Note: {opts.resume} records no options (an earlier version\'s state); options not given here '
                        f'take the defaults of that version: {SIZE_DEFAULTS["images"]}')
        c = setup_training_config(world_size=dist.get_world_size(), legacy_defaults=legacy, **opts)
        launch_training(c, device, outdir=opts.outdir, desc=_run_desc(opts, c), nosubdir=opts.nosubdir,
                        resume=opts.resume, allow_change=allow_change, seed=opts.seed, dry_run=opts.dry_run,
                        threads=opts.threads)
    except (LaunchError, DivergenceError) as err:
        raise click.ClickException(str(err)) from None
    except TrainingStopped as stop: # The state is written and the way to resume printed: exit as the signal says.
        click.get_current_context().exit(128 + stop.signum)
    finally:
        dist.shutdown()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
