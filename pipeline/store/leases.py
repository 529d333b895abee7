"""Leases: a small file (or gs:// object) per running job that says who it is and
that it is still alive, so that another run can tell a live job's files from the
leftovers of a killed one.

A lease records its owner (host, a host identity, pid and the process's start
time, the command) and a heartbeat: a thread of the owning process refreshes every
lease it holds every `heartbeat_interval()` seconds (locally the file's mtime, on
gs:// a rewrite of the object). A lease is ABANDONED, and what it names may be
reclaimed, when
- its owner ran on this host (same hostname, boot and pid namespace) and that
  process is gone (no process with its pid, or one started at another time), or
- its heartbeat is older than `lease_timeout()` seconds (WALS_LEASE_TIMEOUT,
  default 600): the owner is on another machine and has stopped, or hangs.
Otherwise it is live and nothing it names is touched. docs/reliability.md says
where leases are kept and what each one protects.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import re
import socket
import sys
import threading
import time

from apache_beam.io.filesystems import FileSystems

log = logging.getLogger('pipeline.store.leases')

TIMEOUT_ENV = 'WALS_LEASE_TIMEOUT'
DEFAULT_TIMEOUT = 600.0
# A run id (pipeline.store.publish.new_run_id): UTC start time and 8 hex digits.
RUN_ID = r'\d{8}T\d{6}-[0-9a-f]{8}'
RUN_ID_RE = re.compile(f'^{RUN_ID}$')
PART = '.w'   # a lease being rewritten locally (then renamed over the lease)


def lease_timeout() -> float:
    """Seconds without a heartbeat after which a lease is abandoned."""
    try:
        value = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


def heartbeat_interval() -> float:
    """Seconds between heartbeats: six chances per timeout."""
    return max(0.2, lease_timeout() / 6)


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding='ascii', errors='replace') as f:
            return f.read().strip()
    except OSError:
        return None


def host_id() -> str:
    """This host and pid namespace: two processes with the same host_id see the same
    pids (a container with the same hostname has another pid namespace)."""
    boot = _read_text('/proc/sys/kernel/random/boot_id') or 'no-boot-id'
    try:
        pidns = os.readlink('/proc/self/ns/pid')
    except OSError:
        pidns = 'no-pid-ns'
    return f'{socket.gethostname()}/{boot}/{pidns}'


def process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks after boot, /proc/PID/stat field
    22), or None where /proc does not say: with the pid it names one process."""
    stat = _read_text(f'/proc/{pid}/stat')
    if not stat:
        return None
    fields = stat.rsplit(')', 1)[-1].split()   # after "(comm)", which may hold spaces
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass            # exists, owned by someone else
    now = process_start(pid)
    return started is None or now is None or now == started


def owner(run_id: str) -> dict:
    """This process as a lease's owner."""
    return {'run_id': run_id, 'host': socket.gethostname(), 'host_id': host_id(),
            'pid': os.getpid(), 'process_start': process_start(os.getpid()),
            'started': datetime.datetime.now(datetime.timezone.utc).isoformat(),
            'command': ' '.join([os.path.basename(sys.argv[0] or 'python')]
                                + sys.argv[1:])[:500]}


def _local(path: str) -> str | None:
    if path.startswith('file://'):
        return path[len('file://'):]
    return None if '://' in path else path


def _encode(record: dict) -> bytes:
    return json.dumps(record, indent=2, sort_keys=True).encode('utf-8')


def write_record(path: str, record: dict) -> None:
    """Writes a lease in one step (readers see the old or the new one)."""
    local = _local(path)
    if local is None:
        with FileSystems.create(path) as f:      # an object write is atomic
            f.write(_encode(record))
        return
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    part = local + PART
    with open(part, 'wb') as f:
        f.write(_encode(record))
    os.replace(part, local)


class LeaseState:
    """A lease as read back: its record (None if unreadable) and last heartbeat."""

    def __init__(self, path: str, record: dict | None, heartbeat: float):
        self.path, self.record, self.heartbeat = path, record, heartbeat

    @property
    def run_id(self) -> str | None:
        return (self.record or {}).get('run_id')

    def abandoned(self, now: float | None = None) -> bool:
        """True when the owner is provably gone (see the module docstring)."""
        now = time.time() if now is None else now
        if now - self.heartbeat > lease_timeout():
            return True
        owner_ = (self.record or {}).get('owner') or {}
        if owner_.get('host_id') == host_id() and isinstance(owner_.get('pid'), int):
            return not _alive(owner_['pid'], owner_.get('process_start'))
        return False

    def describe(self) -> str:
        o = (self.record or {}).get('owner') or {}
        return f'run {self.run_id} (pid {o.get("pid")} on {o.get("host")})'


def read_lease(path: str) -> LeaseState | None:
    """The lease at path, or None if there is none."""
    local = _local(path)
    try:
        if local is not None:
            mtime = os.stat(local).st_mtime
            with open(local, 'rb') as f:
                data = f.read()
        else:
            metas = FileSystems.match([path])[0].metadata_list
            if not metas:
                return None
            mtime = metas[0].last_updated_in_seconds or 0.0
            with FileSystems.open(path) as f:
                data = f.read()
    except (FileNotFoundError, IOError, OSError):
        return None
    try:
        record = json.loads(data)
        if not isinstance(record, dict):
            record = None
    except ValueError:
        record = None
    try:
        beat = float((record or {}).get('heartbeat') or 0.0)
    except (TypeError, ValueError):
        beat = 0.0
    # Locally the heartbeat thread touches the file; on object stores it rewrites
    # the record (whose time then counts; the object's own time if unreadable).
    return LeaseState(path, record, max(beat, mtime) if local is not None else beat or mtime)


def delete_quietly(paths: list[str]) -> None:
    """Deletes what exists of paths (a lease and its part file)."""
    for path in paths:
        try:
            local = _local(path)
            if local is not None:
                if os.path.lexists(local):
                    os.remove(local)
            elif FileSystems.exists(path):
                FileSystems.delete([path])
        except (IOError, OSError) as e:
            log.warning('could not delete %s: %s', path, e)


class Lease:
    """A lease this process holds: written when taken, refreshed by the heartbeat
    thread, deleted by release()."""

    def __init__(self, path: str, record: dict):
        self.path = path
        self.record = record
        self._lock = threading.Lock()

    def write(self) -> None:
        with self._lock:
            self.record['heartbeat'] = time.time()
            write_record(self.path, self.record)

    def beat(self) -> None:
        local = _local(self.path)
        if local is not None:
            with self._lock:
                os.utime(local)        # the mtime is the heartbeat
        else:
            self.write()

    def names(self) -> set[str]:
        return set(self.record.get('versions', ()))

    def add_versions(self, versions) -> None:
        """Names more versions of its model root (written before this returns)."""
        new = sorted(self.names() | set(versions))
        if new != self.record.get('versions'):
            self.record['versions'] = new
            self.write()

    def remove_versions(self, versions) -> None:
        new = sorted(self.names() - set(versions))
        if new != self.record.get('versions'):
            self.record['versions'] = new
            self.write()

    def release(self) -> None:
        """Deletes the lease (what it protected may then be reclaimed or pruned)."""
        _Heartbeat.forget(self)
        delete_quietly([self.path, self.path + PART])


_HELD: dict[str, Lease] = {}


def take(path: str, run_id: str, **fields) -> Lease:
    """Writes a lease at path for this run (or returns the one this process already
    holds there) and keeps its heartbeat going until release(). Raises OSError (or
    Beam's IOError) when the lease cannot be written."""
    lease = _HELD.get(path)
    if lease is not None:
        return lease
    lease = Lease(path, {'run_id': run_id, 'owner': owner(run_id), **fields})
    lease.write()
    _Heartbeat.hold(lease)
    return lease


def held(path: str) -> Lease | None:
    return _HELD.get(path)


class _Heartbeat:
    """One daemon thread per process refreshing every held lease."""
    _thread: threading.Thread | None = None
    _lock = threading.Lock()

    @classmethod
    def hold(cls, lease: Lease) -> None:
        with cls._lock:
            _HELD[lease.path] = lease
            if cls._thread is None or not cls._thread.is_alive():
                cls._thread = threading.Thread(target=cls._run, name='wals-lease-heartbeat',
                                               daemon=True)
                cls._thread.start()

    @classmethod
    def forget(cls, lease: Lease) -> None:
        with cls._lock:
            if _HELD.get(lease.path) is lease:
                del _HELD[lease.path]

    @classmethod
    def _run(cls) -> None:
        while True:
            time.sleep(heartbeat_interval())
            with cls._lock:
                leases = list(_HELD.values())
            for lease in leases:
                try:
                    lease.beat()
                except Exception as e:   # noqa: BLE001 - keep beating the others
                    log.warning('could not refresh the lease %s: %s', lease.path, e)
