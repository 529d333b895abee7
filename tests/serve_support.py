"""Helpers for the HTTP server tests: small trained models, model roots, and the real
server (`python -m pipeline.serve`) as a subprocess on a free loopback port."""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import httpx
import numpy as np

from pipeline.store.model_root import promote, version_path
from tests.conftest import ROOT, write_ratings
from tests.gcs_support import free_port
from tests.pipeline_support import run_pipeline

START_TIMEOUT = 120.0      # a loaded 2-core machine can take a while to import and load


def int_id_ratings(path: pathlib.Path, seed: int = 5) -> pathlib.Path:
    """~3000 ratings of 150 users on 90 items. User IDs are odd numbers from 3 up (so
    1, 2 and the even numbers in between are not users), item IDs 1..90."""
    rng = np.random.default_rng(seed)
    pairs = rng.choice(150 * 90, size=3000, replace=False)
    users, items = 3 + 2 * (pairs // 90), pairs % 90 + 1
    return write_ratings(path, users, items, rng.integers(1, 6, size=len(pairs)))


def str_id_ratings(path: pathlib.Path, seed: int = 11) -> pathlib.Path:
    """~2500 ratings of 120 users 'u<n>' on 80 items 'i<n>' (str vocabularies)."""
    rng = np.random.default_rng(seed)
    pairs = rng.choice(120 * 80, size=2500, replace=False)
    users, items = pairs // 80, pairs % 80
    return write_ratings(path, [f'u{u}' for u in users], [f'i{i}' for i in items],
                         rng.integers(1, 6, size=len(pairs)))


def train(data: pathlib.Path, out: pathlib.Path, *args: str) -> pathlib.Path:
    """A small model trained by the real pipeline (DirectRunner, in process)."""
    run_pipeline(data, out, '--num_iters', '2', '--block_size', '64', *args)
    return out


def version_name(n: int) -> str:
    """The n-th version name of a test root (they sort by n, as real ones by time)."""
    return f'20260101T{n:06d}Z-{n:08x}'


def add_version(root: pathlib.Path | str, n: int, model: pathlib.Path | str,
                promote_it: bool = True) -> str:
    """Copies a published model folder into ROOT/versions/<name n> (byte for byte:
    the manifest's relative paths verify the copy) and promotes it; returns the name."""
    name = version_name(n)
    dest = version_path(str(root), name)
    if str(root).startswith('gs://'):
        from apache_beam.io.filesystems import FileSystems
        from pipeline.store.publish import list_files
        for f in list_files(str(model)):
            with FileSystems.open(f'{model}/{f}') as src, \
                    FileSystems.create(f'{dest}/{f}') as out:
                out.write(src.read())
    else:
        shutil.copytree(model, dest)
    if promote_it:
        promote(str(root), name, {})
    return name


class Server:
    """`python -m pipeline.serve ARGS --port P` as a subprocess; the log goes to a file."""

    def __init__(self, args: list[str], log: pathlib.Path, env: dict | None = None):
        self.args, self.log_path = [str(a) for a in args], log
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f'http://127.0.0.1:{self.port}'

    def log(self) -> str:
        return self.log_path.read_text(errors='replace') if self.log_path.exists() else ''

    def start(self, timeout: float = START_TIMEOUT) -> 'Server':
        for _ in range(3):      # another process may take the free port first
            self.port = free_port()
            with open(self.log_path, 'ab') as log:
                self.proc = subprocess.Popen(
                    [sys.executable, '-m', 'pipeline.serve', *self.args, '--port',
                     str(self.port)], cwd=ROOT, env=self.env, stdout=log,
                    stderr=subprocess.STDOUT)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if httpx.get(f'{self.url}/healthz', timeout=5).status_code == 200:
                        return self
                except httpx.TransportError:
                    time.sleep(0.1)
            if self.proc.poll() is None:
                break
            if 'address already in use' not in self.log().lower():
                break
        self.stop()
        raise RuntimeError(f'the server did not start:\n{self.log()[-3000:]}')

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (uvicorn's graceful shutdown); returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode


@contextlib.contextmanager
def running(args: list[str], log: pathlib.Path, env: dict | None = None):
    server = Server(args, log, env).start()
    try:
        yield server
    finally:
        code = server.stop()
        assert code == 0, f'the server exited with {code} after SIGTERM:\n{server.log()[-3000:]}'


def wait_for(predicate, timeout: float = 120.0, what: str = 'condition'):
    """Polls predicate() until it returns a true value (returned), or fails."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out after {timeout:.0f} s waiting for {what}')
        time.sleep(0.05)
