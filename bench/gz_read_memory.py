"""Peak memory of reading a large .gz input: streamed (pipeline.io.read.iter_range_bytes,
what the pipeline does, each piece parsed as _ParseRange parses it) against reading
the decompressed file whole (what the reader did before).

  python bench/gz_read_memory.py [--gz_gb 1.0] [--dir /tmp] [--modes streamed,whole]

Writes a ratings .gz of about --gz_gb GB to --dir (a gzip of concatenated copies of
one random 32 MiB block: valid gzip, made in seconds; deleted afterwards), then
measures each way in its own process (peak RSS from getrusage). Prints a Markdown
table and writes it to bench/gz_read_memory.md.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK_BYTES = 32 << 20

MEASURE = r'''
import json, resource, sys, time
from pipeline.io.parse import LineFormat, parse_range
from pipeline.io.read import FileRange, iter_range_bytes
from apache_beam.io.filesystems import FileSystems
path, mode = sys.argv[1], sys.argv[2]
t = time.time()
text_bytes = kept = 0
if mode == 'streamed':
    rng = FileRange(path, 0, None, True, LineFormat('\t'))
    for offset, data in iter_range_bytes(rng):
        text_bytes += len(data)
        kept += parse_range(data, path, offset, rng.fmt).counts['kept']
        del data
else:
    # f.read() alone would stop at Beam's 16 MiB default: read to the end.
    with FileSystems.open(path) as f:
        data = b''.join(iter(lambda: f.read(64 << 20), b''))
    text_bytes = len(data)
print(json.dumps({'seconds': time.time() - t, 'text_bytes': text_bytes, 'kept': kept,
                  'peak_rss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
'''


def ratings_block(rng: np.random.Generator, size: int) -> bytes:
    """About `size` bytes of user<TAB>item<TAB>rating<TAB>timestamp lines."""
    n = size // 28
    users = rng.integers(1, 10_000_000, n)
    items = rng.integers(1, 200_000, n)
    ratings = rng.integers(1, 6, n)
    stamps = rng.integers(874_724_710, 893_286_638, n)
    text = '\n'.join(f'{u}\t{i}\t{r}\t{s}' for u, i, r, s in zip(users, items, ratings, stamps))
    return (text + '\n').encode()


def write_gz(path: pathlib.Path, gz_bytes: float) -> tuple[int, int]:
    """(compressed bytes, uncompressed bytes) of the file written."""
    block = ratings_block(np.random.default_rng(0), BLOCK_BYTES)
    member = gzip.compress(block, compresslevel=6)
    copies = max(1, round(gz_bytes / len(member)))
    with open(path, 'wb') as f:
        for _ in range(copies):
            f.write(member)
    return copies * len(member), copies * len(block)


def measure(path: pathlib.Path, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, '-c', MEASURE, str(path), mode], env=env,
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--gz_gb', type=float, default=1.0)
    parser.add_argument('--dir', default='/tmp')
    parser.add_argument('--modes', default='streamed,whole',
                        help='streamed, whole or both (whole needs a few GB of memory)')
    args = parser.parse_args()
    path = pathlib.Path(args.dir) / 'wals-bench-ratings.tsv.gz'
    t = time.time()
    gz, text = write_gz(path, args.gz_gb * 1e9)
    print(f'wrote {path}: {gz / 1e9:.2f} GB gzip, {text / 1e9:.2f} GB of text '
          f'({time.time() - t:.0f} s)', file=sys.stderr)
    try:
        names = {'streamed': 'streamed: iter_range_bytes + parse_range, 64 MiB pieces',
                 'whole': 'whole file in memory (as the old reader meant to), no parsing'}
        rows = [(names[m], measure(path, m)) for m in args.modes.split(',')]
    finally:
        path.unlink()
    lines = [f'Input: {gz / 1e9:.2f} GB .gz, {text / 1e9:.2f} GB uncompressed '
             f'({text // 28 // 1_000_000:,}M-ish rating lines).', '',
             '| read | text read | peak RSS | seconds |', '| --- | --- | --- | --- |']
    for name, m in rows:
        lines.append(f'| {name} | {m["text_bytes"] / 1e9:.2f} GB | '
                     f'{m["peak_rss_kib"] / 1024:,.0f} MiB | {m["seconds"]:.0f} |')
    table = '\n'.join(lines) + '\n'
    print(table)
    (ROOT / 'bench' / 'gz_read_memory.md').write_text(table)


if __name__ == '__main__':
    main()
