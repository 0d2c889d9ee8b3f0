"""README.md and docs/*.md name only what the repository holds: every repository path and module they name
exists, and every `python -m benchmarks.NAME` command names a real benchmark module."""

import ast
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md'] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'docs', '*.md')))
# Top-level folders and files: a path is a repository path when its first component is one of them.
TOP = {n for n in os.listdir(REPO) if not n.startswith('.') and n not in ('__pycache__',)}
PACKAGES = {n for n in TOP if os.path.isfile(os.path.join(REPO, n, '__init__.py'))}
# Names that a page cites on purpose although the repository no longer holds them: (page, name, why).
HISTORICAL = {('docs/architecture.md', 'training/eot.py'): 'the module path that snapshots written before the '
                                                           'reorganisation carry in their pickles'}
FILE_EXT = ('.py', '.md', '.txt', '.json', '.png', '.pkl', '.pt', '.npz', '.zip', '.jsonl', '.yml', '.toml')


def _spans(text):
    """(fenced code blocks, inline `code` spans) of a Markdown text."""
    fenced = re.findall(r'```[^\n]*\n(.*?)```', text, flags=re.S)
    rest = re.sub(r'```.*?```', '', text, flags=re.S)
    return fenced, re.findall(r'`([^`\n]+)`', rest)


def _tokens(span):
    """The words of a code span that could name a file or a module (no URLs, placeholders or variables)."""
    for tok in re.split(r'[\s=,;()\[\]"\'`]+', span):
        tok = tok.strip('.:').rstrip('/')
        placeholder = any(part.isupper() for part in re.split(r'[./]', tok))       # benchmarks.NAME, DIR/log.txt
        if tok and not placeholder and '://' not in tok and not set('<$~{') & set(tok):
            yield tok


def _all_basenames():
    names = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d != '__pycache__']
        names.update(files)
    return names


def _defines(path, name):
    """True when the module at `path` defines `name` at top level (def, class or assignment)."""
    tree = ast.parse(open(path, encoding='utf-8').read())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
    return False


def _module_problem(dotted):
    """None when `pkg.mod[.attr[.attr]]` names a project module (and an attribute it defines), else why not."""
    parts = dotted.split('.')
    for i in range(len(parts), 0, -1):
        base = os.path.join(REPO, *parts[:i])
        path = base + '.py' if os.path.isfile(base + '.py') else os.path.join(base, '__init__.py')
        if os.path.isfile(path):
            rest = parts[i:]
            if not rest or _defines(path, rest[0]):
                return None
            return f'{os.path.relpath(path, REPO)} defines no {rest[0]}'
    return 'no such module'


def _import_problems(block):
    """{name: why} for the project imports of a code block (`from pkg.mod import a, b`, `import pkg.mod`)."""
    found = {}
    for m in re.finditer(r'^\s*from +([\w.]+) +import +([\w, ]+)', block, flags=re.M):
        if m.group(1).split('.')[0] in PACKAGES:
            for name in (n.strip().split(' as ')[0] for n in m.group(2).split(',')):
                why = _module_problem(f'{m.group(1)}.{name}') if name else None
                if why:
                    found[f'{m.group(1)}.{name}'] = why
    for m in re.finditer(r'^\s*import +([\w.]+)', block, flags=re.M):
        if m.group(1).split('.')[0] in PACKAGES and _module_problem(m.group(1)):
            found[m.group(1)] = _module_problem(m.group(1))
    return found


def _prose_problems(page, text):
    """{name: why} for repository paths and relative links in the page's prose (outside code)."""
    prose = re.sub(r'`[^`\n]+`', '', re.sub(r'```.*?```', '', text, flags=re.S))
    found = {}
    dirs = '|'.join(sorted(re.escape(n) for n in TOP if os.path.isdir(os.path.join(REPO, n))))
    for m in re.finditer(rf'(?<![\w/.:-])(?:{dirs})/[\w./*-]*[\w*]', prose):
        if (page, m.group()) not in HISTORICAL and not glob.glob(os.path.join(REPO, m.group())):
            found[m.group()] = 'no such file or folder'
    for m in re.finditer(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', prose):
        target = m.group(1)
        if '://' not in target and not target.startswith('mailto:'):
            if not os.path.exists(os.path.join(REPO, os.path.dirname(page), target)):
                found[target] = f'link target missing (relative to {os.path.dirname(page) or "the root"})'
    return found


def _problems(page, text, basenames):
    """{name: why} for every name in the page that the repository does not hold."""
    fenced, inline = _spans(text)
    found = _prose_problems(page, text)
    for block in fenced:
        found.update(_import_problems(block))
    for block in fenced + inline:
        for m in re.finditer(r'python3? +benchmarks/(\w+)\.py', block):
            found[f'benchmarks/{m.group(1)}.py'] = (f'"python benchmarks/{m.group(1)}.py" does not run (no sys.path '
                                                    f'edits): python -m benchmarks.{m.group(1)}')
    for span in fenced + inline:
        for tok in _tokens(span):
            if (page, tok) in HISTORICAL or tok in found:
                continue
            if '/' in tok and tok.split('/')[0] in TOP:
                if not glob.glob(os.path.join(REPO, tok)):
                    found[tok] = 'no such file or folder'
            elif '/' not in tok and tok.endswith(('.py', '.md')) and '*' not in tok:
                if tok not in basenames:
                    found[tok] = 'no file of that name in the repository'
            elif tok.split('.')[0] in PACKAGES and '.' in tok and not tok.endswith(FILE_EXT) and '/' not in tok:
                why = _module_problem(tok)      # also every `python -m pkg.module` of the page
                if why:
                    found[tok] = why
    return found


@pytest.mark.parametrize('page', DOCS)
def test_docs_name_only_what_exists(page):
    text = open(os.path.join(REPO, page), encoding='utf-8').read()
    problems = _problems(page, text, _all_basenames())
    assert not problems, f'{page}:\n  ' + '\n  '.join(f'`{k}`: {v}' for k, v in sorted(problems.items()))


def test_the_checker_catches_stale_names():
    # The checks above would pass vacuously if the parsing found nothing: a page with known-bad names fails them.
    text = ('Code: `training/networks.py`, `sampling/dpmot.py`, `sampling.dpmot.no_such_function`, `nowhere.py`.\n'
            '```bash\npython benchmarks/toy2d.py --x=1\npython -m benchmarks.no_such_benchmark\n'
            'python -m benchmarks.toy2d --outdir=runs/x\n```\n'
            '```python\nfrom sampling import dpmot, generation\nfrom metrics.distances import mmd2\nimport training.eot\n```\n'
            'In prose: training/toy.py and data/toy.py, [a link](docs/nothing.md), [b](docs/dpmot.md), '
            'https://github.com/NVlabs/edm/blob/main/training/networks.py.\n')
    problems = _problems('test.md', text, _all_basenames())
    assert sorted(problems) == ['benchmarks.no_such_benchmark', 'benchmarks/toy2d.py', 'docs/nothing.md',
                                'nowhere.py', 'sampling.dpmot.no_such_function', 'sampling.generation',
                                'training.eot', 'training/networks.py', 'training/toy.py'], problems
    assert 'python -m benchmarks.toy2d' in problems['benchmarks/toy2d.py']
