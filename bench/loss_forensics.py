"""Which data-plane message a lost count matches (docs/multiprocessing-loss.md).

Given how many training ratings the column blocks lacked, finds what could have
gone missing, from the data alone (bench/prepare_data.py's split file, no Beam
pipeline run):

  1. the training ratings per (row block, column block) piece, as the row-block
     stage cut them (duplicates merged, the project's test split);
  2. whether the loss is one piece, one row block's pieces, one column block, or a
     run of pieces that continues from one row block into the next;
  3. the messages each multi_processing worker sent: the FnApiRunner splits the
     grouped row blocks between N workers by key order (index % N), a worker emits
     each row block's pieces in column order, and Beam's SDK worker cuts its output
     into a data-plane message once the buffer passes 10 MiB (only between
     elements). A message whose ratings equal the loss is printed.

    python bench/loss_forensics.py                   # the 20m case: 647,879 lost
    python bench/loss_forensics.py --size 20m --lost 647879 --block_size 4096
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench'))

FLUSH_BYTES = 10 << 20   # apache_beam.runners.worker.data_plane._DEFAULT_SIZE_FLUSH_THRESHOLD


def encoded_size(n: int, key: int) -> int:
    """Bytes of one (column block, piece) element of n ratings on the data plane,
    encoded as the runner does for Python values (a windowed key-value of Beam's
    fallback coder)."""
    from apache_beam.coders import coders
    from apache_beam.transforms.window import GlobalWindows
    fallback = coders.FastPrimitivesCoder()
    coder = coders.WindowedValueCoder(coders.TupleCoder([fallback, fallback]),
                                      coders.GlobalWindowCoder())
    piece = (np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n), np.zeros(n, bool))
    return len(coder.encode(GlobalWindows.windowed_value((key, piece))))


def messages(m: np.ndarray, workers: int) -> list:
    """[(worker, first piece, last piece, pieces, ratings)] in sending order."""
    out = []
    for w in range(workers):
        seq = [(r, c, int(m[r, c])) for r in range(w, m.shape[0], workers)
               for c in range(m.shape[1]) if m[r, c]]
        size, chunk = 0, []
        for r, c, n in seq:
            size += encoded_size(n, c)
            chunk.append((r, c, n))
            if size > FLUSH_BYTES:
                out.append((w, chunk[0][:2], chunk[-1][:2], len(chunk),
                             sum(x[2] for x in chunk)))
                size, chunk = 0, []
        if chunk:
            out.append((w, chunk[0][:2], chunk[-1][:2], len(chunk), sum(x[2] for x in chunk)))
    return out


def main(argv=None) -> int:
    from stress_multiprocessing import expected_pieces
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--size', default='20m', choices=['1m', '10m', '20m'])
    ap.add_argument('--lost', type=int, default=18_001_428 - 17_353_549)
    ap.add_argument('--block_size', type=int, default=4096)
    ap.add_argument('--workers', type=int, default=2)
    args = ap.parse_args(argv)
    m = expected_pieces(args.size, args.block_size)
    lost = args.lost
    rows, cols = m.shape
    print(f'{args.size}: {m.sum():,} training ratings in {rows} x {cols} pieces '
          f'(block size {args.block_size}); lost {lost:,}')
    print('one piece:', [(r, c) for r in range(rows) for c in range(cols) if m[r, c] == lost])
    print('one row block:', np.flatnonzero(m.sum(1) == lost).tolist(),
          ' one column block:', np.flatnonzero(m.sum(0) == lost).tolist())
    runs = [(a, c, b, d) for a in range(rows) for c in range(cols) for b in range(rows)
            if b != a for d in range(cols) if m[a, c:].sum() + m[b, :d + 1].sum() == lost]
    print('runs (row a from column c on, then row b up to column d):', runs)
    print(f'data-plane messages ({args.workers} workers, {FLUSH_BYTES >> 20} MiB flushes):')
    hits = 0
    for w, first, last, n, ratings in messages(m, args.workers):
        mark = '   <== the loss' if ratings == lost else ''
        hits += ratings == lost
        print(f'  worker {w}: pieces {first}..{last} ({n}): {ratings:,} ratings{mark}')
    print(f'{hits} message(s) match')
    return 0 if hits else 1


if __name__ == '__main__':
    sys.exit(main())
