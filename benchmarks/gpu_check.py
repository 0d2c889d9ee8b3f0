"""One prepared check of every CUDA path, for a lent GPU: runs each part as a subprocess with its own time limit
(one failure is reported and the rest still runs) inside a total budget, and writes DIR/gpu_check.json (every
part's commands, status, wall time, figures, peak GPU memory and output tail), DIR/gpu_check.md (the table for
docs/gpu.md) and DIR/gpu_check_logs.tar.gz (the full output of every command).

    python -m benchmarks.gpu_check --out=DIR                  # on one GPU, about 7-8 minutes (--budget=480)
    python -m benchmarks.gpu_check --out=DIR --only=train,resume,generate_G
    python -m benchmarks.gpu_check --out=DIR --device=cpu --smoke   # every part at toy sizes on the CPU (minutes)

Without a CUDA device every part is reported as skipped and the script exits 0 at once. The parts, in order:
the `gpu`-marked tests (CUDA variants of the distributed tests included); 32x32 coloured synthetic digits
2 -> 3 (dataset_tool.py); train.py's seed command line under `torchrun --standalone --nproc_per_node=1` (nccl),
then the same command resumed to twice the length; generate.py with G and with the SDE; the G outputs of the
CPU against those of the GPU; fid.py (FID and precision/recall) with the stand-in detector (its numbers are not
FID: they check the CUDA path); benchmarks/train_speed.py (the demo's configuration) in fp32 and bf16; benchmarks/dpmot_speed.py (a 56.5 M
parameter denoiser, DPM-OT against the plain sampler at equal NFE); benchmarks/semidiscrete_speed.py at
N = 10 000 and 50 000, d = 3072. Peak GPU memory is sampled with nvidia-smi every 0.25 s (the device's use above
what it was before the part, CUDA contexts included); where a tool reports its own peak allocation, that is
among the part's figures too. Exit status: 0 when no part failed or ran out of time.
"""

import dataclasses
import datetime
import glob
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

import click
import numpy as np
import PIL.Image
import psutil
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAIL_CHARS = 3000

#----------------------------------------------------------------------------
# Sizes: the GPU run and the CPU smoke run (which only shows that every command works).

@dataclasses.dataclass(frozen=True)
class Sizes:
    resolution: int = 32
    train_per_class: int = 1000
    test_per_class: int = 250
    train_kimg: float = 1.0          # the first run stops at half of it, the resumed one at all of it
    tick_kimg: float = 0.25
    train_extra: tuple = ()          # appended to the seed's command line (the last value of an option wins)
    train_speed: tuple = ('--arms=v1,same-math,demo', '--rounds=3', '--iters=8')
    dpmot_speed: tuple = ('--samples=1024', '--batch=256', '--repeats=2')
    semidiscrete: tuple = (('10k', ('--num-targets=10000', '--res=32', '--kernel-targets=10000')),
                           ('50k', ('--num-targets=50000', '--res=32', '--kernel-targets=50000', '--eval-per-target=20')))
    compare_count: int = 64


SMOKE = Sizes(resolution=16, train_per_class=40, test_per_class=16, train_kimg=0.128, tick_kimg=0.064,
              train_extra=('--G_iters=1', '--model_channels=8'),
              train_speed=('--arms=v1,demo', '--rounds=1', '--iters=1', '--batch=8'),
              dpmot_speed=('--samples=16', '--batch=8', '--repeats=1', '--model-channels=16', '--resolution=8',
                           '--num-targets=64'),
              semidiscrete=(('10k', ('--num-targets=200', '--res=8', '--kernel-targets=200', '--eval-threads=1')),
                            ('50k', ('--num-targets=400', '--res=8', '--kernel-targets=400', '--eval-per-target=20',
                                     '--eval-threads=1'))),
              compare_count=8)

#----------------------------------------------------------------------------
# Parts: what to run, how long it may take, and what to read from it.

@dataclasses.dataclass
class Part:
    name: str
    title: str
    limit_s: float
    commands: object                  # ctx -> list of argv lists (run in order, sharing the part's time)
    figures: object = None            # (ctx, output text) -> dict of figures; may raise CheckFailed


class CheckFailed(Exception):
    """A part ran but what it wrote is wrong (the message says what); `figures` holds what could be read."""

    def __init__(self, message, figures=None):
        super().__init__(message)
        self.figures = figures or {}


@dataclasses.dataclass
class Context:
    work: str
    device: str
    sizes: Sizes
    python: str = sys.executable
    part_timeout: float = 0.0        # seconds the part about to run may take (set by run_part)

    def path(self, *names):
        return os.path.join(self.work, *names)


def _py(ctx, *args):
    return [ctx.python, *args]


def _digits_commands(ctx):
    s, cmds = ctx.sizes, []
    for cls, split, num in ((2, 'train', s.train_per_class), (3, 'train', s.train_per_class),
                            (2, 'test', s.test_per_class), (3, 'test', s.test_per_class)):
        cmds.append(_py(ctx, 'dataset_tool.py', '--source=synthetic-digits', f'--classes={cls}', '--colorize',
                        f'--split={split}', f'--num={num}', f'--resolution={s.resolution}x{s.resolution}',
                        f'--dest={ctx.path("data", f"{cls}_{split}.zip")}', '--overwrite'))
    return cmds


def train_command(ctx, kimg, resume=False):
    """The seed's train.py command line (train.py --help, first example) under torchrun with one process, for
    `kimg` kimg in ticks of sizes.tick_kimg, a snapshot and a training state every tick."""
    d = lambda name: ctx.path('data', name)
    cmd = [ctx.python, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', 'train.py',
           '--name=mnist', f'--outdir={ctx.path("runs")}', f'--data1train={d("2_train.zip")}',
           f'--data2train={d("3_train.zip")}', f'--data1test={d("2_test.zip")}', f'--data2test={d("3_test.zip")}',
           '--batch=64', '--batch-gpu=16', '--G_iters=10', '--D_iters=1', '--f_iters=2', '--gamma=1.0',
           '--model_channels=32',
           f'--duration={kimg / 1000:g}', f'--tick={ctx.sizes.tick_kimg:g}', '--snap=1', '--dump=1', '--seed=0',
           '--no-tensorboard', f'--device={ctx.device}', *ctx.sizes.train_extra]
    return [cmd + (['--resume=auto'] if resume else [])]


def _fresh_runs(ctx):
    """Remove the runs of an earlier invocation with the same --work (the resume part must find one run)."""
    shutil.rmtree(ctx.path('runs'), ignore_errors=True)


def _run_dirs(ctx):
    return sorted(glob.glob(ctx.path('runs', '*-mnist-*')))


def latest_snapshot(ctx):
    snaps = sorted(glob.glob(os.path.join((_run_dirs(ctx) or [ctx.path('runs', 'none')])[-1],
                                          'network-snapshot-*.pkl')))
    if not snaps:
        raise CheckFailed(f'no network-snapshot-*.pkl under {ctx.path("runs")} (did the train part run?)')
    return snaps[-1]


def train_figures(ctx, kimg, resumed):
    """Figures of the (one) run directory from its stats.jsonl; CheckFailed unless it reached `kimg`."""
    runs = _run_dirs(ctx)
    if len(runs) != 1:
        raise CheckFailed(f'expected one run directory under {ctx.path("runs")}, found {len(runs)}: {runs}'
                          + (' (the resumed run did not continue in the first one)' if resumed else ''))
    with open(os.path.join(runs[0], 'stats.jsonl')) as f:
        ticks = [json.loads(line) for line in f if line.strip()]
    last = ticks[-1]
    reached = last['Progress/kimg']['mean']
    if reached < kimg - 1e-9:
        raise CheckFailed(f'the run stopped at {reached} kimg, not {kimg}')
    sec_per_kimg = last['Timing/sec_per_kimg']['mean']
    return dict(kimg=reached, ticks=len(ticks), sec_per_kimg=round(sec_per_kimg, 2),
                img_per_s=round(1000 / sec_per_kimg, 1),
                peak_gpu_mem_gb_torch=round(max(t['Resources/peak_gpu_mem_gb']['mean'] for t in ticks), 3))


def _resume_figures(ctx, out):
    if 'Resuming from' not in out:
        raise CheckFailed('train.py --resume=auto did not say "Resuming from": it started afresh')
    return train_figures(ctx, ctx.sizes.train_kimg, resumed=True)


def _generate_commands(ctx, sampler, device=None, count=None, outdir=None):
    cmd = _py(ctx, 'generate.py', f'--network={latest_snapshot(ctx)}', f'--data={ctx.path("data", "2_test.zip")}',
              f'--outdir={ctx.path(outdir or f"gen-{sampler}")}', f'--sampler={sampler}', '--batch=250',
              f'--device={device or ctx.device}')
    return [cmd + ([f'--max={count}'] if count else [])]


def _count_pngs(ctx, name):
    n = len(glob.glob(ctx.path(name, '[0-9]*.png')))
    if n != ctx.sizes.test_per_class:
        raise CheckFailed(f'{name}: {n} PNGs written, expected one per test image ({ctx.sizes.test_per_class})')
    return dict(images=n)


def compare_figures(ctx, out):
    """Pixel differences between the first outputs of G on the GPU (gen-G) and on the CPU (gen-G-cpu)."""
    names = sorted(os.path.basename(p) for p in glob.glob(ctx.path('gen-G-cpu', '[0-9]*.png')))
    if len(names) != ctx.sizes.compare_count:
        raise CheckFailed(f'gen-G-cpu: {len(names)} PNGs, expected {ctx.sizes.compare_count}')
    a = np.stack([np.asarray(PIL.Image.open(ctx.path('gen-G', n)), dtype=np.int16) for n in names])
    b = np.stack([np.asarray(PIL.Image.open(ctx.path('gen-G-cpu', n)), dtype=np.int16) for n in names])
    diff = np.abs(a - b)
    return dict(images=len(names), max_abs_uint8_diff=int(diff.max()), mean_abs_uint8_diff=round(float(diff.mean()), 4),
                identical_pixel_share=round(float((diff == 0).mean()), 4))


def _fid_commands(ctx):
    det = '--detector=standin:0'
    ref = ctx.path('fid-ref-3_train.npz')
    cmds = [_py(ctx, 'fid.py', 'ref', f'--data={ctx.path("data", "3_train.zip")}', f'--dest={ref}', det,
                f'--device={ctx.device}')]
    for name, images in (('G', ctx.path('gen-G')), ('sde', ctx.path('gen-sde')),
                         ('real_3_test', ctx.path('data', '3_test.zip'))):
        extra = ['--metrics=fid,pr', f'--ref-data={ctx.path("data", "3_train.zip")}'] if name == 'G' else []
        cmds.append(_py(ctx, 'fid.py', 'calc', f'--images={images}', f'--ref={ref}', det, *extra,
                        f'--out={ctx.path(f"fid-{name}.json")}', f'--device={ctx.device}'))
    return cmds


def fid_figures(ctx, out):
    figs = {}
    for name in ('G', 'sde', 'real_3_test'):
        with open(ctx.path(f'fid-{name}.json')) as f:
            rec = json.load(f)
        for key in ('fid', 'precision', 'recall'):
            if key in rec:
                figs[f'{key}_{name}'] = round(rec[key], 4)
    return figs


def train_speed_figures(ctx, out):
    """Seconds per kimg of each arm (the demo's configuration) and the speed-up of the last arm over the first."""
    match = re.search(r'^RESULT (\{.*\})$', out, re.M)
    if not match:
        raise CheckFailed('train_speed printed no RESULT line')
    arms = json.loads(match.group(1))['arms']
    figs = {f'{name}_s_per_kimg': round(a['wall_s_per_kimg'], 4) for name, a in arms.items()}
    names = list(arms)
    figs['speedup'] = round(arms[names[0]]['wall_s_per_kimg'] / arms[names[-1]]['wall_s_per_kimg'], 3)
    return figs


def semidiscrete_figures(ctx, out):
    peak = re.search(r'matmul peak: fp32 (\d+) GFLOP/s, bf16 (\d+) GFLOP/s', out)
    kernel = re.findall(r'our kernel at N = (\d+) \((\w+), [^)]*\): (\d+) GFLOP/s = (\d+)% of the \w+ peak', out)
    reached = re.search(r'ours: reached the target in ([\d.]+) s, (\d+) iterations', out)
    mem = re.search(r'peak GPU memory: ([\d.]+) GiB', out)
    if not (peak and kernel):
        raise CheckFailed('semidiscrete_speed printed no matmul peak or kernel rate')
    figs = dict(matmul_peak_fp32_gflops=int(peak.group(1)), matmul_peak_bf16_gflops=int(peak.group(2)),
                kernel_gflops=int(kernel[-1][2]), kernel_share_of_peak_pct=int(kernel[-1][3]),
                seconds_to_5pct_rms=float(reached.group(1)) if reached else None,
                iterations=int(reached.group(2)) if reached else None)
    if mem:
        figs['peak_gpu_mem_gb_torch'] = float(mem.group(1))
    if not reached:
        raise CheckFailed('ours did not reach the target rms within its time', figs)
    return figs


def dpmot_speed_figures(ctx, out):
    m = re.search(r'^RESULT (\{.*\})$', out, re.M)
    if not m:
        raise CheckFailed('dpmot_speed printed no RESULT line')
    r = json.loads(m.group(1))
    ips = r['images_per_s']
    figs = dict(parameters_M=round(r['parameters'] / 1e6, 1), nfe=r['nfe'],
                dpmot_img_per_s=round(ips['dpmot'], 1), plain_img_per_s=round(ips['plain'], 1),
                network_only_img_per_s=round(ips['network'], 1),
                dpmot_outside_network_pct=round(100 * r['dpmot_outside_network_share'], 2))
    if r['peak_gpu_bytes']['dpmot'] is not None:
        figs['peak_gpu_mem_gb_torch'] = round(max(r['peak_gpu_bytes'].values()) / 2**30, 3)
    return figs


def _solver_seconds(ctx):
    # The solver's own clock (evaluations stopped) gets about half the part's time: the rest is start-up, the
    # matmul peaks, the kernel rates and the evaluations.
    return max(5, int(0.5 * ctx.part_timeout))


def _test_figures(ctx, out):
    last = out.strip().splitlines()[-1] if out.strip() else ''
    return {k: int(v) for v, k in re.findall(r'(\d+) (passed|failed|skipped|deselected|errors?)', last)}


def parts():
    """Every part, in the order they run (the most expensive and least certain last)."""
    s = lambda c: c.sizes
    return [
        Part('tests', 'gpu-marked tests (CUDA variants of the distributed tests)', 150,
             lambda c: [_py(c, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-m', 'gpu', '-rs', 'tests/')],
             _test_figures),
        Part('data', 'coloured synthetic digits 2 and 3 (dataset_tool.py)', 60, _digits_commands,
             lambda c, o: dict(zips=len(glob.glob(c.path('data', '*.zip'))))),
        Part('train', "train.py, the seed's command line under torchrun (nccl), to half the length", 120,
             lambda c: _fresh_runs(c) or train_command(c, s(c).train_kimg / 2),
             lambda c, o: train_figures(c, s(c).train_kimg / 2, resumed=False)),
        Part('resume', 'the same command with --resume=auto, to the full length', 100,
             lambda c: train_command(c, s(c).train_kimg, resume=True), _resume_figures),
        Part('generate_G', 'generate.py --sampler=G on the test 2s', 60,
             lambda c: _generate_commands(c, 'G'), lambda c, o: _count_pngs(c, 'gen-G')),
        Part('generate_sde', 'generate.py --sampler=sde on the test 2s', 75,
             lambda c: _generate_commands(c, 'sde'), lambda c, o: _count_pngs(c, 'gen-sde')),
        Part('generate_cpu', 'generate.py --sampler=G on the CPU: the same outputs as on the GPU?', 60,
             lambda c: _generate_commands(c, 'G', 'cpu', s(c).compare_count, 'gen-G-cpu'), compare_figures),
        Part('fid', 'fid.py ref + calc (FID, precision/recall) with the stand-in detector', 120, _fid_commands,
             fid_figures),
        Part('train_speed_fp32', 'training s/kimg of the demo\'s configuration: the code before issue 18 (v1), '
             'its same-math changes, the demo\'s settings; fp32', 75,
             lambda c: [_py(c, '-m', 'benchmarks.train_speed', f'--device={c.device}', '--precision=fp32',
                            *s(c).train_speed)], train_speed_figures),
        Part('train_speed_bf16', 'the same in bf16 (autocast)', 75,
             lambda c: [_py(c, '-m', 'benchmarks.train_speed', f'--device={c.device}', '--precision=bf16',
                            *s(c).train_speed)], train_speed_figures),
        Part('dpmot_speed', 'DPM-OT sampling img/s vs the plain sampler at equal NFE (56.5 M-parameter denoiser)', 100,
             lambda c: [_py(c, '-m', 'benchmarks.dpmot_speed', f'--device={c.device}', *s(c).dpmot_speed)],
             dpmot_speed_figures),
    ] + [Part(f'semidiscrete_{tag}', f'semi-discrete solver (ours), N = {n}, d = 3072: time to 5 % rms, kernel '
              f'share of the matmul peak', limit,
              lambda c, tag=tag: [_py(c, '-m', 'benchmarks.semidiscrete_speed', f'--device={c.device}',
                                      '--skip-reference', '--eval-every=1000', *dict(c.sizes.semidiscrete)[tag],
                                      f'--max-seconds={_solver_seconds(c)}')],
              semidiscrete_figures) for tag, n, limit in (('10k', '10 000', 120), ('50k', '50 000', 200))]

#----------------------------------------------------------------------------
# Running: subprocesses with time limits, peak GPU memory.

MIN_PART_S = 10


def nvidia_smi():
    """The nvidia-smi executable (on PATH, or where NVIDIA's container runtime mounts it), or None."""
    found = shutil.which('nvidia-smi')
    for path in ([found] if found else []) + ['/usr/local/nvidia/bin/nvidia-smi', '/usr/bin/nvidia-smi']:
        if os.access(path, os.X_OK):
            return path
    return None


class GpuMemorySampler:
    """Polls nvidia-smi for the used memory of every GPU in a thread; `peak` is the largest rise (MiB) above the
    level at the start, or None without nvidia-smi."""

    def __init__(self, interval=0.25):
        self.smi, self.interval, self.peak = nvidia_smi(), interval, None
        self.base = self._read()
        self._stop, self._thread = threading.Event(), None

    def _read(self):
        if self.smi is None:
            return None
        try:
            out = subprocess.run([self.smi, '--query-gpu=memory.used', '--format=csv,noheader,nounits'],
                                 capture_output=True, text=True, timeout=5).stdout
            return [float(v) for v in out.split()] or None
        except (OSError, subprocess.SubprocessError, ValueError):
            return None

    def _loop(self):
        while not self._stop.wait(self.interval):
            used = self._read()
            if used is not None and len(used) == len(self.base):
                rise = max(u - b for u, b in zip(used, self.base))
                self.peak = rise if self.peak is None else max(self.peak, rise)

    def __enter__(self):
        if self.base is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _kill_tree(proc):
    """SIGTERM to the command and every process under it (torchrun's workers live in sessions of their own),
    then SIGKILL to what is left after 10 s."""
    try:
        procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, procs = psutil.wait_procs(procs, timeout=10)
        if not procs:
            break
    proc.wait()


def run_command(cmd, timeout, log, env):
    """Run cmd from the repository root with its output appended to `log`; the exit status, or None when it
    ran past `timeout` seconds (then it and its children are stopped)."""
    log.write(f'$ {shlex.join(cmd)}\n')
    log.flush()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        log.write(f'\n[gpu_check: stopped after {timeout:.0f} s]\n')
        return None


def _status(part, ctx, rc, cmd, timeout, out):
    """(status, reason, figures) of a part whose last command ended with `rc` (a part that ran out of time keeps
    the figures its output already holds, when there are any)."""
    if rc is None:
        try:
            figures = part.figures(ctx, out) if part.figures else {}
        except CheckFailed as err:
            figures = err.figures
        except Exception:
            figures = {}
        return 'timeout', f'ran past its {timeout:.0f} s', figures
    if rc != 0:
        return 'failed', f'exit status {rc} of: {shlex.join(cmd)}', {}
    try:
        return 'ok', None, part.figures(ctx, out) if part.figures else {}
    except CheckFailed as err:
        return 'failed', str(err), err.figures
    except Exception as err:   # a parser that meets output it does not expect: report it, go on with the rest
        return 'failed', f'reading its output failed: {type(err).__name__}: {err}', {}


def run_part(part, ctx, budget_end, logdir, env):
    """Run one part within min(its limit, what is left of the budget); its record for the report."""
    rec = dict(name=part.name, title=part.title, limit_s=part.limit_s, status='skipped', reason=None, commands=[],
               returncodes=[], wall_s=0.0, figures={}, peak_gpu_mem_mib=None, output_tail='')
    start = time.time()
    timeout = min(part.limit_s, budget_end - start)
    if timeout < MIN_PART_S:
        rec['reason'] = f'the total budget was spent ({max(timeout, 0):.0f} s left)'
        return rec
    ctx.part_timeout = timeout
    try:
        cmds = part.commands(ctx)
    except CheckFailed as err:
        rec['reason'] = f'cannot start: {err}'
        return rec
    log_path = os.path.join(logdir, f'{part.name}.log')
    rc, cmd = 0, None
    with open(log_path, 'w') as log, GpuMemorySampler() as mem:
        for cmd in cmds:
            rec['commands'].append(shlex.join(cmd))
            rc = run_command(cmd, start + timeout - time.time(), log, env)
            rec['returncodes'].append(rc)
            if rc != 0:
                break
    with open(log_path, errors='replace') as f:
        out = f.read()
    rec.update(wall_s=round(time.time() - start, 1), peak_gpu_mem_mib=mem.peak, output_tail=out[-TAIL_CHARS:])
    rec['status'], rec['reason'], rec['figures'] = _status(part, ctx, rc, cmd, timeout, out)
    return rec

#----------------------------------------------------------------------------
# The report.

def _gpus():
    smi = nvidia_smi()
    if smi is None:
        return []
    try:
        out = subprocess.run([smi, '--query-gpu=name,memory.total,driver_version', '--format=csv,noheader,nounits'],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [dict(zip(('name', 'memory_mib', 'driver'), (v.strip() for v in line.split(','))))
            for line in out.strip().splitlines()]


def environment(device):
    return dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                cuda_available=torch.cuda.is_available(), device=device, gpus=_gpus(), cpus=os.cpu_count(),
                load_average=[round(v, 2) for v in os.getloadavg()], host=platform.node(),
                date=datetime.datetime.now().isoformat(timespec='seconds'))


def _fmt(value):
    return f'{value:g}' if isinstance(value, float) else str(value)


def markdown(report):
    env = report['environment']
    gpu = '; '.join(f'{g["name"]} ({g["memory_mib"]} MiB, driver {g["driver"]})' for g in env['gpus']) or 'no GPU seen'
    lines = ['# GPU check', '',
             f'Device: {gpu}. torch {env["torch"]} (CUDA {env["cuda"]}), Python {env["python"]}, {env["cpus"]} CPUs, '
             f'load average {env["load_average"][0]} at the start; {env["date"]}.', '',
             f'Command: `{report["command"]}`: {report["total_wall_s"]:.0f} s of a {report["budget_s"]:.0f} s budget. '
             'Peak GPU memory: the rise of the device\'s used memory during the part (nvidia-smi, every 0.25 s; '
             'CUDA contexts included); `peak_gpu_mem_gb_torch` is the tool\'s own peak allocation.', '',
             '| part | what | status | wall s (limit) | figures | peak GPU MiB |', '|---|---|---|---:|---|---:|']
    for r in report['parts']:
        figs = ', '.join(f'{k} {_fmt(v)}' for k, v in r['figures'].items())
        status = r['status'] + (f': {r["reason"]}' if r['reason'] else '')
        mem = '' if r['peak_gpu_mem_mib'] is None else f'{r["peak_gpu_mem_mib"]:.0f}'
        lines.append(f'| {r["name"]} | {r["title"]} | {status} | {r["wall_s"]:.1f} ({r["limit_s"]:.0f}) | {figs} | {mem} |')
    lines += ['', '## Commands', '']
    lines += [f'- {r["name"]}: ' + '; '.join(f'`{c}`' for c in r['commands']) for r in report['parts'] if r['commands']]
    bad = [r for r in report['parts'] if r['status'] in ('failed', 'timeout')]
    for r in bad:
        lines += ['', f'## {r["name"]}: {r["status"]}', '', '```', r['output_tail'][-1500:].rstrip(), '```']
    return '\n'.join(lines) + '\n'


def write_report(out, report, logdir=None):
    """gpu_check.json and gpu_check.md into `out` (and the logs as gpu_check_logs.tar.gz), each atomically."""
    def put(name, text=None, build=None):
        tmp = os.path.join(out, f'.{name}.tmp')
        if build is None:
            with open(tmp, 'w') as f:
                f.write(text)
        else:
            build(tmp)
        os.replace(tmp, os.path.join(out, name))
    put('gpu_check.json', json.dumps(report, indent=2) + '\n')
    put('gpu_check.md', markdown(report))
    if logdir is not None and os.listdir(logdir):
        def tar(path):
            with tarfile.open(path, 'w:gz') as t:
                t.add(logdir, arcname='gpu_check_logs')
        put('gpu_check_logs.tar.gz', build=tar)

#----------------------------------------------------------------------------

def _selected(only):
    every = parts()
    if not only:
        return every
    names = [n.strip() for n in only.split(',') if n.strip()]
    unknown = sorted(set(names) - {p.name for p in every})
    if unknown:
        raise click.BadParameter(f'unknown part(s) {unknown}; the parts: {", ".join(p.name for p in every)}',
                                 param_hint='--only')
    return [p for p in every if p.name in names]


@click.command()
@click.option('--out', help='Where to write gpu_check.json, gpu_check.md and gpu_check_logs.tar.gz', metavar='DIR', required=True)
@click.option('--budget', help='Total seconds for all parts; a part gets min(its limit, what is left)', type=click.FloatRange(min=1), default=480, show_default=True)
@click.option('--device', help='cuda (the check), or cpu with --smoke (a test of the script itself)', type=click.Choice(['cuda', 'cpu']), default='cuda', show_default=True)
@click.option('--smoke', help='Toy sizes (with --device=cpu: every command runs on the CPU in minutes)', is_flag=True)
@click.option('--only', help='Run only these parts (comma-separated; later parts use the work of earlier ones in --work)', metavar='LIST')
@click.option('--work', help='Working directory (data, runs, outputs)  [default: a fresh temporary one, removed at the end]', metavar='DIR')
@click.option('--train-kimg', help='Training length of train + resume (the first run stops at half)  [default: 1, or 0.128 with --smoke]', type=click.FloatRange(min=0, min_open=True))
@click.option('--list', 'list_parts', help='Print the parts and their time limits, and exit', is_flag=True)
def main(out, budget, device, smoke, only, work, train_kimg, list_parts):
    """Run every CUDA path of the project once, each part with its own time limit, and report."""
    selected = _selected(only)
    if list_parts:
        for p in selected:
            print(f'{p.name:18s} {p.limit_s:5.0f} s  {p.title}')
        return
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    cleanup = work is None
    work = os.path.abspath(work or tempfile.mkdtemp(prefix='gpu_check_'))
    logdir = os.path.join(work, 'logs')
    os.makedirs(logdir, exist_ok=True)
    sizes = SMOKE if smoke else Sizes()
    if train_kimg is not None:
        sizes = dataclasses.replace(sizes, train_kimg=train_kimg, tick_kimg=train_kimg / 4)
    ctx = Context(work=work, device=device, sizes=sizes)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '4'), PYTHONUNBUFFERED='1')
    report = dict(command=shlex.join(['python', '-m', 'benchmarks.gpu_check'] + sys.argv[1:]), budget_s=budget,
                  environment=environment(device), sizes=dataclasses.asdict(ctx.sizes), parts=[], total_wall_s=0.0)
    no_cuda = device == 'cuda' and not torch.cuda.is_available()
    for i, part in enumerate(selected):
        if no_cuda:
            rec = dict(name=part.name, title=part.title, limit_s=part.limit_s, status='skipped',
                       reason='no CUDA device (torch.cuda.is_available() is False)', commands=[], returncodes=[],
                       wall_s=0.0, figures={}, peak_gpu_mem_mib=None, output_tail='')
        else:
            print(f'[{i + 1}/{len(selected)}] {part.name}: {part.title} (limit {part.limit_s:.0f} s, '
                  f'{budget - (time.time() - t0):.0f} s of the budget left)', flush=True)
            rec = run_part(part, ctx, t0 + budget, logdir, env)
        report['parts'].append(rec)
        report['total_wall_s'] = round(time.time() - t0, 1)
        print(f'    {part.name}: {rec["status"]}{": " + rec["reason"] if rec["reason"] else ""} ({rec["wall_s"]:.1f} s) '
              f'{json.dumps(rec["figures"])}', flush=True)
        write_report(out, report, logdir)
    if cleanup:
        shutil.rmtree(work, ignore_errors=True)
    bad = [r['name'] for r in report['parts'] if r['status'] in ('failed', 'timeout')]
    print(f'Wrote {os.path.join(out, "gpu_check.json")} and gpu_check.md; {len(bad)} part(s) failed or ran out of '
          f'time{": " + ", ".join(bad) if bad else ""}; total {report["total_wall_s"]:.0f} s', flush=True)
    sys.exit(1 if bad else 0)


if __name__ == '__main__':
    main()
