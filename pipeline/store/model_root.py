"""A versioned model root (--model_root ROOT, local or gs://) and its LATEST pointer.

Layout:
  ROOT/versions/<version>/   one complete model per run (staging + _SUCCESS manifest,
                             pipeline/store/publish.py); never changed once published
  ROOT/LATEST                {"version", "path", "manifest_sha256", "metrics",
                             "updated"}: the version readers use
  ROOT/leases/<run id>.json  one per running job that publishes into ROOT or reads
                             one of its versions (pipeline/store/leases.py): the
                             versions it names are never pruned while it is live

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

Pruning and readers (hold_model, prune): a reader names the version in its lease
first and only then checks that the version is complete (its _SUCCESS there, and
the one LATEST recorded); the pruner skips every version a live lease names,
deletes a version's _SUCCESS first, then reads the leases again and, if a reader
named the version meanwhile, writes the _SUCCESS back and keeps it. Either the
pruner sees the reader's lease, or the reader sees the missing _SUCCESS and reads
LATEST again: a version a reader has resolved is never deleted under it.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import re
import time
import uuid
from typing import Callable, Iterator

from apache_beam.io.filesystems import FileSystems

from pipeline.faults import point
from pipeline.store import leases
from pipeline.store.model_files import LATEST, resolve_model_path
from pipeline.store.publish import (SUCCESS, UntrustedModel, local_path, list_files,
                                    our_manifest, read_manifest_bytes, remove_listed,
                                    remove_tree, staging_path)

log = logging.getLogger('pipeline.store.model_root')

VERSIONS = 'versions'
LEASES = 'leases'
HOLD_ATTEMPTS = 6   # reads of LATEST by a reader racing a pruner before giving up
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
        # A temporary LATEST is only ever written under this lock: any left here is
        # from a run killed while holding it.
        for name in os.listdir(root):
            if name.startswith('.LATEST.tmp-'):
                os.remove(os.path.join(root, name))
                log.info('Removed %s, left by a killed run', name)
        tmp = os.path.join(root, f'.LATEST.tmp-{uuid.uuid4().hex[:8]}')
        with open(tmp, 'wb') as f:
            f.write(_encode(new))
            f.flush()
            os.fsync(f.fileno())
        point('latest-temp-written')
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
    local = local_path(root)
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
    point('latest-written' if moved else 'latest-kept')
    return moved, after


def prune(root: str, keep: int, run_id: str | None = None) -> list[str]:
    """Deletes the oldest versions beyond the newest `keep`, never the one LATEST names,
    nor any newer one (a run may be about to promote it), nor one a live lease names
    (a running job reads it, or a reader has just resolved it). A version's _SUCCESS
    goes first, so a kill while deleting leaves an untrusted folder, not a partial
    trusted model; only the files its manifest lists are deleted. run_id: the
    pruning run, whose own lease does not count (it has finished reading)."""
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
        users = versions_in_use(root, ignore=run_id).get(name)
        if users:
            log.info('Kept %s: in use by %s', name, ', '.join(users))
            continue
        folder = version_path(root, name)
        manifest = our_manifest(folder)
        saved = None
        if FileSystems.exists(f'{folder}/{SUCCESS}'):
            saved = read_manifest_bytes(folder)
            FileSystems.delete([f'{folder}/{SUCCESS}'])
            point('condemned')
        users = versions_in_use(root, ignore=run_id).get(name)
        if users:   # a reader named it between our two looks: give it back
            if saved is not None:
                _restore_manifest(root, folder, saved)
                point('restored')
            log.info('Kept %s: %s started to use it', name, ', '.join(users))
            continue
        if manifest is not None:
            left = remove_listed(folder, manifest)
            if left:
                log.warning('Pruned %s, but it keeps %d file(s) this tool did not write '
                            '(%s): delete them yourself.', folder, len(left),
                            ', '.join(left[:5]))
        else:    # an unfinished version (no manifest) of no live run
            remove_tree(folder)
        deleted.append(name)
    if deleted:
        point('pruned')
        log.info('Pruned %d old version(s): %s', len(deleted), ', '.join(deleted))
    return deleted


def _restore_manifest(root: str, folder: str, data: bytes) -> None:
    """Writes a version's _SUCCESS back in one step (a reader never sees half)."""
    local = local_path(folder)
    if local is None:
        with FileSystems.create(f'{folder}/{SUCCESS}') as f:
            f.write(data)
        return
    part = os.path.join(local_path(root), LEASES, f'.restore-{uuid.uuid4().hex[:8]}')
    os.makedirs(os.path.dirname(part), exist_ok=True)
    with open(part, 'wb') as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, os.path.join(local, SUCCESS))


# ---- leases: who uses which version ------------------------------------------------

def lease_path(root: str, run_id: str) -> str:
    return f'{root.rstrip("/")}/{LEASES}/{run_id}.json'


def root_leases(root: str) -> list[leases.LeaseState]:
    """Every lease under ROOT/leases/ (live or abandoned)."""
    base = f'{root.rstrip("/")}/{LEASES}'
    try:
        metas = FileSystems.match([f'{base}/*.json'])[0].metadata_list
    except Exception:   # noqa: BLE001 - no leases folder
        return []
    out = []
    for m in sorted(metas, key=lambda m: m.path):
        if not leases.RUN_ID_RE.match(m.path.rsplit('/', 1)[-1][:-len('.json')]):
            continue
        state = leases.read_lease(m.path)
        if state is not None:
            out.append(state)
    return out


def versions_in_use(root: str, ignore: str | None = None) -> dict[str, list[str]]:
    """{version: [who]} named by the live leases of a root (but run `ignore`'s)."""
    out: dict[str, list[str]] = {}
    for state in root_leases(root):
        if ignore is not None and state.path.endswith(f'/{ignore}.json'):
            continue
        if state.record is None and not state.abandoned():
            # unreadable but fresh: be safe, protect nothing less than everything
            for name in list_versions(root):
                out.setdefault(name, []).append(f'an unreadable lease {state.path}')
            continue
        if state.record is None or state.abandoned():
            continue
        for name in state.record.get('versions', ()):
            out.setdefault(name, []).append(state.describe())
    return out


def reclaim_root(root: str, keep: str | None = None) -> list[str]:
    """Removes what runs with an abandoned lease left in a root: their staging
    folder (versions/<version>.tmp-<run id>), their version if it never got its
    _SUCCESS, and their lease. A complete version stays (only pruning deletes
    versions). Returns what was removed."""
    root = root.rstrip('/')
    removed = []
    for state in root_leases(root):
        run_id = state.path.rsplit('/', 1)[-1][:-len('.json')]
        if run_id == keep or not state.abandoned():
            continue
        version = (state.record or {}).get('publishes') or version_name(run_id)
        folder = version_path(root, version)
        staging = staging_path(folder, run_id)
        mine = []
        if list_files(staging) or FileSystems.exists(staging):
            remove_tree(staging)
            mine.append(staging)
        if not FileSystems.exists(f'{folder}/{SUCCESS}') and \
                (list_files(folder) or FileSystems.exists(folder)):
            remove_tree(folder)
            mine.append(folder)
        leases.delete_quietly([state.path, state.path + leases.PART])
        log.info('Reclaimed the leftovers of %s in %s: %s', state.describe(), root,
                 ', '.join(mine) or 'its lease')
        removed += mine
    local = local_path(f'{root}/{LEASES}')
    if local is not None and os.path.isdir(local):
        # part files of a lease or of a restored _SUCCESS whose writer was killed
        for name in os.listdir(local):
            path = os.path.join(local, name)
            orphan = name.startswith('.restore-') or (
                name.endswith(leases.PART) and not os.path.exists(path[:-len(leases.PART)]))
            if orphan and time.time() - os.stat(path).st_mtime > leases.lease_timeout():
                os.remove(path)
    return removed


def root_of(path: str) -> tuple[str | None, str | None]:
    """(ROOT, None) when path is a model root (it has LATEST), (ROOT, version) when it
    is ROOT/versions/<version>, else (None, None)."""
    p = path.rstrip('/')
    if FileSystems.exists(f'{p}/{LATEST}'):
        return p, None
    parent, _, name = p.rpartition('/')
    grand, _, folder = parent.rpartition('/')
    if folder == VERSIONS and VERSION_RE.match(name) and grand:
        return grand, name
    return None, None


def hold_model(path: str, run_id: str) -> str:
    """The model folder `path` names (as resolve_model_path), and when path is a
    model root or one of its versions, that version named in this run's lease
    ROOT/leases/<run id>.json before this returns: pruning leaves it alone until
    the lease is released (release_holds, or the end of the process and then
    the lease timeout). UntrustedModel when the version is not complete."""
    root, version = root_of(path)
    if root is None:
        return resolve_model_path(path)
    try:
        lease = leases.take(lease_path(root, run_id), run_id)
    except Exception as e:   # noqa: BLE001 - a reader without write access to the root
        log.warning('Could not write a lease in %s (%s): reading it without one, so a '
                    'run pruning the root meanwhile could delete the version being read '
                    '(the read would then fail, naming the file).', root, e)
        return resolve_model_path(path)
    for attempt in range(HOLD_ATTEMPTS):
        want = None
        name = version
        if name is None:
            pointer = read_latest(root)
            if not pointer or not pointer.get('version'):
                return resolve_model_path(path)   # an old LATEST without a version name
            name, want = pointer['version'], pointer.get('manifest_sha256')
        lease.add_versions([name])
        folder = version_path(root, name)
        try:
            sha = hashlib.sha256(read_manifest_bytes(folder)).hexdigest()
        except UntrustedModel:
            sha = None
        if sha is not None and want in (None, sha):
            point('version-held')
            return folder
        lease.remove_versions([name])
        time.sleep(0.05 * (attempt + 1))   # a pruner may be writing it back
    if version is not None:
        raise UntrustedModel(f'{version_path(root, version)} has no {SUCCESS}: not a '
                             'complete version (pruned, or its run never finished)')
    raise UntrustedModel(f'{root}/{LATEST} names a version that is not complete '
                         f'({HOLD_ATTEMPTS} tries): the root is being changed; run again')


def release_holds(run_id: str) -> None:
    """Releases every lease this process holds for run_id."""
    for lease in list(leases._HELD.values()):
        if lease.record.get('run_id') == run_id:
            lease.release()


@contextlib.contextmanager
def holding(path: str, run_id: str) -> Iterator[str]:
    """hold_model for the duration of a with block."""
    try:
        yield hold_model(path, run_id)
    finally:
        release_holds(run_id)
