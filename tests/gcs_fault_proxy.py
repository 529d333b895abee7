"""A fault proxy in front of the local Cloud Storage emulator (tests/gcs_support.py).

A ThreadingHTTPServer on loopback forwards every request to the emulator and, while
a rule is armed, answers the matching requests itself: an HTTP error status, a
delay, or a connection cut in the middle of the request body. Clients are pointed
at it exactly as at the emulator: STORAGE_EMULATOR_HOST=proxy.host.

    with FaultProxy(emulator.host) as proxy:
        env = dict(emulator.env(), STORAGE_EMULATOR_HOST=proxy.host)
        proxy.arm(Rule('status', methods=WRITES, status=503, times=1))
"""
from __future__ import annotations

import http.client
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WRITES = ('POST', 'PUT', 'PATCH', 'DELETE')
# What the object store's "rename" is made of: copy/rewrite requests (alone or in a
# batch), then deletes.
COPY = r'/(copyTo|rewriteTo)/|^/batch/'


@dataclass
class Rule:
    """What to do with matching requests: action 'status' (answer `status`),
    'delay' (forward, then hold the answer back `seconds`: done, but the client
    times out and retries), 'cut' (read half the body, then close
    the connection without an answer). `skip` matching requests pass first; then
    `times` are faulted (None: all)."""
    action: str
    methods: tuple[str, ...] = WRITES
    path: str = ''                 # a regex the path must match
    status: int = 503
    seconds: float = 0.0
    skip: int = 0
    times: int | None = 1
    seen: int = 0
    hits: int = 0

    def take(self, method: str, path: str) -> bool:
        if method not in self.methods or not re.search(self.path, path):
            return False
        self.seen += 1
        if self.seen <= self.skip or (self.times is not None and self.hits >= self.times):
            return False
        self.hits += 1
        return True


class FaultProxy:
    def __init__(self, upstream: str):
        parsed = urllib.parse.urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.rules: list[Rule] = []
        self.log: list[str] = []       # 'METHOD path -> what happened'
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = 'HTTP/1.1'

            def log_message(self, *args):   # quiet
                pass

            def _any(self):
                length = int(self.headers.get('Content-Length') or 0)
                rule = proxy._match(self.command, self.path)
                if rule is not None and rule.action == 'cut':
                    self.rfile.read(length // 2)
                    proxy._note(f'{self.command} {self.path} -> cut')
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
                body = self.rfile.read(length) if length else b''
                if rule is not None and rule.action == 'status':
                    proxy._note(f'{self.command} {self.path} -> {rule.status}')
                    data = (b'{"error": {"code": %d, "message": "injected by the fault '
                            b'proxy"}}' % rule.status)
                    self.send_response(rule.status)
                    self.send_header('Content-Type', 'application/json')
                    self.send_header('Content-Length', str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self._forward(body, rule.seconds if rule is not None and
                              rule.action == 'delay' else 0.0)

            def _forward(self, body: bytes, hold: float = 0.0) -> None:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ('host', 'connection', 'keep-alive')}
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except OSError:
                    self.close_connection = True
                    return
                finally:
                    conn.close()
                if hold:
                    # done upstream, the answer held back: the client gives up waiting
                    proxy._note(f'{self.command} {self.path} -> answered after {hold}s')
                    time.sleep(hold)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ('transfer-encoding', 'connection', 'content-length',
                                         'keep-alive'):
                        self.send_header(k, v)
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _any

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass   # a client closing its kept-alive connection

        self.server = Server(('127.0.0.1', 0), Handler)
        self.host = f'http://127.0.0.1:{self.server.server_address[1]}'
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _match(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for rule in self.rules:
                if rule.take(method, path):
                    return rule
        return None

    def _note(self, line: str) -> None:
        with self._lock:
            self.log.append(line)

    def arm(self, *rules: Rule) -> None:
        with self._lock:
            self.rules = list(rules)

    def disarm(self) -> None:
        with self._lock:
            self.rules = []

    def faulted(self) -> int:
        with self._lock:
            return sum(r.hits for r in self.rules)

    def __enter__(self) -> 'FaultProxy':
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
