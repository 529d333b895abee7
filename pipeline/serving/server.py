"""Running the recommendation server's ASGI app (pipeline/serving/app.py) on uvicorn
until SIGINT/SIGTERM, with the process tuned for steady latency: in this process
(serve), or in N worker processes sharing the port (serve_workers, --workers N)."""
from __future__ import annotations

import gc
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

# uvicorn's exit code of a process that could not start (uvicorn.config.STARTUP_FAILURE,
# copied: uvicorn is imported only to serve): its supervisor stops, instead of starting
# again, a worker that exits with it.
STARTUP_FAILURE = 3
METRICS_DIR_ENV = 'PROMETHEUS_MULTIPROC_DIR'   # prometheus-client's multiprocess mode


def _config(app, host: str, port: int, log_level: str, access_log: bool, **more):
    import uvicorn   # the server only (importing the app needs no event loop)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          access_log=access_log, server_header=False,
                          timeout_graceful_shutdown=10, lifespan='on', **more)


def _cannot_bind(host: str, port: int) -> int:
    print(f'error: cannot serve on {host}:{port} (the reason is logged above)',
          file=sys.stderr)
    return 1


def serve(app, host: str, port: int, log_level: str = 'info', access_log: bool = False
          ) -> int:
    """Serves `app` on host:port; returns the exit code (0 after a clean shutdown, 1
    when the port cannot be bound)."""
    import uvicorn
    server = uvicorn.Server(_config(app, host, port, log_level, access_log))
    # uvicorn handles SIGINT/SIGTERM (graceful shutdown: requests in flight finish),
    # then raises the signal again with the handlers it found; these make that a
    # no-op, so a clean shutdown exits 0 instead of dying by the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    # Everything alive now (Beam, FastAPI, the model: ~200k objects) lives as long as
    # the process: out of the cyclic collector's sight, a full collection takes
    # microseconds instead of ~80 ms, a pause every request in flight would wait out.
    gc.collect()
    gc.freeze()
    try:
        server.run()
    except SystemExit as e:      # uvicorn's exit when it cannot bind (its code 3)
        if e.code not in (None, 0):
            return _cannot_bind(host, port)
        raise
    return 0 if server.started else 1


def serve_workers(factory: str, workers: int, host: str, port: int, log_level: str = 'info',
                  access_log: bool = False) -> int:
    """Serves with `workers` processes sharing host:port under uvicorn's supervisor (what
    `uvicorn --workers N` runs). Each worker is a fresh interpreter (spawned) that
    calls `factory` ('module:function') for its app; it inherits os.environ, which is
    how its settings reach it. Returns the exit code: 0 after a clean shutdown
    (SIGINT/SIGTERM: the workers finish their requests in flight), 1 when the port
    cannot be bound or a worker cannot start (the reason is logged above)."""
    from uvicorn.supervisors import Multiprocess
    # The workers' metrics: each writes its own files here (prometheus-client reads
    # the variable when a worker imports it), and /metrics adds them all up. A fresh
    # directory per run, as the client requires; removed at exit.
    metrics_dir = tempfile.mkdtemp(prefix='wals-serve-metrics-')
    os.environ[METRICS_DIR_ENV] = metrics_dir
    try:
        # A worker answers the supervisor's pings only once it has imported the app's
        # modules (Beam: seconds) and, while it loads a model, between long numpy
        # calls: uvicorn's 5 s default would get a worker of a busy machine killed
        # and started again, over and over. The price: a worker that hangs (or dies
        # before it answers its first ping) is noticed after 30 s.
        config = _config(factory, host, port, log_level, access_log, factory=True,
                         workers=workers, timeout_worker_healthcheck=30)
        try:
            sock = config.bind_socket()    # once, in this process: the workers share it
        except SystemExit:                 # uvicorn has logged why
            return _cannot_bind(host, port)
        supervisor = Multiprocess(config, sockets=[sock])
        supervisor.run()    # until SIGINT/SIGTERM, or a worker exits with STARTUP_FAILURE
        sock.close()
    finally:
        os.environ.pop(METRICS_DIR_ENV, None)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        print('error: a server worker could not start (the reason is logged above)',
              file=sys.stderr)
        return 1
    return 0


def stop_with_parent(parent: int, interval: float = 1.0) -> None:
    """In a worker of serve_workers: SIGTERM to itself (uvicorn's graceful shutdown)
    once its supervisor (pid `parent`, passed down: a worker may only get here after
    the supervisor died) is gone. A supervisor killed with SIGKILL cannot stop its
    workers, and orphaned workers would go on holding the port (a restarted server
    could not bind it)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name='wals-serve-parent-watch', daemon=True).start()
