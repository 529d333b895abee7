"""Beam alone (no project code): big numpy elements through two GroupByKeys on the
DirectRunner's multi_processing mode, counted on both sides of the second shuffle.

The shape copies the trainer's block build at 20m (bench/stress_multiprocessing.py):
R keys are grouped (the row blocks), each group emits C pieces of about P int32/
int32/float64/bool entries keyed by column (17 bytes an entry, so the worker's
10 MiB data-plane flushes carry 8-9 pieces), flattened with one empty placeholder
per column, and a second GroupByKey gathers them by column. Every run checks that
the entries received equal the entries sent.

    python bench/beam_gbk_multiprocessing.py --runs 20
    python bench/beam_gbk_multiprocessing.py --rows 34 --cols 7 --piece 75000 --runs 5

Exit status 1 if any run lost or repeated an element. Prints one line per run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions


def piece_size(row: int, col: int, piece: int) -> int:
    """Entries of piece (row, col): deterministic, within +-30% of `piece`."""
    return int(piece * (0.7 + 0.6 * np.random.default_rng(row * 1000 + col).random()))


def seed_pieces(row: int):
    yield row, (np.zeros(0, np.int32),)


def emit_pieces(keyed, cols: int, piece: int):
    row, _ = keyed
    for col in range(cols):
        n = piece_size(row, col, piece)
        Metrics.counter('gbk', 'pieces_sent').inc()
        Metrics.counter('gbk', 'entries_sent').inc(n)
        yield col, (np.full(n, row, np.int32), np.arange(n, dtype=np.int32),
                    np.ones(n), np.zeros(n, bool))


def receive(keyed):
    col, pieces = keyed
    pieces = [p for p in pieces if len(p[0])]
    rows = sorted(int(p[0][0]) for p in pieces)
    Metrics.counter('gbk', 'pieces_received').inc(len(pieces))
    Metrics.counter('gbk', 'entries_received').inc(sum(len(p[0]) for p in pieces))
    yield col, rows


def run_once(rows: int, cols: int, piece: int, workers: int, mode: str, out: str) -> dict:
    options = PipelineOptions(['--direct_running_mode', mode,
                               '--direct_num_workers', str(workers)])
    started = time.time()
    p = beam.Pipeline(options=options)
    pieces = (p | beam.Create(list(range(rows)))
              | 'KeyRows' >> beam.FlatMap(seed_pieces)
              | 'GroupRows' >> beam.GroupByKey()
              | 'Pieces' >> beam.FlatMap(emit_pieces, cols, piece))
    # An empty placeholder per column from a second source, flattened in (as the
    # trainer did): the Flatten becomes a stage of its own between the two.
    keys = (p | 'Cols' >> beam.Create(list(range(cols)))
            | 'ColKeys' >> beam.Map(lambda c: (c, (np.zeros(0, np.int32),))))
    got = ((pieces, keys) | 'AllPieces' >> beam.Flatten()
           | 'GroupCols' >> beam.GroupByKey()
           | 'Receive' >> beam.FlatMap(receive))
    _ = (got | beam.combiners.ToList()
         | beam.Map(lambda v, path: open(path, 'w').write(json.dumps(sorted(v))), out))
    result = p.run()
    result.wait_until_finish()

    def counter(name):
        found = result.metrics().query(MetricsFilter().with_name(name))['counters']
        return sum(c.committed if c.committed is not None else c.attempted for c in found)

    expected = sum(piece_size(r, c, piece) for r in range(rows) for c in range(cols))
    with open(out) as f:
        seen = json.load(f)
    missing = sorted((r, c) for c in range(cols) for r in range(rows)
                     if r not in dict(seen).get(c, []))
    per_col = {c: len(rs) for c, rs in seen}
    return {'seconds': round(time.time() - started, 1), 'expected_entries': expected,
            'entries_sent': counter('entries_sent'),
            'entries_received': counter('entries_received'),
            'pieces_sent': counter('pieces_sent'), 'pieces_received': counter('pieces_received'),
            'groups': len(seen), 'groups_per_col_ok': all(per_col.get(c) == rows
                                                          for c in range(cols)),
            'missing_pieces': missing}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--rows', type=int, default=34)
    ap.add_argument('--cols', type=int, default=7)
    ap.add_argument('--piece', type=int, default=75000, help='mean entries per piece')
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--mode', default='multi_processing',
                    choices=['multi_processing', 'multi_threading', 'in_memory'])
    ap.add_argument('--runs', type=int, default=10)
    args = ap.parse_args(argv)
    print(f'apache-beam {beam.__version__}, {args.mode}, {args.workers} workers, '
          f'{args.rows} x {args.cols} pieces of ~{args.piece:,} entries', flush=True)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(1, args.runs + 1):
            r = run_once(args.rows, args.cols, args.piece, args.workers, args.mode,
                         f'{tmp}/seen-{i}.json')
            lost = (r['entries_received'] != r['expected_entries']
                    or r['entries_sent'] != r['expected_entries']
                    or r['missing_pieces'] or not r['groups_per_col_ok']
                    or r['groups'] != args.cols)
            bad += bool(lost)
            print(f'run {i}: {"LOST OR REPEATED" if lost else "ok"} {json.dumps(r)}',
                  flush=True)
    print(f'{bad} of {args.runs} runs lost or repeated elements')
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
