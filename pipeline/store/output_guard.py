"""Where a command may publish: the checks every publisher (train, recommend, export,
tune, and any later one) runs before any work, its lease, the reclaim of what
killed runs left behind, and the publish itself.

    guard = OutputGuard(output, 'model', overwrite=..., flag='--output')
    guard.check_target()                       # a file? writable? inside a published output?
    guard.check_reads([('--input', pattern)])  # overlaps what the command reads?
    staging = guard.start(run_id)              # lease, reclaim, what OUTPUT holds now
    ... the work, into staging ...
    guard.publish(staging, manifest)           # checked again, then publish.publish
    guard.close()

The rules (docs/reliability.md says them for users):
- Publishing replaces only a previous output of this tool of the same kind,
  recognized by its _SUCCESS manifest, and deletes only the files that manifest
  lists. An OUTPUT holding any other file is refused (OutputRefused, exit 2), with
  or without --overwrite, naming the files found.
- An OUTPUT that equals, contains or lies inside a path the command reads is
  refused; paths are compared resolved (symlinks, `..`, trailing slashes; gs:// by
  bucket and object prefix, globs by every file they match).
- An OUTPUT that is a file or a symbolic link, whose parent is a file or cannot be
  written, or that lies inside a published output is refused.
- Leftovers of killed runs beside OUTPUT (`OUTPUT.tmp-<run id>` staging,
  `OUTPUT.old-<run id>` copies, `OUTPUT.lease-<run id>`) are reclaimed once their
  lease is abandoned (pipeline/store/leases.py); never a live run's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import re

from apache_beam.io.filesystems import FileSystems

from pipeline.faults import point
from pipeline.store import leases
from pipeline.store.model_root import reclaim_root, lease_path as root_lease_path
from pipeline.store.publish import (SUCCESS, OutputExists, OutputRefused, PublishFailed,
                                    local_path,
                                    aside_path, list_files, old_copies, our_manifest,
                                    publish, remove_empty_dirs, remove_listed, remove_tree,
                                    staging_path, storage_errors)

log = logging.getLogger('pipeline.store.output_guard')

# A leftover beside an output: NAME.tmp-<run id> (staging), NAME.old-<run id> (the
# copy an --overwrite set aside), NAME.lease-<run id> (its lease, and the lease
# being rewritten, .w).
LEFTOVER_RE = re.compile(
    rf'^(?P<base>.+)\.(?P<what>tmp|old|lease)-(?P<id>{leases.RUN_ID})(?P<part>\.w)?$')
# What an output's manifest says it is, and which kinds may replace each other.
FAMILIES = {'model': 'a published model', 'recommendations': 'published batch recommendations',
            'similar_items': 'published batch recommendations',
            'tuning': 'published tuning results', 'savedmodel': 'a published SavedModel'}
LEGACY_TUNING = {'trials.csv', 'best.json'}   # a search published before manifests
SHOWN = 5   # foreign files named in a refusal


def output_kind(manifest: dict) -> str:
    """'model', 'recommendations', ... of a manifest (models carry no 'kind')."""
    return manifest.get('kind') or ('model' if 'parameters' in manifest else 'output')


def family(kind: str) -> str:
    """What an output of this kind is called, and which kinds may replace it."""
    return FAMILIES.get(kind, f'a published {kind}')


# ---- paths -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Place:
    """A path reduced for comparison: scheme, bucket (or host) and its components,
    resolved (local: symlinks and `..`; object stores: `..`, `.`, repeated and
    trailing slashes)."""
    scheme: str
    bucket: str
    parts: tuple[str, ...]

    def contains(self, other: 'Place') -> bool:
        return ((self.scheme, self.bucket) == (other.scheme, other.bucket)
                and other.parts[:len(self.parts)] == self.parts)


def places(path: str) -> set[Place]:
    """The forms of a path to compare: locally the resolved path (symlinks followed)
    and the one as written (made absolute, `..` removed: a symlink that lies inside
    the output but points elsewhere still lies inside it)."""
    local = local_path(path)
    if local is not None:
        given = os.path.abspath(os.path.expanduser(local))
        return {Place('file', '', tuple(p for p in form.split(os.sep) if p))
                for form in (os.path.realpath(given), os.path.normpath(given))}
    scheme, _, rest = path.partition('://')
    bucket, _, name = rest.partition('/')
    name = posixpath.normpath('/' + name)
    return {Place(scheme, bucket, tuple(p for p in name.split('/') if p))}


def relation(output: str, read: str) -> str | None:
    """'is', 'contains' or 'lies inside', or None when the paths are apart."""
    pairs = [(a, b) for a in places(output) for b in places(read)]
    if any(a == b for a, b in pairs):
        return 'is'
    if any(a.contains(b) for a, b in pairs):
        return 'contains'
    if any(b.contains(a) for a, b in pairs):
        return 'lies inside'
    return None


def expand(pattern: str) -> list[str]:
    """The files a glob matches (itself if it has no wildcard, or matches nothing)."""
    if not any(c in pattern for c in '*?['):
        return [pattern]
    try:
        found = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    except Exception:   # noqa: BLE001 - nothing matches: the command says so itself
        found = []
    return sorted(found) or [pattern]


def _ancestors(path: str) -> list[str]:
    """Folders above path, nearest first (local: resolved; object stores: each
    prefix up to the bucket)."""
    local = local_path(path)
    out = []
    if local is not None:
        here = os.path.realpath(os.path.abspath(local))
        while True:
            up = os.path.dirname(here)
            if up == here:
                return out
            out.append(up)
            here = up
    scheme, _, rest = path.rstrip('/').partition('://')
    parts = rest.split('/')
    return [f'{scheme}://' + '/'.join(parts[:n]) for n in range(len(parts) - 1, 1, -1)]


def _short(paths: list[str]) -> str:
    shown = ', '.join(paths[:SHOWN])
    return shown + (f', ... ({len(paths)} in all)' if len(paths) > SHOWN else '')


def _matches(path: str, want: dict) -> bool:
    """Whether a file holds exactly the bytes a manifest entry records."""
    try:
        with FileSystems.open(path) as f:
            data = f.read()
    except Exception:   # noqa: BLE001
        return False
    return len(data) == want.get('bytes') and \
        hashlib.sha256(data).hexdigest() == want.get('sha256')


# ---- the guard -------------------------------------------------------------------

class OutputGuard:
    """One command's output, from the checks before any work to the publish.

    kind: what the command publishes ('model', 'recommendations', 'similar_items',
    'tuning', 'savedmodel'); flag: the option that named the output (messages);
    root: the model root when output is a new version under it (the lease and the
    reclaim are then the root's); any_sibling: reclaim every leftover in the
    output's parent, not only the output's own (export's version folders)."""

    def __init__(self, output: str, kind: str, *, overwrite: bool = False,
                 flag: str = '--output', root: str | None = None,
                 any_sibling: bool = False):
        self.output = output.rstrip('/') or output
        self.kind = kind
        self.overwrite = overwrite
        self.flag = flag
        self.root = root.rstrip('/') if root else None
        self.any_sibling = any_sibling
        self.run_id: str | None = None
        self.lease: leases.Lease | None = None
        self.replaceable: set[str] = set()
        self._made: list[str] = []   # local folders the lease had to create

    @property
    def shown(self) -> str:
        return f'{self.flag} {self.root or self.output}'

    # -- before any work --

    def check_target(self) -> None:
        """OutputRefused when output is a file or a symbolic link, when a file stands
        where a folder should be, when its parent cannot be written, or when it lies
        inside a published output."""
        local = local_path(self.output)
        if local is not None:
            self._check_local_target(local)
        elif FileSystems.exists(self.output):
            raise OutputRefused(f'{self.shown} is a file (an object named '
                                f'{self.output}), not a folder: choose a folder')
        for folder in _ancestors(self.output):
            manifest = our_manifest(folder)
            if manifest is not None:
                raise OutputRefused(
                    f'{self.shown} lies inside {folder}, which holds '
                    f'{family(output_kind(manifest))} (it has a {SUCCESS} manifest): '
                    'publishing there would mix files into it; choose a folder outside it')

    def _check_local_target(self, local: str) -> None:
        path = os.path.abspath(os.path.expanduser(local))
        if os.path.islink(path):
            raise OutputRefused(f'{self.shown} is a symbolic link (to '
                                f'{os.path.realpath(path)}): give the folder itself')
        if os.path.exists(path) and not os.path.isdir(path):
            raise OutputRefused(f'{self.shown} is a file, not a folder: choose a folder '
                                '(its files are published inside it)')
        here = os.path.dirname(path)
        while not os.path.lexists(here):
            here = os.path.dirname(here)
        if not os.path.isdir(here):
            raise OutputRefused(f'{self.shown}: {here} is a file where a folder should '
                                'be; choose another path')
        if not os.access(here, os.W_OK | os.X_OK):
            raise OutputRefused(f'{self.shown}: cannot create files in {here} (read-only '
                                'or not yours); the run publishes through files beside '
                                'the output, so its parent folder must be writable')

    def check_reads(self, reads: list[tuple[str, str | None]],
                    allow_equal: tuple[str, ...] = ()) -> None:
        """OutputRefused when output equals, contains or lies inside a path the
        command reads: reads are (flag, path or glob); a flag in allow_equal may name
        the output itself (train --previous_model OUT --output OUT --overwrite: the
        previous model is read whole before it is replaced), not a path inside it."""
        for flag, pattern in reads:
            if not pattern:
                continue
            for path in expand(pattern):
                how = relation(self.output, path)
                if how is None or (how == 'is' and flag in allow_equal):
                    continue
                what = path if path == pattern else f'{path} (matched by {pattern})'
                raise OutputRefused(
                    f'{self.shown} {how} {flag} {what}: the output overlaps what the '
                    'command reads, and publishing could replace or delete it; choose an '
                    'output apart from everything the command reads')

    def start(self, run_id: str) -> str:
        """Takes this run's lease (a write beside the output: OutputRefused when it
        fails), reclaims abandoned leftovers and checks what output holds now.
        Returns the staging folder."""
        self.run_id = run_id
        try:
            self._take_lease()
        except OutputRefused:
            raise
        except Exception as e:   # noqa: BLE001 - the filesystem's own error says why
            self._undo_folders()
            raise OutputRefused(f'{self.shown}: cannot write beside it ({e}); the run '
                                'publishes through files beside the output, so its '
                                'parent folder must be writable') from None
        point('lease-taken')
        try:
            self.reclaim()
            self.check_existing()
        except BaseException:
            self.close()
            raise
        return staging_path(self.output, run_id)

    def _take_lease(self) -> None:
        if self.root is not None:
            path = root_lease_path(self.root, self.run_id)
            version = self.output.rsplit('/', 1)[-1]
            self.lease = leases.take(path, self.run_id)
            self.lease.record['publishes'] = version
            self.lease.add_versions([version])
            return
        local = local_path(self.output)
        if local is not None:
            here = os.path.dirname(os.path.abspath(local))
            while not os.path.exists(here):
                self._made.append(here)
                here = os.path.dirname(here)
        self.lease = leases.take(f'{self.output}.lease-{self.run_id}', self.run_id,
                                 output=self.output)

    def _undo_folders(self) -> None:
        """Removes the (empty) parent folders the lease created, when nothing was
        published."""
        for folder in self._made:
            try:
                os.rmdir(folder)
            except OSError:
                break
        self._made = []

    def check_existing(self) -> None:
        """OutputRefused when output holds files this tool did not write, or a
        published output of another kind; OutputExists when it holds one of this kind
        and overwrite is off. Sets self.replaceable (the files a publish may delete)."""
        files = list_files(self.output) if self._is_there() else []
        manifest = our_manifest(self.output) if SUCCESS in files else None
        ours = {SUCCESS} if manifest is not None else set()
        if manifest is not None:
            ours |= set(manifest['files'])
        copies = [(c, our_manifest(c)) for c in old_copies(self.output)]
        copies = [(c, m) for c, m in copies if m is not None]
        for _, m in copies:   # an --overwrite killed on gs:// left old files in place
            ours |= set(m['files'])
        legacy = self._legacy_tuning(files) if manifest is None else False
        if legacy:
            ours |= set(files)
        foreign = sorted(set(files) - ours)
        if SUCCESS in foreign:
            foreign.remove(SUCCESS)
            foreign.insert(0, f'{SUCCESS} (not a manifest of this tool)')
        if foreign:
            raise OutputRefused(
                f'{self.shown} holds {len(foreign)} file(s) this tool did not write: '
                f'{_short(foreign)}. Publishing replaces only an earlier output of this '
                'tool (recognized by its _SUCCESS manifest), so it is refused with or '
                'without --overwrite: choose a new or empty folder')
        existing = (output_kind(manifest) if manifest is not None else
                    'tuning' if legacy else
                    output_kind(copies[0][1]) if copies else None)
        if existing is not None and family(existing) != family(self.kind):
            raise OutputRefused(
                f'{self.shown} holds {family(existing)}, not {self.kind} output: a '
                'publish never replaces one kind of output with another; choose another '
                'folder')
        if (existing is not None or files) and not self.overwrite:
            what = family(existing) if existing else 'files'
            if self.kind == 'savedmodel':
                raise OutputExists(f'{self.shown} already holds {what}: TF Serving versions '
                                   'are immutable; choose another --version')
            raise OutputExists(f'{self.shown} already holds {what}; pass --overwrite to '
                               'replace it, or choose another folder')
        self.replaceable = set(files) & ours

    def _is_there(self) -> bool:
        local = local_path(self.output)
        return os.path.isdir(local) if local is not None else True

    def _legacy_tuning(self, files: list[str]) -> bool:
        """A search published before tune wrote a manifest: trials.csv and best.json
        only, best.json with the train command."""
        if self.kind != 'tuning' or not files or not set(files) <= LEGACY_TUNING:
            return False
        if 'best.json' not in files:
            return True
        try:
            with FileSystems.open(f'{self.output}/best.json') as f:
                return 'command' in json.loads(f.read())
        except Exception:   # noqa: BLE001
            return False

    # -- leftovers ---------------------------------------------------------------

    def reclaim(self) -> list[str]:
        """Deletes what runs whose lease is abandoned left beside the output (or, for
        a model root, in the root). Returns what was removed."""
        if self.root is not None:
            removed = reclaim_root(self.root, keep=self.run_id)
        else:
            removed = reclaim_beside(self.output, keep=self.run_id,
                                     any_sibling=self.any_sibling)
        if removed:
            point('reclaimed')
        return removed

    # -- the publish ---------------------------------------------------------------

    def publish(self, staging: str, manifest: dict) -> dict:
        """Checks the output again (another run, or a person, may have written to it
        since the start), publishes the staged output, then reclaims old copies left
        by killed runs (deletable now that output is complete again)."""
        if self.kind != 'model' and 'kind' not in manifest:
            manifest = dict(manifest, kind=self.kind)
        self.check_existing()
        try:
            out = publish(staging, self.output, manifest, overwrite=self.overwrite,
                          run_id=self.run_id, replaceable=self.replaceable)
        except (OutputRefused, PublishFailed):
            raise
        except storage_errors() as e:   # e.g. the parent became read-only meanwhile
            raise PublishFailed(f'could not publish to {self.output}: {e}; the earlier '
                                'output, if any, is unchanged (or readable through its '
                                'set-aside copy until the next run)') from None
        self._made = []
        try:
            self.reclaim()
        except Exception as e:   # noqa: BLE001 - published: a leftover is not a failure
            log.warning('Published %s, but could not reclaim leftovers beside it: %s',
                        self.output, e)
        return out

    def close(self) -> None:
        """Releases the lease, unless this run left files beside the output that its
        lease must keep naming until this process has ended (so the next run can
        prove them abandoned and reclaim them)."""
        if self.lease is None:
            return
        left = []
        if self.run_id is not None:
            left = [p for p in (staging_path(self.output, self.run_id),
                                aside_path(self.output, self.run_id))
                    if list_files(p) or FileSystems.exists(p)]
        if left:
            log.warning('Left %s behind; the next run on %s deletes it once this process '
                        'has ended.', ', '.join(left), self.output)
            leases._Heartbeat.forget(self.lease)
        else:
            self.lease.release()
            point('lease-released')
        self.lease = None
        self._undo_folders()


def _siblings(output: str, any_sibling: bool) -> dict[str, dict[str, list[str]]]:
    """{run id: {'tmp'|'old'|'lease': [paths]}} of the leftovers beside output."""
    output = output.rstrip('/')
    local = local_path(output)
    if local is None:
        parent, _, name = output.rpartition('/')
    else:
        parent, name = os.path.dirname(local) or '.', os.path.basename(local)
    names: set[str] = set()
    if local is not None:
        try:
            names = set(os.listdir(parent))
        except OSError:
            return {}
    else:
        prefix = f'{parent}/' if any_sibling else f'{output}.'
        for pattern in (f'{prefix}*', f'{prefix}*/**'):
            try:
                metas = FileSystems.match([pattern])[0].metadata_list
            except Exception:   # noqa: BLE001 - nothing there
                continue
            names |= {m.path[len(parent) + 1:].split('/', 1)[0] for m in metas}
    out: dict[str, dict[str, list[str]]] = {}
    for entry in names:
        m = LEFTOVER_RE.match(entry)
        if m is None or (not any_sibling and m['base'] != name):
            continue
        path = os.path.join(parent, entry) if local is not None else f'{parent}/{entry}'
        out.setdefault(m['id'], {}).setdefault(m['what'], []).append(path)
    return out


def reclaim_beside(output: str, keep: str | None = None,
                   any_sibling: bool = False) -> list[str]:
    """Removes the leftovers of runs whose lease is abandoned beside output: their
    staging folders (and, on object stores, the files a killed publish had already
    copied into an output that has no _SUCCESS), their set-aside copies once the
    output is complete again, and then their leases. Leftovers without a lease
    (from a version of this tool before leases, or made by hand) are left alone."""
    removed = []
    for run_id, found in sorted(_siblings(output, any_sibling).items()):
        if run_id == keep:
            continue
        lease_file = next((p for p in found.get('lease', ()) if not p.endswith(leases.PART)),
                          None)
        if lease_file is None and found.get('lease'):
            removed += _remove_stale_parts(found['lease'])
        state = leases.read_lease(lease_file) if lease_file else None
        if state is None or not state.abandoned():
            if state is None and (found.get('tmp') or found.get('old')):
                log.info('Left %s alone: no lease says which run made it (delete it '
                         'yourself if no run is using it).',
                         ', '.join(found.get('tmp', []) + found.get('old', [])))
            continue
        base = lease_file[:-len(f'.lease-{run_id}')]
        complete = our_manifest(base) is not None
        for staging in found.get('tmp', ()):
            if not complete:
                _remove_partial_publish(base, staging)
            remove_tree(staging)
            remove_empty_dirs(staging)
            removed.append(staging)
        kept_copy = False
        for copy in found.get('old', ()):
            if not complete:     # readers still fall back to it
                kept_copy = True
                continue
            left = remove_listed(copy) if our_manifest(copy) else None
            if left is None:
                remove_tree(copy)
            elif left:
                log.warning('%s keeps %d file(s) this tool did not write (%s): delete '
                            'them yourself.', copy, len(left), _short(left))
            removed.append(copy)
        if not kept_copy:
            leases.delete_quietly(found.get('lease', []) + [lease_file + leases.PART])
            log.info('Reclaimed the leftovers of %s: %s', state.describe(),
                     ', '.join(removed) or 'its lease')
    return removed


def _remove_stale_parts(paths: list[str]) -> list[str]:
    """A lease's part file without the lease (a kill while it was first written,
    before the run made anything else): deleted once older than the lease timeout."""
    import time
    gone = []
    for path in paths:
        state = leases.read_lease(path)
        if state is not None and time.time() - state.heartbeat > leases.lease_timeout():
            leases.delete_quietly([path])
            gone.append(path)
    return gone


def _remove_partial_publish(output: str, staging: str) -> None:
    """A run killed while copying its files into output (object stores) left some of
    them there without a _SUCCESS: delete those that hold exactly the bytes its
    staging manifest lists (proof that they are its copies)."""
    manifest = our_manifest(staging)
    if manifest is None:
        return
    present = set(list_files(output)) if FileSystems.exists(output) or \
        local_path(output) is None else set()
    mine = [f for f in sorted(present & set(manifest['files']))
            if _matches(f'{output}/{f}', manifest['files'][f])]
    if mine:
        FileSystems.delete([f'{output}/{f}' for f in mine])
        log.info('Deleted %d file(s) a killed run had copied into %s', len(mine), output)
