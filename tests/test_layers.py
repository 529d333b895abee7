"""The package layers of pipeline/ (pipeline/__init__.py): a package imports only
from the layers below it and from itself, wals_core imports neither Beam nor
pipeline, and every package says what it owns in its docstring."""
from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

from tests.conftest import ROOT

# package -> the packages it may import (besides itself). 'top' is pipeline/*.py.
ALLOWED = {
    'top': {'wals_core'},
    'io': {'top', 'wals_core'},
    'store': {'top', 'wals_core'},
    'runners': {'top', 'wals_core'},
    'training': {'io', 'store', 'runners', 'top', 'wals_core'},
    'tuning': {'io', 'store', 'runners', 'top', 'wals_core'},
    'serving': {'io', 'store', 'runners', 'top', 'wals_core'},
    'cli': {'io', 'store', 'runners', 'training', 'tuning', 'serving', 'top', 'wals_core'},
    'wals_core': {'wals_core'},
}
# The `python -m pipeline.<name>` aliases: each only hands over to cli/<name>.py.
ALIASES = {'train', 'recommend', 'tune', 'export', 'dataflow', 'synth', 'serve'}


def package_of(module: str) -> str | None:
    """'pipeline.training.graph' -> 'training'; 'pipeline.options' -> 'top'."""
    parts = module.split('.')
    if parts[0] == 'wals_core':
        return 'wals_core'
    if parts[0] != 'pipeline':
        return None
    if len(parts) == 1:
        return 'top'
    if (ROOT / 'pipeline' / parts[1]).is_dir():
        return parts[1]
    return 'cli' if parts[1] in ALIASES else 'top'


def imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, functions and try blocks included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == 'pipeline':   # from pipeline import x: x is the module
                out += [(node.lineno, f'pipeline.{a.name}') for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def sources(folder: str) -> list[pathlib.Path]:
    return sorted((ROOT / folder).rglob('*.py'))


def test_every_import_runs_down_the_layers():
    wrong = []
    for path in sources('pipeline') + sources('wals_core'):
        rel = path.relative_to(ROOT)
        module = '.'.join(rel.with_suffix('').parts).removesuffix('.__init__')
        here = package_of(module)
        for line, target in imports(path):
            there = package_of(target)
            if there is None or there == here:
                continue
            if there not in ALLOWED[here]:
                wrong.append(f'{rel}:{line}: {here} imports {target} ({there})')
    assert not wrong, 'imports that run up the layers:\n' + '\n'.join(wrong)


def test_wals_core_imports_no_beam():
    found = [f'{p.relative_to(ROOT)}:{line}: {m}' for p in sources('wals_core')
             for line, m in imports(p) if m.split('.')[0] in ('apache_beam', 'pipeline')]
    assert not found, found


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rules above can fail: an io module importing training is reported."""
    bad = tmp_path / 'bad.py'
    bad.write_text('from pipeline.training.graph import build_pipeline\n')
    (line, target), = imports(bad)
    assert package_of(target) == 'training' and 'training' not in ALLOWED['io']


@pytest.mark.parametrize('package', sorted(k for k in ALLOWED if k not in ('top', 'wals_core')))
def test_every_package_says_what_it_owns_and_may_import(package):
    doc = importlib.import_module(f'pipeline.{package}').__doc__ or ''
    assert 'May import' in doc and len(doc.split()) > 20, doc


@pytest.mark.parametrize('alias', sorted(ALIASES))
def test_the_python_m_aliases_only_hand_over(alias):
    tree = ast.parse((ROOT / 'pipeline' / f'{alias}.py').read_text())
    froms = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert froms == [f'pipeline.cli.{alias}']
