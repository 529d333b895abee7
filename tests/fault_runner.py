"""Runs the `wals` command with a fault plan: the only way fault hooks get installed.

    python -m tests.fault_runner PLAN_JSON -- train --input ... --output ...

PLAN_JSON is a JSON object:
  "record": a file to which every fault point reached is appended, one per line
            (flushed at once, so it survives a SIGKILL);
  "faults": a list of {"at": POINT, "do": ACTION, "nth": N (default 1)}, ACTION one of
      "kill"   SIGKILL this process right after the N-th time POINT is reached;
      "enospc" / "efbig" / "eio"
               raise that OSError there (the step after the point fails);
      "fsize"  from there on, writing a file beyond "bytes" fails with EFBIG
               (RLIMIT_FSIZE, SIGXFSZ ignored): a disk that fills during the run;
      "pause"  wait until the file "until" exists (at most "timeout" seconds, default
               120), first creating the file "ready" if given, then go on.
The hooks go into pipeline.faults (a module-level list, empty in every other
process); then pipeline.cli.main.main runs the command with the rest of argv,
exactly as `wals ...` would.
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import resource
import signal
import sys
import time

from pipeline import faults

ERRORS = {'enospc': errno.ENOSPC, 'efbig': errno.EFBIG, 'eio': errno.EIO}


def make_hook(plan: dict):
    record = plan.get('record')
    todo = [dict(f) for f in plan.get('faults', ())]
    seen: dict[str, int] = {}

    def hook(name: str) -> None:
        seen[name] = seen.get(name, 0) + 1
        if record:
            with open(record, 'a', encoding='utf-8') as f:
                f.write(name + '\n')
                f.flush()
                os.fsync(f.fileno())
        for fault in todo:
            if fault['at'] != name or seen[name] != int(fault.get('nth', 1)):
                continue
            action = fault['do']
            if action == 'kill':
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            elif action in ERRORS:
                code = ERRORS[action]
                raise OSError(code, os.strerror(code), f'<fault injected at {name}>')
            elif action == 'fsize':
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                limit = int(fault['bytes'])
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            elif action == 'pause':
                if fault.get('ready'):
                    pathlib.Path(fault['ready']).touch()
                deadline = time.monotonic() + float(fault.get('timeout', 120))
                while not os.path.exists(fault['until']):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f'fault plan: {fault["until"]} never appeared')
                    time.sleep(0.02)
            else:
                raise ValueError(f'fault plan: unknown action {action!r}')
    return hook


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] != '--':
        print(__doc__, file=sys.stderr)
        return 2
    plan = json.loads(argv[0])
    unknown = [f['at'] for f in plan.get('faults', ()) if f['at'] not in faults.POINTS]
    if unknown:
        print(f'fault plan: unknown points {unknown}', file=sys.stderr)
        return 2
    faults.install(make_hook(plan))
    from pipeline.cli.main import main as wals
    return wals(argv[2:])


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
