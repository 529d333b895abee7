"""gs:// input and output for real: the CLI trains from and into a Cloud Storage
emulator server on 127.0.0.1, and every output file matches a local run's."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from apache_beam.io.filesystems import FileSystems

from tests.conftest import ROOT
from tests.gcs_emulator_server import STALLED_CONNECTION_SECONDS
from tests.gcs_support import gcs_emulator

BUCKET = 'wals-gcs-test'
# Fields that legitimately differ between two runs of the same data: wall times,
# run ids and publication times. Paths differ only by their root (gs://BUCKET/ versus
# a local folder with the same layout below it) and are compared below that root.
VOLATILE_KEYS = {'phase_seconds', 'published', 'run_id', 'seconds', 'solve_seconds'}


def _ratings(seed: int, n: int) -> str:
    rng = np.random.default_rng(seed)
    users, items = rng.integers(1, 301, n), rng.integers(1, 201, n)
    ratings = rng.integers(1, 6, n)
    return ''.join(f'{u}\t{i}\t{r}\t881250949\n' for u, i, r in zip(users, items, ratings))


FILES = {
    'part-0.tsv': _ratings(1, 2000),
    'part-1.tsv': _ratings(2, 2000) + 'only\ttwo-fields\n',     # one bad line
    'notes.txt': 'not ratings: the *.tsv glob must skip this file\n',
}


@pytest.fixture(scope='module')
def emulator(tmp_path_factory):
    with gcs_emulator(tmp_path_factory.mktemp('gcs'), BUCKET) as emu:
        yield emu


def _write(path: str, data: bytes) -> None:
    with FileSystems.create(path) as f:
        f.write(data)


def _read(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


def _train(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-m', 'pipeline.train', *args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def next_state(proc: subprocess.Popen, what: str) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f'{what} run failed (exit {proc.returncode}):\n{out}'
    return out


def normalize(obj, root: str, key: str | None = None):
    """JSON with the volatile fields removed and `root` replaced in paths; a
    manifest's checksums are kept for the .npy files only (the other files hold
    paths or times)."""
    if isinstance(obj, dict):
        return {k: normalize(v, root, k) for k, v in obj.items() if k not in VOLATILE_KEYS
                and not (key == 'files' and not k.endswith('.npy'))}
    if isinstance(obj, list):
        return [normalize(v, root) for v in obj]
    if isinstance(obj, str):
        return obj.replace(root, '<root>/')
    return obj


def comparable(name: str, data: bytes, root: str):
    """What must be equal between the two runs for one output file."""
    if name.endswith('.npy'):
        return data                                       # byte for byte
    if name.endswith('.json') or name.rsplit('/', 1)[-1] == '_SUCCESS':
        return normalize(json.loads(data), root)
    if name.endswith('.jsonl'):
        return [normalize(json.loads(line), root) for line in data.splitlines()
                if line.strip()]
    return data


def test_training_from_and_to_gcs_matches_a_local_run(emulator, tmp_path):
    # The same layout under both roots: ratings/*.tsv in, models/run1 out.
    gs_root, local_root = f'gs://{BUCKET}/', f'{tmp_path}/'
    local_in = tmp_path / 'ratings'
    local_in.mkdir()
    for name, text in FILES.items():
        (local_in / name).write_text(text)
        _write(f'gs://{BUCKET}/ratings/{name}', text.encode())
    gs_out = f'gs://{BUCKET}/models/run1'
    local_out = tmp_path / 'models' / 'run1'
    model = ['--num_iters', '2', '--latent_factors', '4', '--block_size', '64']
    env = dict(os.environ, PYTHONPATH=str(ROOT), **emulator.env())

    gs_run = _train(['--input', f'gs://{BUCKET}/ratings/*.tsv', '--output', gs_out, *model],
                    env)
    local_run = _train(['--input', f'{local_in}/*.tsv', '--output', str(local_out), *model],
                       env)
    gs_log = next_state(gs_run, 'gs://')
    next_state(local_run, 'local')
    assert f'{gs_out}/model/' in gs_log

    local_files = sorted(p.relative_to(local_out).as_posix()
                         for p in local_out.rglob('*') if p.is_file())
    gs_files = sorted(m.path[len(gs_out) + 1:]
                      for m in FileSystems.match([f'{gs_out}/**'])[0].metadata_list)
    assert gs_files == local_files
    for name in ('model/user.npy', 'model/item.npy', 'model/row.npy', 'model/col.npy',
                 'metrics.json'):
        assert name in local_files
    for name in local_files:
        gs_bytes = _read(f'{gs_out}/{name}')
        local_bytes = (local_out / name).read_bytes()
        assert comparable(name, gs_bytes, gs_root) == \
            comparable(name, local_bytes, local_root), \
            f'{name} differs between the gs:// and the local run'

    metrics = json.loads(_read(f'{gs_out}/metrics.json'))
    assert metrics['parameters']['input'] == f'gs://{BUCKET}/ratings/*.tsv'
    assert metrics['users'] == 300 and metrics['lines']['kept'] == 4000
    row = np.load(io.BytesIO(_read(f'{gs_out}/model/row.npy')), allow_pickle=False)
    assert row.shape == (300, 4) and np.isfinite(row).all()
    # The run published in place: nothing is left in its staging folder.
    leftovers = [n for n in emulator.list_objects(BUCKET, 'models/')
                 if not n.startswith('models/run1/')]
    assert leftovers == []


CREDENTIALS_PROBE = """
import json
import google.auth
from google.auth import _default
from google.auth.compute_engine import _metadata
from apache_beam.internal.gcp import auth
from apache_beam.options.pipeline_options import PipelineOptions

calls = {'default': 0, 'gce': 0, 'metadata': 0}
def counted(name, fn):
    def wrapper(*args, **kwargs):
        calls[name] += 1
        return fn(*args, **kwargs)
    return wrapper
google.auth.default = counted('default', google.auth.default)
_default._get_gce_credentials = counted('gce', _default._get_gce_credentials)
_metadata.ping = counted('metadata', _metadata.ping)
_metadata.is_on_gce = counted('metadata', _metadata.is_on_gce)
c = auth.get_service_credentials(PipelineOptions([])).get_google_auth_credentials()
print(json.dumps(dict(calls, type=type(c).__module__ + '.' + type(c).__name__,
                      client_id=c.client_id, token=c.token)))
"""


def test_credentials_come_from_the_environment_without_a_lookup(emulator):
    """The documented ADC file is found on the first try: Beam's retry loop (20-30 s
    of backoff) does not run and no metadata server is consulted."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **emulator.env())
    out = subprocess.run([sys.executable, '-c', CREDENTIALS_PROBE], env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    probe = json.loads(out.strip().splitlines()[-1])
    assert probe['type'] == 'google.oauth2.credentials.Credentials'
    assert (probe['client_id'], probe['token']) == ('offline-test', 'offline-test-token')
    assert probe['default'] == 1             # one lookup: no retry
    assert probe['gce'] == 0 and probe['metadata'] == 0


def test_a_client_stopped_mid_request_does_not_stall_the_others(emulator):
    """Tests stop running jobs (SIGSTOP), possibly mid-request; the emulator serves one
    connection at a time, so tests/gcs_emulator_server.py drops a stalled connection
    after STALLED_CONNECTION_SECONDS instead of leaving every other client waiting
    (Beam's listing gave up after two minutes, and a test read that as "no lease")."""
    _write(f'gs://{BUCKET}/stall/a.txt', b'a')
    with socket.create_connection(('127.0.0.1', emulator.port)) as stalled:
        # The headers of an upload whose body never comes.
        stalled.sendall(f'POST /upload/storage/v1/b/{BUCKET}/o?uploadType=media&name=x '
                        'HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n'.encode())
        time.sleep(0.5)      # the server is now reading that body
        started = time.monotonic()
        listed = [m.path for m in FileSystems.match([f'gs://{BUCKET}/stall/*'])[0].metadata_list]
        waited = time.monotonic() - started
    assert listed == [f'gs://{BUCKET}/stall/a.txt']
    assert waited < STALLED_CONNECTION_SECONDS + 10, waited
