"""docs/*-help.txt equal the scripts' --help; the README and docs link what exists.

Regenerate the help files after changing an option:

    python -m tests.test_docs
"""

import importlib
import os
import re
import sys

import pytest
from click.testing import CliRunner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, 'docs')
TERMINAL_WIDTH = 120

# docs file -> (script, subcommands whose help goes into the file; [] is the script's own help).
HELP_FILES = {
    'train-help.txt': ('train.py', [[]]),
    'generate-help.txt': ('generate.py', [[]]),
    'fid-help.txt': ('fid.py', [[], ['ref'], ['calc']]),
    'dataset-tool-help.txt': ('dataset_tool.py', [[]]),
    'potential-help.txt': ('potential.py', [[]]),
}


def render_help(script, subcommands):
    """The --help text of `script` (and of each subcommand), as a user sees it at a fixed terminal width."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    module = importlib.import_module(os.path.splitext(script)[0])
    parts = []
    for sub in subcommands:
        res = CliRunner().invoke(module.main, [*sub, '--help'], prog_name=script, terminal_width=TERMINAL_WIDTH)
        assert res.exit_code == 0, res.output
        parts.append(f'$ python {" ".join([script, *sub])} --help\n\n{res.output}')
    return '\n'.join(parts)


def _missing_script(script):
    return not os.path.isfile(os.path.join(REPO, script))


@pytest.mark.parametrize('name', sorted(HELP_FILES))
def test_help_file_matches_the_script(name):
    script, subcommands = HELP_FILES[name]
    if _missing_script(script):
        pytest.skip(f'{script} is not in this checkout yet; docs/{name} is generated once it exists')
    path = os.path.join(DOCS, name)
    assert os.path.isfile(path), f'docs/{name} is missing; write it with `python -m tests.test_docs`'
    with open(path, encoding='utf-8') as f:
        written = f.read()
    assert written == render_help(script, subcommands), \
        f'docs/{name} is out of date with `{script} --help`; regenerate it with `python -m tests.test_docs`'


def test_readme_links_every_doc_and_keeps_the_two_commands():
    readme = open(os.path.join(REPO, 'README.md'), encoding='utf-8').read()
    assert readme.startswith('# One-step entropic OT and DPM-OT in PyTorch\n\n```bash\npython3 dev.py demo ')
    for name in [*HELP_FILES, 'recipes.md', 'safe-loading.md', 'demo.png', 'metrics.md']:
        if name in HELP_FILES and _missing_script(HELP_FILES[name][0]):
            continue
        assert f'docs/{name}' in readme, f'README.md does not link docs/{name}'
        assert os.path.isfile(os.path.join(DOCS, name)), name
    # Every local link of the README and the recipes points at a file that exists.
    for doc in ('README.md', os.path.join('docs', 'recipes.md'), os.path.join('docs', 'safe-loading.md')):
        text = open(os.path.join(REPO, doc), encoding='utf-8').read()
        for target in re.findall(r'\]\(([^)#\s]+)\)', text):
            if '://' in target:
                continue
            full = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), target))
            assert os.path.exists(full), f'{doc} links {target}, which does not exist'


def test_recipe_commands_use_real_options():
    """Every `--option` in docs/recipes.md's commands is an option of the script it is passed to."""
    text = open(os.path.join(DOCS, 'recipes.md'), encoding='utf-8').read()
    commands = re.sub(r'\\\n\s*', ' ', '\n'.join(re.findall(r'```(?:bash|sh)?\n(.*?)```', text, flags=re.S)))
    checked = 0
    for line in commands.splitlines():
        m = re.search(r'(\w+\.py)((?:\s+(?:ref|calc))?)\s(.*)', line)
        if m is None or m.group(1) not in {s for s, _ in HELP_FILES.values()} or _missing_script(m.group(1)):
            continue
        sub = [m.group(2).strip()] if m.group(2).strip() else []
        known = set(re.findall(r'(--[\w-]+)', render_help(m.group(1), [sub])))
        for option in re.findall(r'\s(--[\w-]+)', ' ' + m.group(3)):
            assert option in known, f'docs/recipes.md: {m.group(1)} {" ".join(sub)} has no option {option}: {line}'
            checked += 1
    assert checked > 20


if __name__ == '__main__':
    for name, (script, subcommands) in HELP_FILES.items():
        if _missing_script(script):
            print(f'skipped docs/{name}: {script} does not exist yet')
            continue
        with open(os.path.join(DOCS, name), 'w', encoding='utf-8') as f:
            f.write(render_help(script, subcommands))
        print(f'wrote docs/{name}')
