"""Read-and-parse speed of a ratings file: a base commit against the working tree, in
the same run (ratios; absolute numbers on a shared machine are provisional).

  python bench/parse_speed.py [--base main] [--input FILE] [--rounds 3] [--gz]

Reads the file as the pipeline's Parse step does (pipeline.io.read: 64 MiB ranges,
or the streamed pieces of a .gz), and parses every piece as parse_range does: the
columnar fast path, or the line-by-line parser when it declines. Each tree runs in
its own process, base and new alternating, `--rounds` times; the table gives the
median CPU seconds of the process (what the work costs: on a shared machine the
wall time mostly measures the neighbours; the median wall ratio is shown too),
MB/s of text per CPU second, the ratio new / base, and how many pieces fell back
to the line parser (0 on a clean file: the fast path must stay the path for clean
data). Default input: the ml-10m synthetic set (pipeline.synth), made in a
temporary folder. --gz also measures a gzip copy of it (level 1). Prints a Markdown
table and writes it to bench/results/parse_speed.md.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Run in a tree's checkout: the same work as _PlanRanges + _ParseRange.
MEASURE = r'''
import dataclasses, json, os, sys, time
from pipeline.io.parse import LineFormat, _parse_columnar, parse_lines
from pipeline.io import read
path = sys.argv[1]
fields = {f.name for f in dataclasses.fields(LineFormat)}
limits = {k: v for k, v in (('max_line_bytes', 1 << 20), ('max_abs_value', 1e9))
          if k in fields}
fmt = LineFormat('\t', max_id_length=256, **limits)
compressed = path.endswith('.gz')
size = os.path.getsize(path)
split = read.SPLIT_BYTES
ranges = ([read.FileRange(path, 0, None, True, fmt)] if compressed else
          [read.FileRange(path, s, min(s + split, size), False, fmt)
           for s in range(0, size, split)])
t, cpu = time.perf_counter(), time.process_time()
text = kept = pieces = fallbacks = 0
for rng in ranges:
    for offset, data in read.iter_range_bytes(rng, split):
        pieces += 1
        text += len(data)
        chunk = _parse_columnar(data, path, offset, fmt)
        if chunk is None:
            fallbacks += 1
            chunk = parse_lines(data, path, offset, fmt)
        kept += chunk.counts['kept']
        del data, chunk
print(json.dumps({'seconds': time.perf_counter() - t, 'cpu': time.process_time() - cpu,
                  'text_bytes': text, 'kept': kept, 'pieces': pieces,
                  'fallbacks': fallbacks}))
'''


def measure(tree: pathlib.Path, path: pathlib.Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, '-c', MEASURE, str(path)], env=env, cwd=tree,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def checkout(base: str, folder: pathlib.Path) -> pathlib.Path:
    tree = folder / 'base'
    subprocess.run(['git', 'worktree', 'add', '--detach', str(tree), base], cwd=ROOT,
                   check=True, capture_output=True)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--base', default='main', help='git revision to compare with')
    parser.add_argument('--input', help='ratings file (default: the ml-10m synthetic set)')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--gz', action='store_true', help='also a gzip copy of the input')
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix='wals-parse-speed-'))
    try:
        base = checkout(args.base, work)
        path = pathlib.Path(args.input) if args.input else work / '10m.tsv'
        if not args.input:
            subprocess.run([sys.executable, '-m', 'pipeline.synth', '--preset', 'ml-10m',
                            '--output', str(path)], cwd=ROOT, check=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)),
                           stdout=subprocess.DEVNULL)
        inputs = [path]
        if args.gz:
            gz = work / (path.name + '.gz')
            with open(path, 'rb') as src, gzip.open(gz, 'wb', compresslevel=1) as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
            inputs.append(gz)
        rows = []
        for p in inputs:
            runs = {'base': [], 'new': []}
            for _ in range(args.rounds):
                for name, tree in (('base', base), ('new', ROOT)):
                    runs[name].append(measure(tree, p))
            for r in runs['base'] + runs['new']:
                assert r['kept'] == runs['base'][0]['kept'], 'the trees kept other lines'
            med = {k: statistics.median(r['cpu'] for r in v) for k, v in runs.items()}
            wall = {k: statistics.median(r['seconds'] for r in v) for k, v in runs.items()}
            text = runs['new'][0]['text_bytes']
            rows.append((p.name, text, med, wall, runs['new'][0]))
            print(f'{p.name}: CPU base {med["base"]:.2f} s, new {med["new"]:.2f} s',
                  file=sys.stderr)
    finally:
        subprocess.run(['git', 'worktree', 'remove', '--force', str(work / 'base')],
                       cwd=ROOT, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    lines = [f'Read and parse, base `{args.base}` against the working tree; median of '
             f'{args.rounds} alternating runs, one process each; CPU seconds.', '',
             '| input | text | base CPU s | new CPU s | base MB/s | new MB/s | new / base '
             '(CPU) | new / base (wall) | pieces | line-parser fallbacks (new) |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    for name, text, med, wall, new in rows:
        lines.append(f'| {name} | {text / 1e6:,.0f} MB | {med["base"]:.2f} | '
                     f'{med["new"]:.2f} | {text / 1e6 / med["base"]:.0f} | '
                     f'{text / 1e6 / med["new"]:.0f} | {med["new"] / med["base"]:.3f} | '
                     f'{wall["new"] / wall["base"]:.3f} | {new["pieces"]} | '
                     f'{new["fallbacks"]} |')
    table = '\n'.join(lines) + '\n'
    print(table)
    out = ROOT / 'bench' / 'results' / 'parse_speed.md'
    out.write_text(table)


if __name__ == '__main__':
    main()
