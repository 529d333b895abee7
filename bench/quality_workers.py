"""One case of the quality benchmark, run in its own process by run_quality.py.

    python bench/quality_workers.py METHOD --data NAME --out DIR --result FILE [...]

METHOD:
  implicit_als    `implicit` AlternatingLeastSquares (CPU, its defaults: CG, λ 0.01),
                  factors 32, 15 iterations, trained on log1p(rating) with alpha 1, so
                  confidence = 1 + log1p(r)
  spark_explicit  Spark MLlib ALS local[2], explicit, rank 10, regParam 0.1, 15 it,
                  coldStartStrategy drop
  spark_implicit  Spark MLlib ALS local[2], implicitPrefs, rank 32, alpha 1 on
                  log1p(rating), regParam 0.1, 15 it
  inmem           the project's in-memory trainer (wals_core.train) for --model with the
                  mode's CLI defaults (cross-check of the CLI)
  evaluate        the ranking metrics and RMSE of a `python -m pipeline.train` output
                  (--model_dir DIR/model), computed here as for every other method

Every method's factors are scored by bench/quality_eval.py (the project's top_k and
ranking_sums on the same split); the result JSON has the timing fields of
bench/workers.py (ready, per_iteration or seconds_per_iteration, phases) plus
`ranking` and, where it applies, `rmse`.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from workers import (THREADS, spark_session, spark_split, spark_timed_fit,  # noqa: E402
                     write_result)
from prepare_data import read_ratings, paths  # noqa: E402
import quality_eval as qe  # noqa: E402

# The project's mode defaults (the CLI's, see notes/INTERFACES.md): used by `inmem`.
MODE_DEFAULTS = {
    'wals': {},
    'implicit': dict(latent_factors=32, num_iters=15, regularization=1.0, alpha=1.0,
                     epsilon=1.0, confidence='log'),
    'explicit': dict(latent_factors=10, num_iters=15, regularization=0.1),
}


def _vocab(name: str):
    """Sorted int64 user and item IDs: the dense indices of NAME.split.tsv."""
    users, items, _ = read_ratings(paths(name)['raw'])
    return np.unique(users), np.unique(items)


def _metrics(split: qe.Split, u, v, k: int, offsets=None, predict=None) -> dict:
    t = time.time()
    out = {'ranking': qe.ranking(split, u, v, k, 0.0, offsets)}
    if predict is not None:
        out['rmse'] = qe.rmse(split, predict)
    out['evaluate_seconds'] = time.time() - t
    return out


# ---------------------------------------------------------------------------------
# implicit
# ---------------------------------------------------------------------------------

def run_implicit_als(args) -> dict:
    import scipy.sparse
    from threadpoolctl import threadpool_limits
    import implicit
    from implicit.cpu.als import AlternatingLeastSquares
    ready = time.time()
    split = qe.Split.load(args.data)
    conf = np.log1p(split.train_r).astype(np.float32)      # C = 1 + alpha * log1p(r)
    user_items = scipy.sparse.csr_matrix((conf, (split.train_u, split.train_i)),
                                         shape=(split.n_users, split.n_items))
    per_iter = []
    model = AlternatingLeastSquares(factors=args.rank, iterations=args.iters, alpha=1.0,
                                    num_threads=THREADS, calculate_training_loss=False,
                                    random_state=0)
    t0 = time.time()
    with threadpool_limits(1, 'blas'):                      # as implicit asks
        model.fit(user_items, show_progress=False,
                  callback=lambda it, elapsed, loss: per_iter.append(elapsed))
    fit = time.time() - t0
    res = {'ready': ready, 'per_iteration': per_iter,
           'per_iteration_how': "median of implicit's per-iteration fit callback times",
           'phases': {'fit': fit}, 'version': implicit.__version__,
           'params': {'factors': args.rank, 'iterations': args.iters, 'alpha': 1.0,
                      'regularization': model.regularization, 'use_cg': model.use_cg,
                      'confidence': '1 + log1p(r)'}}
    res.update(_metrics(split, model.user_factors, model.item_factors, args.rank_k))
    return res


# ---------------------------------------------------------------------------------
# Spark
# ---------------------------------------------------------------------------------

def _spark_factors(df, n: int, rank: int) -> np.ndarray:
    """Dense (n × rank) float32 factors from a Spark (id, features) DataFrame; rows
    Spark has no factors for (no training rating) stay zero."""
    out = np.zeros((n, rank), np.float32)
    rows = df.collect()
    if rows:
        ids = np.fromiter((r['id'] for r in rows), np.int64, len(rows))
        out[ids] = np.asarray([r['features'] for r in rows], np.float32)
    return out


def run_spark_als(args, implicit_prefs: bool) -> dict:
    import pyspark
    from pyspark.ml.evaluation import RegressionEvaluator
    from pyspark.ml.recommendation import ALS
    from pyspark.sql import functions as F
    spark = spark_session(args.spark_driver_memory)
    # Without a checkpoint folder ALS never cuts its RDD lineage (checkpointInterval
    # 10 needs one): at 15 iterations on 10m ratings the lineage overflows the JVM
    # stack (StackOverflowError). Spark's documented remedy.
    spark.sparkContext.setCheckpointDir(str(pathlib.Path(args.out).resolve() / 'checkpoints'))
    ready = time.time()
    train, test, n_train, n_test = spark_split(spark, args.data)
    if implicit_prefs:      # confidence 1 + alpha * log1p(r), preference r > 0
        train = train.withColumn('r', F.log1p('r')).cache()
        train.count()

    def als(iters):
        return ALS(rank=args.rank, maxIter=iters, regParam=0.1, userCol='u', itemCol='i',
                   ratingCol='r', implicitPrefs=implicit_prefs, alpha=1.0,
                   coldStartStrategy='drop', seed=0)
    fit = spark_timed_fit(als, train, args.iters)
    model = fit.pop('model')
    res = {'ready': ready, 'per_iteration': None,
           'seconds_per_iteration': fit['seconds_per_iteration'],
           'per_iteration_how': fit['per_iteration_how'], 'phases': fit['phases'],
           'version': pyspark.__version__,
           'java': spark.sparkContext._jvm.System.getProperty('java.version'),
           'params': {'rank': args.rank, 'maxIter': args.iters, 'regParam': 0.1,
                      'implicitPrefs': implicit_prefs, 'alpha': 1.0,
                      'ratings': 'log1p(r)' if implicit_prefs else 'r'}}
    if not implicit_prefs:
        ev = RegressionEvaluator(metricName='rmse', labelCol='r', predictionCol='prediction')
        res['spark_test_rmse'] = ev.evaluate(model.transform(test))
    split = qe.Split.load(args.data)
    u = _spark_factors(model.userFactors, split.n_users, args.rank)
    v = _spark_factors(model.itemFactors, split.n_items, args.rank)
    spark.stop()
    res.update(_metrics(split, u, v, args.rank_k,
                        predict=None if implicit_prefs else qe.dot_predictor(u, v)))
    return res


# ---------------------------------------------------------------------------------
# The project: in-memory trainer, and evaluation of a pipeline output
# ---------------------------------------------------------------------------------

def run_inmem(args) -> dict:
    from wals_core import objectives
    from wals_core.init import initial_factors
    from wals_core.params import WalsParams
    from wals_core.train import Problem, initial_state, train
    from wals_core.vocab import Vocabulary
    from pipeline.runners.memory_tuning import tune_malloc
    tune_malloc()                  # as the Beam command line does
    ready = time.time()
    split = qe.Split.load(args.data)
    uvoc, ivoc = _vocab(args.data)
    kw = dict(MODE_DEFAULTS[args.model], model=args.model)
    if args.rank:
        kw['latent_factors'] = args.rank
    if args.iters:
        kw['num_iters'] = args.iters
    params = WalsParams(**kw)
    k = params.latent_factors
    problem = Problem.build(split.train_u, split.train_i, split.train_r, split.n_users,
                            split.n_items, params)
    u0, v0 = initial_state(initial_factors(Vocabulary(uvoc).hashes, k, 0, 'row'),
                           initial_factors(Vocabulary(ivoc).hashes, k, 0, 'col'), params)
    stamps = [time.time()]

    def on_half_step(it, side, u, v):
        if side == 'col':
            stamps.append(time.time())
    u, v = train(problem, params, u0, v0, on_half_step)
    uf, ub = objectives.split_bias(u, params)
    vf, vb = objectives.split_bias(v, params)
    mu = problem.global_mean if objectives.has_bias(params) else 0.0
    res = {'ready': ready, 'per_iteration': list(np.diff(stamps)),
           'per_iteration_how': 'median of wall times between column half-step ends',
           'phases': {'iterations': stamps[-1] - stamps[0]}, 'params': params.as_dict()}
    res.update(_metrics(split, uf, vf, args.rank_k, offsets=vb,
                        predict=None if params.model == 'implicit' else
                        qe.dot_predictor(uf, vf, mu, ub, vb)))
    return res


def _dense(model_dir: pathlib.Path, side: str, vocab: np.ndarray, name: str):
    """A model file of one side (row.npy, row_bias.npy, ...) re-indexed to the split's
    dense order (rows of IDs the model lacks are zero)."""
    ids = np.load(model_dir / ('user.npy' if side == 'row' else 'item.npy'), allow_pickle=False)
    ids = np.asarray(ids).astype(np.int64)
    idx = np.searchsorted(vocab, ids)
    if np.any(idx >= len(vocab)) or np.any(vocab[np.minimum(idx, len(vocab) - 1)] != ids):
        raise SystemExit(f'{model_dir}: {side} IDs are not those of the data set')
    arr = np.load(model_dir / name)
    out = np.zeros((len(vocab),) + arr.shape[1:], arr.dtype)
    out[idx] = arr
    return out


def run_evaluate(args) -> dict:
    ready = time.time()
    model_dir = pathlib.Path(args.model_dir)
    metrics = json.loads((model_dir.parent / 'metrics.json').read_text())
    mode = metrics.get('model', 'wals')
    split = qe.Split.load(args.data)
    uvoc, ivoc = _vocab(args.data)
    u = _dense(model_dir, 'row', uvoc, 'row.npy')
    v = _dense(model_dir, 'col', ivoc, 'col.npy')
    predict, offsets = None, None
    if mode == 'explicit':
        ub = _dense(model_dir, 'row', uvoc, 'row_bias.npy')
        offsets = _dense(model_dir, 'col', ivoc, 'col_bias.npy')
        mu = float(np.load(model_dir / 'global_mean.npy'))
        predict = qe.dot_predictor(u, v, mu, ub, offsets)
    elif mode == 'wals':
        predict = qe.dot_predictor(u, v)
    res = {'ready': ready, 'per_iteration': None, 'model': mode}
    res.update(_metrics(split, u, v, args.rank_k, offsets=offsets, predict=predict))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('method', choices=('implicit_als', 'spark_explicit', 'spark_implicit',
                                       'inmem', 'evaluate'))
    ap.add_argument('--data', required=True)
    ap.add_argument('--rank', type=int, default=0, help='factors (0: the method default)')
    ap.add_argument('--iters', type=int, default=0, help='iterations (0: the method default)')
    ap.add_argument('--model', default='wals', help='inmem: the project mode')
    ap.add_argument('--model_dir', help='evaluate: a pipeline output model/ folder')
    ap.add_argument('--rank_k', type=int, default=10)
    ap.add_argument('--out', required=True)
    ap.add_argument('--result', required=True)
    ap.add_argument('--spark_driver_memory', default='6g')
    args = ap.parse_args(argv)
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.method in ('implicit_als', 'spark_implicit', 'spark_explicit'):
        args.rank = args.rank or (10 if args.method == 'spark_explicit' else 32)
        args.iters = args.iters or 15
    runners = {'implicit_als': run_implicit_als, 'inmem': run_inmem,
               'spark_explicit': lambda a: run_spark_als(a, implicit_prefs=False),
               'spark_implicit': lambda a: run_spark_als(a, implicit_prefs=True),
               'evaluate': run_evaluate}
    write_result(runners[args.method](args), args.result)
    return 0


if __name__ == '__main__':
    sys.exit(main())
