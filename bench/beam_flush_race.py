"""Beam alone (no project code): the FnApiRunner's time-flushed data-plane streams
drop what is written while a flush is under way (docs/multiprocessing-loss.md).

1. stream: data_plane.TimeBasedBufferingClosableOutputStream, the stream the
   FnApiRunner's gRPC data server gives the runner for each bundle input. Its timer
   thread flushes (get(), hand on, _clear()) while write() goes on unlocked; a
   hand-on that blocks (a full send queue) makes the window wide. Counts the bytes
   written and delivered.
2. pipeline: DirectRunner multi_processing, 2 workers. A Flatten of a large
   PCollection (several 10 MiB data-plane messages) with a small one becomes a stage
   of its own; the runner sends it its input chunk by chunk. The runner's send
   queue is made slow for large messages (as when it is full) and the flush timer
   is shortened from Beam's 1000 ms to --tick_ms, so that a tick lands inside the
   write loop on most runs instead of by chance. With --fixed, the timer is off
   (pipeline/runners/beam_fixes.py does this, here by hand). Counts the elements a
   GroupByKey after the Flatten received.

    python bench/beam_flush_race.py                  # both, stock Beam: loses data
    python bench/beam_flush_race.py --fixed          # the timer off: nothing lost

Exit status 1 if anything was lost.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import worker_handlers
from apache_beam.runners.worker import data_plane


def stream_race(fixed: bool) -> tuple[int, int]:
    """(bytes written, bytes delivered) through one stream, writes every 2 ms, a
    flush every 20 ms whose hand-on takes 50 ms."""
    delivered = []

    def slow_hand_on(data: bytes) -> None:
        delivered.append(len(data))
        time.sleep(0.05)

    out = data_plane.ClosableOutputStream.create(
        lambda data: delivered.append(len(data)), slow_hand_on, 0 if fixed else 20)
    chunk = b'x' * 1000
    for _ in range(300):
        out.write(chunk)
        time.sleep(0.002)
    out.close()
    return 300 * len(chunk), sum(delivered)


def pipeline_race(fixed: bool, elements: int, tick_ms: int, out: str) -> tuple[int, int]:
    """(elements sent into the Flatten, elements the GroupByKey after it received)."""
    send = data_plane._GrpcDataChannel._enqueue_to_send

    def slow_send(self, elem):   # the runner's send queue, full: large data waits
        if getattr(elem, 'data', b'') and len(elem.data) > (1 << 20):
            time.sleep(0.2)
        return send(self, elem)

    old_limit = worker_handlers.DATA_BUFFER_TIME_LIMIT_MS
    worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = 0 if fixed else tick_ms
    data_plane._GrpcDataChannel._enqueue_to_send = slow_send
    try:
        p = beam.Pipeline(options=PipelineOptions(['--direct_running_mode=multi_processing',
                                                   '--direct_num_workers=2']))
        big = (p | 'Keys' >> beam.Create(list(range(elements)))
               | 'Payload' >> beam.Map(lambda i: (i % 7, b'x' * 20_000)))
        small = p | 'Placeholders' >> beam.Create([(k, b'') for k in range(7)])
        _ = ((big, small) | beam.Flatten() | beam.GroupByKey()
             | beam.Map(lambda kv: sum(1 for v in kv[1] if v))
             | beam.CombineGlobally(sum)
             | beam.Map(lambda n, path: open(path, 'w').write(json.dumps(n)), out))
        p.run().wait_until_finish()
    finally:
        worker_handlers.DATA_BUFFER_TIME_LIMIT_MS = old_limit
        data_plane._GrpcDataChannel._enqueue_to_send = send
    with open(out) as f:
        return elements, json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--fixed', action='store_true', help='flush by size only (no timer)')
    ap.add_argument('--elements', type=int, default=3000, help='20 kB each (60 MB)')
    ap.add_argument('--tick_ms', type=int, default=5)
    ap.add_argument('--runs', type=int, default=3)
    args = ap.parse_args(argv)
    print(f'apache-beam {beam.__version__}; {"timer off" if args.fixed else "stock streams"}')
    written, delivered = stream_race(args.fixed)
    lost = written != delivered
    print(f'stream: {written:,} bytes written, {delivered:,} delivered')
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            sent, got = pipeline_race(args.fixed, args.elements, args.tick_ms,
                                      f'{tmp}/n{i}.json')
            lost |= sent != got
            print(f'pipeline run {i + 1}: {sent:,} elements into the Flatten, {got:,} out of '
                  f'the GroupByKey after it', flush=True)
    print('LOST' if lost else 'nothing lost')
    return 1 if lost else 0


if __name__ == '__main__':
    sys.exit(main())
