"""Benchmark of the WALS half-step kernel (wals_core.solve.solve_rows) against the
previous implementation (kept below as `old_solve_rows`), in the same process.

    .venv/bin/python bench/kernel/bench_kernel.py                  # 10M ratings, k = 10, 32
    .venv/bin/python bench/kernel/bench_kernel.py --ratings 1000000 --factors 10 32 64
    .venv/bin/python bench/kernel/bench_kernel.py --no-old         # new kernel only
    .venv/bin/python bench/kernel/bench_kernel.py --users 138493 --items 26744 \
        --ratings 20000000 --factors 32 --no-old --repeat 1       # 20M: memory check
    # with the `implicit` library (not a project dependency) in another venv:
    /tmp/impl-venv/bin/python bench/kernel/bench_kernel.py --implicit --cg

Data: 10M synthetic ratings, 69,878 users × 10,677 items (MovieLens-10M shaped), from
pipeline/io/synth.py's generate_ratings when it exists, else a power-law generator here.
One "iteration" = all rows then all columns (two half-steps), the same inputs fed to
both kernels so their results can be compared. The machine may be shared: compare the
ratios printed for one run, not absolute times across runs. Timings are the best of
--repeat runs (the old kernel runs once: it is slow). "CPU" is the process CPU time
of the same iteration: with 2 idle cores the wall time approaches CPU / 2; when
wall ~= CPU, other processes were using the second core.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc

import numpy as np
import scipy.sparse

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from wals_core.params import OPTIMIZED, WalsParams  # noqa: E402
from wals_core.solve import gramian, solve_rows  # noqa: E402
from wals_core.sparse import Csr, csr_from_triples  # noqa: E402
from wals_core.weights import column_weights, row_weights  # noqa: E402


# ----------------------------------------------------------------------------------
# The previous kernel (baseline), verbatim.
# ----------------------------------------------------------------------------------

_OLD_CHUNK_ELEMENTS = 1 << 23


def old_solve_rows(block: Csr, self_weights, other_factors, other_weights, other_gramian,
                   unobs_weight, regularization):
    k = other_factors.shape[1]
    out = np.zeros((block.num_rows, k), dtype=np.float64)
    base = unobs_weight * np.asarray(other_gramian, dtype=np.float64) \
        + regularization * np.eye(k)
    per_row = max(1, _OLD_CHUNK_ELEMENTS // (k * k))
    per_nnz = max(1, _OLD_CHUNK_ELEMENTS // (k * (k + 1) // 2))
    start = 0
    while start < block.num_rows:
        limit = block.indptr[start] + per_nnz
        stop = int(np.searchsorted(block.indptr, limit, side='right')) - 1
        stop = min(max(stop, start + 1), start + per_row, block.num_rows)
        out[start:stop] = _old_solve_chunk(block, start, stop, self_weights, other_factors,
                                           other_weights, base, unobs_weight)
        start = stop
    return out


def _old_solve_chunk(block, start, stop, self_weights, other_factors, other_weights, base,
                     unobs_weight):
    k = other_factors.shape[1]
    n = stop - start
    lo, hi = int(block.indptr[start]), int(block.indptr[stop])
    indptr = block.indptr[start:stop + 1] - lo
    cols = block.indices[lo:hi]
    vals = block.values[lo:hi]
    row_of = np.repeat(np.arange(n), np.diff(indptr))
    conf = np.asarray(self_weights, np.float64)[start:stop][row_of] \
        * np.asarray(other_weights, np.float64)[cols]
    uniq, local = np.unique(cols, return_inverse=True)
    v = np.asarray(other_factors, dtype=np.float64)[uniq]
    shape = (n, len(uniq))
    rhs = scipy.sparse.csr_matrix(((unobs_weight + conf) * vals, local, indptr), shape) @ v
    lhs = np.broadcast_to(base, (n, k, k)).copy()
    if np.any(conf):
        iu, ju = np.triu_indices(k)
        packed = scipy.sparse.csr_matrix((conf, local, indptr), shape) @ (v[:, iu] * v[:, ju])
        lhs[:, iu, ju] += packed
        off = iu != ju
        lhs[:, ju[off], iu[off]] += packed[:, off]
    try:
        return np.linalg.solve(lhs, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        return np.einsum('nij,nj->ni', np.linalg.pinv(lhs, hermitian=True), rhs)


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------

def power_law_ratings(num_users, num_items, num_ratings, seed=0):
    """Distinct (user, item) pairs drawn with Zipf(1) popularity on both sides
    (0-based ids), integer ratings 1..5."""
    rng = np.random.default_rng(seed)

    def probs(n):
        w = np.arange(1, n + 1, dtype=np.float64) ** -1.0
        w = np.minimum(w / w.sum() * num_ratings, 0.5 * (num_items if n == num_users
                                                         else num_users))
        p = np.empty(n)
        p[rng.permutation(n)] = w / w.sum()
        return p

    pu, pi = probs(num_users), probs(num_items)
    keys = np.zeros(0, np.int64)
    while len(keys) < num_ratings:
        need = int((num_ratings - len(keys)) * 1.1) + 1000
        u = rng.choice(num_users, need, p=pu)
        i = rng.choice(num_items, need, p=pi)
        keys = np.unique(np.concatenate([keys, u * np.int64(num_items) + i]))
    keys = rng.permutation(keys)[:num_ratings]
    users, items = np.divmod(keys, np.int64(num_items))
    ratings = rng.integers(1, 6, num_ratings).astype(np.float64)
    return users, items, ratings


def load_ratings(num_users, num_items, num_ratings, seed):
    try:
        from pipeline.io.synth import generate_ratings
    except ImportError:
        return power_law_ratings(num_users, num_items, num_ratings, seed), 'bench power-law'
    u, i, r, _ = generate_ratings(num_users, num_items, num_ratings, seed=seed)
    return (u - 1, i - 1, r.astype(np.float64)), 'pipeline.io.synth.generate_ratings'


# ----------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------

def half_step(kernel, block, own, other, others, params, **kw):
    return kernel(block, own, other, others, gramian(other), params.unobs_weight,
                  params.regularization, **kw)


def diff(new, old):
    """Max absolute difference, and max difference relative to each row's largest
    |element| (the factor vector's scale)."""
    scale = np.maximum(np.max(np.abs(old), axis=1, keepdims=True), 1e-300)
    return float(np.max(np.abs(new - old))), float(np.max(np.abs(new - old) / scale))


def time_implicit(by_row: Csr, k: int, use_cg: bool, threads: int, iterations: int = 3):
    """Best seconds per iteration of implicit's ALS on the same rating matrix (its
    confidence model differs, its per-row work is the same: a k × k Gramian and
    solve per user and per item). None if implicit is not installed."""
    try:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits
    except ImportError:
        print('        (implicit / threadpoolctl not importable: skipped)')
        return None
    n = by_row.num_rows
    m = int(by_row.indices.max()) + 1
    user_items = scipy.sparse.csr_matrix(
        (by_row.values.astype(np.float32), by_row.indices, by_row.indptr), shape=(n, m))
    times = []
    last = [time.perf_counter()]

    def callback(iteration, elapsed, loss):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    with threadpool_limits(1, 'blas'):      # as implicit itself recommends
        model = AlternatingLeastSquares(factors=k, regularization=0.07, use_cg=use_cg,
                                        iterations=iterations, num_threads=threads,
                                        random_state=0)
        last[0] = time.perf_counter()
        model.fit(user_items, show_progress=False, callback=callback)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--users', type=int, default=69_878)
    ap.add_argument('--items', type=int, default=10_677)
    ap.add_argument('--ratings', type=int, default=10_000_000)
    ap.add_argument('--factors', type=int, nargs='+', default=[10, 32])
    ap.add_argument('--params', choices=['default', 'optimized', 'noweights'],
                    default='default')
    ap.add_argument('--repeat', type=int, default=3)
    ap.add_argument('--threads', type=int, default=None)
    ap.add_argument('--no-old', action='store_true', help='skip the old kernel')
    ap.add_argument('--cg', action='store_true', help="also time solver='cg' (3 steps)")
    ap.add_argument('--implicit', action='store_true',
                    help='also time the `implicit` library (if importable; run this script '
                         'with a Python that has it): its exact Cholesky solver '
                         '(use_cg=False) and its default 3-step CG, same ratings, same k')
    ap.add_argument('--seed', type=int, default=0)
    args = ap.parse_args(argv)

    t = time.perf_counter()
    (users, items, ratings), source = load_ratings(args.users, args.items, args.ratings,
                                                   args.seed)
    print(f'data: {len(ratings):,} ratings, {args.users:,} x {args.items:,} ({source}), '
          f'{time.perf_counter() - t:.1f}s', flush=True)
    if args.params == 'optimized':
        params = WalsParams(**OPTIMIZED['ratings'])
    elif args.params == 'noweights':
        params = WalsParams(weights=False)
    else:
        params = WalsParams()
    by_row = csr_from_triples(users, items, ratings, args.users)
    by_col = csr_from_triples(items, users, ratings, args.items)
    del users, items, ratings
    row_w = row_weights(args.users, params)
    col_w = column_weights(np.diff(by_col.indptr), params)
    lens_r, lens_c = np.diff(by_row.indptr), np.diff(by_col.indptr)
    print(f'row lengths: median {np.median(lens_r):.0f}, max {lens_r.max()}; '
          f'column lengths: median {np.median(lens_c):.0f}, max {lens_c.max()}')
    print(f'params: w0={params.unobs_weight} lambda={params.regularization} '
          f'weights={params.weights} {params.wt_type}; OPENBLAS_CORETYPE='
          f'{os.environ.get("OPENBLAS_CORETYPE", "(unset)")}; threads='
          f'{args.threads or "default"}; load average {os.getloadavg()[0]:.2f}', flush=True)

    for k in args.factors:
        rng = np.random.default_rng(k)
        v0 = (rng.standard_normal((args.items, k)) / np.sqrt(k)).astype(np.float32)
        kw = {} if args.threads is None else {'num_threads': args.threads}

        def iteration(v):
            u = half_step(solve_rows, by_row, row_w, v, col_w, params, **kw).astype(np.float32)
            v = half_step(solve_rows, by_col, col_w, u, row_w, params, **kw).astype(np.float32)
            return u, v

        # One warm-up iteration gives realistic factors for the timed ones.
        u1, v1 = iteration(v0)
        times, cpus = [], []
        for _ in range(args.repeat):
            t, c = time.perf_counter(), time.process_time()
            iteration(v1)
            times.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        new_t = min(times)
        # Peak memory the kernel allocates (numpy arrays are traced) in one half-step.
        tracemalloc.start()
        half_step(solve_rows, by_row, row_w, v1, col_w, params, **kw)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        line = (f'k={k:3d}  new {new_t:6.2f} s/iteration (runs: '
                f'{", ".join(f"{x:.2f}" for x in times)}; CPU {min(cpus):.2f} s), '
                f'kernel peak {peak / 2**20:.0f} MiB; load {os.getloadavg()[0]:.1f}')
        print(line, flush=True)

        if args.cg:
            t = time.perf_counter()
            ucg = half_step(solve_rows, by_row, row_w, v1, col_w, params, solver='cg', x0=u1,
                            **kw).astype(np.float32)
            vcg = half_step(solve_rows, by_col, col_w, ucg, row_w, params, solver='cg',
                            x0=v1, **kw)
            cg_t = time.perf_counter() - t
            print(f'        cg (3 steps, warm start) {cg_t:6.2f} s/iteration', flush=True)
            del vcg

        if args.implicit:
            for use_cg in (False, True):
                t_imp = time_implicit(by_row, k, use_cg, args.threads or 2)
                if t_imp is not None:
                    print(f'        implicit {"cg (3 steps)" if use_cg else "exact (Cholesky)"}'
                          f' {t_imp:6.2f} s/iteration -> new is x{t_imp / new_t:.1f} faster; '
                          f'load {os.getloadavg()[0]:.1f}', flush=True)

        if not args.no_old:
            # Same inputs to both kernels, half-step by half-step.
            t, c = time.perf_counter(), time.process_time()
            uo = half_step(old_solve_rows, by_row, row_w, v1, col_w, params)
            t_rows, c_rows = time.perf_counter() - t, time.process_time() - c
            un = half_step(solve_rows, by_row, row_w, v1, col_w, params, **kw)
            u32 = un.astype(np.float32)
            t, c = time.perf_counter(), time.process_time()
            vo = half_step(old_solve_rows, by_col, col_w, u32, row_w, params)
            old_t = t_rows + time.perf_counter() - t
            old_c = c_rows + time.process_time() - c
            vn = half_step(solve_rows, by_col, col_w, u32, row_w, params, **kw)
            du, dv = diff(un, uo), diff(vn, vo)
            print(f'        old {old_t:6.2f} s/iteration (CPU {old_c:.2f} s) -> speed-up '
                  f'x{old_t / new_t:.1f} (CPU x{old_c / min(cpus):.1f}); max |new-old|: rows '
                  f'{du[0]:.2e} (rel {du[1]:.2e}), cols {dv[0]:.2e} (rel {dv[1]:.2e}); '
                  f'load {os.getloadavg()[0]:.1f}', flush=True)
    print(f'process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB')


if __name__ == '__main__':
    main()
