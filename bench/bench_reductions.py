"""What the fixed-order sums (wals_core/sums.py, docs/determinism.md) cost.

On the synthetic 1m set of bench/prepare_data.py (6,040 users x 3,706 items, 1M
ratings, the pipeline's split; one row block, as --block_size 16384 makes it), times
each reported reduction of an iteration and of the evaluation twice in the same run:
with the project's fixed-order sums, and with the BLAS dot products they replaced
(the baseline: the same functions with wals_core.sums' entry points swapped for
`float(a @ b)`). One row half-step solve is timed for scale.

    python bench/bench_reductions.py                 # --repeats 11
    nice -n 10 python bench/bench_reductions.py --threads 2

Prints a table and writes bench/results/reductions.md. Times are medians of the
repeats; ratios (fixed-order / BLAS) are what to read on a loaded machine.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'bench'))
RESULT = ROOT / 'bench' / 'results' / 'reductions.md'


def _blas_dot(a, b) -> float:
    return float(a @ b)


class _BlasSum:
    """FixedSum's interface over BLAS dot products on one thread (metrics.py's old
    squared_error)."""

    def __init__(self):
        self.value = 0.0

    def add_products(self, a, b):
        from wals_core.solve import single_threaded_blas
        with single_threaded_blas():
            self.value += float(a @ b)
        return self


@contextlib.contextmanager
def blas_sums():
    """The reductions swapped for BLAS dot products, where the code calls them."""
    import numpy as np
    from pipeline.training import evaluate
    from wals_core import metrics, objectives, ranking
    saved = [(objectives, 'fixed_dot', objectives.fixed_dot),
             (metrics, 'FixedSum', metrics.FixedSum),
             (evaluate, 'sum_of_squares', evaluate.sum_of_squares),
             (ranking, 'fixed_sum', ranking.fixed_sum)]
    objectives.fixed_dot = _blas_dot
    metrics.FixedSum = _BlasSum
    evaluate.sum_of_squares = lambda x: _blas_dot(x, x)
    ranking.fixed_sum = lambda x: float(np.sum(x))
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _paired_medians(fn, repeats: int) -> tuple[float, float]:
    """Median seconds of fn with BLAS sums and with fixed-order sums, the two taken
    in turn (alternating which goes first) so that a change of load hits both."""
    base, fixed = [], []
    for i in range(repeats):
        for blas in ((True, False) if i % 2 == 0 else (False, True)):
            with blas_sums() if blas else contextlib.nullcontext():
                t = time.perf_counter()
                fn()
                (base if blas else fixed).append(time.perf_counter() - t)
    return statistics.median(base), statistics.median(fixed)


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cases(k: int):
    """(name, function) of every timed reduction on the 1m set."""
    import numpy as np
    from prepare_data import prepare, read_split
    from pipeline.training import evaluate
    from pipeline.training.rating_stats import RatingStats
    from wals_core import objectives
    from wals_core.metrics import squared_error
    from wals_core.params import WalsParams
    from wals_core.ranking import rank_and_score
    from wals_core.sparse import csr_from_triples
    from wals_core.train import solve_side, Problem

    prepare('1m')
    u_idx, i_idx, r, test, n_users, n_items = read_split('1m')
    tr = ~test
    block = csr_from_triples(u_idx[tr], i_idx[tr], r[tr], n_users)
    counts = np.bincount(i_idx[tr], minlength=n_items)
    rng = np.random.default_rng(0)
    out = []
    for model in ('wals', 'implicit', 'explicit'):
        p = WalsParams(model=model, latent_factors=k)
        w = objectives.stored_width(p)
        u = (rng.normal(size=(n_users, w)) / np.sqrt(k)).astype(np.float32)
        v = (rng.normal(size=(n_items, w)) / np.sqrt(k)).astype(np.float32)
        mu = float(r[tr].mean())

        def objective(p=p, u=u, v=v, mu=mu):
            objectives.block_objective(block, 0, u, v, p, counts, mu)
            objectives.count_norm(counts, v)
        out.append((f'{model}: objective of an iteration (block_objective + count_norm)',
                    objective))
    p = WalsParams(model='explicit', latent_factors=k)
    u = (rng.normal(size=(n_users, k + 1)) / np.sqrt(k)).astype(np.float32)
    v = (rng.normal(size=(n_items, k + 1)) / np.sqrt(k)).astype(np.float32)
    stats = RatingStats(int(tr.sum()), float(r[tr].sum()), float(r[tr].min()),
                        float(r[tr].max()))
    rows = block.row_of_entry()
    out.append(('explicit: train + test squared errors (evaluate)', lambda: (
        evaluate._squared_errors(rows, block.indices, block.values, u, v, p, stats),
        evaluate._squared_errors(u_idx[test], i_idx[test], r[test], u, v, p, stats))))
    out.append(('wals: train + test squared errors (metrics.squared_error)', lambda: (
        squared_error(rows, block.indices, block.values, u[:, :k], v[:, :k]),
        squared_error(u_idx[test], i_idx[test], r[test], u[:, :k], v[:, :k]))))
    out.append(('ranking evaluation @10 (rank_and_score, every test user)', lambda: (
        rank_and_score(u[:, :k], v[:, :k], 10, u_idx[test], i_idx[test], block.indptr,
                       block.indices, item_offsets=v[:, k]))))
    err = rng.normal(size=int(tr.sum()))
    out.append(('the sum alone: Σ e² of 900k float64 (sum_of_squares)',
                lambda: evaluate.sum_of_squares(err)))
    pw = WalsParams(latent_factors=k)
    problem = Problem.build(u_idx[tr], i_idx[tr], r[tr], n_users, n_items, pw)
    vw = v[:, :k].copy()
    solve_side(problem, 'row', vw, pw)          # plan once, as every later iteration
    scale = ('for scale: one row half-step solve (wals, no reduction changed)',
             lambda: solve_side(problem, 'row', vw, pw))
    return out, scale


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--repeats', type=int, default=11)
    ap.add_argument('--latent_factors', type=int, default=10)
    ap.add_argument('--threads', type=int, default=None,
                    help='BLAS threads of the baseline (default: the BLAS default)')
    args = ap.parse_args(argv)
    if args.threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads, 'blas')
    started = datetime.datetime.now(datetime.timezone.utc)
    timed, scale = cases(args.latent_factors)
    rows = []
    for name, fn in timed:
        fn()                                      # warm: caches, first-touch pages
        base, fixed = _paired_medians(fn, args.repeats)
        rows.append((name, base, fixed))
        print(f'{name}: BLAS {base * 1e3:.1f} ms, fixed-order {fixed * 1e3:.1f} ms '
              f'({fixed / base:.2f}x)', flush=True)
    solve = _median_seconds(scale[1], args.repeats)
    commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    lines = [
        '# Fixed-order sums: cost against the BLAS dot products they replaced', '',
        f'{started:%Y-%m-%d %H:%M} UTC, commit {commit}, {platform.machine()}, '
        f'{os.cpu_count()} CPUs (shared, loaded: read the ratios), '
        f'k = {args.latent_factors}, median of {args.repeats}. Data: synthetic 1m '
        '(bench/prepare_data.py), 900k training and 100k test ratings, one row block.',
        '', '```', 'python ' + ' '.join(['bench/bench_reductions.py', *(argv or sys.argv[1:])]),
        '```', '',
        '| reduction | BLAS dot (before) ms | fixed-order (after) ms | after / before |',
        '| --- | ---: | ---: | ---: |']
    for name, base, fixed in rows:
        lines.append(f'| {name} | {base * 1e3:.2f} | {fixed * 1e3:.2f} | {fixed / base:.2f} |')
    lines += ['', f'{scale[0]}: {solve * 1e3:.0f} ms.', '']
    text = '\n'.join(lines)
    RESULT.write_text(text)
    print('\n' + text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
