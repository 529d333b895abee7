"""The output folder contract: stage, then publish atomically with a _SUCCESS manifest.

A run writes everything to a staging folder beside --output
(`<output>.tmp-<run id>`). Only when the pipeline has finished does the launcher
move the files into --output and write `_SUCCESS` last: a JSON manifest with the
inputs (paths, sizes), parameters, counts, SHA-256 of every published file and
the code version. A reader trusts a model folder only when `_SUCCESS` is there
and the checksums match (pipeline.store.model_files.read_model). Works on any Beam filesystem (local, gs://).
"""
from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import uuid

from apache_beam.io.filesystems import FileSystems

from pipeline.faults import point
from pipeline.options import ConfigError

SUCCESS = '_SUCCESS'
MANIFEST_FORMAT = 'wals-model/1'
CODE_VERSION = '0.1.0'

log = logging.getLogger('pipeline.store.publish')


class OutputRefused(ConfigError):
    """An output this command must not publish to (exit 2, before any work): it holds
    files this tool did not write, overlaps what the command reads, is a file, or
    cannot be written (pipeline/store/output_guard.py)."""


class OutputExists(OutputRefused):
    """--output already holds a published output and --overwrite was not given (or
    another run published there while this one ran)."""


class PublishFailed(RuntimeError):
    """The filesystem refused a step of publishing (exit 1): nothing new is
    published, the earlier output is intact or readable through its set-aside copy."""


def storage_errors() -> tuple[type[BaseException], ...]:
    """What a filesystem raises when it refuses an operation: OSError (local files,
    Beam's BeamIOError) and, with google-cloud installed, its API errors (gs://: a
    403, or a 5xx that outlasted the client's retries)."""
    try:
        from google.api_core.exceptions import GoogleAPIError
    except ImportError:
        return (OSError,)
    return (OSError, GoogleAPIError)


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
    """Refuses an --output that already holds files unless overwrite is set (the
    last check before a publish; pipeline/store/output_guard.py checks everything
    else before any work)."""
    if not overwrite and list_files(output):
        kind = 'a published model' if FileSystems.exists(f'{output.rstrip("/")}/{SUCCESS}') \
            else 'files'
        raise OutputExists(f'--output {output} already holds {kind}; pass --overwrite to '
                           'replace it, or choose another folder')


def our_manifest(folder: str) -> dict | None:
    """The _SUCCESS manifest of a folder this tool published, or None (no _SUCCESS,
    or one that is not this tool's: not JSON, no format, no file list)."""
    path = f'{folder.rstrip("/")}/{SUCCESS}'
    try:
        if not FileSystems.exists(path):
            return None
        manifest = json.loads(_read(path))
    except (ValueError, IOError, OSError):
        return None
    if (isinstance(manifest, dict) and str(manifest.get('format', '')).startswith('wals-')
            and isinstance(manifest.get('files'), dict)):
        return manifest
    return None


def _read(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


def describe_inputs(pattern: str) -> list[dict]:
    """[{path, size_bytes}] of the files a pattern matches (empty list: none)."""
    metas = FileSystems.match([pattern])[0].metadata_list
    return [{'path': m.path, 'size_bytes': m.size_in_bytes}
            for m in sorted(metas, key=lambda m: m.path)]


def publish(staging: str, output: str, manifest: dict, overwrite: bool = True,
            run_id: str | None = None, replaceable: set[str] | None = None) -> dict:
    """Publishes a staged output at output with its _SUCCESS manifest. Returns the
    manifest written.

    The staging folder first gets its own _SUCCESS: from then on it is a complete,
    verifiable output too. Without overwrite, OutputExists if output has gained files
    since the run started (another run published): checked atomically on a local
    filesystem (one rename of the whole folder, which fails on a non-empty folder),
    just before the move elsewhere (object stores have no atomic no-clobber move).
    With overwrite, the old output survives a kill at any point (see _replace_local
    and _replace_copying): at every instant output or output.old-<run id> holds a
    complete output verified by its _SUCCESS, and readers (model_files.resolve_model_path)
    fall back to the .old- copy while output has no _SUCCESS.

    Only files this tool wrote are ever deleted: the old output's files listed in
    its manifest (`replaceable`: the files of output the caller found listed in a
    manifest of this output, pipeline/store/output_guard.py). Once the new output is
    in place, failing to delete the old copy only logs a warning (the publish has
    succeeded; the next run on this output reclaims the copy)."""
    staging, output = staging.rstrip('/'), output.rstrip('/')
    run_id = run_id or new_run_id()
    files = [f for f in list_files(staging) if f != SUCCESS]
    manifest = dict(manifest, format=MANIFEST_FORMAT, code_version=CODE_VERSION,
                    published=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    files={f: _checksum(f'{staging}/{f}') for f in files})
    _write_manifest(staging, manifest)
    point('staged')
    local = local_path(output)
    if local is not None and local_path(staging) is not None:
        if not overwrite:
            return _publish_local_new(staging, local, manifest)
        _replace_local(local_path(staging), local, run_id)
        return manifest
    if not overwrite:
        check_output(output, overwrite=False)
    _replace_copying(staging, output, files, run_id, replaceable)
    return manifest


def _write_manifest(folder: str, manifest: dict) -> None:
    with FileSystems.create(f'{folder}/{SUCCESS}') as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True).encode('utf-8'))


def aside_path(output: str, run_id: str) -> str:
    return f'{output.rstrip("/")}.old-{run_id}'


def _replace_local(staging: str, output: str, run_id: str) -> None:
    """Two renames of whole folders: the old output aside (output.old-<run id>, still
    verified by its own _SUCCESS), the new one in; then the old one's files are
    deleted."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    aside = aside_path(output, run_id)
    if os.path.isdir(output) and os.listdir(output):
        os.rename(output, aside)
        point('old-set-aside')
    elif os.path.isdir(output):
        os.rmdir(output)
    os.rename(staging, output)
    point('new-moved-in')
    _remove_aside(output, aside)


def _replace_copying(staging: str, output: str, files: list[str], run_id: str,
                     replaceable: set[str] | None = None) -> None:
    """On object stores (gs://) a rename is a copy: the old output's files (those its
    manifest lists) are first copied to output.old-<run id> (its _SUCCESS copied
    last), then untrusted in place (its _SUCCESS deleted) and deleted; the new files
    move in under their final names and the new _SUCCESS is written last; then the
    copy is deleted."""
    present = set(list_files(output))   # an object store has no folder to test for
    manifest = our_manifest(output)
    listed = set(manifest['files']) if manifest is not None else set()
    old = sorted(present & (listed | set(replaceable or ())))
    if manifest is not None:
        aside = aside_path(output, run_id)
        rest = [f for f in sorted(present & listed)]
        if rest:
            FileSystems.copy([f'{output}/{f}' for f in rest], [f'{aside}/{f}' for f in rest])
        FileSystems.copy([f'{output}/{SUCCESS}'], [f'{aside}/{SUCCESS}'])
        point('old-set-aside')
        FileSystems.delete([f'{output}/{SUCCESS}'])
        point('old-untrusted')
    old = [f for f in old if f != SUCCESS]
    if old:
        FileSystems.delete([f'{output}/{f}' for f in old])
    for folder in sorted({f.rsplit('/', 1)[0] for f in files if '/' in f}):
        _mkdirs(f'{output}/{folder}')
    _mkdirs(output)
    FileSystems.rename([f'{staging}/{f}' for f in files], [f'{output}/{f}' for f in files])
    point('new-files-moved')
    FileSystems.copy([f'{staging}/{SUCCESS}'], [f'{output}/{SUCCESS}'])
    point('new-moved-in')
    try:
        remove_tree(staging)
    except Exception as e:   # noqa: BLE001 - published: a leftover is not a failure
        log.warning('Published %s, but could not delete the staging copy %s (%s); the '
                    'next run on %s reclaims it.', output, staging, e, output)
    _remove_aside(output, aside_path(output, run_id))


def old_copies(output: str, complete: bool = True) -> list[str]:
    """The output.old-<run id> folders (newest first): copies of an earlier model set
    aside by an --overwrite, left behind if it was killed. complete: only those
    holding a _SUCCESS."""
    output = output.rstrip('/')
    pattern = f'{output}.old-*/{SUCCESS}' if complete else f'{output}.old-*/**'
    try:
        metas = FileSystems.match([pattern])[0].metadata_list
    except Exception:   # noqa: BLE001 - nothing matches
        return []
    folders = {output + m.path[len(output):].split('/', 1)[0].split(os.sep, 1)[0]
               for m in metas if m.path.startswith(output)}
    return sorted(folders, reverse=True)


def _remove_aside(output: str, aside: str) -> None:
    """Deletes this run's copy of the old output once the new one is in place; a
    failure is a warning (the publish has succeeded)."""
    try:
        if not list_files(aside):
            if local_path(aside) is not None and os.path.isdir(local_path(aside)):
                remove_empty_dirs(aside)
            return
        left = remove_listed(aside)
    except Exception as e:   # noqa: BLE001 - published: a leftover is not a failure
        log.warning('Published %s, but could not delete the old copy %s (%s); the next '
                    'run on %s reclaims it.', output, aside, e, output)
        return
    point('old-removed')
    if left:
        log.warning('Published %s; the old copy %s keeps %d file(s) this tool did not '
                    'write (%s): delete them yourself.', output, aside, len(left),
                    ', '.join(left[:5]))


def remove_listed(folder: str, manifest: dict | None = None) -> list[str]:
    """Deletes a published folder: its _SUCCESS first (so a kill while deleting
    leaves an untrusted folder, not a partial trusted one), then the files its
    manifest lists, then the folders left empty. Returns the files left (not
    listed: this tool did not write them). Without a manifest of this tool's,
    nothing is deleted and every file is returned."""
    folder = folder.rstrip('/')
    manifest = manifest if manifest is not None else our_manifest(folder)
    present = list_files(folder)
    if manifest is None:
        return present
    listed = set(manifest['files'])
    if SUCCESS in present:
        FileSystems.delete([f'{folder}/{SUCCESS}'])
    doomed = [f for f in present if f in listed]
    if doomed:
        FileSystems.delete([f'{folder}/{f}' for f in doomed])
    left = [f for f in present if f not in listed and f != SUCCESS]
    if local_path(folder) is not None:
        remove_empty_dirs(folder)
    return left


def remove_empty_dirs(folder: str) -> None:
    """Removes the empty folders under a local folder, and the folder itself if it
    is left empty (object stores have no folders)."""
    root = local_path(folder)
    if root is None or not os.path.isdir(root) or os.path.islink(root):
        return
    for here, dirs, _ in os.walk(root, topdown=False):
        for d in dirs:
            path = os.path.join(here, d)
            if not os.path.islink(path) and not os.listdir(path):
                os.rmdir(path)
    if not os.listdir(root):
        os.rmdir(root)


def local_path(path: str) -> str | None:
    """The OS path of a local file system path, None for other file systems."""
    if path.startswith('file://'):
        return path[len('file://'):]
    return None if '://' in path else path


def _publish_local_new(staging: str, output: str, manifest: dict) -> dict:
    """Renames the staging folder (with its _SUCCESS) to output in one step: the
    rename fails, publishing nothing, if output holds any file."""
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    try:
        os.rename(local_path(staging), output)   # onto nothing, or an empty folder
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            check_output(output, overwrite=False)  # says what is there
        raise
    point('new-moved-in')
    return manifest


def remove_tree(root: str) -> None:
    """Deletes every file under root, and root itself where folders exist (object
    stores such as gs:// have no folder to test or delete). Only for folders this
    tool made whole (staging folders, work folders)."""
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


def read_manifest_bytes(output: str) -> bytes:
    """The raw _SUCCESS of a model folder (LATEST records its SHA-256)."""
    path = f'{output.rstrip("/")}/{SUCCESS}'
    if not FileSystems.exists(path):
        raise UntrustedModel(f'{output} has no {SUCCESS}: not a finished model')
    return _read(path)


def read_manifest(output: str) -> dict:
    try:
        manifest = json.loads(read_manifest_bytes(output))
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get('files'), dict):
        raise UntrustedModel(f'{output.rstrip("/")}/{SUCCESS} is not a manifest of this '
                             'tool (not JSON with a file list): not a finished model')
    return manifest
