#!/usr/bin/env python3
"""Set-up and entry points for a fresh machine that has only python3.

    python3 dev.py demo [demo options]   # the main job on the embedded default data
    python3 dev.py test [pytest options] # the whole test suite

Each command creates (or reuses) the virtual environment `.venv` inside the repository and installs
`requirements.txt` into it when the file has changed since the last install, then runs the job with
the environment's Python. Uses only the standard library.
"""

import hashlib
import os
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, '.venv')
REQUIREMENTS = os.path.join(ROOT, 'requirements.txt')
STAMP = os.path.join(VENV, '.requirements.sha256')


def venv_python():
    return os.path.join(VENV, 'Scripts' if os.name == 'nt' else 'bin', 'python')


def ensure_environment():
    """Create .venv and install the pinned requirements if they are not installed yet."""
    with open(REQUIREMENTS, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if not os.path.isfile(venv_python()):
        print(f'Creating virtual environment in {VENV} ...', flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if not os.path.isfile(STAMP) or open(STAMP).read().strip() != digest:
        print('Installing requirements.txt into .venv ...', flush=True)
        subprocess.run([venv_python(), '-m', 'pip', 'install', '--quiet', '-r', REQUIREMENTS], check=True)
        with open(STAMP, 'w') as f:
            f.write(digest + '\n')


def main(argv):
    if not argv or argv[0] not in ('demo', 'test', 'setup'):
        print(__doc__.strip())
        return 2
    ensure_environment()
    command, rest = argv[0], argv[1:]
    if command == 'setup':
        return 0
    if command == 'demo':
        cmd = [venv_python(), os.path.join(ROOT, 'demo.py'), *rest]
    else:
        cmd = [venv_python(), '-m', 'pytest', *rest]
    returncode = subprocess.run(cmd, cwd=ROOT).returncode
    if command == 'test' and returncode == 5:
        print('pytest collected no tests: treated as a failure.', file=sys.stderr)
        return 1
    return returncode


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
