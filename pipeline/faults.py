"""Named fault points in publishing and promotion, and the hooks tests attach to them.

Production code calls `point(name)` after each step that changes what a reader or
the next run sees (a rename, a manifest or LATEST written, a version condemned or
pruned, a lease taken or released, leftovers reclaimed). A point logs
`publish: <name>` and calls the hooks installed in this process: none in
production, so a point costs one log call and a test of an empty list. Tests
install hooks only in a child process they start (tests/fault_runner.py: SIGKILL
self at a point, raise ENOSPC at one, pause until a file appears), never through
an environment variable or anything a production run reads.

POINTS is the complete list; tests/test_fault_injection.py checks that it names
exactly the points the code calls, and that the fault matrix reaches every one.
"""
from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger('pipeline.store.publish')

# Every point, in the order a run meets them (docs/reliability.md, "Publish steps").
POINTS: tuple[str, ...] = (
    'lease-taken',          # the run's lease written (beside the output, or in ROOT/leases)
    'reclaimed',            # abandoned leftovers of killed runs deleted
    'version-held',         # a reader named a root's version in its lease and found it complete
    'staged',               # the staging folder's own _SUCCESS manifest written
    'old-set-aside',        # the old output renamed (copied on gs://) to OUTPUT.old-<run id>
    'old-untrusted',        # gs://: the old output's _SUCCESS deleted in place
    'new-files-moved',      # gs://: the new files renamed into OUTPUT, no _SUCCESS yet
    'new-moved-in',         # the new output complete in place (rename; gs://: _SUCCESS copied)
    'old-removed',          # the set-aside old output deleted
    'latest-temp-written',  # local root: the new LATEST written to a temporary file
    'latest-written',       # LATEST now names this run's version
    'latest-kept',          # LATEST already named a newer version: left as it was
    'condemned',            # prune: a version's _SUCCESS deleted
    'restored',             # prune: a reader took the condemned version; _SUCCESS written back
    'pruned',               # prune: the condemned versions' files deleted
    'lease-released',       # the run's lease deleted
)

Hook = Callable[[str], None]
_hooks: list[Hook] = []


def point(name: str) -> None:
    """Marks a step of publishing: logs it and runs the installed hooks (none in
    production). A hook may raise (the step after the point then fails) or end the
    process (a crash right after the step)."""
    log.info('publish: %s', name)
    if _hooks:
        if name not in POINTS:
            raise AssertionError(f'fault point {name!r} is not in pipeline.faults.POINTS')
        for hook in list(_hooks):
            hook(name)


def install(hook: Hook) -> None:
    """Adds a hook called with the name of every point reached (tests only)."""
    _hooks.append(hook)


def clear() -> None:
    """Removes every hook."""
    _hooks.clear()
