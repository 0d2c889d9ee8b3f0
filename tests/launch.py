"""Run a Python script under torchrun from a test: N CPU processes on the gloo backend."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(script, *args, nproc=2, timeout=240, env=None, check=True, extra_launcher_args=()):
    """Launch `script` with `nproc` local processes; return the CompletedProcess (text output).

    Uses `--standalone` (a free rendezvous port per run) and forces the CPU device.
    """
    full_env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
                    OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')
    full_env.update(env or {})
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           *extra_launcher_args, os.fspath(script), *map(str, args)]
    res = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f'torchrun exited with {res.returncode}\n--- stdout ---\n{res.stdout[-6000:]}\n'
                             f'--- stderr ---\n{res.stderr[-6000:]}')
    return res
