"""Running the recommendation server's ASGI app (pipeline/serving/app.py) on uvicorn
until SIGINT/SIGTERM, with the process tuned for steady latency."""
from __future__ import annotations

import gc
import signal
import sys


def serve(app, host: str, port: int, log_level: str = 'info', access_log: bool = False
          ) -> int:
    """Serves `app` on host:port; returns the exit code (0 after a clean shutdown, 1
    when the port cannot be bound)."""
    import uvicorn   # the server only (importing the app needs no event loop)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            access_log=access_log, server_header=False,
                            timeout_graceful_shutdown=10, lifespan='on')
    server = uvicorn.Server(config)
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
            print(f'error: cannot serve on {host}:{port} (the reason is logged '
                  'above)', file=sys.stderr)
            return 1
        raise
    return 0 if server.started else 1
