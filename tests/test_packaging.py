"""The worker package: setup.py built into an sdist the way Beam stages it for
Dataflow (--setup_file), installed into a fresh virtual environment that has only
what the SDK container has (Beam and its dependencies), then imported and run.

A module or data file missing from the package, or an import the package does not
declare, is caught here instead of on a Dataflow worker."""
from __future__ import annotations

import ast
import email
import importlib.metadata as md
import json
import os
import pathlib
import re
import subprocess
import sys
import sysconfig
import tarfile

import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.transforms.environments import python_sdk_dependencies

from tests.conftest import ROOT, write_ratings

PACKAGES = ('pipeline', 'wals_core')
STAGED_NAME = 'workflow.tar.gz'     # what Dataflow workers pip install


def source_files() -> set[str]:
    """Every file of the packages in the source tree ('pipeline/cli/train.py', ...)."""
    out = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob('*'):
            if path.is_file() and '__pycache__' not in path.parts and path.suffix != '.pyc':
                out.add(path.relative_to(ROOT).as_posix())
    return out


@pytest.fixture(scope='module')
def sdist(tmp_path_factory) -> pathlib.Path:
    """The package Beam stages for --setup_file, built by Beam's own stager."""
    tmp = tmp_path_factory.mktemp('staged')
    artifacts = python_sdk_dependencies(
        PipelineOptions([f'--setup_file={ROOT / "setup.py"}']), tmp_dir=str(tmp))
    for artifact in artifacts:
        role = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(
            artifact.role_payload)
        if role.staged_name == STAGED_NAME:
            return pathlib.Path(beam_runner_api_pb2.ArtifactFilePayload.FromString(
                artifact.type_payload).path)
    raise AssertionError(f'Beam staged no {STAGED_NAME}: {artifacts}')


def _sdist_members(path: pathlib.Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name.split('/', 1)[1]: tar.extractfile(m).read()
                for m in tar.getmembers() if m.isfile() and '/' in m.name}


def _name(requirement: str) -> str:
    return re.split(r'[ ;<>=!~\[(]', requirement.strip(), maxsplit=1)[0].lower()


def _requirements(members: dict[str, bytes]) -> tuple[set[str], set[str]]:
    """(run-time requirement names, names required by an extra) of the staged sdist,
    from PKG-INFO's Requires-Dist or, for setuptools versions that leave them out of
    an sdist's PKG-INFO, from its egg-info requires.txt."""
    runtime, extras = set(), set()
    reqs = email.message_from_bytes(members['PKG-INFO']).get_all('Requires-Dist') or []
    for req in reqs:
        (extras if 'extra ==' in req else runtime).add(_name(req))
    if not reqs:
        text = next(v for k, v in members.items() if k.endswith('.egg-info/requires.txt'))
        section = None
        for line in text.decode().splitlines():
            if line.startswith('['):
                section = line
            elif line.strip():
                (extras if section else runtime).add(_name(line))
    return runtime, extras


def test_the_staged_package_holds_every_file_and_declares_the_worker_needs(sdist):
    members = _sdist_members(sdist)
    missing = source_files() - set(members)
    assert not missing, f'not in the staged package (add them to setup.py): {missing}'
    runtime, extras = _requirements(members)
    # The SDK container brings Beam itself; TensorFlow is not needed by any worker step.
    assert not {'apache-beam', 'tensorflow'} & runtime
    assert 'apache-beam' in extras


# Imported without being an install requirement, and why that is right.
NOT_REQUIRED = {
    'apache-beam': 'the SDK container brings it; declared in the local extra',
    'protobuf': "Beam's runner API objects are protobuf messages (dataflow.py turns "
                "one into JSON); the version is the one Beam pins",
    'google-cloud-storage': "Beam's gcp extra brings it (its gs:// filesystem); the "
                            "launcher writes LATEST with its generation precondition",
    'google-api-core': "comes with google-cloud-storage (the precondition's exception)",
}


def _dist(name: str) -> str:
    return name.lower().replace('_', '-')


def _imports() -> dict[str, list[str]]:
    """Every module imported by the packages' code (absolute imports, also those
    inside functions) -> the files importing it."""
    out: dict[str, list[str]] = {}
    for rel in sorted(source_files()):
        if not rel.endswith('.py'):
            continue
        for node in ast.walk(ast.parse((ROOT / rel).read_text(), rel)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                out.setdefault(name, []).append(rel)
    return out


def _providers(module: str) -> set[str]:
    """The installed distributions that provide an imported module (for a namespace
    package such as google.*, the ones holding its subpackage)."""
    parts = module.split('.')
    dists = {_dist(d) for d in md.packages_distributions().get(parts[0], [])}
    if len(dists) <= 1 or len(parts) == 1:
        return dists
    sub = '/'.join(parts[:2])
    return {d for d in dists
            if any(str(f).startswith(f'{sub}/') or str(f) == f'{sub}.py'
                   for f in md.distribution(d).files or [])}


def _third_party_imports() -> dict[str, set[str]]:
    """Third-party modules imported by pipeline/ and wals_core/ -> their providers."""
    own = set(sys.stdlib_module_names) | set(PACKAGES) | {'__future__'}
    return {m: _providers(m) for m in _imports() if m.split('.')[0] not in own}


def test_every_third_party_import_is_declared(sdist):
    """An import that arrives only through another package (as pyarrow did, through
    Beam) breaks when that package changes its own requirements."""
    runtime, extras = _requirements(_sdist_members(sdist))
    imports = _third_party_imports()
    assert 'numpy' in imports and 'pyarrow.csv' in imports      # the scan sees them
    unknown = sorted(m for m, p in imports.items() if not p)
    assert not unknown, f'imported but not installed here: {unknown}'
    files = _imports()
    undeclared = {m: sorted(p) for m, p in imports.items()
                  if not p & (runtime | set(NOT_REQUIRED)) and not _launcher_only(m, files[m])}
    assert not undeclared, f'imports whose distribution setup.py does not declare: {undeclared}'
    assert {_dist(m) for m in set().union(*LAUNCHER_ONLY.values())} <= extras


# Imports of code that never runs on a training worker, provided by a setup.py extra.
LAUNCHER_ONLY = {'pipeline/tuning/search.py': {'optuna'}, 'pipeline/serving/export.py': {'tensorflow'},
                 'pipeline/runners/dask_runner.py': {'dask', 'distributed'},
                 'pipeline/runners/factory.py': {'dask', 'distributed'},   # only to say the extra is missing
                 # the HTTP server (python -m pipeline.serve): the serve extra
                 'pipeline/serving/app.py': {'fastapi', 'starlette', 'pydantic',
                                             'prometheus_client'},
                 'pipeline/serving/server.py': {'uvicorn'}}


def _launcher_only(module: str, importers: list[str]) -> bool:
    return all(module.split('.')[0] in LAUNCHER_ONLY.get(f, ()) for f in importers)


def test_every_declared_dependency_is_imported(sdist):
    """A requirement no code imports is dead weight on every worker."""
    runtime, _ = _requirements(_sdist_members(sdist))
    imported = set().union(*_third_party_imports().values())
    unused = sorted(runtime - imported)
    assert not unused, f'declared in install_requires but imported by no module: {unused}'


def _container_layer(tmp: pathlib.Path) -> pathlib.Path:
    """A folder of links to this environment's installed packages except this
    project's own: Beam with its dependencies, as in the SDK container."""
    site = pathlib.Path(sysconfig.get_paths()['purelib'])
    layer = tmp / 'container-site-packages'
    layer.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(('wals_beam', '__editable__', 'pipeline', 'wals_core')) \
                or name.endswith('.pth') or name == '__pycache__':
            continue
        (layer / entry.name).symlink_to(entry)
    return layer


def test_the_staged_package_installs_imports_and_trains_in_a_fresh_environment(
        sdist, tmp_path):
    venv = tmp_path / 'fresh'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True,
                   timeout=120)
    python = venv / 'bin' / 'python'
    fresh_site = pathlib.Path(subprocess.run(
        [str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
        check=True, capture_output=True, text=True).stdout.strip())
    (fresh_site / '_sdk_container.pth').write_text(f'{_container_layer(tmp_path)}\n')
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME')}
    work = tmp_path / 'work'          # not the checkout: nothing importable by accident
    work.mkdir()

    install = subprocess.run(
        [sys.executable, '-m', 'pip', '--python', str(python), 'install', '--no-index',
         '--no-build-isolation', '--disable-pip-version-check', str(sdist)],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr

    check = ('import importlib, json, pkgutil, pipeline, wals_core\n'
             'mods = [m.name for p in (pipeline, wals_core)\n'
             '        for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]\n'
             'for m in mods: importlib.import_module(m)\n'
             'print(json.dumps({"files": [pipeline.__file__, wals_core.__file__], '
             '"modules": mods}))\n')
    proc = subprocess.run([str(python), '-c', check], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for path in found['files']:
        assert pathlib.Path(path).is_relative_to(fresh_site), path
    assert 'pipeline.cli.train' in found['modules'] and 'wals_core.solve' in found['modules']

    ratings = write_ratings(work / 'ratings.tsv', [u % 40 + 1 for u in range(600)],
                            [(u * 7) % 30 + 1 for u in range(600)],
                            [u % 5 + 1 for u in range(600)])
    train = subprocess.run(
        [str(python), '-m', 'pipeline.train', '--input', str(ratings), '--output',
         str(work / 'out'), '--num_iters', '2', '--latent_factors', '3'],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stdout + train.stderr
    for name in ('user', 'item', 'row', 'col'):
        assert (work / 'out' / 'model' / f'{name}.npy').stat().st_size > 0
    metrics = json.loads((work / 'out' / 'metrics.json').read_text())
    assert metrics['users'] == 40 and metrics['train_rmse'] is not None
