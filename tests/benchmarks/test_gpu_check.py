"""benchmarks/gpu_check.py on a machine without CUDA (every part skipped, exit 0, in seconds), its part runner
(time limits, failures, child processes), the parsers of every part's output on real outputs, and the two
benchmarks it adds options to or runs (dpmot_speed, train_speed --precision) at toy sizes on the CPU."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import psutil
import pytest
from click.testing import CliRunner

from benchmarks import dpmot_speed, gpu_check, train_speed

REPO = gpu_check.REPO


def _ctx(tmp_path, sizes=gpu_check.SMOKE):
    return gpu_check.Context(work=str(tmp_path), device='cpu', sizes=sizes)


def test_without_cuda_every_part_is_skipped_and_the_exit_status_is_0(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
    t0 = time.time()
    res = subprocess.run([sys.executable, '-m', 'benchmarks.gpu_check', f'--out={tmp_path}'], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert time.time() - t0 < 60
    report = json.load(open(tmp_path / 'gpu_check.json'))
    names = [p.name for p in gpu_check.parts()]
    assert [r['name'] for r in report['parts']] == names and len(names) == 13
    assert all(r['status'] == 'skipped' and 'no CUDA device' in r['reason'] and not r['commands']
               for r in report['parts'])
    md = open(tmp_path / 'gpu_check.md').read()
    assert all(f'| {n} |' in md for n in names) and '| part | what | status |' in md
    assert sorted(os.listdir(tmp_path)) == ['gpu_check.json', 'gpu_check.md']


def test_only_refuses_unknown_parts(tmp_path):
    res = CliRunner().invoke(gpu_check.main, [f'--out={tmp_path}', '--only=train,nonsense'])
    assert res.exit_code == 2 and "unknown part(s) ['nonsense']" in res.output


def _part(name, code, limit=30, figures=None):
    return gpu_check.Part(name, name, limit, lambda c: [[sys.executable, '-c', code]], figures)


def test_run_part_reports_success_failure_timeout_and_budget(tmp_path):
    ctx, logdir, env = _ctx(tmp_path), str(tmp_path), dict(os.environ)
    far = time.time() + 1000
    ok = gpu_check.run_part(_part('ok', 'print("value 42")', figures=lambda c, out: dict(v=int(out.split()[-1]))),
                            ctx, far, logdir, env)
    assert ok['status'] == 'ok' and ok['figures'] == dict(v=42) and ok['returncodes'] == [0]
    assert 'value 42' in ok['output_tail'] and ok['commands'][0].startswith(sys.executable)
    bad = gpu_check.run_part(_part('bad', 'import sys; print("boom"); sys.exit(3)'), ctx, far, logdir, env)
    assert bad['status'] == 'failed' and bad['reason'].startswith('exit status 3 of:') and 'boom' in bad['output_tail']

    def refuse(c, out):
        raise gpu_check.CheckFailed('wrong numbers')
    wrong = gpu_check.run_part(_part('wrong', 'pass', figures=refuse), ctx, far, logdir, env)
    assert (wrong['status'], wrong['reason']) == ('failed', 'wrong numbers')
    crash = gpu_check.run_part(_part('crash', 'pass', figures=lambda c, out: {}['x']), ctx, far, logdir, env)
    assert crash['status'] == 'failed' and 'KeyError' in crash['reason']
    late = gpu_check.run_part(_part('late', 'pass'), ctx, time.time() + 5, logdir, env)
    assert late['status'] == 'skipped' and 'budget' in late['reason'] and not late['commands']


def test_a_part_past_its_limit_is_stopped_with_its_children(tmp_path):
    # The child runs in a session of its own, as torchrun's workers do: killing the parent's group would miss it.
    pid_file = tmp_path / 'child.pid'
    code = ('import subprocess, sys, time; '
            'p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True); '
            f'open({str(pid_file)!r}, "w").write(str(p.pid)); print("started", flush=True); time.sleep(300)')
    t0 = time.time()
    part = _part('slow', code, limit=gpu_check.MIN_PART_S + 2, figures=lambda c, out: dict(started='started' in out))
    rec = gpu_check.run_part(part, _ctx(tmp_path), time.time() + 1000, str(tmp_path), dict(os.environ))
    assert rec['status'] == 'timeout' and rec['returncodes'] == [None] and 'started' in rec['output_tail']
    assert rec['figures'] == dict(started=True)         # what the output already holds is kept
    assert time.time() - t0 < 60
    child = int(pid_file.read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_parsers_read_the_tools_outputs(tmp_path):
    ctx = _ctx(tmp_path)
    out = ('arm  wall s/kimg ...\n'
           'RESULT {"device": "cuda:0", "arms": {"v1": {"wall_s_per_kimg": 0.52, "cpu_s_per_kimg": 0.5}, '
           '"demo": {"wall_s_per_kimg": 0.26, "cpu_s_per_kimg": 0.25}}}\n')
    assert gpu_check.train_speed_figures(ctx, out) == dict(v1_s_per_kimg=0.52, demo_s_per_kimg=0.26, speedup=2.0)
    out = ('matmul peak: fp32 51234 GFLOP/s, bf16 612345 GFLOP/s\n'
           'our kernel at N = 10000 (bf16, top-2 with the winner exact): 401234 GFLOP/s = 66% of the bf16 peak\n'
           '     ours iter   30       4.1 s  eval rms 0.0490  max|r| 0.540 (floor 0.430)  empty 0\n'
           'ours: reached the target in 4.1 s, 30 iterations, 618 N samples; own certificate: converged=False\n'
           'peak GPU memory: 3.21 GiB allocated\n')
    assert gpu_check.semidiscrete_figures(ctx, out) == dict(
        matmul_peak_fp32_gflops=51234, matmul_peak_bf16_gflops=612345, kernel_gflops=401234,
        kernel_share_of_peak_pct=66, seconds_to_5pct_rms=4.1, iterations=30, peak_gpu_mem_gb_torch=3.21)
    with pytest.raises(gpu_check.CheckFailed, match='did not reach') as err:
        gpu_check.semidiscrete_figures(ctx, out.replace('reached the target in 4.1 s', 'did not reach the target in nan s'))
    assert err.value.figures['kernel_share_of_peak_pct'] == 66 and err.value.figures['seconds_to_5pct_rms'] is None
    result = dict(device='cuda:0', parameters=56524291, nfe=9, samples=1024, batch=256,
                  images_per_s=dict(dpmot=900.0, plain=880.0, network=950.0),
                  peak_gpu_bytes=dict(dpmot=2**30, plain=2**29, network=2**29), dpmot_outside_network_share=0.0556)
    figs = gpu_check.dpmot_speed_figures(ctx, 'x\nRESULT ' + json.dumps(result) + '\n')
    assert figs == dict(parameters_M=56.5, nfe=9, dpmot_img_per_s=900.0, plain_img_per_s=880.0,
                        network_only_img_per_s=950.0, dpmot_outside_network_pct=5.56, peak_gpu_mem_gb_torch=1.0)
    assert gpu_check._test_figures(ctx, 'SKIPPED [1] x\n2 passed, 1 skipped, 260 deselected in 3.20s\n') == dict(
        passed=2, skipped=1, deselected=260)


def test_train_compare_and_fid_figures_read_the_files(tmp_path):
    ctx = _ctx(tmp_path)
    run = tmp_path / 'runs' / '00000-mnist-eot-gpus1-batch64-gamma1'
    run.mkdir(parents=True)
    tick = lambda kimg, spk, mem: json.dumps({'Progress/kimg': {'mean': kimg}, 'Timing/sec_per_kimg': {'mean': spk},
                                              'Resources/peak_gpu_mem_gb': {'mean': mem}})
    (run / 'stats.jsonl').write_text(tick(0.064, 50.0, 0.5) + '\n' + tick(0.128, 40.0, 0.75) + '\n')
    assert gpu_check.train_figures(ctx, 0.128, resumed=True) == dict(
        kimg=0.128, ticks=2, sec_per_kimg=40.0, img_per_s=25.0, peak_gpu_mem_gb_torch=0.75)
    with pytest.raises(gpu_check.CheckFailed, match='stopped at 0.128 kimg'):
        gpu_check.train_figures(ctx, 0.256, resumed=False)
    (tmp_path / 'runs' / '00001-mnist-eot-gpus1-batch64-gamma1').mkdir()
    with pytest.raises(gpu_check.CheckFailed, match='did not continue in the first one'):
        gpu_check.train_figures(ctx, 0.128, resumed=True)

    rng = np.random.default_rng(0)
    for name in ('gen-G', 'gen-G-cpu'):
        (tmp_path / name).mkdir()
    for i in range(ctx.sizes.compare_count):
        img = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        PIL.Image.fromarray(img).save(tmp_path / 'gen-G' / f'{i:06d}.png')
        img[0, 0, 0] = min(255, int(img[0, 0, 0]) + 2) if i == 1 else img[0, 0, 0]
        PIL.Image.fromarray(img).save(tmp_path / 'gen-G-cpu' / f'{i:06d}.png')
    figs = gpu_check.compare_figures(ctx, '')
    assert figs['images'] == 8 and figs['max_abs_uint8_diff'] <= 2
    assert figs['identical_pixel_share'] >= 1 - 1 / (8 * 48)

    for name, rec in (('G', dict(fid=12.5, precision=0.5, recall=0.25)), ('sde', dict(fid=10.0)),
                      ('real_3_test', dict(fid=1.5))):
        (tmp_path / f'fid-{name}.json').write_text(json.dumps(rec))
    assert gpu_check.fid_figures(ctx, '') == dict(fid_G=12.5, precision_G=0.5, recall_G=0.25, fid_sde=10.0,
                                                  fid_real_3_test=1.5)


def test_markdown_names_failures_and_their_output(tmp_path):
    rec = lambda name, status, reason=None, figures=None: dict(
        name=name, title=f'{name} title', limit_s=60, status=status, reason=reason, commands=[f'python {name}.py'],
        returncodes=[0], wall_s=1.5, figures=figures or {}, peak_gpu_mem_mib=512.0, output_tail=f'tail of {name}')
    report = dict(command='python -m benchmarks.gpu_check --out=x', budget_s=480, total_wall_s=3.0,
                  environment=gpu_check.environment('cuda'),
                  parts=[rec('a', 'ok', figures=dict(img_per_s=12.5)), rec('b', 'failed', 'exit status 1 of: x')])
    gpu_check.write_report(str(tmp_path), report)
    md = open(tmp_path / 'gpu_check.md').read()
    assert '| a | a title | ok | 1.5 (60) | img_per_s 12.5 | 512 |' in md
    assert '| b | b title | failed: exit status 1 of: x |' in md and '## b: failed' in md and 'tail of b' in md
    assert 'tail of a' not in md
    assert json.load(open(tmp_path / 'gpu_check.json'))['parts'][1]['reason'] == 'exit status 1 of: x'


def test_dpmot_speed_runs_its_three_arms_on_the_cpu():
    res = CliRunner().invoke(dpmot_speed.main, ['--device=cpu', '--model-channels=8', '--resolution=8',
                                                '--num-targets=16', '--samples=6', '--batch=4', '--repeats=1'])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output.split('RESULT ')[1])
    assert result['nfe'] == 9 and set(result['images_per_s']) == {'dpmot', 'plain', 'network'}
    assert all(v > 0 for v in result['images_per_s'].values()) and result['peak_gpu_bytes']['dpmot'] is None


def test_train_speed_runs_both_arms_in_bf16_on_the_cpu():
    res = CliRunner().invoke(train_speed.main, ['--device=cpu', '--precision=bf16', *gpu_check.SMOKE.train_speed])
    assert res.exit_code == 0, res.output
    assert 'bf16' in res.output
    figs = gpu_check.train_speed_figures(None, res.output)
    assert figs['v1_s_per_kimg'] > 0 and figs['demo_s_per_kimg'] > 0