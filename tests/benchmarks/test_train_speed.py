"""benchmarks/train_speed.py: its FLOP counter against closed forms, and a toy run of its arms on the CPU."""

import contextlib
import io
import json

import torch
from click.testing import CliRunner

import demo
from benchmarks import train_speed


def test_flop_count_matches_closed_forms_with_a_double_backward():
    n, c, o, r = 3, 4, 5, 6
    x = torch.randn(n, c, r, r, requires_grad=True)
    w = torch.randn(o, c, 3, 3, requires_grad=True)
    with train_speed.FlopCount() as counter:
        y = torch.nn.functional.conv2d(x, w, padding=1)
    conv = 2 * n * o * r * r * c * 9
    assert counter.total == conv
    with train_speed.FlopCount() as counter:
        grad, = torch.autograd.grad(torch.nn.functional.conv2d(x, w, padding=1).square().sum(), x, create_graph=True)
        grad.square().sum().backward()
    assert counter.total >= 4 * conv # Forward, input gradient, and their backward (weight and input).
    a, b = torch.randn(7, 11), torch.randn(11, 13)
    with train_speed.FlopCount() as counter:
        a @ b
    assert counter.total == 2 * 7 * 11 * 13


def test_arms_run_and_report(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        demo.build_data(str(tmp_path), demo.QUICK)
    res = CliRunner().invoke(train_speed.main, [f'--data={tmp_path / "data"}', '--arms=v1,lazy4,demo,batch96',
                                                '--iters=4', '--rounds=1', '--batch=8'])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output.split('RESULT ')[1])
    arms = result['arms']
    assert result['batch'] == dict(v1=8, lazy4=8, demo=8, batch96=96) # A batch arm keeps its own.
    # The joint penalty pass of v1 runs the interpolates' backward over 3x the rows; lazy4 penalises 1 step in 4.
    assert arms['v1']['gflop_per_iter'] > 1.3 * arms['lazy4']['gflop_per_iter']
    # The demo's f- and D-steps reuse the G-step's outputs: two G forward passes fewer per iteration.
    assert arms['lazy4']['gflop_per_iter'] > 1.1 * arms['demo']['gflop_per_iter']
    assert abs(arms['batch96']['gflop_per_iter'] / arms['demo']['gflop_per_iter'] - 12) < 1e-6 # FLOPs per image.
    assert all(a['wall_s_per_kimg'] > 0 and a['cpu_s_per_kimg'] > 0 for a in arms.values())
    res = CliRunner().invoke(train_speed.main, ['--arms=v1,fastest'])
    assert res.exit_code != 0 and 'fastest' in res.output
