"""A real Cloud Storage server on loopback for tests: the gcp-storage-emulator package
run as its own process (through tests/gcs_emulator_server.py, which keeps a stalled
client from blocking the others), and the environment that points Beam's gcsio at it.

How Beam is kept off the network and off the 20-30 s credential lookup
----------------------------------------------------------------------
Beam's GCS client asks google.auth.default() for credentials and retries for
20-30 s when there are none before it falls back to anonymous access. Tests give it
credentials through the documented environment variable instead:

  GOOGLE_APPLICATION_CREDENTIALS  an "authorized_user" Application Default
      Credentials file that already holds an access token (the "token" and "expiry"
      fields google-auth itself writes in Credentials.to_json). google.auth.default()
      loads it at once without any request, and the token is valid until 2099, so it
      is never refreshed. The emulator accepts any token.
  STORAGE_EMULATOR_HOST           http://127.0.0.1:PORT (with the scheme): every
      google-cloud-storage client talks to the emulator.
  NO_GCE_CHECK=true, GCE_METADATA_HOST/GCE_METADATA_IP=127.0.0.1:9
      belt and braces: should anything look for the GCE metadata server anyway it
      stays on loopback (port 9, nothing listens) and gives up at once.
  GOOGLE_CLOUD_PROJECT            a project id, so no lookup warns about a missing one.

No private API is patched; subprocesses (python -m pipeline.train ...) get the same
environment and behave the same.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

PROJECT = 'wals-offline-test'
FAKE_TOKEN_EXPIRY = '2099-01-01T00:00:00Z'
SERVER = pathlib.Path(__file__).with_name('gcs_emulator_server.py')   # the emulator


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def write_credentials(path: pathlib.Path) -> pathlib.Path:
    """An authorized_user ADC file with a long-lived dummy access token."""
    path.write_text(json.dumps({
        'type': 'authorized_user', 'client_id': 'offline-test',
        'client_secret': 'offline-test', 'refresh_token': 'offline-test',
        'token': 'offline-test-token', 'expiry': FAKE_TOKEN_EXPIRY,
    }))
    return path


class GcsEmulator:
    """A running gcp-storage-emulator process on 127.0.0.1 (in memory)."""

    def __init__(self, workdir: pathlib.Path, buckets: tuple[str, ...]):
        self.workdir = workdir
        self.buckets = buckets
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.credentials = write_credentials(workdir / 'adc.json')
        self.log = workdir / 'emulator.log'

    @property
    def host(self) -> str:
        return f'http://127.0.0.1:{self.port}'

    def env(self) -> dict[str, str]:
        """The variables that send Google Cloud clients to this emulator."""
        return {
            'STORAGE_EMULATOR_HOST': self.host,
            'GOOGLE_APPLICATION_CREDENTIALS': str(self.credentials),
            'NO_GCE_CHECK': 'true',
            'GCE_METADATA_HOST': '127.0.0.1:9',
            'GCE_METADATA_IP': '127.0.0.1:9',
            'GOOGLE_CLOUD_PROJECT': PROJECT,
        }

    def start(self, timeout: float = 60) -> 'GcsEmulator':
        for _ in range(3):                 # another process may grab the free port
            self.port = free_port()
            with open(self.log, 'ab') as log:
                self.process = subprocess.Popen(
                    [sys.executable, str(SERVER), 'start',
                     '--host', '127.0.0.1', '--port', str(self.port), '--in-memory'],
                    stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                    env={k: v for k, v in os.environ.items()
                         if k not in ('STORAGE_EMULATOR_HOST',)})
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    with urllib.request.urlopen(self.host + '/', timeout=2) as r:
                        if r.read() == b'OK':
                            for bucket in self.buckets:
                                self.create_bucket(bucket)
                            return self
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    time.sleep(0.1)
            self.stop()
        raise RuntimeError(f'the GCS emulator did not start; see {self.log}:\n'
                           f'{self.log.read_text(errors="replace")[-2000:]}')

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def _request(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.host + path, data=data, method=method,
                                     headers={'Content-Type': 'application/json'})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b'null')

    def create_bucket(self, name: str) -> None:
        self._request('POST', f'/storage/v1/b?project={PROJECT}', {'name': name})

    def list_objects(self, bucket: str, prefix: str = '') -> dict[str, int]:
        """{object name: size} of every object under prefix."""
        out, token = {}, None
        while True:
            query = f'prefix={urllib.request.quote(prefix)}'
            if token:
                query += f'&pageToken={urllib.request.quote(token)}'
            page = self._request('GET', f'/storage/v1/b/{bucket}/o?{query}')
            for item in page.get('items', []):
                out[item['name']] = int(item['size'])
            token = page.get('nextPageToken')
            if not token:
                return out


@contextlib.contextmanager
def gcs_emulator(workdir: pathlib.Path, *buckets: str):
    """Starts an emulator with the given buckets and sets its environment in this
    process (restored afterwards); yields the GcsEmulator."""
    emulator = GcsEmulator(pathlib.Path(workdir), buckets).start()
    saved = {k: os.environ.get(k) for k in emulator.env()}
    os.environ.update(emulator.env())
    try:
        yield emulator
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        emulator.stop()
