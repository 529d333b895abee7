"""A fix for a data-loss race in Beam's FnApiRunner (the DirectRunner's
multi_processing and multi_threading modes), applied before a pipeline runs.

The runner sends a stage's input to a worker by writing its buffered chunks one
by one into a data-plane output stream (fn_runner.BundleManager._send_input_to_worker).
Its gRPC data server makes those streams flush on a timer
(fn_api_runner.worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = 1000, so
data_plane.TimeBasedBufferingClosableOutputStream), and that stream's flush takes
the buffer (get()), hands it on (which blocks while the send queue is full) and
then clears it (_clear()) without holding off write(): a chunk written in between
is cleared unsent, and the worker processes its bundle without it. Seen as lost
rating pieces at 20M ratings; docs/multiprocessing-loss.md has the evidence and
bench/beam_flush_race.py shows it with Beam alone.

apply() (called by factory.make_pipeline) turns the timer off (limit 0: the streams
flush by size only, and the runner's input streams, which never ask for a size
flush, send each input whole at close). It names the private attribute it needs,
so a Beam upgrade that moves it fails loudly (tests/test_multiprocessing_loss.py).
It also installs finished_stages.py (the runner frees what it keeps of a finished
stage: a memory fix, not a data-loss one).
"""
from __future__ import annotations

from pipeline.runners import finished_stages

PRIVATE_NAME = 'apache_beam.runners.portability.fn_api_runner.worker_handlers.DATA_BUFFER_TIME_LIMIT_MS'


def apply() -> None:
    """Makes the FnApiRunner's data plane flush by size only and free finished
    stages (idempotent)."""
    from apache_beam.runners.portability.fn_api_runner import worker_handlers
    if not isinstance(getattr(worker_handlers, 'DATA_BUFFER_TIME_LIMIT_MS', None), int):
        raise RuntimeError(f'{PRIVATE_NAME} is gone: this Beam version needs a new look at '
                           'the fix in pipeline/runners/beam_fixes.py (docs/multiprocessing-loss.md)')
    worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = 0
    finished_stages.install()

