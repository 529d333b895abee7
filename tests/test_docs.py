"""The documentation cannot drift from the code: the site builds in strict mode (no
broken link or anchor), and every example that runs locally is run.

Convention (docs/development.md): a shell example that runs locally is written
with a `$ ` prompt and the output it prints; `>>> ` marks a Python example. Both
are run by byexample, page by page, each page in a fresh folder (its examples in
order, in one shell session), and their output compared with the page, `<...>`
standing for text that changes between runs (times, run ids). Examples that need
Google Cloud or other machines are written without a prompt and are not run.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
PROMPT = re.compile(r'^(\$|>>>) ', re.M)


def _with_examples() -> list[pathlib.Path]:
    return [p for p in PAGES if PROMPT.search(p.read_text())]


def _tool(name: str) -> str:
    """An executable of this environment (the venv the tests run in)."""
    exe = pathlib.Path(sys.executable).parent / name
    if not exe.exists():
        pytest.fail(f'{name} is not installed next to {sys.executable}: the `docs`/`test` '
                    'extras are missing (scripts/ensure_venv.sh installs them)')
    return str(exe)


def test_the_site_builds_in_strict_mode(tmp_path):
    proc = subprocess.run([_tool('mkdocs'), 'build', '--strict', '--site-dir',
                           str(tmp_path / 'site')], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING='1'), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / 'site' / 'index.html').exists()


def test_every_page_is_in_the_nav():
    nav = (ROOT / 'mkdocs.yml').read_text()
    missing = [p.name for p in PAGES[1:] if f' {p.name}' not in nav]
    assert not missing, f'pages not in mkdocs.yml nav: {missing}'


@pytest.mark.parametrize('page', _with_examples(), ids=lambda p: p.name)
def test_examples_run_and_print_what_the_page_shows(page, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT),
               PATH=f'{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ["PATH"]}')
    proc = subprocess.run(
        [_tool('byexample'), '--language', 'shell,python', '--timeout', '600',
         '--options', '+norm-ws', '--no-enhance-diff', str(page)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, f'{page.name}: its examples do not run as shown:\n' \
        + proc.stdout[-6000:] + proc.stderr[-2000:]
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_the_package_picture_in_the_architecture_page_is_the_code_s():
    import importlib.util
    spec = importlib.util.spec_from_file_location('architecture',
                                                  ROOT / 'scripts' / 'architecture.py')
    architecture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(architecture)
    assert architecture.current() == architecture.section(), \
        'docs/architecture.md is stale: run python scripts/architecture.py --write'
    assert '0 running up or sideways' in architecture.section()
