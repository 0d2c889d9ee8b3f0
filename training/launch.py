"""Launching a training run from a config: find the run to continue, check the state against the options,
claim the run directory, write training_options.json, start the log, run the loop.

Everything that can refuse a run does so before the run directory exists (or, for a run continued in its
directory, before anything in it changes), with a LaunchError naming the option, the values and the fix.
"""

import copy
import json
import os
import signal

import torch

import dnnlib
from torch_utils import distributed as dist
from training.loop import TrainingStopped, training_loop, write_options
from training.resume import StateError, check_networks, compare_options, load_state, network_names, state_options
from training.runs import (RunDirError, RunLock, claim_run_dir, file_nimg, find_latest_state, next_run_dir, run_ids,
                           set_aside_later_files)

#----------------------------------------------------------------------------

class LaunchError(ValueError):
    """A run that cannot start as asked; the message says why and what to do."""


# What a training state depends on, by option (checked on resume). 'never': the state continues only the method and
# networks it holds; 'allow' (a value) and 'path' (a data file, compared by its real path): may change only when
# named in --allow-change. Every other option (duration, intervals, evaluation data, metrics, performance, output)
# may always change.
RESUME_RULES = (
    ('kind', 'task_kwargs.class_name', 'never'),
    ('precond', 'task_kwargs.loss_kwargs.class_name', 'never'),
    ('g-loss', 'task_kwargs.G_loss', 'never'),
    ('model-channels', 'task_kwargs.G_kwargs', 'never'),
    ('model-channels', 'task_kwargs.f_kwargs', 'never'),
    ('model-channels', 'task_kwargs.D_kwargs', 'never'),
    ('model-channels', 'task_kwargs.network_kwargs', 'never'),
    ('seed', 'seed', 'allow'),
    ('batch', 'batch_size', 'allow'),
    ('gamma', 'task_kwargs.gamma', 'allow'),
    ('g-iters', 'task_kwargs.G_iters', 'allow'),
    ('f-iters', 'task_kwargs.f_iters', 'allow'),
    ('d-iters', 'task_kwargs.D_iters', 'allow'),
    ('d-gp', 'task_kwargs.D_gp', 'allow'),
    ('lr-g', 'task_kwargs.G_opt_kwargs.lr', 'allow'),
    ('lr-f', 'task_kwargs.f_opt_kwargs.lr', 'allow'),
    ('lr-d', 'task_kwargs.D_opt_kwargs.lr', 'allow'),
    ('lr', 'task_kwargs.optimizer_kwargs.lr', 'allow'),
    ('lr-rampup', 'lr_rampup_kimg', 'allow'),
    ('lr-decay', 'lr_decay', 'allow'),
    ('ema', 'ema_halflife_kimg', 'allow'),
    ('ema-rampup', 'ema_rampup_ratio', 'allow'),
    ('grad-clip', 'grad_clip', 'allow'),
    ('precision', 'precision', 'allow'),
    ('data1train', 'data_paths.data1train', 'path'),
    ('data2train', 'data_paths.data2train', 'path'),
    ('data', 'data_paths.data', 'path'),
)
CHANGEABLE = tuple(dict.fromkeys(label for label, _path, rule in RESUME_RULES if rule != 'never'))
NEVER = tuple(dict.fromkeys(label for label, _path, rule in RESUME_RULES if rule == 'never'))


def check_outdir(outdir):
    """Refuse an --outdir that cannot hold run directories, naming why (LaunchError)."""
    problem = dnnlib.util.output_dir_problem(outdir)
    if problem is not None:
        raise LaunchError(f'--outdir={outdir}: {problem}; choose another --outdir')


def parse_allowed_changes(text):
    """--allow-change=LIST as a tuple of option names (without dashes, any spelling)."""
    names = tuple(n.strip().lstrip('-').lower().replace('_', '-') for n in (text or '').split(',') if n.strip())
    for name in names:
        if name in NEVER:
            raise LaunchError(f'--allow-change={text}: --{name} can never change on resume (the state continues only '
                              'the method and networks it holds); start a new run instead')
        if name not in CHANGEABLE:
            raise LaunchError(f'--allow-change={text}: unknown option "{name}"; choose from {", ".join(CHANGEABLE)} '
                              '(other options may change freely)')
    return names

#----------------------------------------------------------------------------

def launch_training(c, device, outdir, desc, nosubdir=False, resume=None, allow_change=(), seed=None,
                    dry_run=False, threads=None):
    """Start (or continue) the run of config `c` on every rank.

    Args:
        c: the config of setup_training_config (a dict; completed here with seed, run_dir, resume_state, world_size).
        device: this rank's torch.device.
        outdir, desc: runs go to <outdir>/NNNNN-<desc>, or to outdir itself with `nosubdir`.
        resume: None, 'auto' (the newest run of the same name and kind in outdir, continued in its directory) or
            the path of a training-state-*.pt.
        allow_change: option names (RESUME_RULES labels) that may differ from the resumed state's.
        seed: the seed asked for; None takes the resumed state's, or a random one for a new run.
        dry_run: print the options and return.
        threads: CPU threads per process (None: on the CPU the idle cores, dist.default_threads; on a GPU
            torch's choice).
    Raises:
        LaunchError before any output exists; DivergenceError and TrainingStopped (a signal; the state is
        written) from the loop.
    """
    check_outdir(outdir)
    if resume not in (None, 'auto') and not (os.path.isfile(resume) and file_nimg(resume) is not None and
                                             os.path.basename(resume).startswith('training-state-')):
        raise LaunchError(f'--resume="{resume}" must be a training-state-*.pt file of an earlier run, or auto')
    run_dir, c.resume_state = _on_rank0(_run_to_continue, c, outdir, nosubdir, resume)
    if c.resume_state is not None:
        c.seed, unrecorded = _on_rank0(_check_state, c, c.resume_state, seed, allow_change,
                                       run_dir if resume == 'auto' else None)
        for name, key in unrecorded:
            dist.print0(f'Note: {os.path.basename(c.resume_state)} records no {key!r} for {name}: {name} is built '
                        f'as that run built it (without the argument)')
        c.task_kwargs = without_network_args(c.task_kwargs, unrecorded)
    else:
        c.seed = dist.agree_on_seed(seed)
    c.run_dir = run_dir or (outdir if nosubdir else next_run_dir(outdir, desc))
    c.world_size = dist.get_world_size()
    _print_options(c, device)
    if dry_run:
        dist.print0('Dry run; exiting.')
        return None
    claimed = {}

    def claim():
        claimed['run_dir'], claimed['lock'] = _claim_run_dir(outdir, desc, nosubdir, run_dir, c.resume_state)
        return claimed['run_dir']
    c.run_dir = _on_rank0(claim)  # (A new run's number differs from the one printed when another run took it.)
    lock, logger = claimed.get('lock'), None
    if dist.get_rank() == 0:
        write_options(c.run_dir, c)
        logger = dnnlib.util.Logger(os.path.join(c.run_dir, 'log.txt'), file_mode='a')
    dist.barrier()
    threads, why = (threads, '--threads') if threads else dist.default_threads(device)
    dist.print0(f'CPU threads: {threads or torch.get_num_threads()} ({why})')
    dist.setup_precision(cudnn_benchmark=c.cudnn_benchmark, threads=threads)
    try:
        return training_loop(device=device, options=json.loads(json.dumps(c)), **c)
    except TrainingStopped as stop:
        dist.print0(f'Stopped by {signal.Signals(stop.signum).name}; the training state is {stop.state_path}. To '
                    f'continue, run the same command with --resume=auto (or --resume={stop.state_path})')
        raise
    finally:
        if logger is not None:
            logger.close()
        if lock is not None:
            lock.release()


def _on_rank0(fn, *args):
    """fn(*args) on rank 0; its result on every rank, or its LaunchError raised on every rank."""
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn(*args)
        except LaunchError as err:
            error = str(err)
    result, error = dist.broadcast_object((result, error))
    if error is not None:
        raise LaunchError(error)
    return result


def _print_options(c, device):
    dist.print0()
    dist.print0('Training options:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    dist.print0(f'Output directory:   {c.run_dir}')
    dist.print0(f'Processes:          {dist.get_world_size()} on {device.type}')
    dist.print0(f'Resume from:        {c.resume_state or "-"}')
    dist.print0()

#----------------------------------------------------------------------------
# The run directory.

def _run_to_continue(c, outdir, nosubdir, resume):
    """(existing run directory to continue or None, training state to resume from or None)."""
    explicit = None if resume in (None, 'auto') else resume
    if nosubdir:
        if not os.path.isdir(outdir):
            return None, explicit
        state = (find_latest_state(outdir) if resume == 'auto' else None) or explicit
        if state is None and os.path.exists(os.path.join(outdir, 'training_options.json')):
            raise LaunchError(f'--outdir={outdir} already holds a run (training_options.json)' +
                              (' but no training state to resume (it stopped before writing one); remove it or '
                               'choose another --outdir' if resume == 'auto' else
                               '; continue it with --resume=auto, or choose another --outdir (or leave out --nosubdir)'))
        return outdir, state
    if resume == 'auto':
        for run_dir in _runs_of(outdir, c.name, c.task_kwargs['class_name']):
            state = find_latest_state(run_dir)
            if state is not None:
                return run_dir, state
    return None, explicit


def _runs_of(outdir, name, task_class):
    """The run directories in `outdir` of runs with this name and task, newest first."""
    ids = run_ids(outdir)
    for dirname in sorted(ids, key=lambda n: (ids[n], n), reverse=True):
        try:
            with open(os.path.join(outdir, dirname, 'training_options.json'), encoding='utf-8') as f:
                options = json.load(f)
            same = (options['name'] == name and
                    options['task_kwargs']['class_name'].split('.')[-1] == task_class.split('.')[-1])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if same:
            yield os.path.join(outdir, dirname)


def _claim_run_dir(outdir, desc, nosubdir, run_dir, resume):
    """Rank 0: (run directory, lock): a new directory claimed, or an existing one locked.

    In an existing directory, files that the continued run writes anew (those of its earlier attempt after the
    resumed state) are set aside first, so nothing there is replaced.
    """
    try:
        if run_dir is None:
            run_dir = outdir if nosubdir else claim_run_dir(outdir, desc)
            os.makedirs(run_dir, exist_ok=True)
            return run_dir, RunLock(run_dir)
        lock = RunLock(run_dir)
    except RunDirError as err:
        raise LaunchError(str(err)) from None
    except OSError as err: # Not writable after all (a read-only filesystem, a quota, a race): one line, no traceback.
        raise LaunchError(f'--outdir={outdir}: cannot write there ({err.strerror or err}); '
                          'choose another --outdir') from None
    removed = dnnlib.util.remove_stale_temporaries(run_dir, min_age_s=0) # Nothing else writes here: we hold the lock.
    if removed:
        print(f'Removed {len(removed)} temporary file(s) of interrupted writes: {", ".join(removed)}')
    if resume is not None:
        moved = set_aside_later_files(run_dir, file_nimg(resume))
        if moved:
            print(f'Set aside {len(moved)} file(s) that the earlier attempt wrote after {os.path.basename(resume)} '
                  f'(this run writes them anew): {", ".join(moved[:3])}{" ..." if len(moved) > 3 else ""}')
    return run_dir, lock

#----------------------------------------------------------------------------
# The state to resume.

def _check_state(c, path, seed, allow_change, auto_run_dir):
    """Rank 0: check the training state at `path` against config `c`. Returns the seed to use (the state's,
    unless `seed` asks for another and 'seed' is allowed to change) and the network arguments the state's
    options do not record (`unrecorded_network_args`), which the run then leaves out."""
    unrecorded = []
    try:
        state = load_state(path)
        own_seed = state.get('seed')
        seed = own_seed if seed is None else seed
        options = state_options(state, path)
        if options is None:  # A state of an earlier version: its networks tell what it is.
            check_networks(state, path, c.task_kwargs)
        old = dict(options or {}, **{k: state[k] for k in ('batch_size', 'seed') if k in state})
        problems = compare_options(old, json.loads(json.dumps(dict(c, seed=seed))), RESUME_RULES, allow_change)
        if problems:
            raise LaunchError(_mismatch_message(path, problems, auto_run_dir, c.name))
        if options is not None:  # Also when the options agree: the code may build other networks from them.
            unrecorded = unrecorded_network_args(options, c.task_kwargs, network_names(state))
            check_networks(state, path, without_network_args(c.task_kwargs, unrecorded))
    except StateError as err:
        raise LaunchError(f'--resume: {err}') from None
    return int(seed) if seed is not None else int.from_bytes(os.urandom(4), 'little') & 0x7fffffff, unrecorded


def unrecorded_network_args(options, task_kwargs, names):
    """[(network, argument)]: arguments of the networks `names` in `task_kwargs` that the options of the state
    (`options`, its training_options.json) do not record for that network. The code that wrote the state did
    not pass them, so its networks took the class's default: a resumed run builds them the same way (an argument
    added since with another setting, such as MLPGenerator's noise_skip, would build other networks)."""
    recorded = options.get('task_kwargs') or {}
    found = []
    for name in names:
        old, new = recorded.get(f'{name}_kwargs'), task_kwargs.get(f'{name}_kwargs')
        if isinstance(old, dict) and isinstance(new, dict) and old.get('class_name') == new.get('class_name'):
            found += [(name, key) for key in new if key not in old]
    return found


def without_network_args(task_kwargs, args):
    """A copy of `task_kwargs` without the network arguments `args` [(network, argument)]."""
    task_kwargs = copy.deepcopy(task_kwargs)
    for name, key in args:
        del task_kwargs[f'{name}_kwargs'][key]
    return task_kwargs


def _mismatch_message(path, problems, auto_run_dir, name):
    parts = []
    for label, rule, key, old, new in problems:
        if rule == 'never':
            parts.append(f'{key} is {old!r} there and {new!r} here (from --{label}, --net-opts or the data: '
                         'a state continues only the method and networks it holds)' if label == 'model-channels' else
                         f'--{label} is {_value(old)} there and {_value(new)} here (it can never change)')
        else:
            parts.append(f'--{label} is {_value(old)} there and {_value(new)} here')
    changeable = sorted({p[0] for p in problems if p[1] != 'never'}, key=CHANGEABLE.index)
    head = (f'--resume=auto: the newest run named "{name}", {auto_run_dir}, was made with other options' if auto_run_dir
            else f'--resume: {path} was made with other options')
    fixes = ['pass the same options']
    if changeable and len(changeable) == len(problems):
        fixes.append(f'or --allow-change={",".join(changeable)} to continue with the new values')
    if auto_run_dir:
        fixes.append('or another --name (or leave out --resume=auto) to start a new run')
    return f'{head}: {"; ".join(parts)}. To resume, {" ".join(fixes)}'


def _value(value):
    """An option value as the user wrote it."""
    if isinstance(value, float):
        return f'{value:g}'
    if isinstance(value, str) and value.count('.') >= 2 and '/' not in value:
        return value.rsplit('.', 1)[-1] # A class name (e.g. the task of --kind).
    return str(value)
