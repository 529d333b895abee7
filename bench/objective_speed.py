"""The training objective of one row block (wals_core.objectives.block_objective, what
every iteration's objective branch runs per block): a base commit against the
working tree, per model and rank, on 1 and 2 threads, in alternating rounds.

The block is synthetic and the same for both (seeded): 9,000 users with 50-249
ratings each among 10,677 items (about 1.35M ratings, the size of one row block of
the 10M-rating benchmark set), the other matrices 70,000 x k and 10,677 x k. Each
round runs one process per version, with the command line's allocator settings
(pipeline/runners/memory_tuning.py); a process times every case (median of
--repeats calls) and reports the value and squared error it computed, so the
table also says whether both versions give the same bits.

    python bench/objective_speed.py --base HEAD --rounds 3

Prints a table and writes bench/results/objective.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'bench'))
from parse_speed import checkout   # noqa: E402  (bench/ is on sys.path: a sibling script)

RESULT = ROOT / 'bench' / 'results' / 'objective.md'
CASES = [(model, k) for k in (10, 32) for model in ('wals', 'implicit', 'explicit')]
THREADS = (1, 2)

CHILD = r'''
import json, statistics, sys, time
from pipeline.runners.memory_tuning import tune_malloc
tune_malloc()     # the allocator settings of the command line (before any thread)
import numpy as np
from wals_core import objectives, solve
from wals_core.params import WalsParams
from wals_core.sparse import Csr

cases, threads, repeats = json.loads(sys.argv[1])
rng = np.random.default_rng(2026)
n_rows, n_cols, n_users = 9000, 10677, 70000
counts = rng.integers(50, 250, n_rows)
indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
# Distinct sorted items per user: a random sample of each row's count.
cols = np.concatenate([np.sort(rng.choice(n_cols, c, replace=False))
                       for c in counts]).astype(np.int32)
values = rng.integers(1, 6, len(cols)).astype(np.float64)
train = Csr(indptr, cols, values)
col_counts = np.bincount(cols, minlength=n_cols)
out = []
for model, k in cases:
    p = WalsParams(latent_factors=k, model=model)
    width = objectives.stored_width(p)
    u = (rng.standard_normal((n_users, width)) * 0.1).astype(np.float32)
    v = (rng.standard_normal((n_cols, width)) * 0.1).astype(np.float32)
    for t in threads:
        solve.default_threads = lambda t=t: t
        got, times = None, []
        for _ in range(repeats + 1):
            started = time.perf_counter()
            got = objectives.block_objective(train, 1000, u, v, p, col_counts, 3.5)
            times.append(time.perf_counter() - started)
        out.append({'model': model, 'k': k, 'threads': t, 'nnz': int(len(cols)),
                    's': statistics.median(times[1:]), 'value': list(got)})
print(json.dumps(out))
'''


def _run(tree: pathlib.Path, repeats: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, '-c', CHILD,
                           json.dumps([CASES, THREADS, repeats])],
                          cwd=tree, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--base', default='main', help='git revision to compare with')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=7, help='calls per case and round')
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix='wals-objective-'))
    runs: dict[str, list[list[dict]]] = {'base': [], 'new': []}
    try:
        base = checkout(args.base, work)
        for r in range(args.rounds):
            order = (('base', base), ('new', ROOT)) if r % 2 == 0 else \
                (('new', ROOT), ('base', base))
            for name, tree in order:
                runs[name].append(_run(tree, args.repeats))
                print(f'round {r + 1} {name} done', flush=True)
    finally:
        subprocess.run(['git', 'worktree', 'remove', '--force', str(work / 'base')],
                       cwd=ROOT, capture_output=True)
    head = subprocess.run(['git', 'rev-parse', '--short', args.base], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
    nnz = runs['new'][0][0]['nnz']
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M')
    lines = [
        f'block_objective of one row block ({nnz:,} ratings), base {args.base} ({head}) '
        f'against the working tree, {stamp} UTC, {platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} CPUs; '
        f'medians of {args.rounds} alternating rounds of {args.repeats} calls '
        f'(`python bench/objective_speed.py --base {args.base} --rounds {args.rounds}`).',
        '',
        '| model | k | threads | base ms | new ms | new / base | ns per rating (new) '
        '| same bits |',
        '| --- | --- | --- | --- | --- | --- | --- | --- |']
    for i, case in enumerate(runs['new'][0]):
        b = statistics.median(run[i]['s'] for run in runs['base'])
        n = statistics.median(run[i]['s'] for run in runs['new'])
        same = all(run[i]['value'] == case['value'] for run in runs['base'] + runs['new'])
        lines.append(f"| {case['model']} | {case['k']} | {case['threads']} | {b * 1e3:.1f} "
                     f"| {n * 1e3:.1f} | {n / b:.2f} | {n / nnz * 1e9:.1f} | "
                     f"{'yes' if same else 'NO'} |")
    text = '\n'.join(lines) + '\n'
    print(text)
    RESULT.write_text(text)


if __name__ == '__main__':
    main()
