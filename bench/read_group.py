"""Reading and grouping (the pipeline's read_and_group phase) and the final evaluation
(evaluate_and_write): a base commit against the working tree, with `pandas.read_csv`
of the same file as the yardstick, in one run.

  python bench/read_group.py [--base main] [--data 10m] [--rounds 3] [--iters 2]
                             [--model wals] [--result read_group.md]

Each round runs, one process each: pandas.read_csv of the file, then the training
command line (DirectRunner in_memory, rank 10, --iters iterations) in the base
checkout and in the working tree, in alternating order. The table gives medians
over the rounds: read_and_group, evaluate_and_write and the whole pipeline from
metrics.json, the median s/iter, the process's user and system CPU seconds and its
peak RSS (both from getrusage of the finished child), and the ratios new / base and
read_and_group / read_csv (the issue's goal 3). Data: output/bench-data/DATA.data as made by
bench/prepare_data.py. Prints a Markdown table and writes it to
bench/results/RESULT (default read_group.md).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from parse_speed import checkout   # bench/ is on sys.path: a sibling script

ROOT = pathlib.Path(__file__).resolve().parents[1]

PANDAS = r'''
import sys, time
import pandas as pd
t = time.perf_counter()
pd.read_csv(sys.argv[1], sep='\t', header=None)
print(time.perf_counter() - t)
'''


def _child(cmd: list[str], cwd: pathlib.Path) -> tuple[float, dict]:
    """Runs cmd; (wall s, {user, sys, rss_gib}) of that child alone (os.wait4)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f'{" ".join(cmd)} (in {cwd}) exited {proc.returncode}')
    return wall, {'user': usage.ru_utime, 'sys': usage.ru_stime,
                  'rss_gib': usage.ru_maxrss / 2**20}


def train(tree: pathlib.Path, data: pathlib.Path, out: pathlib.Path, iters: int,
          model: str) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, '-m', 'pipeline.train', '--input', str(data), '--output', str(out),
           '--latent_factors', '10', '--num_iters', str(iters), '--runner', 'DirectRunner',
           '--direct_running_mode', 'in_memory', '--model', model]
    wall, usage = _child(cmd, tree)
    phases = json.loads((out / 'metrics.json').read_text())['phase_seconds']
    return dict(usage, wall=wall, read_and_group=phases['read_and_group'],
                evaluate_and_write=phases['evaluate_and_write'], pipeline=phases['pipeline'],
                s_iter=statistics.median(phases['per_iteration']))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--base', default='main', help='commit to compare against')
    ap.add_argument('--data', default='10m', help='output/bench-data/DATA.data')
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--iters', type=int, default=2)
    ap.add_argument('--model', default='wals', choices=('wals', 'implicit', 'explicit'))
    ap.add_argument('--result', default='read_group.md',
                    help='file name under bench/results/ for the table')
    args = ap.parse_args()
    data = ROOT / 'output' / 'bench-data' / f'{args.data}.data'
    if not data.is_file():
        sys.exit(f'{data} is missing: make it with bench/prepare_data.py')
    base_rev = subprocess.run(['git', 'rev-parse', '--short', args.base], cwd=ROOT,
                              check=True, capture_output=True, text=True).stdout.strip()
    work = pathlib.Path(tempfile.mkdtemp(prefix='read_group.'))
    try:
        trees = {'base': checkout(args.base, work), 'new': ROOT}
        runs: dict = {'base': [], 'new': []}
        pandas_s = []
        for r in range(args.rounds):
            out = subprocess.run([sys.executable, '-c', PANDAS, str(data)], check=True,
                                 capture_output=True, text=True)
            pandas_s.append(float(out.stdout))
            order = ('base', 'new') if r % 2 == 0 else ('new', 'base')
            for name in order:
                runs[name].append(train(trees[name], data, work / f'out-{name}', args.iters,
                                         args.model))
                print(f'round {r + 1} {name}: {runs[name][-1]}', file=sys.stderr)
    finally:
        subprocess.run(['git', 'worktree', 'remove', '--force', str(work / 'base')],
                       cwd=ROOT, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    read_csv = statistics.median(pandas_s)
    keys = [('read_and_group', 'read_and_group s'),
            ('evaluate_and_write', 'evaluate_and_write s'), ('pipeline', 'pipeline s'),
            ('s_iter', 's/iter'), ('wall', 'process wall s'), ('user', 'user CPU s'),
            ('sys', 'system CPU s'), ('rss_gib', 'peak RSS GiB')]
    med = {n: {k: statistics.median(x[k] for x in runs[n]) for k, _ in keys} for n in runs}
    lines = [
        f'Pipeline phases, {args.data}, DirectRunner in_memory, --model {args.model}, rank 10, '
        f'{args.iters} iterations: base {args.base} ({base_rev}) against the working tree, '
        f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}; medians of {args.rounds} '
        'alternating rounds, one process each (`python bench/read_group.py '
        f'--model {args.model}`).', '',
        '| measure | base | new | new / base |', '| --- | --- | --- | --- |']
    for k, label in keys:
        b, n = med['base'][k], med['new'][k]
        lines.append(f'| {label} | {b:.2f} | {n:.2f} | {n / b:.2f} |')
    lines += ['', f'`pandas.read_csv` of the same file (median): {read_csv:.2f} s; '
              f'read_and_group / read_csv: base {med["base"]["read_and_group"] / read_csv:.1f}×, '
              f'new {med["new"]["read_and_group"] / read_csv:.1f}× (goal 3: ≤ 2×).', '',
              'Every round (read_and_group s, system CPU s; evaluate_and_write s):', '']
    for n in ('base', 'new'):
        lines.append(f'- {n}: ' + ', '.join(f'{x["read_and_group"]:.2f} ({x["sys"]:.1f}; '
                                            f'{x["evaluate_and_write"]:.2f})'
                                            for x in runs[n]))
    text = '\n'.join(lines) + '\n'
    print(text)
    dest = ROOT / 'bench' / 'results' / args.result
    dest.write_text(text)


if __name__ == '__main__':
    main()
