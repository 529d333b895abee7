"""A versioned model root (--model_root ROOT, local or gs://) and its LATEST pointer.

Layout:
  ROOT/versions/<version>/   one complete model per run (staging + _SUCCESS manifest,
                             pipeline/store/publish.py); never changed once published
  ROOT/LATEST                {"version", "path", "manifest_sha256", "metrics",
                             "updated"}: the version readers use

A version name is the run's UTC start time and its run id suffix
(`20261202T051500Z-1a2b3c4d`): names sort by time and are unique per run.

LATEST changes only by replacing one small file in one step, after the version it
names is completely published, so a kill at any moment leaves it naming a complete,
verified version (or absent, before the first promotion):
- locally: a temporary file in ROOT, fsync'ed, then os.replace; the read-decide-write
  is serialized between processes by an flock on ROOT/.LATEST.lock;
- on gs://: one object write with a generation precondition (ifGenerationMatch: the
  generation read before, 0 if absent). When another run wrote LATEST in between,
  the write fails, LATEST is read again and the decision made again (bounded).
The decision: LATEST only moves forward (to a version that sorts after the one it
names), so two runs finishing together leave it on the newer one.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
import uuid
from typing import Callable

from apache_beam.io.filesystems import FileSystems

from pipeline.store.model_files import LATEST
from pipeline.store.publish import SUCCESS, _local_path, list_files, read_manifest_bytes, step

log = logging.getLogger('pipeline.store.model_root')

VERSIONS = 'versions'
VERSION_RE = re.compile(r'^\d{8}T\d{6}Z-[0-9a-f]{8}$')
LATEST_METRICS = ('test_rmse', 'train_rmse', 'ndcg_at_k', 'precision_at_k', 'users', 'items',
                  'train_ratings', 'iterations_run', 'final_objective')
ATTEMPTS = 10   # gs:// precondition failures before giving up


class LatestConflict(RuntimeError):
    """LATEST kept changing under us (gs://): ATTEMPTS writes all lost the race."""


def version_name(run_id: str) -> str:
    """'20261202T051500-1a2b3c4d' (publish.new_run_id) -> '20261202T051500Z-1a2b3c4d'."""
    stamp, suffix = run_id.split('-', 1)
    return f'{stamp}Z-{suffix}'


def version_path(root: str, version: str) -> str:
    return f'{root.rstrip("/")}/{VERSIONS}/{version}'


def list_versions(root: str) -> list[str]:
    """Version names under ROOT/versions/ (complete or not; staging folders
    excluded), oldest first."""
    base = f'{root.rstrip("/")}/{VERSIONS}'
    try:
        files = list_files(base)
    except Exception:   # noqa: BLE001 - no versions folder yet
        return []
    return sorted({f.split('/', 1)[0] for f in files if VERSION_RE.match(f.split('/', 1)[0])})


def latest_record(root: str, version: str, manifest_sha256: str, metrics: dict) -> dict:
    return {'version': version, 'path': version_path(root, version),
            'manifest_sha256': manifest_sha256,
            'metrics': {k: metrics.get(k) for k in LATEST_METRICS if k in metrics},
            'updated': datetime.datetime.now(datetime.timezone.utc).isoformat()}


def read_latest(root: str) -> dict | None:
    path = f'{root.rstrip("/")}/{LATEST}'
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        return json.loads(f.read())


def _encode(record: dict) -> bytes:
    return json.dumps(record, indent=2, sort_keys=True).encode('utf-8')


def _update_local(root: str, decide: Callable[[dict | None], dict | None]) -> dict | None:
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, '.LATEST.lock'), 'a+b') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)       # released when the file closes
        path = os.path.join(root, LATEST)
        current = None
        if os.path.exists(path):
            with open(path, 'rb') as f:
                current = json.loads(f.read())
        new = decide(current)
        if new is None:
            return current
        tmp = os.path.join(root, f'.LATEST.tmp-{uuid.uuid4().hex[:8]}')
        with open(tmp, 'wb') as f:
            f.write(_encode(new))
            f.flush()
            os.fsync(f.fileno())
        step('latest-temp-written')
        os.replace(tmp, path)                  # atomic: the old or the new LATEST
        dir_fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return new


def _split_gcs(path: str) -> tuple[str, str]:
    bucket, _, name = path[len('gs://'):].partition('/')
    return bucket, name


def update_gcs(bucket, name: str, decide: Callable[[dict | None], dict | None],
               attempts: int = ATTEMPTS) -> dict | None:
    """LATEST on Cloud Storage: read it with its generation, decide, write with
    if_generation_match (0: must not exist); on a precondition failure, again.
    `bucket` is a google.cloud.storage Bucket (or anything with get_blob/blob)."""
    from google.api_core.exceptions import PreconditionFailed
    for _ in range(attempts):
        blob = bucket.get_blob(name)
        current, generation = None, 0
        if blob is not None:
            generation = blob.generation
            current = json.loads(blob.download_as_bytes(if_generation_match=generation))
        new = decide(current)
        if new is None:
            return current
        try:
            bucket.blob(name).upload_from_string(_encode(new), content_type='application/json',
                                                 if_generation_match=generation)
            return new
        except PreconditionFailed:
            log.info('LATEST changed while it was being updated; reading it again')
    raise LatestConflict(f'gs://{bucket.name}/{name} changed {attempts} times while this run '
                         'tried to update it')


def _gcs_bucket(bucket_name: str):
    from google.cloud import storage
    return storage.Client().bucket(bucket_name)


def update_latest(root: str, decide: Callable[[dict | None], dict | None]) -> dict | None:
    """Applies decide(current LATEST or None) -> new record (None: leave it) atomically;
    returns LATEST as it is afterwards."""
    root = root.rstrip('/')
    local = _local_path(root)
    if local is not None:
        return _update_local(local, decide)
    if root.startswith('gs://'):
        bucket, prefix = _split_gcs(root)
        return update_gcs(_gcs_bucket(bucket), f'{prefix}/{LATEST}' if prefix else LATEST,
                          decide)
    raise ValueError(f'--model_root {root}: only local folders and gs:// are supported')


def promote(root: str, version: str, metrics: dict) -> tuple[bool, dict]:
    """Points ROOT/LATEST at a published version unless LATEST already names a
    version that sorts after it. Returns (moved, LATEST afterwards)."""
    manifest_sha = hashlib.sha256(read_manifest_bytes(version_path(root, version))).hexdigest()
    record = latest_record(root, version, manifest_sha, metrics)

    def decide(current):
        if current is not None and current.get('version', '') >= version:
            return None
        return record
    after = update_latest(root, decide)
    moved = after is not None and after.get('version') == version
    step('latest-written' if moved else 'latest-kept')
    return moved, after


def prune(root: str, keep: int) -> list[str]:
    """Deletes the oldest versions beyond the newest `keep`, never the one LATEST names
    nor any newer one (a run may be about to promote it). _SUCCESS goes first, so a
    kill while deleting leaves an untrusted folder, not a partial trusted model."""
    latest = read_latest(root)
    if latest is None:
        return []
    current = latest['version']
    names = list_versions(root)
    protected = set(names[-keep:]) | {current} | {n for n in names if n > current}
    deleted = []
    for name in names:
        if name in protected:
            continue
        folder = version_path(root, name)
        if FileSystems.exists(f'{folder}/{SUCCESS}'):
            FileSystems.delete([f'{folder}/{SUCCESS}'])
        files = list_files(folder)
        if files:
            FileSystems.delete([f'{folder}/{f}' for f in files])
        if FileSystems.exists(folder):
            FileSystems.delete([folder])
        deleted.append(name)
    if deleted:
        step('pruned')
        log.info('Pruned %d old version(s): %s', len(deleted), ', '.join(deleted))
    return deleted
