"""The pinned versions in requirements.txt and environment.yml agree; no torchvision anywhere."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pins(text):
    return dict(re.findall(r'^[\s-]*([A-Za-z0-9_.\-]+)==([^\s#]+)', text, flags=re.M))


def test_requirements_and_conda_environment_pin_the_same_versions():
    req = _pins(open(os.path.join(REPO, 'requirements.txt')).read())
    env = _pins(open(os.path.join(REPO, 'environment.yml')).read())
    assert req['torch'] == '2.13.0'
    assert req == env
    assert 'torchvision' not in req


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(REPO, 'README.md')).read()
    ci = open(os.path.join(REPO, '.ci', 'run')).read()
    blocks = re.findall(r'```(?:bash|sh)?\n(.*?)```', readme, flags=re.S)
    first_commands = [line.split('#')[0].strip() for line in blocks[0].splitlines() if line.split('#')[0].strip()]
    assert len(first_commands) == 2, first_commands
    assert first_commands[1] in ci
