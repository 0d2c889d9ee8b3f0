"""The layering of docs/architecture.md, checked on every module's imports (function-level ones included)."""

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {'train', 'generate', 'potential', 'fid', 'dataset_tool', 'demo', 'dev'}
# Package -> the project packages it may import (docs/architecture.md, "Layers").
ALLOWED = {
    'dnnlib': set(),
    'torch_utils': {'dnnlib'},
    'data': {'torch_utils', 'dnnlib'},
    'transport': {'torch_utils', 'dnnlib'},
    'models': {'torch_utils', 'dnnlib'},  # dnnlib only inside the network factories, when called
    'metrics': {'torch_utils', 'dnnlib'},
    'sampling': {'models', 'transport', 'data', 'torch_utils', 'dnnlib'},
    'training': {'sampling', 'metrics', 'models', 'transport', 'data', 'torch_utils', 'dnnlib'},
}


def _modules():
    """{module name: path} of every project module outside tests/."""
    out = {}
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('tests', '__pycache__', 'node_modules')]
        for n in names:
            if n.endswith('.py'):
                rel = os.path.relpath(os.path.join(root, n), REPO)[:-3].replace(os.sep, '.')
                out[rel[:-9] if rel.endswith('.__init__') else rel] = os.path.join(root, n)
    return out


def _imports(path, modules):
    """Project modules imported anywhere in the file at `path`."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
        for name in names:
            parts = name.split('.')
            for i in range(len(parts), 0, -1):
                if '.'.join(parts[:i]) in modules:
                    found.add('.'.join(parts[:i]))
                    break
    return found


def _graph():
    modules = _modules()
    return modules, {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_packages_import_only_the_layers_below_them():
    modules, graph = _graph()
    bad = []
    for m, deps in graph.items():
        pkg = m.split('.')[0]
        if pkg not in ALLOWED:
            continue
        for d in deps:
            dpkg = d.split('.')[0]
            if dpkg != pkg and dpkg not in ALLOWED[pkg]:
                bad.append(f'{m} imports {d}')
    assert not bad, 'imports against docs/architecture.md: ' + '; '.join(sorted(bad))


def test_no_import_cycles():
    _, graph = _graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 'open'
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 'open':
                cycles.append(' -> '.join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 'done'

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, 'import cycles: ' + '; '.join(cycles)


def test_nothing_edits_sys_path_or_cites_a_missing_document():
    modules, _ = _graph()
    edits = [m for m, p in modules.items() if re.search(r'sys\.path\.(insert|append)', open(p, encoding='utf-8').read())]
    assert not edits, f'sys.path edited in {edits}: run scripts from the root and benchmarks with python -m'
    name = 'ARCHITECTURE' + '.md' # Spelt in two parts, so that this file does not cite it either.
    cites = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d != '__pycache__' and d != 'fixtures']
        for n in names:
            if n.endswith(('.py', '.md', '.txt')):
                if name in open(os.path.join(root, n), encoding='utf-8', errors='ignore').read():
                    cites.append(os.path.relpath(os.path.join(root, n), REPO))
    assert not cites, f'{cites} cite {name}, which this repository does not hold (docs/architecture.md)'


def test_no_function_over_80_lines():
    """Short functions (docs/architecture.md): none over 80 lines, docstring included, outside tests/."""
    long = []
    for name, path in sorted(_modules().items()):
        for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f'{name}.{node.name}: {length} lines')
    assert not long, long


def test_no_module_defines_a_top_level_name_twice():
    """A second `def test_x` silently replaces the first (pytest then never runs it): merges left three such copies."""
    twice = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('__pycache__', 'node_modules')]
        for n in (n for n in names if n.endswith('.py')):
            path = os.path.join(root, n)
            defs = [node.name for node in ast.parse(open(path, encoding='utf-8').read()).body
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
            twice += [f'{os.path.relpath(path, REPO)}: {name}' for name in sorted(set(defs)) if defs.count(name) > 1]
    assert not twice, twice
