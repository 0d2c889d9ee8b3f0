"""Resume checks: read a training state and make sure it belongs to the run being started, before any output exists.

A training state carries the options of the run that wrote it (`options`, the same dict as its
training_options.json); states written before this version do not, and then the training_options.json beside
the state is used, or, when there is none, the fields every state has (batch_size, seed) and the shapes of its
networks. What may differ is the caller's choice: `compare_options` takes rules
(option name, config path, 'never' | 'allow') and the options the user allows to change.
"""

import json
import os

import torch

import dnnlib

#----------------------------------------------------------------------------

class StateError(ValueError):
    """A training state that cannot be resumed here; the message names the file, the problem and the fix."""


def load_state(path):
    """The training state at `path` on the CPU (memory-mapped: nothing large is read), checked for the fields
    a resume needs. Raises StateError for an unreadable, truncated or foreign file."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as err:  # PytorchStreamReader (truncated), UnpicklingError, EOFError, OSError, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StateError(f'{path}: not a readable training state ({type(err).__name__}: {reason}); the file may be '
                         'truncated: resume from an earlier training-state-*.pt') from None
    trainer = state.get('trainer') if isinstance(state, dict) else None
    ok = isinstance(trainer, dict) and all(isinstance(trainer.get(k), dict) for k in ('nets', 'ema', 'opt'))
    ok = ok and 'cur_nimg' in trainer and isinstance(state.get('task'), dict) and isinstance(state.get('rng'), list)
    if not ok or 'cur_tick' not in state:
        raise StateError(f'{path}: not a training state of train.py (it lacks trainer / task / rng / cur_tick)')
    return state


def state_options(state, path):
    """The options of the run that wrote the state: its own `options`, else the training_options.json beside it
    (a state of an earlier version), else None."""
    if isinstance(state.get('options'), dict):
        return state['options']
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), 'training_options.json')
    try:
        with open(beside, encoding='utf-8') as f:
            options = json.load(f)
    except (OSError, ValueError):
        return None
    return options if isinstance(options, dict) else None


def records_no_options(resume):
    """Whether --resume names a training state that records no options: one written before states carried them,
    with no training_options.json beside it. Its run used train.py's image defaults whatever the data, and
    nothing in it says otherwise, so train.py fills the options not given with those (train.SIZE_DEFAULTS);
    a state that records options is checked against them instead (compare_options)."""
    if resume in (None, 'auto') or not os.path.isfile(resume):
        return False
    try:
        return state_options(load_state(resume), resume) is None
    except StateError:
        return False  # (launch_training names the problem.)


def network_names(state):
    return sorted(state['trainer']['nets'])

#----------------------------------------------------------------------------
# Options.

def lookup(config, path):
    """The value at a dotted `path` of a nested dict ('task_kwargs.G_opt_kwargs.lr'), or KeyError."""
    value = config
    for key in path.split('.'):
        if not isinstance(value, dict):
            raise KeyError(path)
        value = value[key]
    return value


def _normal(value):
    """Values compared the way they mean: class names by their last component (modules moved between versions),
    tuples as lists, ints as floats."""
    if isinstance(value, dict):
        return {k: (v.rsplit('.', 1)[-1] if k == 'class_name' and isinstance(v, str) else _normal(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, str) and value.count('.') >= 2 and ' ' not in value and '/' not in value:
        return value.rsplit('.', 1)[-1]     # A bare class name, e.g. 'training.eot.EOTTask'.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _same_path(a, b):
    if a is None or b is None:
        return a == b
    return a == b or os.path.realpath(a) == os.path.realpath(b)


def _first_difference(old, new, prefix=''):
    """(key path, old value, new value) of the first difference between two normalised values, or None.

    Dicts are compared on the keys both hold: a key only one side has is an argument one version of the code
    records and the other does not (the shapes of the networks are checked on their own)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) & set(new)):
            diff = _first_difference(old.get(key), new.get(key), f'{prefix}.{key}' if prefix else key)
            if diff is not None:
                return diff
        return None
    return None if old == new else (prefix, old, new)


def compare_options(old, new, rules, allowed=()):
    """The differences between the options of a state (`old`) and of this run (`new`) that `rules` forbid.

    Args:
        old, new: option dicts (training_options.json).
        rules: (option label, config path, 'never' | 'allow' | 'path') per option that a state depends on;
            'allow' and 'path' (a file, compared by its real path) differences pass when the label is in `allowed`.
        allowed: labels the user allows to change.
    Returns:
        [(label, rule, key path, old value, new value)], empty when the state belongs to this run.
    """
    problems = []
    for label, path, rule in rules:
        try:
            old_value, new_value = lookup(old, path), lookup(new, path)
        except KeyError:
            continue  # An option the older run did not record (or another kind's): nothing to compare.
        if rule == 'path':
            if not _same_path(old_value, new_value) and label not in allowed:
                problems.append((label, rule, path, old_value, new_value))
            continue
        diff = _first_difference(_normal(old_value), _normal(new_value), path)
        if diff is not None and (rule == 'never' or label not in allowed):
            problems.append((label, rule, diff[0], lookup_or(old, diff[0], diff[1]), lookup_or(new, diff[0], diff[2])))
    return problems


def lookup_or(config, path, default):
    try:
        return lookup(config, path)
    except KeyError:
        return default

#----------------------------------------------------------------------------
# Networks.

def check_networks(state, path, task_kwargs):
    """Check that the state's networks are those the task would build (names and parameter shapes).

    Builds the task's networks on the CPU: used for states that carry no options to compare."""
    task = dnnlib.util.construct_class_by_name(**task_kwargs)
    wanted = task.networks()
    have = state['trainer']['nets']
    if set(have) != set(wanted):
        raise StateError(f'{path} holds the networks {", ".join(sorted(have))}, but this run trains '
                         f'{", ".join(sorted(wanted))}: it is a state of another kind of run')
    for name, kwargs in wanted.items():
        net = dnnlib.util.construct_class_by_name(**kwargs)
        for key, value in net.state_dict().items():
            theirs = have[name].get(key)
            if theirs is None or tuple(theirs.shape) != tuple(value.shape):
                shape = 'missing' if theirs is None else list(theirs.shape)
                raise StateError(f'{path} holds other networks than this run builds: {name}.{key} is {shape} there, '
                                 f'{list(value.shape)} here (another data shape, --model-channels or --net-opts)')
