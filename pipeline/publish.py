"""The output folder contract: stage, then publish atomically with a _SUCCESS manifest.

A run writes everything to a staging folder beside --output
(`<output>.tmp-<run id>`). Only when the pipeline has finished does the launcher
move the files into --output and write `_SUCCESS` last: a JSON manifest with the
inputs (paths, sizes), parameters, counts, SHA-256 of every published file and
the code version. A reader trusts a model folder only when `_SUCCESS` is there
and the checksums match (read_model). Works on any Beam filesystem (local, gs://).
"""
from __future__ import annotations

import datetime
import errno
import hashlib
import io
import json
import os
import uuid

import numpy as np
from apache_beam.io.filesystems import FileSystems

SUCCESS = '_SUCCESS'
MANIFEST_FORMAT = 'wals-model/1'
CODE_VERSION = '0.1.0'


class OutputExists(ValueError):
    """--output already holds files and --overwrite was not given."""


def new_run_id() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%S') + \
        '-' + uuid.uuid4().hex[:8]


def staging_path(output: str, run_id: str) -> str:
    return f'{output.rstrip("/")}.tmp-{run_id}'


def list_files(root: str) -> list[str]:
    """Paths (relative to root, '/'-separated) of every file under root, sorted."""
    root = root.rstrip('/')
    result = FileSystems.match([f'{root}/**'])[0]
    return sorted(m.path[len(root) + 1:].replace(os.sep, '/') for m in result.metadata_list)


def check_output(output: str, overwrite: bool) -> None:
    """Refuses an --output that already holds files unless overwrite is set."""
    if not overwrite and list_files(output):
        kind = 'a published model' if FileSystems.exists(f'{output.rstrip("/")}/{SUCCESS}') \
            else 'files'
        raise OutputExists(f'--output {output} already holds {kind}; pass --overwrite to '
                           'replace it, or choose another folder')


def _read(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


def describe_inputs(pattern: str) -> list[dict]:
    """[{path, size_bytes}] of the files a pattern matches (empty list: none)."""
    metas = FileSystems.match([pattern])[0].metadata_list
    return [{'path': m.path, 'size_bytes': m.size_in_bytes}
            for m in sorted(metas, key=lambda m: m.path)]


def publish(staging: str, output: str, manifest: dict, overwrite: bool = True) -> dict:
    """Moves staged files into output and writes _SUCCESS last. Returns the manifest
    written. With overwrite, an earlier model is replaced; without, OutputExists
    if output has gained files since the run started (another run published):
    checked atomically on a local filesystem (one rename of the whole folder, which
    fails on a non-empty folder), just before the move elsewhere (object stores
    have no atomic no-clobber move of a folder)."""
    staging, output = staging.rstrip('/'), output.rstrip('/')
    files = list_files(staging)
    manifest = dict(manifest, format=MANIFEST_FORMAT, code_version=CODE_VERSION,
                    published=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    files={f: _checksum(f'{staging}/{f}') for f in files})
    if not overwrite:
        local = _local_path(output)
        if local is not None and _local_path(staging) is not None:
            return _publish_local_new(staging, local, manifest)
        check_output(output, overwrite=False)
    # Untrust the old model first: from here until _SUCCESS is written again, a
    # reader sees no _SUCCESS and keeps away.
    if FileSystems.exists(f'{output}/{SUCCESS}'):
        FileSystems.delete([f'{output}/{SUCCESS}'])
    old = list_files(output) if FileSystems.exists(output) else []
    if old:
        FileSystems.delete([f'{output}/{f}' for f in old])
    for folder in sorted({f.rsplit('/', 1)[0] for f in files if '/' in f}):
        _mkdirs(f'{output}/{folder}')
    _mkdirs(output)
    FileSystems.rename([f'{staging}/{f}' for f in files], [f'{output}/{f}' for f in files])
    with FileSystems.create(f'{output}/{SUCCESS}') as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True).encode('utf-8'))
    remove_tree(staging)
    return manifest


def _local_path(path: str) -> str | None:
    """The OS path of a local file system path, None for other file systems."""
    if path.startswith('file://'):
        return path[len('file://'):]
    return None if '://' in path else path


def _publish_local_new(staging: str, output: str, manifest: dict) -> dict:
    """Writes _SUCCESS into the staging folder, then renames the folder to output in
    one step: the rename fails, publishing nothing, if output holds any file."""
    with FileSystems.create(f'{staging}/{SUCCESS}') as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True).encode('utf-8'))
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    try:
        os.rename(_local_path(staging), output)   # onto nothing, or an empty folder
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            check_output(output, overwrite=False)  # says what is there
        raise
    return manifest


def remove_tree(root: str) -> None:
    """Deletes every file under root, and root itself where folders exist (object
    stores such as gs:// have no folder to test or delete)."""
    root = root.rstrip('/')
    files = list_files(root)
    if files:
        FileSystems.delete([f'{root}/{f}' for f in files])
    if FileSystems.exists(root):
        FileSystems.delete([root])


def discard(staging: str) -> None:
    """Removes a failed run's staging folder (best effort)."""
    try:
        remove_tree(staging)
    except Exception:   # noqa: BLE001 - cleanup must not hide the real error
        pass


def _mkdirs(path: str) -> None:
    try:
        FileSystems.mkdirs(path)
    except IOError:
        pass   # exists already (local); object stores have no folders


def _checksum(path: str) -> dict:
    data = _read(path)
    return {'bytes': len(data), 'sha256': hashlib.sha256(data).hexdigest()}


class UntrustedModel(ValueError):
    """A model folder without a valid _SUCCESS manifest."""


def read_manifest(output: str) -> dict:
    path = f'{output.rstrip("/")}/{SUCCESS}'
    if not FileSystems.exists(path):
        raise UntrustedModel(f'{output} has no {SUCCESS}: not a finished model')
    return json.loads(_read(path))


def read_model(output: str) -> dict[str, np.ndarray]:
    """The published model {user, item, row, col} after checking _SUCCESS and checksums.
    Loads with allow_pickle=False: nothing read can execute code."""
    output = output.rstrip('/')
    manifest = read_manifest(output)
    model = {}
    for name in ('user', 'item', 'row', 'col'):
        rel = f'model/{name}.npy'
        data = _read(f'{output}/{rel}')
        want = manifest['files'].get(rel, {}).get('sha256')
        if hashlib.sha256(data).hexdigest() != want:
            raise UntrustedModel(f'{output}/{rel} does not match its {SUCCESS} checksum')
        model[name] = np.load(io.BytesIO(data), allow_pickle=False)
    return model
