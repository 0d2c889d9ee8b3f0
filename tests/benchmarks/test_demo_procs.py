"""benchmarks/demo_procs.py: a toy run of the demo's training in one and two processes, timed from its tick lines."""

import contextlib
import io
import os

from click.testing import CliRunner

import demo
from benchmarks import demo_procs


def test_tick_lines_give_the_steady_rate():
    line = 'tick 3     kimg 3.008      time 26s           sec/tick 8.15     sec/kimg 8.49     loss_G -0.2002'
    assert [m.groups() for m in demo_procs.TICK.finditer(line)] == [('3', '8.49')]


def test_one_and_two_processes_are_timed(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        demo.build_data(str(tmp_path), demo.QUICK)
    cfg = dict(demo.QUICK, kimg=1.5) # Ticks of 0.5 kimg: ticks 1 to 3 after tick 0.
    for procs in (1, 2):
        run_dir = tmp_path / f'run{procs}'
        rate, seconds = demo_procs.time_training(str(tmp_path / 'data'), str(run_dir), cfg, procs)
        # The run (start-up and three ticks of ~0.48 kimg after tick 0) takes longer than 0.9 kimg at the median rate.
        assert 0 < rate and rate * 0.9 < seconds
        lines = (run_dir / 'log.txt').read_text()
        ticks = [float(m.group(2)) for m in demo_procs.TICK.finditer(lines) if int(m.group(1)) > 0]
        assert len(ticks) == 3 and sorted(ticks)[1] == rate
        assert f'"world_size": {procs}' in (run_dir / 'training_options.json').read_text()


def test_bad_process_counts_are_refused():
    res = CliRunner().invoke(demo_procs.main, ['--procs=1,two'])
    assert res.exit_code != 0 and '--procs=1,two' in res.output
    res = CliRunner().invoke(demo_procs.main, ['--procs=1,3'])
    assert res.exit_code != 0 and 'must divide the demo\'s batch of 64' in res.output
