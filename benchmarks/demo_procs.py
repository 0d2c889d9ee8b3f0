"""Wall time of the demo's training in one process and in two (torchrun, gloo), as demo.py runs it.

train_speed.py times the arithmetic of one process; this times what a user waits for: train.py started as
demo.py starts it (demo.train_command: the demo's settings, one thread per process) for --kimg kimg, once per
process count per round, in turns (1, 2, 2, 1, ...) so machine load hits both alike. Per run it reads train.py's
own tick lines: the steady seconds per kimg (median over the ticks after tick 0) and the time from the launch to
the end of training (start-up, the first tick and the snapshots included). Two processes each take half of the
batch of 64 and draw their own random numbers: the same work per kimg, not the same bits.

    python -m benchmarks.demo_procs                         # the demo's data built in a temporary folder
    python -m benchmarks.demo_procs --data=demo-run/data --kimg=6 --rounds=3

The last line, `RESULT {...}`, holds the figures as JSON.
"""

import contextlib
import io
import json
import os
import re
import statistics
import subprocess
import tempfile
import time

import click

import demo

TICK = re.compile(r'tick (\d+)\s+kimg \S+\s+time .*?sec/kimg (\S+)')


def time_training(data_dir, run_dir, cfg, procs):
    """(steady s/kimg, seconds from the launch to the end of training) of one train.py run of the demo's config
    `cfg` (demo.FULL with its kimg) in `procs` processes."""
    t0 = time.perf_counter()
    res = subprocess.run(demo.train_command(cfg, demo.data_paths(data_dir), run_dir, 1, procs), cwd=demo.ROOT,
                         env=demo.tool_env(OMP_NUM_THREADS='1'), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise click.ClickException(f'train.py with {procs} process(es) failed:\n{(res.stdout + res.stderr)[-3000:]}')
    rates = [float(m.group(2)) for m in TICK.finditer(res.stdout) if int(m.group(1)) > 0]
    if not rates:
        raise click.ClickException(f'kimg={cfg["kimg"]:g}: no tick after tick 0 to time; train for longer')
    return statistics.median(rates), seconds


@click.command()
@click.option('--data',   'data_dir', help='Folder with the demo\'s 2_train.zip, 3_train.zip, 2_test.zip, 3_test.zip  [default: built in a temporary folder]', metavar='DIR', type=str)
@click.option('--kimg',   help='Training per run (ticks of 1 kimg)', metavar='KIMG', type=click.IntRange(min=2), default=4, show_default=True)
@click.option('--rounds', help='Runs of each process count, in turns', metavar='INT', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--procs',  help='Comma-separated process counts, the first is the baseline', metavar='LIST', type=str, default='1,2', show_default=True)
def main(data_dir, kimg, rounds, procs):
    """Seconds per kimg of the demo's training with 1 and 2 processes, and the ratio."""
    try:
        counts = [int(p) for p in procs.split(',') if p]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise click.ClickException(f'--procs={procs}: give process counts >= 1 separated by commas, e.g. 1,2')
    batch = demo.FULL['batch']
    if any(batch % n for n in counts):
        raise click.ClickException(f'--procs={procs}: every count must divide the demo\'s batch of {batch}, e.g. 1,2,4')
    with tempfile.TemporaryDirectory() as tmp:
        if data_dir is None:
            data_dir = os.path.join(tmp, 'data')
            with contextlib.redirect_stdout(io.StringIO()):
                demo.build_data(tmp, demo.FULL)
        cfg = dict(demo.FULL, kimg=kimg, snap_ticks=1000) # Snapshots at the start and the end only.
        load0 = os.getloadavg()
        print(f'The demo\'s training (demo.FULL), {kimg} kimg per run, one thread per process, {rounds} round(s); '
              f'load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} on {os.cpu_count()} CPUs', flush=True)
        rate = {n: [] for n in counts}
        total = {n: [] for n in counts}
        for r in range(rounds):
            for n in (counts if r % 2 == 0 else counts[::-1]):
                s_per_kimg, seconds = time_training(data_dir, os.path.join(tmp, f'run-{r}-{n}'), cfg, n)
                rate[n].append(s_per_kimg)
                total[n].append(seconds)
                print(f'  round {r}: {n} process(es) {s_per_kimg:6.2f} s/kimg, {seconds:6.1f} s in all', flush=True)
    load1 = os.getloadavg()
    med = statistics.median
    base = counts[0]
    print(f'{"processes":>9s} {"s/kimg":>8s} {"speed-up":>9s} {"run s":>7s} {"speed-up":>9s}')
    for n in counts:
        print(f'{n:9d} {med(rate[n]):8.2f} {med(rate[base]) / med(rate[n]):8.2f}x {med(total[n]):7.1f} '
              f'{med(total[base]) / med(total[n]):8.2f}x')
    print(f'load average at the end: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}')
    print('RESULT ' + json.dumps(dict(kimg=kimg, rounds=rounds, load=[load0[0], load1[0]],
                                      procs={n: dict(s_per_kimg=med(rate[n]), run_s=med(total[n])) for n in counts})))


if __name__ == '__main__':
    main()
