"""Re-runs on new dumps, for real: the CLI in subprocesses on two dumps with a model
root (local and gs:// on the local Cloud Storage server), the promotion gate, SIGKILLs
while publishing and promoting, reruns and the convergence history."""
from __future__ import annotations

import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from apache_beam.io.filesystems import FileSystems

from pipeline.store.model_files import load_model_files, resolve_model_path
from pipeline.store.model_root import promote, read_latest, update_gcs, version_path
from pipeline.store.model_files import read_model
from pipeline.store.publish import SUCCESS, list_files
from tests.conftest import ROOT
from tests.gcs_support import gcs_emulator

BUCKET = 'wals-rerun-test'
SMALL = ['--latent_factors', '3', '--block_size', '32']


def _dumps(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """Two dumps of rank-3 ratings: the second adds users, items and ratings and
    drops user 3 (a full dump is the truth: user 3 must leave the model)."""
    rng = np.random.default_rng(11)
    n_users, n_items = 90, 60
    u = rng.normal(size=(n_users, 3))
    v = rng.normal(size=(n_items, 3))
    pairs = rng.choice(n_users * n_items, size=2200, replace=False)
    users, items = pairs // n_items + 1, pairs % n_items + 1
    stars = np.clip(np.rint(3 + (u[users - 1] * v[items - 1]).sum(1)), 1, 5).astype(int)
    lines = [f'{a}\t{b}\t{c}\n' for a, b, c in zip(users, items, stars)]
    first = [line for line, a, b in zip(lines[:1900], users, items) if a <= 80 and b <= 55]
    second = [line for line, a in zip(lines, users) if a != 3]
    d1, d2 = folder / 'dump1.tsv', folder / 'dump2.tsv'
    d1.write_text(''.join(first))
    d2.write_text(''.join(second))
    return d1, d2


def _env(extra: dict | None = None) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), **(extra or {}))


def _start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-m', 'pipeline.train', *map(str, args)],
                            cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, expect: int = 0) -> str:
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == expect, f'exit {proc.returncode}, expected {expect}:\n{out}'
    return out


def _read(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


def _npy(path: str) -> np.ndarray:
    return np.load(io.BytesIO(_read(path)), allow_pickle=False)


def _snapshot(folder: str) -> dict[str, bytes]:
    return {f: _read(f'{folder}/{f}') for f in list_files(folder)}


def _id_sets(path: pathlib.Path):
    rows = [line.split('\t')[:2] for line in path.read_text().splitlines() if line]
    return {r[0] for r in rows}, {r[1] for r in rows}, {(r[0], r[1]) for r in rows}


def _two_dumps(root: str, d1: pathlib.Path, d2: pathlib.Path, env: dict) -> dict:
    """v1 on dump 1, then v2 on dump 2 warm started from LATEST with --num_iters 0
    (so its item factors are exactly the warm start)."""
    _wait(_start(['--input', d1, '--model_root', root, '--num_iters', '5', *SMALL], env))
    latest1 = read_latest(root)
    v1 = latest1['path']
    before = _snapshot(v1)
    out = _wait(_start(['--input', d2, '--model_root', root, '--num_iters', '0', *SMALL],
                       env))
    return dict(latest1=latest1, latest2=read_latest(root), v1=v1, v1_before=before,
                log=out)


def _check_two_dumps(run: dict, root: str, d1: pathlib.Path, d2: pathlib.Path) -> None:
    latest1, latest2, v1 = run['latest1'], run['latest2'], run['v1']
    v2 = latest2['path']
    assert latest2['version'] > latest1['version']            # LATEST moved to v2
    assert v2 == version_path(root, latest2['version'])
    assert resolve_model_path(root) == v2.rstrip('/')
    assert _snapshot(v1) == run['v1_before']                   # v1 byte-identical
    old, new = load_model_files(v1), load_model_files(root)    # verified readers
    assert new.path == v2.rstrip('/')
    assert read_model(root)['col'].tobytes() == new.col.tobytes()
    # Warm start: every item v1 knows starts (and, with 0 iterations, ends) with v1's
    # factors; the items new in dump 2 get the seeded init, not v1's.
    old_pos = {str(i): j for j, i in enumerate(old.items)}
    known = [j for j, i in enumerate(new.items) if str(i) in old_pos]
    assert 0 < len(known) < len(new.items)
    np.testing.assert_array_equal(new.col[known], old.col[[old_pos[str(new.items[j])]
                                                          for j in known]])
    # Removed IDs are gone; the report's counts equal an independent count.
    assert '3' in set(old.users.astype(str)) and '3' not in set(new.users.astype(str))
    u1, i1, p1 = _id_sets(d1)
    u2, i2, p2 = _id_sets(d2)
    report = json.loads(_read(f'{v2}/report.json'))
    ch = report['changes']
    for name, a, b in (('users', u1, u2), ('items', i1, i2), ('ratings', p1, p2)):
        assert ch[name] == {'added': len(b - a), 'removed': len(a - b), 'kept': len(a & b)}, \
            name
    assert ch['warm_started_items'] == len(known)
    assert report['gate']['passed'] and report['previous_model'] == v1.rstrip('/')
    manifest = json.loads(_read(f'{v2}/{SUCCESS}'))
    assert {'report.json', 'convergence.png'} <= set(manifest['files'])
    assert _read(f'{v2}/convergence.png')[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'Users    +' in run['log'] and f'-{len(u1 - u2)} removed' in run['log']


# ---------------------------------------------------------------- local model root

@pytest.fixture(scope='module')
def local_loop(tmp_path_factory):
    """v1; then, side by side, a refused regression and two reruns of dump 2 from v1;
    then v2."""
    tmp = tmp_path_factory.mktemp('rerun')
    d1, d2 = _dumps(tmp)
    root = str(tmp / 'root')
    _wait(_start(['--input', d1, '--model_root', root, '--num_iters', '5', *SMALL]))
    latest1 = read_latest(root)
    v1 = latest1['path']
    latest_bytes = (pathlib.Path(root) / 'LATEST').read_bytes()
    gate = _start(['--input', d2, '--model_root', root, '--latent_factors', '1',
                   '--num_iters', '1', '--no_warm_start', '--max_regression', '0.01'])
    reruns = [_start(['--input', d2, '--previous_model', v1, '--output', tmp / name,
                      '--num_iters', '2', *SMALL]) for name in ('again_a', 'again_b')]
    gate_out = _wait(gate, expect=3)
    for proc in reruns:
        _wait(proc)
    after_gate = (pathlib.Path(root) / 'LATEST').read_bytes()
    versions = sorted(os.listdir(f'{root}/versions'))
    before = _snapshot(v1)
    log = _wait(_start(['--input', d2, '--model_root', root, '--num_iters', '0', *SMALL]))
    return dict(tmp=tmp, d1=d1, d2=d2, root=root, latest1=latest1, v1=v1,
                latest_bytes=latest_bytes, gate_out=gate_out, after_gate=after_gate,
                versions_after_gate=versions, v1_before=before, log=log,
                latest2=read_latest(root))


def test_two_dumps_local_root(local_loop):
    r = local_loop
    _check_two_dumps(r, r['root'], r['d1'], r['d2'])


def test_the_gate_refuses_a_worse_model_and_leaves_latest(local_loop):
    r = local_loop
    assert r['after_gate'] == r['latest_bytes']                   # LATEST unchanged
    assert 'the gate refused' in r['gate_out'] and 'test RMSE' in r['gate_out']
    refused = [v for v in r['versions_after_gate'] if v != r['latest1']['version']]
    assert len(refused) == 1                                      # published anyway
    folder = version_path(r['root'], refused[0])
    model = load_model_files(folder)                              # complete, verified
    assert model.params.latent_factors == 1
    gate = json.loads(_read(f'{folder}/report.json'))['gate']
    assert gate['passed'] is False and gate['pairs'] > 0
    assert gate['new'] > gate['previous'] * 1.01
    assert f'{gate["pairs"]} test pairs' in r['gate_out']


def test_a_rerun_with_the_same_dump_and_previous_model_gives_identical_files(local_loop):
    a, b = local_loop['tmp'] / 'again_a' / 'model', local_loop['tmp'] / 'again_b' / 'model'
    names = sorted(p.name for p in a.glob('*.npy'))
    assert 'col.npy' in names and names == sorted(p.name for p in b.glob('*.npy'))
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    report = json.loads((a.parent / 'report.json').read_text())
    assert report['changes']['users']['removed'] == 1


def test_the_wals_objective_history_does_not_increase(local_loop):
    metrics = json.loads(_read(f'{local_loop["v1"]}/metrics.json'))
    objective = [h['objective'] for h in metrics['history']]
    assert len(objective) == 5 and metrics['iterations_run'] == 5
    assert all(b <= a * (1 + 1e-6) for a, b in zip(objective, objective[1:])), objective
    assert objective[-1] < objective[0]


def test_keep_versions_prunes_old_versions_but_never_latest(local_loop, tmp_path):
    root = tmp_path / 'root'
    shutil.copytree(local_loop['root'], root)
    names = sorted(os.listdir(root / 'versions'))          # v1, refused, v2 (LATEST)
    assert len(names) == 3
    _wait(_start(['--input', local_loop['d2'], '--model_root', root, '--num_iters', '1',
                  '--keep_versions', '2', *SMALL]))
    left = sorted(os.listdir(root / 'versions'))
    latest = read_latest(str(root))['version']
    assert latest not in names and latest in left
    assert left == [names[-1], latest]                     # the two newest
    load_model_files(str(root))


# ---------------------------------------------------------------- SIGKILLs

def _kill_at(args: list[str], step: str, env: dict) -> str:
    """Runs the launcher with a fault plan (tests/fault_runner.py) that SIGKILLs it
    right after the fault point `step` (pipeline/faults.py)."""
    plan = json.dumps({'faults': [{'at': step, 'do': 'kill'}]})
    proc = subprocess.Popen([sys.executable, '-m', 'tests.fault_runner', plan, '--', 'train',
                             *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=600)
    steps = [line for line in out.splitlines() if 'publish: ' in line]
    assert proc.returncode == -signal.SIGKILL and steps[-1].endswith(f'publish: {step}'), \
        f'not killed at {step} (exit {proc.returncode}):\n{out}'
    return out


def _kill_all(jobs: list[tuple[list[str], str]], env: dict) -> None:
    """The kills of a group side by side (threads only read the logs)."""
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(jobs)) as pool:
        for f in [pool.submit(_kill_at, args, step, env) for args, step in jobs]:
            f.result()


@pytest.fixture(scope='module')
def v1_model(local_loop) -> str:
    return local_loop['v1']


def _copy_model(src: str, dest: str) -> None:
    """A published model folder copied file by file (the manifest's paths are
    relative: the copy is verified as the original)."""
    for f in list_files(src):
        with FileSystems.create(f'{dest}/{f}') as out:
            out.write(_read(f'{src}/{f}'))


ROOT_STEPS = ('staged', 'new-moved-in', 'latest-temp-written')
OVERWRITE_STEPS = ('staged', 'old-set-aside', 'new-moved-in')
GCS_OVERWRITE_STEPS = ('old-set-aside', 'old-untrusted', 'new-files-moved')


def test_sigkill_while_publishing_and_promoting_leaves_latest_verified(local_loop, tmp_path):
    root = str(tmp_path / 'root')
    name = local_loop['latest1']['version']
    _copy_model(local_loop['v1'], version_path(root, name))
    promote(root, name, {})
    latest = (pathlib.Path(root) / 'LATEST').read_bytes()
    args = ['--input', local_loop['d2'], '--model_root', root, '--num_iters', '1', *SMALL]
    _kill_all([(args, step) for step in ROOT_STEPS], _env())
    # None of them got to replace LATEST: it is unchanged and names a verified model.
    assert (pathlib.Path(root) / 'LATEST').read_bytes() == latest
    assert load_model_files(root).path == version_path(root, name)
    assert read_model(root)['user'].tobytes() == \
        load_model_files(local_loop['v1']).users.tobytes()
    # The runs killed after publishing left complete versions; the others none.
    complete = [v for v in os.listdir(f'{root}/versions')
                if os.path.exists(f'{root}/versions/{v}/{SUCCESS}')]
    assert len(complete) >= 2
    for v in complete:
        load_model_files(version_path(root, v))
    # A run after the kills promotes as usual.
    _wait(_start(args))
    assert read_latest(root)['version'] > name
    load_model_files(root)


def _check_old_or_new(out: str, old_run_id: str) -> str:
    model = load_model_files(out)          # follows an .old- copy if need be
    run_id = model.manifest['run_id']
    assert model.col.shape[0] > 0
    return 'old' if run_id == old_run_id else 'new'


def test_sigkill_during_overwrite_leaves_the_old_or_the_new_model(local_loop, tmp_path):
    v1 = local_loop['v1']
    old_run = json.loads(_read(f'{v1}/{SUCCESS}'))['run_id']
    jobs, outs = [], {}
    for step in OVERWRITE_STEPS:
        out = str(tmp_path / f'out-{step}')
        _copy_model(v1, out)
        outs[step] = out
        jobs.append((['--input', local_loop['d2'], '--output', out, '--overwrite',
                      '--num_iters', '1', *SMALL], step))
    _kill_all(jobs, _env())
    seen = {step: _check_old_or_new(out, old_run) for step, out in outs.items()}
    # Killed before the new model moved in: the old one, in place or set aside.
    assert seen['staged'] == 'old' and seen['old-set-aside'] == 'old'
    assert not os.path.exists(f'{outs["old-set-aside"]}/{SUCCESS}')
    assert seen['new-moved-in'] == 'new'
    # The next --overwrite cleans up what the killed one left.
    out = outs['old-set-aside']
    _wait(_start(['--input', local_loop['d2'], '--output', out, '--overwrite',
                  '--num_iters', '1', *SMALL]))
    assert _check_old_or_new(out, old_run) == 'new'
    assert not [n for n in os.listdir(tmp_path) if '.old-' in n and 'set-aside' in n]


# ---------------------------------------------------------------- gs://

@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
    with gcs_emulator(tmp_path_factory.mktemp('gcs'), BUCKET) as emu:
        yield emu


def test_two_dumps_gcs_root(emulator, tmp_path):
    d1, d2 = _dumps(tmp_path)
    root = f'gs://{BUCKET}/models'
    run = _two_dumps(root, d1, d2, _env(emulator.env()))
    _check_two_dumps(run, root, d1, d2)
    leftovers = [n for n in emulator.list_objects(BUCKET, 'models/')
                 if '.tmp-' in n or '.old-' in n]
    assert leftovers == []


def test_sigkill_during_a_gcs_overwrite_leaves_a_verified_model(emulator, local_loop):
    v1 = local_loop['v1']
    old_run = json.loads(_read(f'{v1}/{SUCCESS}'))['run_id']
    jobs, outs = [], {}
    for step in GCS_OVERWRITE_STEPS:
        out = f'gs://{BUCKET}/overwrite/{step}'
        _copy_model(v1, out)
        outs[step] = out
        jobs.append((['--input', local_loop['d2'], '--output', out, '--overwrite',
                      '--num_iters', '1', *SMALL], step))
    _kill_all(jobs, _env(emulator.env()))
    seen = {step: _check_old_or_new(out, old_run) for step, out in outs.items()}
    # Until the new _SUCCESS is written, readers get the complete old copy.
    assert seen == {step: 'old' for step in GCS_OVERWRITE_STEPS}
    assert not FileSystems.exists(f'{outs["old-untrusted"]}/{SUCCESS}')


class _PreconditionBucket:
    """The emulator's bucket with ifGenerationMatch enforced here: gcp-storage-emulator
    accepts any ifGenerationMatch (checked in test_the_emulator_ignores_...), real
    Cloud Storage answers 412. `meddle` runs once, just before our first write: the
    other run that writes LATEST in between."""

    def __init__(self, bucket, meddle):
        self._bucket, self._meddle, self.name = bucket, meddle, bucket.name
        self.writes = 0

    def get_blob(self, name):
        return self._bucket.get_blob(name)

    def blob(self, name):
        outer = self

        class _Blob:
            def upload_from_string(self, data, content_type=None, if_generation_match=None):
                from google.api_core.exceptions import PreconditionFailed
                if outer._meddle is not None:
                    meddle, outer._meddle = outer._meddle, None
                    meddle()
                current = outer._bucket.get_blob(name)
                generation = current.generation if current is not None else 0
                if if_generation_match is not None and int(if_generation_match) != \
                        int(generation):
                    raise PreconditionFailed('conditionNotMet')
                outer.writes += 1
                outer._bucket.blob(name).upload_from_string(data, content_type=content_type)
        return _Blob()


def test_the_emulator_ignores_if_generation_match(emulator):
    from google.cloud import storage
    bucket = storage.Client().bucket(BUCKET)
    bucket.blob('probe').upload_from_string(b'1')
    bucket.blob('probe').upload_from_string(b'2', if_generation_match=0)   # 412 on GCS
    assert bucket.get_blob('probe').download_as_bytes() == b'2'


@pytest.mark.parametrize('other, expect', [('20990101T000000Z-ffffffff', 'other'),
                                           ('20000101T000000Z-00000000', 'ours')])
def test_latest_on_gcs_decides_again_after_losing_a_race(emulator, other, expect):
    from google.cloud import storage
    bucket = storage.Client().bucket(BUCKET)
    name = f'race-{expect}/LATEST'
    ours = '20261202T051500Z-12345678'
    bucket.blob(name).upload_from_string(json.dumps({'version': '2026'}).encode())

    def meddle():
        bucket.blob(name).upload_from_string(json.dumps({'version': other}).encode())

    def decide(current):
        return None if current['version'] >= ours else {'version': ours}
    racing = _PreconditionBucket(bucket, meddle)
    after = update_gcs(racing, name, decide)
    stored = json.loads(bucket.get_blob(name).download_as_bytes())
    assert stored == after
    assert stored['version'] == (other if expect == 'other' else ours)
    assert racing.writes == (0 if expect == 'other' else 1)
