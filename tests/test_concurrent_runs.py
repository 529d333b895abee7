"""Concurrent runs on one model root (issue 18 §4), with real processes: a version a
running job reads (a warm start, a batch of recommendations) is never pruned under
it, concurrent runs each publish a complete version and LATEST names the newest,
and a crashed job's lease stops protecting anything once it is provably abandoned;
locally and on gs:// (the local Cloud Storage server). Plus the pruner's second
look at the leases, in-process through its step hook."""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import time

import numpy as np
import pytest
from apache_beam.io.filesystems import FileSystems

from pipeline import faults
from pipeline.store import model_root
from pipeline.store.model_files import load_model_files
from pipeline.store.model_root import promote, prune, read_latest, version_path
from pipeline.store.publish import SUCCESS, list_files
from tests.test_output_safety import SMALL, cli, finish, start, wait_for

BUCKET = 'wals-concurrent-runs'
PUBLISHED = re.compile(r'Published the model to \S*/versions/(\S+)')
PRUNED = re.compile(r'Pruned \d+ old version\(s\): (.+)')


@pytest.fixture(scope='module')
def ratings(tmp_path_factory) -> pathlib.Path:
    rng = np.random.default_rng(4)
    pairs = rng.choice(100 * 70, size=1800, replace=False)
    path = tmp_path_factory.mktemp('data') / 'ratings.tsv'
    path.write_text(''.join(f'{p // 70 + 1}\t{p % 70 + 1}\t{rng.integers(1, 6)}\n'
                            for p in pairs))
    return path


@pytest.fixture(scope='module')
def root_v1(ratings, tmp_path_factory) -> pathlib.Path:
    """A model root with one version (copied by each test)."""
    root = tmp_path_factory.mktemp('root') / 'root'
    proc = cli('train', '--input', ratings, '--model_root', root, *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def fresh_root(root_v1: pathlib.Path, dest: pathlib.Path) -> tuple[pathlib.Path, str]:
    shutil.copytree(root_v1, dest)
    return dest, read_latest(str(dest))['version']


def train_args(ratings, root, *extra) -> list:
    return ['train', '--input', ratings, '--model_root', root, *extra, *SMALL]


def complete(root: str, version: str) -> bool:
    try:
        load_model_files(version_path(root, version))
        return True
    except Exception:   # noqa: BLE001
        return False


def versions(root: str) -> list[str]:
    return model_root.list_versions(root)


def lease_files(root: str) -> list[str]:
    # A failed listing raises: it must not read as "no lease".
    return [m.path for m in FileSystems.match([f'{root}/leases/*'])[0].metadata_list]


def no_leftovers(root: str) -> None:
    names = list_files(root)
    assert not [n for n in names if '.tmp-' in n], names
    assert lease_files(root) == []


# ---- a running job's version is not pruned ------------------------------------------

def _pruned_under_a_warm_start(ratings, root: str, v1: str, extra_env=None) -> None:
    """Run A warm-starts from v1 (--previous_model ROOT, as the daily DAG runs it)
    and is stopped while training; run B with --keep_versions 1 publishes, promotes
    and prunes; A then continues."""
    a = start(*train_args(ratings, root, '--previous_model', root), extra_env=extra_env)
    try:
        wait_for(a, f'Previous model: {version_path(root, v1)} (warm start of the item '
                    'factors)')
        a.send_signal(signal.SIGSTOP)
        b = cli(*train_args(ratings, root, '--keep_versions', '1'), extra_env=extra_env)
        assert b.returncode == 0, b.stderr[-3000:]
        assert f'Kept {v1}: in use by run' in b.stderr
        assert complete(root, v1)
        b_version = PUBLISHED.search(b.stderr).group(1)
        assert read_latest(root)['version'] == b_version
    finally:
        a.send_signal(signal.SIGCONT)
    code, log = finish(a)
    assert code == 0, log[-3000:]
    a_version = PUBLISHED.search(log).group(1)
    assert a_version < b_version and complete(root, a_version)   # published, not promoted
    assert read_latest(root)['version'] == b_version
    assert lease_files(root) == []
    # Nobody reads v1 or A's version now: the next pruning run deletes them.
    c = cli(*train_args(ratings, root, '--keep_versions', '1'), extra_env=extra_env)
    assert c.returncode == 0, c.stderr[-3000:]
    assert versions(root) == [read_latest(root)['version']]
    load_model_files(root)
    no_leftovers(root)


def test_a_version_a_running_job_warm_starts_from_is_not_pruned(ratings, root_v1,
                                                               tmp_path):
    root, v1 = fresh_root(root_v1, tmp_path / 'root')
    _pruned_under_a_warm_start(ratings, str(root), v1)


def test_a_version_a_batch_of_recommendations_reads_is_not_pruned(ratings, root_v1,
                                                                  tmp_path):
    root, v1 = fresh_root(root_v1, tmp_path / 'root')
    recs = tmp_path / 'recs'
    reader = start('recommend', '--model', root, '--output', recs)
    try:
        wait_for(reader, 'publish: version-held')
        reader.send_signal(signal.SIGSTOP)
        b = cli(*train_args(ratings, root, '--keep_versions', '1'))
        assert b.returncode == 0, b.stderr[-3000:]
        assert f'Kept {v1}: in use by run' in b.stderr and complete(str(root), v1)
    finally:
        reader.send_signal(signal.SIGCONT)
    code, log = finish(reader)
    assert code == 0, log[-3000:]
    metrics = json.loads((recs / 'metrics.json').read_text())
    assert metrics['model'] == version_path(str(root), v1)
    assert lease_files(str(root)) == []


def test_a_reader_without_write_access_to_the_root_still_reads(root_v1, tmp_path):
    """A reader that cannot write its lease (a read-only root: a server with read
    credentials) reads LATEST as before, with a warning."""
    from tests.test_output_safety import read_only
    root, v1 = fresh_root(root_v1, tmp_path / 'root')
    with read_only(root / 'leases'):
        proc = cli('recommend', '--model', root, '--user', '1', '--top_k', '2')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'Could not write a lease' in proc.stderr and len(proc.stdout.splitlines()) == 2
    assert os.listdir(root / 'leases') == []


# ---- several runs at once -----------------------------------------------------------

def test_three_concurrent_runs_each_publish_a_complete_version(ratings, root_v1, tmp_path):
    root, v1 = fresh_root(root_v1, tmp_path / 'root')
    # All warm-start from v1; the shortest promotes and prunes while the others train.
    runs = [start(*train_args(ratings, root, '--keep_versions', '1', '--seed', str(seed)),
                  '--num_iters', iters)
            for seed, iters in enumerate(('1', '4', '8'))]
    logs = []
    for run in runs:
        code, log = finish(run)
        assert code == 0, log[-3000:]
        logs.append(log)
    published = [PUBLISHED.search(log).group(1) for log in logs]
    pruned = {name.strip() for log in logs for m in PRUNED.finditer(log)
              for name in m.group(1).split(',')}
    assert len(set(published)) == 3
    latest = read_latest(str(root))
    assert latest['version'] == max(published)           # LATEST only moves forward
    assert load_model_files(str(root)).path == version_path(str(root), max(published))
    left = versions(str(root))
    for name in published + [v1]:   # no version lost except by pruning
        assert (name in left and complete(str(root), name)) or name in pruned, name
    assert all(complete(str(root), name) for name in left)
    no_leftovers(str(root))


# ---- a crashed job's lease ----------------------------------------------------------

def test_a_crashed_jobs_lease_protects_until_it_expires(ratings, root_v1, tmp_path):
    root, v1 = fresh_root(root_v1, tmp_path / 'root')
    a = start(*train_args(ratings, root))
    wait_for(a, 'warm start of the item factors)')
    a.send_signal(signal.SIGKILL)
    a.wait()
    [lease] = os.listdir(root / 'leases')
    path = root / 'leases' / lease
    record = json.loads(path.read_text())
    assert v1 in record['versions']
    # As if the job had run on another machine: only its heartbeat can expire it.
    # (Locally the heartbeat is the newer of the file's mtime and its record's.)
    record['owner'].update(host='another-host', host_id='another-host/boot/pidns')
    record['heartbeat'] = time.time() - 3600
    path.write_text(json.dumps(record))          # mtime now: a fresh heartbeat
    b = cli(*train_args(ratings, root, '--keep_versions', '1'))
    assert b.returncode == 0, b.stderr[-3000:]
    assert f'Kept {v1}: in use by run' in b.stderr and 'another-host' in b.stderr
    assert path.exists() and complete(str(root), v1)
    # Its heartbeat stopped an hour ago: abandoned (the default timeout is 600 s).
    stale = time.time() - 3600
    os.utime(path, (stale, stale))
    c = cli(*train_args(ratings, root, '--keep_versions', '1'))
    assert c.returncode == 0, c.stderr[-3000:]
    assert v1 not in versions(str(root)) and not path.exists()
    assert versions(str(root)) == [read_latest(str(root))['version']]
    no_leftovers(str(root))


# ---- gs:// --------------------------------------------------------------------------

@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
    from tests.gcs_support import gcs_emulator
    with gcs_emulator(tmp_path_factory.mktemp('gcs'), BUCKET) as emu:
        yield emu


def test_gcs_a_running_jobs_version_is_kept_and_a_crashed_jobs_lease_is_not(
        emulator, ratings, root_v1):
    root = f'gs://{BUCKET}/root'
    for path in sorted(p for p in root_v1.rglob('*') if p.is_file()):
        with FileSystems.create(f'{root}/{path.relative_to(root_v1).as_posix()}') as f:
            f.write(path.read_bytes())
    v1 = read_latest(root)['version']
    extra = emulator.env()
    a = start(*train_args(ratings, root), extra_env=extra)
    try:
        wait_for(a, 'warm start of the item factors)')
        a.send_signal(signal.SIGSTOP)
        assert len(lease_files(root)) == 1                  # a lease as an object
        b = cli(*train_args(ratings, root, '--keep_versions', '1'), extra_env=extra)
        assert b.returncode == 0, b.stderr[-3000:]
        assert f'Kept {v1}: in use by run' in b.stderr and complete(root, v1)
    finally:
        a.send_signal(signal.SIGKILL)                       # it crashes instead
        a.wait()
    assert len(lease_files(root)) == 1
    c = cli(*train_args(ratings, root, '--keep_versions', '1'), extra_env=extra)
    assert c.returncode == 0, c.stderr[-3000:]
    assert v1 not in versions(root)                          # its owner is gone
    assert versions(root) == [read_latest(root)['version']]
    no_leftovers(root)
    assert not [n for n in emulator.list_objects(BUCKET, 'root/') if '.tmp-' in n]


# ---- the pruner's second look (in-process, through a fault hook: pipeline/faults.py) ---

def test_a_reader_that_names_a_version_while_it_is_pruned_keeps_it(root_v1, tmp_path):
    from pipeline.store import leases
    from pipeline.store.model_root import lease_path
    root, v1 = fresh_root(root_v1, tmp_path / 'root')
    root = str(root)
    v2 = '29990101T000000Z-00000002'
    shutil.copytree(version_path(root, v1), version_path(root, v2))
    promote(root, v2, {})
    before = (pathlib.Path(version_path(root, v1)) / SUCCESS).read_bytes()
    taken = []

    def hook(name):
        if name == 'condemned' and not taken:   # a reader names v1 just then
            taken.append(leases.take(lease_path(root, '20000101T000000-0000abcd'),
                                     '20000101T000000-0000abcd', versions=[v1]))
    faults.install(hook)
    try:
        assert prune(root, 1) == []
    finally:
        faults.clear()
    assert (pathlib.Path(version_path(root, v1)) / SUCCESS).read_bytes() == before
    load_model_files(version_path(root, v1))
    taken[0].release()
    assert prune(root, 1) == [v1]                 # released: now it goes
    assert versions(root) == [v2]
