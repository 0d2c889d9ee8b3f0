"""Resume checks: the comparison of a state's options with a run's, against a brute-force reading of the rules."""

import copy
import os

from training.launch import RESUME_RULES
from training.resume import compare_options

OPTIONS = dict(
    name='x', batch_size=64, seed=3, lr_rampup_kimg=0.0, ema_halflife_kimg=500.0, grad_clip=1.0, precision='fp32',
    total_kimg=1000.0, kimg_per_tick=50.0,
    data_paths=dict(data1train='a.zip', data2train='b.zip', data1test=None),
    task_kwargs=dict(class_name='training.eot_task.EOTTask', gamma=0.5, G_loss='stated', G_iters=10, f_iters=2,
                     D_iters=1, D_gp=0.0, sde_steps=10,
                     G_kwargs=dict(class_name='models.networks.UNetGenerator', model_channels=32, img_resolution=8),
                     f_kwargs=dict(class_name='models.networks.UNetDrift', model_channels=32, img_resolution=8),
                     D_kwargs=dict(class_name='models.networks.UNetCritic', model_channels=64, img_resolution=8),
                     G_opt_kwargs=dict(class_name='torch.optim.Adam', lr=1e-4, betas=[0.9, 0.999]),
                     f_opt_kwargs=dict(class_name='torch.optim.Adam', lr=1e-4, betas=[0.9, 0.999]),
                     D_opt_kwargs=dict(class_name='torch.optim.Adam', lr=1e-4, betas=[0.9, 0.999])))


def _changed(path, value):
    new = copy.deepcopy(OPTIONS)
    *parents, key = path.split('.')
    d = new
    for p in parents:
        d = d[p]
    d[key] = value
    return new


def test_each_rule_flags_its_own_option_and_nothing_else():
    for label, path, rule in RESUME_RULES:
        try:
            value = OPTIONS
            for key in path.split('.'):
                value = value[key]
        except KeyError:
            continue    # another kind's option
        other = (value + 'X' if isinstance(value, str) else dict(value, model_channels=7) if isinstance(value, dict)
                 else value * 2 + 1)
        problems = compare_options(OPTIONS, _changed(path, other), RESUME_RULES)
        assert [p[0] for p in problems] == [label], (path, problems)
        allowed = compare_options(OPTIONS, _changed(path, other), RESUME_RULES, allowed=(label,))
        assert (allowed == []) == (rule != 'never'), (path, allowed)


def test_what_does_not_change_a_state_passes():
    new = copy.deepcopy(OPTIONS)
    new.update(total_kimg=2000.0, kimg_per_tick=1.0, batch_size=64.0)    # free options; 64 == 64.0
    new['data_paths']['data1test'] = 'other.zip'
    new['task_kwargs']['sde_steps'] = 20
    new['task_kwargs']['class_name'] = 'training.eot.EOTTask'           # the module of an earlier version
    new['task_kwargs']['G_opt_kwargs']['fused'] = True                   # an optimiser argument that is no option
    new['task_kwargs']['G_kwargs']['new_argument'] = 1                   # recorded by one version only
    assert compare_options(OPTIONS, new, RESUME_RULES) == []


def test_data_paths_compare_by_real_path(tmp_path):
    (tmp_path / 'a.zip').write_bytes(b'x')
    os.symlink(tmp_path / 'a.zip', tmp_path / 'link.zip')
    old = _changed('data_paths.data1train', str(tmp_path / 'a.zip'))
    assert compare_options(old, _changed('data_paths.data1train', str(tmp_path / 'link.zip')), RESUME_RULES) == []
    problems = compare_options(old, _changed('data_paths.data1train', str(tmp_path / 'b.zip')), RESUME_RULES)
    assert problems == [('data1train', 'path', 'data_paths.data1train', str(tmp_path / 'a.zip'), str(tmp_path / 'b.zip'))]
