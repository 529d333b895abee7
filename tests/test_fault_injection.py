"""Fault injection: the publish and re-run promises under SIGKILL, full disks, gs://
errors and concurrent publishers, with real CLI processes (tests/fault_runner.py
installs the faults in the child only; pipeline/faults.py lists the points).

The matrix (fault x command x point x local/gs://) runs once per module, several
cells side by side; each cell is then reported as its own test, and
docs/reliability.md's table is generated from the results (WALS_UPDATE_FAULT_DOCS=1
rewrites it; otherwise the test checks the table there matches what ran).

The promise checked after every fault:
- the previous output (or the previous LATEST) still loads and verifies, or the new
  one does, complete (readers follow an OUTPUT.old-<run id> copy while OUTPUT has no
  _SUCCESS); never a partial one;
- a failure says so in one `error:` line, with a non-zero exit and no traceback;
- the next run of the same command, unchanged (with --overwrite once an output
  exists), succeeds without a hand fix and leaves no leftovers: no .tmp-, .old- or
  .lease- beside the output, no lease or staging folder in a model root, every
  version complete.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import pathlib
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pytest
from apache_beam.io.filesystems import FileSystems

from pipeline import faults
from pipeline.store import leases
from pipeline.store.model_files import load_model_files, resolve_model_path
from pipeline.store.model_root import (lease_path, list_versions, promote, read_latest,
                                       version_path)
from pipeline.store.publish import SUCCESS, list_files, new_run_id, read_manifest
from tests.conftest import ROOT
from tests.gcs_fault_proxy import FaultProxy, Rule
from tests.gcs_support import gcs_emulator

BUCKET = 'wals-faults'
SMALL = ['--num_iters', '1', '--latent_factors', '3']
WORKERS = 3                 # cells run side by side (each is a few CLI processes)
DOC = ROOT / 'docs' / 'reliability.md'
BEGIN, END = '<!-- fault-matrix:begin -->', '<!-- fault-matrix:end -->'

# What each command reaches, in order (a kill cell per point). "new": a first
# publish; "overwrite": replacing an earlier output; "root": a model root with one
# version and LATEST, --keep_versions 1 (so the promotion prunes the old version).
TARGETS = {
    ('local', 'train-new'): ('lease-taken', 'staged', 'new-moved-in', 'lease-released'),
    ('local', 'train-overwrite'): ('lease-taken', 'staged', 'old-set-aside', 'new-moved-in',
                                   'old-removed', 'lease-released'),
    ('local', 'train-root'): ('lease-taken', 'version-held', 'staged', 'new-moved-in',
                              'latest-temp-written', 'latest-written', 'condemned',
                              'pruned', 'lease-released'),
    ('local', 'recommend'): ('version-held', 'lease-taken', 'staged', 'old-set-aside',
                             'new-moved-in', 'old-removed', 'lease-released'),
    ('local', 'export'): ('version-held', 'lease-taken', 'staged', 'new-moved-in',
                          'lease-released'),
    ('local', 'tune'): ('lease-taken', 'staged', 'old-set-aside', 'new-moved-in',
                        'old-removed', 'lease-released'),
    ('gs', 'train-new'): ('lease-taken', 'staged', 'new-files-moved', 'new-moved-in',
                          'lease-released'),
    ('gs', 'train-overwrite'): ('lease-taken', 'staged', 'old-set-aside', 'old-untrusted',
                                'new-files-moved', 'new-moved-in', 'old-removed',
                                'lease-released'),
    ('gs', 'train-root'): ('lease-taken', 'version-held', 'staged', 'new-files-moved',
                           'new-moved-in', 'latest-written', 'condemned', 'pruned',
                           'lease-released'),
    # recommend, export and tune publish on gs:// through the same code as train
    # --overwrite (publish._replace_copying): their commands are covered locally.
}
# An injected error (ENOSPC) in the step after a point: the points after which a
# publish step writes or renames (after the last of them the output is published
# and only cleanup is left).
ERROR_POINTS = {
    ('local', 'train-overwrite'): ('lease-taken', 'staged', 'old-set-aside'),
    ('local', 'train-root'): ('staged', 'new-moved-in', 'latest-temp-written',
                              'condemned'),
    ('gs', 'train-overwrite'): ('staged', 'old-set-aside', 'old-untrusted',
                                'new-files-moved'),
    ('gs', 'train-root'): ('staged', 'new-files-moved', 'new-moved-in', 'condemned'),
}
# RLIMIT_FSIZE on the child (SIGXFSZ ignored, so writes fail with EFBIG): the limit
# that stops each command while it writes the model, or the report/results. Set
# from the start; tune's from its lease-taken point on (its lease, which holds the
# command line, is as large as its results).
FSIZE_AFTER_LEASE = {'tune'}
FSIZE = {
    ('train-new', 'model'): 1000, ('train-new', 'report'): 12000,
    ('train-overwrite', 'model'): 1000, ('train-overwrite', 'report'): 12000,
    ('train-root', 'model'): 1000, ('train-root', 'report'): 12000,
    ('recommend', 'results'): 5000, ('tune', 'results'): 500,
    ('export', 'results'): 50000,
}


# gs:// faults through tests/gcs_fault_proxy.py, armed when the run reaches a point
# (it pauses there while the test arms the proxy): what the proxy does from then on.
PROXY_RULES = {
    'gs-503-once': lambda: [Rule('status', status=503, times=1)],       # next write: 503
    'gs-403': lambda: [Rule('status', status=403, times=None)],         # every write: 403
    'gs-cut-upload': lambda: [Rule('cut', methods=('POST', 'PUT'), path=r'^/upload/')],
    # the object store's rename is a batch of copies, then a batch of deletes: the
    # deletes fail (train-root at staged: the first batch is the copy; overwrite at
    # old-untrusted: the old files' delete batch comes first)
    'gs-rename-halfway': lambda: [Rule('status', path=r'^/batch/', status=403, times=None,
                                       skip=1)],
    'gs-rename-halfway-2': lambda: [Rule('status', path=r'^/batch/', status=403,
                                         times=None, skip=2)],
    # past the client's 60 s read timeout, once: the client retries
    'gs-timeout': lambda: [Rule('delay', path=r'^/batch/', seconds=65, times=1)],
}
PROXY_CELLS = (
    [('gs-503-once', 'train-overwrite', p) for p in ('staged', 'old-set-aside',
                                                      'old-untrusted', 'new-files-moved')] +
    [('gs-503-once', 'train-root', p) for p in ('staged', 'new-moved-in')] +
    [('gs-403', 'train-overwrite', p) for p in ('staged', 'old-set-aside', 'old-untrusted',
                                                 'new-files-moved')] +
    [('gs-403', 'train-root', p) for p in ('staged', 'new-moved-in')] +
    [('gs-cut-upload', 'train-overwrite', 'lease-taken'),
     ('gs-cut-upload', 'train-root', 'new-moved-in'),
     ('gs-rename-halfway', 'train-root', 'staged'),
     ('gs-rename-halfway-2', 'train-overwrite', 'old-untrusted'),
     ('gs-timeout', 'train-overwrite', 'old-untrusted')])


@dataclass(frozen=True)
class Cell:
    fault: str      # kill | enospc | efbig | kill-twice | race
    backend: str    # local | gs
    target: str     # train-new, train-overwrite, train-root, recommend, export, tune
    point: str      # the fault point (efbig: what was being written)

    @property
    def id(self) -> str:
        return f'{self.fault}-{self.backend}-{self.target}-{self.point}'


def _cells() -> list[Cell]:
    out = [Cell('kill', b, t, p) for (b, t), points in TARGETS.items() for p in points]
    out += [Cell('enospc', b, t, p) for (b, t), points in ERROR_POINTS.items()
            for p in points]
    out += [Cell('efbig', 'local', t, what) for (t, what) in FSIZE]
    # 'reclaimed' needs leftovers: a first run killed, then the next killed right
    # after reclaiming them. 'latest-kept' and 'restored' need a race, staged with
    # pauses (fault_runner's "pause").
    out += [Cell('kill-twice', b, t, 'reclaimed') for b in ('local', 'gs')
            for t in ('train-overwrite', 'train-root')]
    out += [Cell('race', b, 'train-root', p) for b in ('local', 'gs')
            for p in ('latest-kept', 'restored')]
    out += [Cell(f, 'gs', t, p) for f, t, p in PROXY_CELLS]
    # Publishers side by side on one root, a reader loading LATEST in a loop.
    out += [Cell('concurrent', b, 'train-root', f'{n}-publishers+reader')
            for b in ('local', 'gs') for n in (3,)]
    return out


CELLS = _cells()


# ---------------------------------------------------------------- running the CLI

def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(extra or {}))
    env.pop('WALS_LEASE_TIMEOUT', None)
    return env


def _fsize(limit: int):
    def pre():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@dataclass
class Run:
    code: int
    out: str
    err: str
    points: list[str] = field(default_factory=list)


_RECORDS = threading.Lock()
_RECORD_N = [0]


class Harness:
    """Starts `wals` children through tests/fault_runner.py and records every point
    they reach (REACHED: the coverage check)."""

    def __init__(self, tmp: pathlib.Path, env: dict, reached: set[str] | None = None):
        self.tmp, self.env = tmp, env
        self.reached: set[str] = reached if reached is not None else set()
        self._n = 0
        self._lock = threading.Lock()

    def _record(self) -> pathlib.Path:
        with _RECORDS:
            _RECORD_N[0] += 1
            return self.tmp / f'points-{_RECORD_N[0]}.txt'

    def start(self, args: list, plan: list[dict] | None = None, fsize: int | None = None,
              env: dict | None = None) -> tuple[subprocess.Popen, pathlib.Path]:
        record = self._record()
        spec = json.dumps({'record': str(record), 'faults': plan or []})
        proc = subprocess.Popen(
            [sys.executable, '-m', 'tests.fault_runner', spec, '--', *map(str, args)],
            cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, preexec_fn=_fsize(fsize) if fsize else None)
        return proc, record

    def finish(self, proc: subprocess.Popen, record: pathlib.Path) -> Run:
        out, err = proc.communicate(timeout=600)
        points = record.read_text().split() if record.exists() else []
        with self._lock:
            self.reached |= set(points)
        return Run(proc.returncode, out, err, points)

    def run(self, args: list, plan: list[dict] | None = None, fsize: int | None = None,
            env: dict | None = None) -> Run:
        return self.finish(*self.start(args, plan, fsize, env))


def _ok(run: Run, what: str) -> None:
    assert run.code == 0, f'{what}: exit {run.code}\n{run.err[-3000:]}'


def _killed_at(run: Run, point: str) -> None:
    assert run.code == -signal.SIGKILL, \
        f'not killed at {point} (exit {run.code}; reached {run.points})\n{run.err[-2000:]}'
    assert run.points and run.points[-1] == point, run.points


def _one_clear_error(run: Run) -> None:
    """A non-zero exit, one `error:` line last, no traceback of ours."""
    assert run.code not in (0, 70) and run.code > 0, f'exit {run.code}\n{run.err[-3000:]}'
    lines = [ln for ln in run.err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith('error:') or ': error:' in ln]
    assert len(errors) == 1, run.err[-3000:]
    assert 'internal error' not in run.err, run.err[-3000:]


# ---------------------------------------------------------------- files and checks

def _read(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


def verify(folder: str) -> dict:
    """The manifest of a published folder (any kind) after checking every file it
    lists: present, same size, same SHA-256."""
    manifest = read_manifest(folder)
    for name, want in manifest['files'].items():
        data = _read(f'{folder.rstrip("/")}/{name}')
        assert len(data) == want['bytes'], f'{folder}/{name}: size'
        assert hashlib.sha256(data).hexdigest() == want['sha256'], f'{folder}/{name}: bytes'
    return manifest


def readable(out: str) -> dict:
    """What a reader of `out` gets (its LATEST for a root; an output being replaced:
    its set-aside copy), verified: the manifest."""
    return verify(resolve_model_path(out))


def _copy(src: str, dest: str) -> None:
    for f in list_files(src):
        with FileSystems.create(f'{dest.rstrip("/")}/{f}') as out:
            out.write(_read(f'{src.rstrip("/")}/{f}'))


def _names(path: str) -> list[str]:
    """Every file under path's parent whose name starts with path's last part
    (the output and what lies beside it), relative to that parent."""
    parent, _, name = path.rstrip('/').rpartition('/')
    return [f for f in list_files(parent) if f.split('/', 1)[0].startswith(name)]


LEFTOVER = re.compile(r'\.(tmp|old|lease)-\d{8}T\d{6}-[0-9a-f]{8}')


def no_leftovers(out: str) -> None:
    left = sorted({f.split('/', 1)[0] for f in _names(out) if LEFTOVER.search(f)})
    assert left == [], f'leftovers beside {out}: {left}'


def clean_root(root: str) -> None:
    files = list_files(root)
    assert not [f for f in files if f.startswith('leases/') and f.endswith('.json')], files
    assert not [f for f in files if '.tmp-' in f or '.LATEST.tmp' in f], files
    for name in list_versions(root):
        verify(version_path(root, name))
    verify(resolve_model_path(root))


# ---------------------------------------------------------------- the world a cell runs in

class World:
    """Inputs and published outputs made once; each cell copies what it needs to a
    fresh place (local folder or gs:// prefix)."""

    def __init__(self, tmp: pathlib.Path, harness: Harness, gs_harness: Harness | None,
                 emulator_host: str = ''):
        self.tmp, self.emulator_host = tmp, emulator_host
        self.h = {'local': harness, 'gs': gs_harness}
        self.ratings = tmp / 'ratings.tsv'
        rng = np.random.default_rng(19)
        pairs = rng.choice(40 * 30, size=400, replace=False)
        stars = rng.integers(1, 6, size=400)
        self.ratings.write_text(''.join(f'{p // 30 + 1}\t{p % 30 + 1}\t{s}\n'
                                        for p, s in zip(pairs, stars)))
        base = tmp / 'base'
        self.model = str(base / 'model')
        self.root = str(base / 'root')
        self.recs = str(base / 'recs')
        self.tune = str(base / 'tune')
        self.export = str(base / 'export')
        h = harness
        _ok(h.run(['train', '--input', self.ratings, '--output', self.model, *SMALL]), 'base')
        _ok(h.run(['train', '--input', self.ratings, '--model_root', self.root, *SMALL]),
            'base root')
        _ok(h.run(['recommend', '--model', self.root, '--output', self.recs]), 'base recs')
        _ok(h.run(['tune', '--input', self.ratings, '--output', self.tune, '--trials', '2',
                   '--parallel', '1', '--num_iters', '1']), 'base tune')
        _ok(h.run(['export', '--model', self.root, '--output', self.export]), 'base export')
        self.n = 0
        self._lock = threading.Lock()

    def place(self, backend: str, name: str) -> str:
        with self._lock:
            self.n += 1
            n = self.n
        if backend == 'local':
            folder = self.tmp / f'c{n:03d}-{name}'
            folder.mkdir()
            return str(folder)
        return f'gs://{BUCKET}/c{n:03d}-{name}'

    def copy_root(self, dest: str) -> str:
        """A copy of the base root: its one version and a LATEST naming it."""
        name = read_latest(self.root)['version']
        _copy(version_path(self.root, name), version_path(dest, name))
        promote(dest, name, {})
        return name

    def setup(self, cell: Cell, place: str) -> tuple[str, list, list]:
        """(output, the command, the recovery command) for a cell, with the
        earlier output it replaces (if any) in place."""
        t, r = cell.target, self.ratings
        if t == 'train-new':
            out = f'{place}/model'
            args = ['train', '--input', r, '--output', out, *SMALL]
            return out, args, args + ['--overwrite']
        if t == 'train-overwrite':
            out = f'{place}/model'
            _copy(self.model, out)
            args = ['train', '--input', r, '--output', out, '--overwrite', *SMALL]
            return out, args, args
        if t == 'train-root':
            out = f'{place}/root'
            self.copy_root(out)
            args = ['train', '--input', r, '--model_root', out, '--keep_versions', '1',
                    *SMALL]
            return out, args, args
        if t == 'recommend':
            model = f'{place}/root'
            self.copy_root(model)
            out = f'{place}/recs'
            _copy(self.recs, out)
            args = ['recommend', '--model', model, '--output', out, '--overwrite']
            return out, args, args
        if t == 'tune':
            out = f'{place}/tune'
            _copy(self.tune, out)
            args = ['tune', '--input', r, '--output', out, '--overwrite', '--trials', '2',
                    '--parallel', '1', '--num_iters', '1']
            return out, args, args
        if t == 'export':
            model = f'{place}/root'
            self.copy_root(model)
            out = f'{place}/export'
            _copy(self.export, out)
            args = ['export', '--model', model, '--output', out]
            return out, args, args
        raise ValueError(t)


# ---------------------------------------------------------------- the promise per kind

def snapshot(cell: Cell, out: str) -> dict | None:
    """What a reader gets before the fault (None: nothing yet)."""
    if cell.target == 'train-new':
        return None
    if cell.target == 'export':
        return {n: verify(f'{out}/{n}') for n in _versions_of(out)}
    return readable(out)


def _versions_of(base: str) -> list[str]:
    return sorted({f.split('/', 1)[0] for f in list_files(base)
                   if f.split('/', 1)[0].isdigit()}, key=int)


def check_after_fault(cell: Cell, out: str, before: dict | None, published: bool | None):
    """The old output, or the new complete one; never a partial one. published:
    whether the new one must (True), must not (False) or may (None) be there."""
    if cell.target == 'export':
        names = _versions_of(out)
        for n, manifest in (before or {}).items():
            assert verify(f'{out}/{n}') == manifest          # earlier versions intact
        complete = [n for n in names if FileSystems.exists(f'{out}/{n}/{SUCCESS}')]
        for n in complete:
            verify(f'{out}/{n}')
        if published is not None:
            assert (len(complete) > len(before or {})) == published, names
        return
    if cell.target == 'train-new':
        if published is False:
            assert not FileSystems.exists(f'{out}/{SUCCESS}')
            return
        if FileSystems.exists(f'{out}/{SUCCESS}'):
            verify(out)
            if cell.target.startswith('train'):
                load_model_files(out)
        else:
            assert published is None
        return
    now = readable(out)
    if cell.target.startswith('train'):
        load_model_files(out)                                # the reader's own checks
    if published is False:
        assert now == before
    elif published is True:
        assert now != before
    if cell.target == 'train-root':
        latest = read_latest(out)
        verify(version_path(out, latest['version']))


def recover(h: Harness, cell: Cell, out: str, args: list, before: dict | None) -> None:
    """The next run, unchanged, publishes and leaves nothing behind."""
    run = h.run(args)
    _ok(run, 'the next run')
    if cell.target == 'export':
        check_after_fault(cell, out, before, True)
    else:
        after = readable(out)
        assert after != before
    if cell.target == 'train-root':
        clean_root(out)
        # --keep_versions 1: only LATEST's version is left, the killed runs' gone too
        assert list_versions(out) == [read_latest(out)['version']]
    elif cell.target == 'recommend' or cell.target == 'export':
        no_leftovers(out)
        verify(resolve_model_path(f'{out.rsplit("/", 1)[0]}/root'))   # what it read
    else:
        no_leftovers(out)


PUBLISHED_AFTER = {'new-moved-in', 'old-removed', 'latest-temp-written', 'latest-written',
                   'latest-kept', 'condemned', 'restored', 'pruned', 'lease-released'}


def _published(cell: Cell, point: str) -> bool | None:
    if cell.target == 'train-root':
        # LATEST moves at latest-written (local: the temp file is not yet in place)
        return point in {'latest-written', 'condemned', 'pruned', 'lease-released'}
    return point in PUBLISHED_AFTER


# ---------------------------------------------------------------- the cells

def run_cell(world: World, cell: Cell) -> None:
    h = world.h[cell.backend]
    if h is None:
        raise RuntimeError('no GCS emulator')
    place = world.place(cell.backend, cell.target)
    out, args, again = world.setup(cell, place)
    before = snapshot(cell, out)
    if cell.fault == 'kill':
        run = h.run(args, [{'at': cell.point, 'do': 'kill'}])
        _killed_at(run, cell.point)
        check_after_fault(cell, out, before, _published(cell, cell.point))
    elif cell.fault == 'enospc':
        run = h.run(args, [{'at': cell.point, 'do': 'enospc'}])
        assert cell.point in run.points, run.points
        if cell.point == 'condemned':
            # promoted already: a prune that fails is a warning, the run succeeded
            _ok(run, 'a failed prune after the promotion')
            assert 'WARNING' in run.err and 'prune' in run.err.lower(), run.err[-2000:]
        else:
            _one_clear_error(run)
            assert 'no space left' in run.err.lower(), run.err[-2000:]
        check_after_fault(cell, out, before, cell.point == 'condemned')
    elif cell.fault == 'efbig':
        limit = FSIZE[(cell.target, cell.point)]
        if cell.target in FSIZE_AFTER_LEASE:
            run = h.run(args, [{'at': 'lease-taken', 'do': 'fsize', 'bytes': limit}])
        else:
            run = h.run(args, fsize=limit)
        _one_clear_error(run)
        assert 'file too large' in run.err, run.err[-2000:]
        assert 'staged' not in run.points and 'new-moved-in' not in run.points, run.points
        check_after_fault(cell, out, before, False)
        if cell.target != 'export':
            no_leftovers(out) if cell.target != 'train-root' else clean_root(out)
    elif cell.fault == 'kill-twice':
        first = 'old-set-aside' if cell.target == 'train-overwrite' else 'staged'
        _killed_at(h.run(args, [{'at': first, 'do': 'kill'}]), first)
        run = h.run(args, [{'at': 'reclaimed', 'do': 'kill'}])
        _killed_at(run, 'reclaimed')
        check_after_fault(cell, out, before, False)
    elif cell.fault == 'race':
        race(world, h, cell, out, args, before)
    elif cell.fault.startswith('gs-'):
        through_proxy(world, cell, out, args, before)
    elif cell.fault == 'concurrent':
        concurrent(world, h, cell, out, args)
        return
    else:
        raise ValueError(cell.fault)
    recover(h, cell, out, again, before)


def race(world: World, h: Harness, cell: Cell, root: str, args: list, before) -> None:
    sync = world.tmp / f'sync-{cell.id}'
    sync.mkdir()
    ready, go = sync / 'ready', sync / 'go'
    if cell.point == 'latest-kept':
        # A (older version) waits once published; B publishes and promotes a newer
        # one; A then finds LATEST newer, keeps it, and is killed.
        a, rec_a = h.start(args, [{'at': 'new-moved-in', 'do': 'pause', 'ready': str(ready),
                                   'until': str(go)},
                                  {'at': 'latest-kept', 'do': 'kill'}])
        _wait_for(ready, a)
        time.sleep(1.1)          # B's run id (and version) sorts after A's
        b = h.run(args)
        _ok(b, 'the newer run')
        latest_b = read_latest(root)
        go.touch()
        run = h.finish(a, rec_a)
        _killed_at(run, 'latest-kept')
        assert read_latest(root) == latest_b
        verify(version_path(root, latest_b['version']))
        return
    # restored: the pruner condemns the old version, a reader names it in its lease
    # meanwhile, the pruner sees it, writes the _SUCCESS back and is killed.
    old = read_latest(root)['version']
    a, rec_a = h.start(args, [{'at': 'condemned', 'do': 'pause', 'ready': str(ready),
                               'until': str(go)},
                              {'at': 'restored', 'do': 'kill'}])
    _wait_for(ready, a)
    reader = new_run_id()
    lease = leases.take(lease_path(root, reader), reader)
    try:
        lease.add_versions([old])
        go.touch()
        run = h.finish(a, rec_a)
        _killed_at(run, 'restored')
        verify(version_path(root, old))                    # given back, complete
        check_after_fault(cell, root, before, True)
    finally:
        lease.release()


def through_proxy(world: World, cell: Cell, out: str, args: list, before) -> None:
    """The run pauses at the cell's point, the proxy is armed, the run goes on: it
    either succeeds (a retry got through: the new output is complete) or fails
    with one clear error and the old output intact."""
    sync = world.tmp / f'sync-{cell.id}'
    sync.mkdir()
    ready, go = sync / 'ready', sync / 'go'
    with FaultProxy(world.emulator_host) as proxy:
        h = Harness(world.tmp, dict(world.h['gs'].env, STORAGE_EMULATOR_HOST=proxy.host),
                    world.h['gs'].reached)
        proc, record = h.start(args, [{'at': cell.point, 'do': 'pause', 'ready': str(ready),
                                       'until': str(go)}])
        _wait_for(ready, proc)
        proxy.arm(*PROXY_RULES[cell.fault]())
        go.touch()
        run = h.finish(proc, record)
        hits = proxy.faulted()
        proxy.disarm()
    assert hits > 0, f'the proxy faulted nothing after {cell.point}: {proxy.log[-5:]}'
    if run.code == 0:
        check_after_fault(cell, out, before, True)
    else:
        _one_clear_error(run)
        check_after_fault(cell, out, before, False)


def concurrent(world: World, h: Harness, cell: Cell, root: str, args: list) -> None:
    """n runs publish and promote into one root (--keep_versions 2) while a reader
    loads LATEST in a loop: the reader never fails and sees versions only move
    forward; every run publishes a complete version, which is there still unless
    a run pruned it; LATEST names the newest; nothing is left behind."""
    n = int(cell.point.split('-', 1)[0])
    sync = world.tmp / f'sync-{cell.id}'
    sync.mkdir()
    stop, report = sync / 'stop', sync / 'reader.json'
    base = read_latest(root)['version']
    reader = subprocess.Popen([sys.executable, '-m', 'tests.latest_reader', root, str(stop),
                               str(report)], cwd=ROOT, env=h.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        args = [a if a != '1' or args[i - 1] != '--keep_versions' else '2'
                for i, a in enumerate(args)]
        procs = [h.start([*args, '--seed', str(seed)]) for seed in range(n)]
        runs = [h.finish(*p) for p in procs]
    finally:
        stop.touch()
        reader.communicate(timeout=300)
    for run in runs:
        _ok(run, 'a concurrent run')
    seen = json.loads(report.read_text())
    assert seen['errors'] == [] and seen['loads'] > 0, seen
    assert seen['versions'] == sorted(seen['versions']), seen['versions']
    published = {re.search(r'Published the model to (\S+)', r.err).group(1).rstrip('/')
                 .rsplit('/', 1)[-1] for r in runs}
    pruned = set()
    for r in runs:
        for found in re.finditer(r'Pruned \d+ old version\(s\): ([^\n]+)', r.err):
            pruned |= {v.strip() for v in found.group(1).split(',')}
    assert len(published) == n
    left = set(list_versions(root))
    assert (published | {base}) - pruned <= left, (published, pruned, left)
    assert left <= published | {base}
    assert read_latest(root)['version'] == max(published)
    assert len(left) >= 2
    clean_root(root)


def _wait_for(path: pathlib.Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f'exited {proc.returncode} before pausing:\n'
                                 f'{proc.stderr.read()[-3000:]}')
        assert time.monotonic() < deadline, f'{path} never appeared'
        time.sleep(0.05)


# ---------------------------------------------------------------- the module's run

@pytest.fixture(scope='module')
def matrix(tmp_path_factory):
    """Runs every cell (WORKERS at a time); {cell id: (error or None, seconds)}."""
    tmp = tmp_path_factory.mktemp('faults')
    started = time.monotonic()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    results: dict[str, tuple[str | None, float]] = {}
    with gcs_emulator(tmp_path_factory.mktemp('gcs'), BUCKET) as emu:
        reached: set[str] = set()
        local = Harness(tmp, _env(), reached)
        gs = Harness(tmp, _env(emu.env()), reached)
        world = World(tmp, local, gs, emu.host)

        def one(cell: Cell) -> None:
            t0 = time.monotonic()
            try:
                run_cell(world, cell)
                results[cell.id] = (None, time.monotonic() - t0)
            except BaseException as e:   # noqa: BLE001 - reported by the cell's test
                results[cell.id] = (f'{type(e).__name__}: {e}', time.monotonic() - t0)

        # gs:// cells first: they are the slowest
        only = os.environ.get('WALS_FAULT_ONLY')   # a regex of cell ids, to debug one
        cells = [c for c in CELLS if not only or re.search(only, c.id)]
        order = sorted(cells, key=lambda c: (c.backend != 'gs', c.target == 'tune'))
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(one, order))

    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    yield {'results': results, 'reached': reached,
           'seconds': time.monotonic() - started, 'cpu_seconds': cpu}


@pytest.mark.parametrize('cell', CELLS, ids=[c.id for c in CELLS])
def test_cell(matrix, cell):
    if cell.id not in matrix['results'] and os.environ.get('WALS_FAULT_ONLY'):
        pytest.skip('not selected by WALS_FAULT_ONLY')
    error, _ = matrix['results'][cell.id]
    assert error is None, error


def test_every_fault_point_is_reached_by_the_matrix(matrix):
    assert set(faults.POINTS) - matrix['reached'] == set()
    assert matrix['reached'] <= set(faults.POINTS)


def test_the_matrix_kills_every_point_a_command_reaches():
    killed = {c.point for c in CELLS if c.fault in ('kill', 'kill-twice', 'race')}
    assert killed == set(faults.POINTS)
    for points in TARGETS.values():
        assert set(points) <= set(faults.POINTS)


def _called_points() -> dict[str, list[str]]:
    """{point: [file:line]} of every faults.point('...') / point('...') call in the
    production code (a name that is not a literal is an error here too)."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / 'pipeline').rglob('*.py')):
        if path.name == 'faults.py':
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, 'id', None)
            if name != 'point':
                continue
            where = f'{path.relative_to(ROOT)}:{node.lineno}'
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.IfExp):    # point('a' if x else 'b')
                values = [arg.body, arg.orelse]
            else:
                values = [arg]
            for v in values:
                assert isinstance(v, ast.Constant) and isinstance(v.value, str), \
                    f'{where}: a fault point must be named by a string literal'
                found.setdefault(v.value, []).append(where)
    return found


def test_the_list_of_points_and_the_code_agree():
    called = _called_points()
    assert sorted(set(called) - set(faults.POINTS)) == [], 'called, not in POINTS'
    assert sorted(set(faults.POINTS) - set(called)) == [], 'in POINTS, never called'
    assert len(set(faults.POINTS)) == len(faults.POINTS)


def test_the_points_do_nothing_without_hooks(monkeypatch):
    """Production: no hook, no effect (no sleep, no environment read)."""
    assert faults._hooks == []
    monkeypatch.setattr(os, 'environ', {})     # a point must not read the environment
    t0 = time.perf_counter()
    for _ in range(1000):
        faults.point('staged')
    assert time.perf_counter() - t0 < 1.0
    tree = ast.parse((ROOT / 'pipeline' / 'faults.py').read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names} | {n.module for n in ast.walk(tree)
                                     if isinstance(n, ast.ImportFrom)}
    assert not imported & {'os', 'time', 'environ', 'getenv', 'sleep'}, imported
    assert not re.search(r'WALS_STEP_DELAY', ''.join(
        p.read_text() for p in (ROOT / 'pipeline').rglob('*.py')))


def test_an_unknown_point_is_an_error_once_a_hook_is_installed():
    seen = []
    faults.install(seen.append)
    try:
        faults.point('staged')
        with pytest.raises(AssertionError, match='not in pipeline.faults.POINTS'):
            faults.point('no-such-point')
    finally:
        faults.clear()
    assert seen == ['staged']


# ---------------------------------------------------------------- the table in the docs

def matrix_table(results: dict, seconds: float, cpu_seconds: float = 0.0) -> str:
    """fault x point rows, a column per command and backend: passed/run."""
    columns = sorted({(c.backend, c.target) for c in CELLS},
                     key=lambda bt: (bt[0] != 'local', bt[1]))
    rows: dict[tuple[str, str], dict] = {}
    for c in CELLS:
        rows.setdefault((c.fault, c.point), {})[(c.backend, c.target)] = c.id
    fault_order = ('kill', 'kill-twice', 'race', 'enospc', 'efbig', *PROXY_RULES,
                   'concurrent')
    point_order = {p: i for i, p in enumerate(faults.POINTS)}
    head = '| fault | point | ' + ' | '.join(f'{t} ({b})' for b, t in columns) + ' |'
    lines = [head, '|' + '---|' * (len(columns) + 2)]
    for (fault, point) in sorted(rows, key=lambda fp: (fault_order.index(fp[0]),
                                                        point_order.get(fp[1], 99), fp[1])):
        cells = []
        for col in columns:
            cid = rows[(fault, point)].get(col)
            cells.append('' if cid is None else
                         ('pass' if results.get(cid, ('missing',))[0] is None else 'FAIL'))
        lines.append(f'| {fault} | `{point}` | ' + ' | '.join(cells) + ' |')
    passed = sum(1 for c in CELLS if results.get(c.id, ('missing',))[0] is None)
    by_fault = {f: (sum(1 for c in CELLS if c.fault == f and
                        results.get(c.id, ('x',))[0] is None),
                    sum(1 for c in CELLS if c.fault == f)) for f in fault_order}
    summary = ', '.join(f'{f} {p}/{n}' for f, (p, n) in by_fault.items())
    return '\n'.join(lines) + (
        f'\n\n{passed} of {len(CELLS)} cells pass ({summary}). The matrix took '
        f'{seconds / 60:.1f} minutes of wall time ({WORKERS} cells at a time) and '
        f'{cpu_seconds / 60:.1f} minutes of CPU time in its processes, on the 2-core '
        f'machine that generated this table, shared with other jobs at the time '
        f'(`WALS_UPDATE_FAULT_DOCS=1 ./run_tests.sh tests/test_fault_injection.py`).')


def _table_rows(text: str) -> str:
    """The table without the timing sentence (which varies run to run)."""
    return text.split('\n\n')[0].strip()


def test_the_docs_table_is_the_matrix_that_ran(matrix):
    table = matrix_table(matrix['results'], matrix['seconds'], matrix['cpu_seconds'])
    doc = DOC.read_text()
    assert BEGIN in doc and END in doc, f'{DOC} has no {BEGIN} ... {END} section'
    head, rest = doc.split(BEGIN, 1)
    current, tail = rest.split(END, 1)
    if os.environ.get('WALS_UPDATE_FAULT_DOCS') == '1':
        DOC.write_text(f'{head}{BEGIN}\n{table}\n{END}{tail}')
        return
    assert _table_rows(current) == _table_rows(table), \
        'docs/reliability.md: the fault matrix table is stale; regenerate it with ' \
        'WALS_UPDATE_FAULT_DOCS=1 ./run_tests.sh tests/test_fault_injection.py'
