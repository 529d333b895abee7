"""One benchmarked method, run in its own process by run_bench.py.

    python bench/workers.py METHOD --data NAME --rank K --iters N --out DIR --result FILE

METHOD: wals_core | wals_core_cg | implicit_exact | implicit_cg | spark | numpy_floor |
pandas_read.
(The Beam pipeline runs as its own CLI, `python -m pipeline.train`; see run_bench.py.)

Every worker writes FILE (JSON) with absolute wall-clock stamps (time.time()) so the
parent can place them against the moment it spawned the process:
  ready          imports done (and, for Spark, the SparkSession up)
  read_start / model_written   the read -> model-on-disk span
and the measured numbers: seconds per iteration (per_iteration list and how it was
measured), phase seconds, train/test RMSE where they apply.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

T_START = time.time()

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The run's snapshot of pipeline/ and wals_core/ (run_bench.py sets it) comes first.
CODE_ROOT = pathlib.Path(os.environ.get('BENCH_CODE_ROOT', ROOT))
sys.path.insert(0, str(ROOT / 'bench'))
sys.path.insert(0, str(CODE_ROOT))

import numpy as np  # noqa: E402

from prepare_data import paths, read_split  # noqa: E402

THREADS = 2


# ---------------------------------------------------------------------------------
# wals_core: the project's in-memory trainer, read -> split -> train -> write, the
# same steps and split as the pipeline (reads the raw ratings file itself).
# ---------------------------------------------------------------------------------

def run_wals_core(args) -> dict:
    from prepare_data import read_ratings
    from wals_core.hashing import is_test
    from wals_core.metrics import rmse, squared_error
    from wals_core.params import WalsParams
    from wals_core.sparse import merge_duplicates
    from wals_core.train import fit_inputs, train
    from wals_core.vocab import Vocabulary
    from pipeline.runners.memory_tuning import tune_malloc
    tune_malloc()                  # as the Beam command line does (see run_bench NOTES)
    ready = time.time()

    # Read: the raw file. IDs are canonical integers in every data set here, so the
    # sorted int64 IDs are exactly wals_core.vocab.finalize_ids' vocabulary.
    t_read = time.time()
    users, items, ratings = read_ratings(paths(args.data)['raw'])
    t_loaded = time.time()
    uvoc, rows = np.unique(users, return_inverse=True)
    ivoc, cols = np.unique(items, return_inverse=True)
    uv, iv = Vocabulary(uvoc), Vocabulary(ivoc)
    test = is_test(uv.hashes[rows], iv.hashes[cols], 0, 0.1)      # pipeline defaults
    rows, cols, vals, test, _ = merge_duplicates(rows, cols, ratings, 'mean', test)
    train_mask = ~test
    # project defaults (wals_core_cg: --solver cg with its default --cg_steps)
    params = WalsParams(latent_factors=args.rank, num_iters=args.iters,
                        solver='cg' if args.method == 'wals_core_cg' else 'exact')
    problem, u0, v0 = fit_inputs(rows[train_mask], cols[train_mask], vals[train_mask],
                                 uv.hashes, iv.hashes, params, 0)
    t_built = time.time()

    stamps = [time.time()]

    def on_half_step(it, side, u, v):
        if side == 'col':
            stamps.append(time.time())
    u, v = train(problem, params, u0, v0, on_half_step)
    t_trained = time.time()

    out = pathlib.Path(args.out) / 'model'
    out.mkdir(parents=True, exist_ok=True)
    for fname, arr in (('user.npy', uv.ids), ('item.npy', iv.ids), ('row.npy', u),
                       ('col.npy', v)):
        np.save(out / fname, arr)
    t_written = time.time()

    # RMSE exactly as pipeline/training/evaluate.py: train entries, and warm test entries
    # (user and item both have a training rating).
    pr = problem.by_row
    train_sse = squared_error(pr.row_of_entry(), pr.indices, pr.values, u, v)
    user_has = np.diff(pr.indptr) > 0
    col_has = np.bincount(cols[train_mask], minlength=len(iv)) > 0
    t_rows, t_cols, t_vals = rows[test], cols[test], vals[test]
    warm = user_has[t_rows] & col_has[t_cols]
    test_sse = squared_error(t_rows[warm], t_cols[warm], t_vals[warm], u, v)
    per_iter = list(np.diff(stamps))
    return {
        'ready': ready, 'read_start': t_read, 'model_written': t_written,
        'per_iteration': per_iter, 'per_iteration_how': 'median of timed iterations',
        'phases': {'read': t_loaded - t_read, 'split_and_build': t_built - t_loaded,
                   'iterations': t_trained - t_built, 'write': t_written - t_trained,
                   'evaluate': time.time() - t_written},
        'train_rmse': rmse(train_sse, pr.nnz), 'test_rmse': rmse(test_sse, int(warm.sum())),
        'train_ratings': int(pr.nnz), 'test_ratings': int(warm.sum()),
    }


# ---------------------------------------------------------------------------------
# implicit: AlternatingLeastSquares on CPU, 2 threads, BLAS pinned to 1 thread as
# implicit asks. Trained on the training ratings of the split (as confidences).
# ---------------------------------------------------------------------------------

def run_implicit(args, use_cg: bool) -> dict:
    import scipy.sparse
    from threadpoolctl import threadpool_limits
    import implicit
    from implicit.cpu.als import AlternatingLeastSquares
    ready = time.time()
    with threadpool_limits(1, 'blas'):
        t_read = time.time()
        u, i, r, test, nu, ni = read_split(args.data)
        train = ~test
        user_items = scipy.sparse.csr_matrix(
            (r[train].astype(np.float32), (u[train], i[train])), shape=(nu, ni))
        t_built = time.time()
        per_iter = []
        model = AlternatingLeastSquares(
            factors=args.rank, iterations=args.iters, use_cg=use_cg,
            num_threads=THREADS, calculate_training_loss=False, random_state=0)
        model.fit(user_items, show_progress=False,
                  callback=lambda it, elapsed, loss: per_iter.append(elapsed))
        t_trained = time.time()
        out = pathlib.Path(args.out) / 'model'
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / 'row.npy', model.user_factors)
        np.save(out / 'col.npy', model.item_factors)
        t_written = time.time()
    return {
        'ready': ready, 'read_start': t_read, 'model_written': t_written,
        'per_iteration': per_iter,
        'per_iteration_how': "median of implicit's per-iteration fit callback times",
        'phases': {'read_and_build_csr': t_built - t_read, 'fit': t_trained - t_built,
                   'write': t_written - t_trained},
        'train_rmse': None, 'test_rmse': None,
        'version': implicit.__version__,
        'note': 'implicit-feedback objective on the ratings as confidences: RMSE not comparable',
    }


# ---------------------------------------------------------------------------------
# Spark MLlib ALS, local[2], explicit feedback, regParam 0.1.
# ---------------------------------------------------------------------------------

def spark_session(driver_memory: str):
    """A local[THREADS] SparkSession, UI off, logs at ERROR."""
    from pyspark.sql import SparkSession
    spark = (SparkSession.builder.master(f'local[{THREADS}]').appName('wals-bench')
             .config('spark.driver.memory', driver_memory)
             .config('spark.ui.enabled', 'false')
             .config('spark.ui.showConsoleProgress', 'false')
             .config('spark.sql.shuffle.partitions', str(4 * THREADS))
             .getOrCreate())
    spark.sparkContext.setLogLevel('ERROR')
    return spark


def spark_split(spark, name: str):
    """(train, test) cached DataFrames (u, i, r) of NAME.split.tsv and their counts."""
    from pyspark.sql import functions as F, types as T
    schema = T.StructType([T.StructField(c, T.IntegerType()) for c in ('u', 'i', 'mr', 't')])
    df = (spark.read.csv(str(paths(name)['split']), sep='\t', schema=schema)
          .withColumn('r', F.col('mr') / 1000.0))
    train = df.filter('t = 0').select('u', 'i', 'r').cache()
    test = df.filter('t = 1').select('u', 'i', 'r').cache()
    return train, test, train.count(), test.count()


def spark_timed_fit(make_als, train, n: int) -> dict:
    """fit(maxIter=n) of make_als(iters), timed, with its marginal s/iter.

    A warm-up fit, discarded: without it fit(1) alone pays the JIT compilation of
    the ALS code, and the marginal (fit(n) - fit(1)) / (n - 1) comes out low by that
    cost / (n - 1)."""
    t_warm = time.time()
    make_als(1).fit(train)
    t0 = time.time()
    make_als(1).fit(train)
    t1 = time.time()
    model = make_als(n).fit(train)
    t2 = time.time()
    fit1, fitn = t1 - t0, t2 - t1
    return {'model': model, 'fit_end': t2, 'fit_n': fitn,
            'seconds_per_iteration': (fitn - fit1) / (n - 1) if n > 1 else fitn,
            'per_iteration_how': f'marginal: (fit(maxIter={n}) - fit(maxIter=1)) / {n - 1}, '
                                 'both after a discarded warm-up fit(maxIter=1)',
            'phases': {'fit_warmup': t0 - t_warm, 'fit_1': fit1, f'fit_{n}': fitn}}


def run_spark(args) -> dict:
    import pyspark
    from pyspark.ml.evaluation import RegressionEvaluator
    from pyspark.ml.recommendation import ALS
    spark = spark_session(args.spark_driver_memory)
    ready = time.time()

    t_read = time.time()
    train, test, n_train, n_test = spark_split(spark, args.data)
    t_loaded = time.time()

    def als(iters):
        return ALS(rank=args.rank, maxIter=iters, regParam=0.1, userCol='u', itemCol='i',
                   ratingCol='r', implicitPrefs=False, coldStartStrategy='drop', seed=0)
    fit = spark_timed_fit(als, train, args.iters)
    model, t2, fitn = fit['model'], fit['fit_end'], fit['fit_n']
    out = pathlib.Path(args.out) / 'spark_model'
    model.write().overwrite().save(str(out))
    t_written = time.time()

    ev = RegressionEvaluator(metricName='rmse', labelCol='r', predictionCol='prediction')
    train_rmse = ev.evaluate(model.transform(train))
    test_rmse = ev.evaluate(model.transform(test))
    warm = model.transform(test).count()
    result = {
        'ready': ready,
        # read -> model on disk = load + fit(maxIter=N) + write (the fit(1)s excluded).
        'read_start': t_read, 'model_written': t_written,
        'read_to_model_override': (t_loaded - t_read) + fitn + (t_written - t2),
        'per_iteration': None, 'seconds_per_iteration': fit['seconds_per_iteration'],
        'per_iteration_how': fit['per_iteration_how'],
        'phases': {'load': t_loaded - t_read, **fit['phases'], 'write': t_written - t2},
        'train_rmse': train_rmse, 'test_rmse': test_rmse,
        'train_ratings': n_train, 'test_ratings': warm,
        'version': pyspark.__version__,
        'java': spark.sparkContext._jvm.System.getProperty('java.version'),
    }
    spark.stop()
    return result


# ---------------------------------------------------------------------------------
# pandas_read: the yardstick of reading: pandas.read_csv of the same raw file the
# pipeline reads (every column, types inferred, the C engine), as a user of pandas
# would load it. Reported as read→model so it sits beside the pipeline's read→blocks.
# ---------------------------------------------------------------------------------

def run_pandas_read(args) -> dict:
    import pandas as pd
    ready = time.time()
    t0 = time.time()
    df = pd.read_csv(paths(args.data)['raw'], sep='\t', header=None, engine='c')
    t1 = time.time()
    return {'ready': ready, 'read_start': t0, 'model_written': t1,
            'per_iteration': [], 'per_iteration_how': 'n/a (reading only)',
            'phases': {'read_csv': t1 - t0}, 'train_rmse': None, 'test_rmse': None,
            'note': f'{len(df):,} rows x {df.shape[1]} columns'}


# ---------------------------------------------------------------------------------
# numpy floor: per iteration, the kernels no exact ALS in numpy/scipy can skip
# even if every per-row Gramian were free: the right-hand sides (sparse A @ V and
# Aᵀ @ U) and one batched Cholesky-class solve of every user's and item's k×k system.
# ---------------------------------------------------------------------------------

def run_numpy_floor(args) -> dict:
    import scipy.sparse
    ready = time.time()
    u, i, r, test, nu, ni = read_split(args.data)
    train = ~test
    a = scipy.sparse.csr_matrix((r[train], (u[train], i[train])), shape=(nu, ni))
    at = a.T.tocsr()
    k = args.rank
    rng = np.random.default_rng(0)
    uf = rng.standard_normal((nu, k))
    vf = rng.standard_normal((ni, k))
    spd = rng.standard_normal((k, k))
    spd = spd @ spd.T + k * np.eye(k)
    chunk = 8192
    times = []
    for _ in range(args.iters):
        t0 = time.time()
        for side_a, other, n in ((a, vf, nu), (at, uf, ni)):
            rhs = side_a @ other
            x = np.empty_like(rhs)
            for lo in range(0, n, chunk):
                hi = min(lo + chunk, n)
                lhs = np.broadcast_to(spd, (hi - lo, k, k)).copy()
                x[lo:hi] = np.linalg.solve(lhs, rhs[lo:hi, :, None])[..., 0]
        times.append(time.time() - t0)
    return {'ready': ready, 'read_start': None, 'model_written': None,
            'per_iteration': times,
            'per_iteration_how': 'median; rhs SpMM both sides + batched np.linalg.solve '
                                 'of all (users + items) k×k systems, Gramians not built',
            'phases': {}, 'train_rmse': None, 'test_rmse': None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('method', choices=('wals_core', 'wals_core_cg', 'implicit_exact',
                                       'implicit_cg', 'spark', 'numpy_floor', 'pandas_read'))
    ap.add_argument('--data', required=True)
    ap.add_argument('--rank', type=int, required=True)
    ap.add_argument('--iters', type=int, default=10)
    ap.add_argument('--out', required=True)
    ap.add_argument('--result', required=True)
    ap.add_argument('--spark_driver_memory', default='6g')
    args = ap.parse_args(argv)
    runners = {'wals_core': run_wals_core, 'wals_core_cg': run_wals_core, 'spark': run_spark,
               'pandas_read': run_pandas_read,
               'implicit_exact': lambda a: run_implicit(a, use_cg=False),
               'implicit_cg': lambda a: run_implicit(a, use_cg=True),
               'numpy_floor': run_numpy_floor}
    write_result(runners[args.method](args), args.result)
    return 0


def write_result(result: dict, path: str) -> None:
    """Completes a worker's result (s/iter as the median of per_iteration unless
    measured otherwise, threads, code location) and writes it as JSON."""
    result['process_start'] = T_START
    per = result.get('per_iteration')
    if result.get('seconds_per_iteration') is None and per:
        result['seconds_per_iteration'] = statistics.median(per)
    result['threads'] = THREADS
    result['code_root'] = str(CODE_ROOT)
    import wals_core
    result['wals_core_file'] = wals_core.__file__
    pathlib.Path(path).write_text(json.dumps(result, indent=2, default=float))


if __name__ == '__main__':
    sys.exit(main())
