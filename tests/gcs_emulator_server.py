"""Starts gcp-storage-emulator (same arguments as `python -m gcp_storage_emulator`)
with a socket timeout on every connection.

The emulator's HTTP server handles one connection at a time. A test that stops a
running job (SIGSTOP) can catch that job mid-request, e.g. a lease heartbeat
between its headers and its body; the server then waits on that connection and
every other client's request (the test's own listing, a second job) times out
after two minutes. Cloud Storage serves each client on its own, so the timeout
drops such a stalled connection after a few seconds (the stopped client's own
library retries it once it runs again) and the others go on.
"""
from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main

STALLED_CONNECTION_SECONDS = 10

if __name__ == '__main__':
    server.RequestHandler.timeout = STALLED_CONNECTION_SECONDS
    main()
